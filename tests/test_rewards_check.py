"""`rft reward check`: statistics, warnings, and the from-file mode on hand-written answers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from rft.config import ConfigError, RewardConfig
from rft.reward_check import (
    configure_parser,
    format_report,
    recipe_reward_range,
    run,
    summarize,
    summarize_scores,
)
from rft.scoring import RewardScorer, ScoreOutput
from tests.conftest import REPO, tiny_recipe


def test_statistics_and_zero_variance_share():
    report = summarize(
        totals=[[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0]],
        per_function={"correct": [[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [None, None]]},
        reward_range=(0.0, 1.0),
    )
    assert report.groups == 3 and report.completions == 8
    assert report.total.mean == pytest.approx(4 / 8)
    assert report.total.zero_variance_share == pytest.approx(2 / 3)
    correct = report.rewards[0]
    assert correct.none_share == pytest.approx(2 / 8)
    assert correct.zero_variance_share == pytest.approx(1 / 2)  # the all-None group does not count
    assert correct.std == pytest.approx((4 / 6 * (1 - 4 / 6)) ** 0.5)
    assert any("67% of groups have the same total reward" in w for w in report.warnings)
    assert not any("RFT may not be needed" in w or "unreachable" in w for w in report.warnings)


def test_warnings_near_the_maximum_and_near_zero():
    aced = summarize([[1.0, 1.0], [1.0, 0.9]], {}, reward_range=(0.0, 1.0))
    assert any("RFT may not be needed" in w for w in aced.warnings)
    unreachable = summarize([[0.0, 0.01], [0.0, 0.0]], {}, reward_range=(0.0, 1.0))
    assert any("the reward may be unreachable" in w for w in unreachable.warnings)
    no_range = summarize([[0.0, 0.0]], {}, reward_range=None)
    assert any("unreachable" in w for w in no_range.warnings)
    assert "pass --reward-range" in format_report(no_range)
    mixed = summarize([[0.0, 1.0], [1.0, 0.0]], {}, reward_range=(0.0, 1.0))
    assert mixed.warnings == []
    assert "No warnings." in format_report(mixed)


def test_summarize_scores_groups_a_scored_batch():
    output = ScoreOutput(total=[1.0, 0.0, 1.0, 1.0, 1.0], per_function={"r": [1.0, 0.0, 1.0, 1.0, 1.0]},
                         failed=[False, False, False, True, True])
    report = summarize_scores(output, [2, 3], reward_range=(0.0, 1.0))
    assert report.total.zero_variance_share == 0.5 and report.failed_share == 0.4
    with pytest.raises(ValueError, match="add up to 4"):
        summarize_scores(output, [2, 2])


def test_reward_range_from_declared_ranges_and_weights():
    scorer = RewardScorer([RewardConfig(fn="rewards.maths:math_answer"),
                           RewardConfig(fn="rewards.maths:gsm8k_format", weight=-0.5)])
    assert recipe_reward_range(scorer) == (-0.5, 1.0)
    unknown = RewardScorer([RewardConfig(fn="rewards.policy:blocked_terms", kwargs={"terms": ["x"]})])
    assert recipe_reward_range(unknown) is None


def write_recipe(tmp_path: Path) -> Path:
    recipe = {
        "data": {"train": "unused.jsonl"},
        "rewards": [
            {"fn": "rewards.maths:math_answer", "kwargs": {"answer_column": "answer"}},
            {"fn": "rewards.maths:gsm8k_format", "weight": 0.5},
        ],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return parser.parse_args(argv)


def test_file_mode_unit_tests_a_reward(tmp_path, capsys):
    cases = [
        {"prompt": "What is 7 + 5?", "completion": "7 + 5 = 12\n#### 12", "answer": "#### 12",
         "expect": {"math_answer": 1, "total": 1.5}},
        {
            "prompt": "What is 7 + 5?", "completion": "It is 13.", "answer": "#### 12",
            "expect": {"total": [0, 0.1]},
        },
        {"messages": [{"role": "user", "content": "2 * 21?"}], "completion": "\\boxed{42}", "answer": "42",
         "expect": 1.0},
    ]
    completions = tmp_path / "answers.jsonl"
    completions.write_text("\n".join(json.dumps(c) for c in cases) + "\n")
    report_path = tmp_path / "report.json"
    code = run(
        parse([str(write_recipe(tmp_path)), "--completions", str(completions), "--json", str(report_path)])
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "line 1: math_answer=1.000  gsm8k_format=1.000  total=1.500  PASS" in printed
    assert "All expectations met." in printed
    assert "Total reward range: 0 .. 1.5" in printed
    report = json.loads(report_path.read_text())
    assert report["groups"] == 2 and report["completions"] == 3

    cases[1]["expect"] = {"math_answer": 1}  # a wrong expectation: the reward is right to say 0
    completions.write_text("\n".join(json.dumps(c) for c in cases) + "\n")
    assert run(parse([str(write_recipe(tmp_path)), "--completions", str(completions)])) == 1
    printed = capsys.readouterr().out
    assert (
        "line 2: math_answer=0.000  gsm8k_format=0.000  total=0.000  FAIL: math_answer expected 1" in printed
    )
    assert "1 expectation(s) FAILED." in printed


def test_file_mode_reports_bad_lines_by_number(tmp_path):
    completions = tmp_path / "answers.jsonl"
    completions.write_text(
        '{"prompt": "q", "completion": "a", "answer": "1"}\n'
        "not json\n"
        '{"prompt": "q", "answer": "1"}\n'
        '{"prompt": "q", "completion": "a", "expect": {"nonexistent": 1}}\n'
    )
    with pytest.raises(ConfigError) as error:
        run(parse([str(write_recipe(tmp_path)), "--completions", str(completions)]))
    message = str(error.value)
    assert f"{completions}:2: not JSON" in message
    assert f"{completions}:3: field completion: missing" in message
    assert f"{completions}:4: field expect.nonexistent: no such reward" in message
    with pytest.raises(ConfigError, match="--reward-range"):
        run(
            parse([
                str(write_recipe(tmp_path)), "--completions", str(completions), "--reward-range", "1", "0"
            ])
        )


def column_recipe(tmp_path: Path, model: str, **sections) -> Path:
    from tests.conftest import ADDITION_TRAIN, ARITHMETIC_REWARD

    recipe = {
        "model": {"name_or_path": model},
        "data": {"train": str(ADDITION_TRAIN), "eval_size": 4},
        "rewards": [{"fn": ARITHMETIC_REWARD}, {"fn": "rewards.maths:math_answer"}],
        **sections,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_a_missing_column_is_found_before_any_model_loads(tmp_path):
    """math_answer reads `reference_answer` by default; the addition rows have `answer`. The model path does
    not exist: reaching it would be a different error, so the column check must come first."""
    from rft.config import load_config
    from rft.scoring import RewardError
    from rft.trainer import Trainer

    recipe = column_recipe(tmp_path, str(tmp_path / "no-such-model"))
    with pytest.raises(RewardError,
                                          match=r"reward math_answer: answer_column "
                                          r"'reference_answer' is in no row of "
                                          r"data.train .*its rows have: answer, phrasing, prompt"):
        run(parse([str(recipe)]))
    with pytest.raises(RewardError, match="answer_column 'reference_answer' is in no row"):
        Trainer(load_config(recipe))
    fixed = load_config(recipe, ["rewards.1.kwargs={answer_column: answer}"])
    # a kwarg that names a real column passes
    RewardScorer(fixed.rewards).check_columns({"rows": [{"answer": 1}]})


def test_sampled_check_shows_samples_truncation_and_the_likely_cause(tmp_path, tiny_model_dir, capsys):
    """A random tiny model never stops within 4 tokens: every completion is truncated, nothing scores."""
    recipe = column_recipe(
        tmp_path, str(tiny_model_dir), rollout={"engine": "transformers", "max_new_tokens": 4}
    )
    report_path = tmp_path / "report.json"
    assert run(parse([str(recipe), "--set", "rewards.1.kwargs={answer_column: answer}", "--prompts", "2",
                      "--group-size", "3", "--json", str(report_path)])) == 0
    printed = capsys.readouterr().out
    assert "Truncated at max_new_tokens: 100% of completions" in printed
    assert "Likely cause: truncation, 100% of completions were cut" in printed
    assert "Samples (each reward's highest- and lowest-scored completions):" in printed
    report = json.loads(report_path.read_text())
    assert report["completions"] == 6 and report["truncated_share"] == 1.0
    assert report["samples"] and all(s["truncated"] for s in report["samples"])
    assert set(report["samples"][0]["scores"]) == {"final_number_correct", "math_answer", "total"}


def test_likely_cause_of_an_unreachable_reward():
    def warning(per_function: dict, truncated_share: float | None) -> str:
        report = summarize(
            [[0.0, 0.0], [0.0, 0.0]], per_function, (0.0, 1.0), truncated_share=truncated_share
        )
        return next(w for w in report.warnings if w.startswith("No completion scored"))

    zeros = {"correct": [[0.0, 0.0], [0.0, 0.0]]}
    assert "Likely cause: truncation, 75% of completions" in warning(zeros, 0.75)
    absent = {"correct": [[0.0, 0.0], [0.0, 0.0]], "cited": [[None, None], [None, None]]}
    assert "Likely cause: a column, cited returned None" in warning(absent, 0.1)
    assert "Likely cause: the format" in warning(zeros, 0.0)


def test_sampled_check_of_an_agent_recipe_shows_whole_conversations(tmp_path, embedded_model_dir, capsys):
    """Episodes through `rft reward check`: the environment's rewards listed, samples as conversations."""
    recipe = tiny_recipe(
        embedded_model_dir, tmp_path / "run", data={"system_prompt": "Answer with the number only."},
        rollout={"engine": "transformers", "max_new_tokens": 24, "max_turns": 2, "temperature": 0.7},
    )
    recipe["environment"], recipe["rewards"] = f"{REPO / 'tests' / 'agent_envs.py'}:NeverDone", []
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(recipe))
    report_path = tmp_path / "report.json"
    assert run(parse([str(path), "--prompts", "2", "--group-size", "2", "--json", str(report_path)])) == 0
    report = json.loads(report_path.read_text())
    assert report["completions"] == 4
    assert all(set(sample["scores"]) == {"environment", "total"} for sample in report["samples"])
    # NeverDone pays 0.25 a turn: an episode of two turns shows both, and the environment's turn between.
    two_turns = [s for s in report["samples"] if s["scores"]["environment"] == 0.5]
    assert all("user: Go on." in sample["completion"] for sample in two_turns)
