"""Held-out evaluation: the statistics against hand-computed values, slices, the baseline cache,
`rft eval`."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from rft.config import ConfigError, DataConfig, RewardConfig, load_config
from rft.data import prepare_examples
from rft.eval_command import configure_parser, run
from rft.eval_plans import EvalError, EvalPlan, eval_plans, resolve_slices
from rft.evaluation import Evaluator
from rft.models import load_checkpoint_policy
from rft.rollout.base import RolloutOutput, SamplingSettings
from rft.scoring import RewardScorer
from rft.stats import compare, mean_and_stderr, pass_at_k
from rft.trajectories import SingleTurn
from tests.conftest import ADDITION_HELDOUT, ARITHMETIC_REWARD, tiny_recipe

# A reward with graded values on a random tiny model (the arithmetic reward is always 0 there).
LENGTH_REWARD = '''
def text_length(completions, **_):
    texts = [c if isinstance(c, str) else "".join(m["content"] for m in c) for c in completions]
    return [min(len(text), 40) / 40 for text in texts]
'''

JUDGE_METRIC = '''
def judge(completions, **_):
    """Stands in for an LLM judge: None ("not applicable") on a 7, else 0.1 per character."""
    texts = [c if isinstance(c, str) else "".join(m["content"] for m in c) for c in completions]
    return [None if text == "7" else 0.1 * len(text) for text in texts]
'''


class ScriptedEngine:
    """Answers each prompt with fixed completions: the evaluation maths can then be checked by hand."""

    name = "scripted"

    def __init__(self, tokenizer, answers: dict[tuple[int, ...], list[str]]):
        self.tokenizer = tokenizer
        self.answers = answers
        self.calls = 0

    def generate(self, prompt_ids, n: int, sampling: SamplingSettings) -> RolloutOutput:
        self.calls += 1
        completions = [
            self.tokenizer.encode(self.answers[tuple(ids)][j], add_special_tokens=False)
            for ids in prompt_ids for j in range(n)
        ]
        return RolloutOutput(completions, None, [False] * len(completions))


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir: Path):
    from rft.models import load_tokenizer

    return load_tokenizer(str(embedded_model_dir))


def _plan(**changes) -> EvalPlan:
    settings = dict(
        mode="sampled", sampling=SamplingSettings(max_new_tokens=8), samples_per_prompt=4, pass_k=(1, 2, 4),
        pass_threshold=1.0, exact_match="answer", seed=0, batch_size=3, keep_samples=2,
    )
    return EvalPlan(**{**settings, **changes})


def test_pass_at_k_matches_the_unbiased_estimator_by_hand() -> None:
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0  # fewer failures than draws: a pass is certain


def test_mean_and_stderr_by_hand() -> None:
    mean, stderr = mean_and_stderr([0.75, 0.25, 0.0, 1.0])
    assert mean == pytest.approx(0.5)
    assert stderr == pytest.approx(math.sqrt(0.625 / 3 / 4))
    assert mean_and_stderr([0.3]) == (0.3, 0.0)


def test_evaluate_reports_reward_exact_match_pass_at_k_metrics_and_slices(tmp_path: Path, tokenizer) -> None:
    rows = [
        {"prompt": "What is 1 + 1?", "answer": 2, "domain": "math"},
        {"prompt": "What is 2 + 2?", "answer": 4, "domain": "math"},
        {"prompt": "What is 3 + 3?", "answer": 6, "domain": "trivia"},
        {"prompt": "What is 4 + 4?", "answer": 8, "domain": "trivia"},
    ]
    examples = prepare_examples(
        [(f"rows:{i}", r) for i, r in enumerate(rows)], DataConfig(train="x"), tokenizer, "held-out"
    )
    completions = [
        ["The answer is 2.", "2", "3", "2"], ["4", "5", "5", "5"], ["7", "7", "7", "7"], ["8", "8", "8", "8"]
    ]
    engine = ScriptedEngine(
        tokenizer, {tuple(e.prompt_ids): c for e, c in zip(examples, completions, strict=True)}
    )
    (tmp_path / "judge.py").write_text(JUDGE_METRIC)
    scorer = RewardScorer([RewardConfig(fn=ARITHMETIC_REWARD)])
    judge = RewardScorer([RewardConfig(fn=f"{tmp_path / 'judge.py'}:judge")])

    plan = _plan()
    evaluator = Evaluator(engine, SingleTurn(tokenizer), examples, scorer, [plan], ["domain"], judge)
    result = evaluator.evaluate("base", plan)

    # Per prompt: reward .75 .25 0 1; exact match .5 .25 0 1 ("The answer is 2." scores but is not exact).
    assert engine.calls == 2  # batch_size 3 over 4 prompts
    assert result.mean == pytest.approx(0.5)
    assert result.stderr == pytest.approx(math.sqrt(0.625 / 3 / 4))
    assert result.count == 4
    assert result.stats["exact_match"].mean == pytest.approx((0.5 + 0.25 + 0 + 1) / 4)
    # pass@1 is the pass rate; pass@2 for prompt 2 (1 of 4 pass) is 1 - C(3,2)/C(4,2) = 0.5.
    assert result.stats["pass@1"].mean == pytest.approx(0.5)
    assert result.stats["pass@2"].mean == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert result.stats["pass@4"].mean == pytest.approx(0.75)
    # The judge is "not applicable" on prompt 3 (all 7s): its mean is over 3 prompts.
    judge_stat = result.stats["metric/judge"]
    assert judge_stat.count == 3
    assert judge_stat.mean == pytest.approx(((1.6 + 0.1 * 3) / 4 + 0.1 + 0.1) / 3)
    math_slice, trivia_slice = (
        result.slices["domain"]["math"]["reward"], result.slices["domain"]["trivia"]["reward"]
    )
    assert (math_slice.mean, math_slice.stderr, math_slice.count) == pytest.approx((0.5, 0.25, 2))
    assert (trivia_slice.mean, trivia_slice.stderr, trivia_slice.count) == pytest.approx((0.5, 0.5, 2))
    assert [s["tags"] for s in result.samples] == [{"domain": "math"}, {"domain": "math"}]
    assert result.per_function == {"final_number_correct": pytest.approx(0.5)}


def test_compare_uses_the_two_sample_standard_error() -> None:
    def summary(mean: float, stderr: float, count: int, slice_mean: float) -> dict:
        stat = {"mean": mean, "stderr": stderr, "count": count}
        return {
            "stats": {"reward": stat}, "slices": {"domain": {"a": {"reward": {**stat, "mean": slice_mean}}}}
        }

    rows = compare(summary(0.5, 0.1, 10, 0.9), summary(0.8, 0.1, 10, 0.4), sigmas=2.0)
    overall, sliced = rows
    assert overall.change == pytest.approx(0.3)
    assert overall.stderr == pytest.approx(math.sqrt(0.02))
    assert overall.z == pytest.approx(0.3 / math.sqrt(0.02))  # 2.12
    assert overall.significant is True
    assert compare(summary(0.5, 0.1, 10, 0.9), summary(0.8, 0.1, 10, 0.4), sigmas=3.0)[0].significant is False
    assert (sliced.tag, sliced.value, sliced.significant) == ("domain", "a", True)
    assert sliced.change == pytest.approx(-0.5)
    # One prompt on a side: no noise estimate, so nothing is called significant.
    lonely = compare(summary(0.0, 0.0, 1, 0.0), summary(1.0, 0.0, 1, 1.0), sigmas=2.0)[0]
    assert lonely.z is None and lonely.significant is False


def test_auto_slices_pick_tags_not_answers(tokenizer) -> None:
    from rft.data import read_rows

    examples = prepare_examples(
        read_rows(str(ADDITION_HELDOUT), "test"), DataConfig(train="x"), None, "held-out"
    )
    assert resolve_slices(examples, "auto") == ["phrasing"]  # `answer` and `prompt` are not tags
    for example, score in zip(examples, range(len(examples)), strict=True):
        example.row["score"] = score / 10  # a float measurement
        example.row["uid"] = f"row-{score}"  # unique per row
        example.row["difficulty_level"] = score % 3
    assert resolve_slices(examples, "auto") == ["difficulty_level", "phrasing"]
    assert resolve_slices(examples, ["uid"]) == ["uid"]  # explicit fields are taken as given
    with pytest.raises(EvalError, match=r"eval\.slices: \['domain'\] on no held-out row"):
        resolve_slices(examples, ["domain"])


def test_eval_config_rejects_pass_k_without_samples() -> None:
    base = {"data": {"train": "x.jsonl"}, "rewards": [{"fn": ARITHMETIC_REWARD}]}
    with pytest.raises(ConfigError, match=r"eval: .*pass_k needs sampled completions"):
        load_config(raw={**base, "eval": {"pass_k": [1]}})
    with pytest.raises(ConfigError, match=r"between 1 and eval.samples_per_prompt \(2\)"):
        load_config(raw={**base, "eval": {"sampled": True, "samples_per_prompt": 2, "pass_k": [4]}})
    plans = eval_plans(
        load_config(raw={**base, "eval": {"sampled": True, "samples_per_prompt": 4, "pass_k": [4]}})
    )
    assert [(p.mode, p.samples_per_prompt, p.pass_k, p.sampling.greedy) for p in plans] == [
        ("greedy", 1, (), True), ("sampled", 4, (4,), False)
    ]


# ---------------------------------------------------------------------------- with a real (tiny) model
@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _write_recipe(tmp_path: Path, tiny_model_dir: Path, **sections) -> Path:
    (tmp_path / "length.py").write_text(LENGTH_REWARD)
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", **sections)
    recipe["rewards"] = [{"fn": f"{tmp_path / 'length.py'}:text_length", "version": "v1"}]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_sampled_evaluation_is_seeded_and_leaves_training_randomness_alone(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from rft.data import load_splits
    from rft.models import load_policy
    from rft.rollout.hf import TransformersEngine

    config = load_config(
        _write_recipe(tmp_path, tiny_model_dir, eval={"greedy": False, "samples_per_prompt": 2})
    )
    model, tokenizer = load_policy(config, torch.device("cpu"))
    _, held_out = load_splits(config.data, tokenizer, 0)
    scorer, (plan,) = RewardScorer(config.rewards), eval_plans(config)
    state = torch.get_rng_state()
    def evaluate(label: str, plan: EvalPlan):
        return Evaluator(
            TransformersEngine(model, tokenizer), SingleTurn(tokenizer), held_out, scorer, [plan]
        ).evaluate(label, plan)

    first = evaluate("a", plan)
    assert torch.equal(torch.get_rng_state(), state)
    second = evaluate("b", plan)
    assert first.rewards == second.rewards and first.stats["reward"].stderr > 0
    other_seed = evaluate("c", _replace_seed(plan, 1))
    assert other_seed.rewards != first.rewards


def _replace_seed(plan: EvalPlan, seed: int) -> EvalPlan:
    from dataclasses import replace

    return replace(plan, seed=seed)


def test_baseline_cache_hits_only_when_nothing_changed(
    tmp_path: Path, tiny_model_dir: Path, cache: Path
) -> None:
    from rft.data import load_splits
    from rft.models import load_policy
    from rft.rollout.hf import TransformersEngine

    recipe = _write_recipe(tmp_path, tiny_model_dir, eval={"slices": ["phrasing"]})

    def baseline(*overrides: str):
        config = load_config(recipe, list(overrides))
        model, tokenizer = load_policy(config, torch.device("cpu"))
        _, held_out = load_splits(config.data, tokenizer, 0)
        engine = TransformersEngine(model, tokenizer)
        scorer = RewardScorer(config.rewards)
        return Evaluator(
            engine, SingleTurn(tokenizer), held_out, scorer, eval_plans(config), ["phrasing"]
        ).baseline(config)

    first = baseline()
    assert not first[0].cached and len(list((cache / "baselines").glob("*.json"))) == 1
    again = baseline()
    assert again[0].cached and again[0].summary() | {"cached": False} == first[0].summary()
    assert again[0].rewards == first[0].rewards
    assert not baseline("data.max_eval_rows=6")[0].cached  # different held-out data
    assert not baseline("eval.max_new_tokens=3")[0].cached  # different evaluation settings
    (tmp_path / "length.py").write_text(LENGTH_REWARD.replace("40", "30"))
    assert not baseline()[0].cached  # the reward's source changed
    assert baseline("eval.baseline_cache=false")[0].cached is False
    assert len(list((cache / "baselines").glob("*.json"))) == 4


def _eval_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return parser.parse_args(list(argv))


def test_rft_eval_on_a_trained_checkpoint_reproduces_the_runs_scores(
    tmp_path: Path, tiny_model_dir: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rft.trainer import Trainer

    recipe = _write_recipe(
        tmp_path, tiny_model_dir, eval={"before_training": True, "after_training": True},
        training={"steps": 2, "learning_rate": 0.05}, output={"report": False},
    )
    results = Trainer(load_config(recipe)).train()
    run_dir = tmp_path / "run"
    assert not any(
        json.loads(line).get("cached") for line in (run_dir / "evaluations.jsonl").read_text().splitlines()
    )

    output = tmp_path / "scores.json"
    assert run(_eval_args(
        str(recipe), "--checkpoint", str(run_dir), "--compare-with-base", "--output", str(output)
    )) == 0
    printed = capsys.readouterr().out
    assert "before / after (greedy; larger than noise: |change| > 2 two-sample s.e.)" in printed
    assert "phrasing=compute" in printed
    scores = json.loads(output.read_text())
    # The base scores come from the cache the training run filled; the checkpoint's equal the run's own.
    assert scores["base"][0]["cached"] is True
    assert scores["base"][0]["mean"] == pytest.approx(results["before"]["mean"])
    assert scores["checkpoint_results"][0]["mean"] == pytest.approx(results["after"]["mean"])
    assert scores["checkpoint"] == str(run_dir / "final")
    comparison = scores["comparisons"]["greedy"]
    assert {row["tag"] for row in comparison} == {None, "phrasing"}
    assert comparison[0]["change"] == pytest.approx(results["after"]["mean"] - results["before"]["mean"])
    # What was evaluated really is the trained adapter, not the base model.
    config = load_config(recipe)
    model, _ = load_checkpoint_policy(config, run_dir / "final", torch.device("cpu"))
    assert any(p.abs().sum() > 0 for name, p in model.named_parameters() if "lora_B" in name)

    assert run(_eval_args(str(recipe))) == 0  # the base model alone, straight from the cache
    assert "[base] greedy, n=8 (cached)" in capsys.readouterr().out


def test_rft_eval_loads_a_full_fine_tuned_checkpoint(
    tmp_path: Path, tiny_model_dir: Path, cache: Path
) -> None:
    from rft.trainer import Trainer

    recipe = _write_recipe(
        tmp_path, tiny_model_dir, lora={"enabled": False}, eval={"after_training": True},
        training={"steps": 1, "learning_rate": 1e-3}, output={"report": False, "save_every": 1},
    )
    results = Trainer(load_config(recipe)).train()
    output = tmp_path / "scores.json"
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000001"
    assert run(_eval_args(str(recipe), "--checkpoint", str(checkpoint), "--output", str(output))) == 0
    scores = json.loads(output.read_text())
    assert "base" not in scores
    assert scores["checkpoint"] == str(checkpoint / "policy")
    assert scores["checkpoint_results"][0]["mean"] == pytest.approx(results["after"]["mean"])


def test_rft_eval_rejects_a_folder_without_weights_before_loading_a_model(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    recipe = _write_recipe(tmp_path, tiny_model_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"--checkpoint .*empty: no adapter_config.json or config.json"):
        run(_eval_args(str(recipe), "--checkpoint", str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match=r"eval\.slices: \['domain'\] on no held-out row"):
        run(_eval_args(str(recipe), "--set", "eval.slices=[domain]"))
    with pytest.raises(
        ConfigError,
        match=r"eval\.exact_match: field 'solution' missing on 8 held-out row\(s\), "
        r"e\.g\. .*addition_heldout\.jsonl:1",
    ):
        run(_eval_args(str(recipe), "--set", "eval.exact_match=solution"))


def test_one_noise_rule_one_text() -> None:
    """`rft train`'s last line, `rft eval --compare-with-base` and the report word the rule's outcome
    alike."""
    from rft.report_page import verdict_cells
    from rft.stats import format_comparison, overall_change

    def summary(mean: float, stderr: float) -> dict:
        return {"stats": {"reward": {"mean": mean, "stderr": stderr, "count": 8}}}

    flat = overall_change(summary(0.0, 0.0), summary(0.0, 0.0), 2.0)
    assert flat == "0.000 ± 0.000 -> 0.000 ± 0.000 (n=8; change +0.000, within noise (+0.0 s.e. ≤ 2))"
    assert "better (+inf s.e. > 2)" in overall_change(summary(0.0, 0.0), summary(1.0, 0.0), 2.0)
    assert "worse (-2.5 s.e. > 2)" in overall_change(summary(0.5, 0.04), summary(0.4, 0.0), 2.0)
    row = compare(summary(0.5, 0.1), summary(0.6, 0.1), 2.0)[0]
    assert row.verdict == "within noise (+0.7 s.e. ≤ 2)" == verdict_cells(row)[1]
    assert format_comparison([row]).endswith("within noise (+0.7 s.e. ≤ 2)")


# ---------------------------------------------------------------------------- held-out data that is not there
@pytest.fixture
def tokenizer_only_model_dir(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A model folder with a tokenizer and no model: a command that loads the model fails on it."""
    from rft.models import load_tokenizer

    directory = tmp_path / "tokenizer-only"
    load_tokenizer(str(tiny_model_dir)).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.parametrize("held_out", ["no rows", "every prompt too long"])
def test_an_empty_held_out_split_stops_train_and_eval_before_the_model_loads(
    command: str, held_out: str, tmp_path: Path, tokenizer_only_model_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from rft.cli import main

    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("" if held_out == "no rows" else json.dumps({"prompt": "many words " * 80}) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(
        tokenizer_only_model_dir, tmp_path / "run", data={"eval": str(eval_file), "max_prompt_length": 64},
    )))
    assert main([command, str(recipe)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(eval_file) in errors[0], errors
    assert (
        "data.eval holds no rows" if held_out == "no rows" else "longer than data.max_prompt_length=64"
    ) in errors[0]
    assert not (tmp_path / "run").exists()


def test_a_recipe_without_held_out_data_trains_and_says_so_once(
    tmp_path: Path, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from rft.trainer import Trainer

    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", training={"steps": 1}, output={"report": False})
    del recipe["data"]["eval"], recipe["data"]["max_eval_rows"]
    with caplog.at_level("INFO"):
        results = Trainer(load_config(raw=recipe)).train()
    assert results.pop("steps_s") > 0 and results == {"engine": "transformers"}
    said = [r for r in caplog.records if "trains without evaluation" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "WARNING"
