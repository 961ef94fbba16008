"""TRL users' files and habits: TRL's reward functions and factories, trainer_state / log_metric /
log_extra, TRL's field names, the Python API, and chat completions in `rft reward check --completions`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from rft.config import ConfigError, RewardConfig, ScoringConfig, load_config
from rft.reward_check import check_file
from rft.scoring import RewardError, RewardScorer
from tests.conftest import REPO, tiny_recipe

HERE = Path(__file__).resolve()


# -- rewards used by the tests (loaded by file path, as a recipe would) ------------------------------


def curriculum_len(completions, trainer_state, log_metric, **kwargs):
    """TRL-style curriculum: long completions pay only after the first step; logs what it saw."""
    log_metric("curriculum/global_step", trainer_state.global_step)
    log_metric("curriculum/max_steps", trainer_state.max_steps)
    log_metric("curriculum/epoch", trainer_state.epoch)
    target = 2 if trainer_state.global_step == 0 else 6
    return [-abs(len(c) - target) / 10 for c in completions]


def logged_lengths(completions, log_extra, **kwargs):
    log_extra("length", [len(c) for c in completions])
    return [0.0 for _ in completions]


def state_only(prompts, completions, completion_ids, trainer_state):
    """No **kwargs: it must get trainer_state and nothing else it did not ask for."""
    return [float(trainer_state.global_step) for _ in completions]


def plain(prompts, completions, completion_ids):
    return [1.0 for _ in completions]


def first_length(completions, log_metric, **kwargs):
    log_metric("first_length", len(completions[0]))
    return [0.0 for _ in completions]


def bad_extra(completions, log_extra, **kwargs):
    log_extra("short", [1])
    return [0.0 for _ in completions]


def clashing_metric(completions, log_metric, **kwargs):
    log_metric("reward/mean", 100.0)
    return [0.0 for _ in completions]


# -- TRL's own rewards through the scorer -------------------------------------------------------------

TRL_REWARDS = [
    {"fn": "trl.rewards:accuracy_reward"},
    {"fn": "trl.rewards:think_format_reward"},
    {
        "fn": "trl.rewards:get_soft_overlong_punishment",
        "build": {"max_completion_len": 10, "soft_punish_cache": 4},
    },
    {"fn": "trl.rewards:get_cosine_scaled_reward", "build": {"max_len": 48}},
]


def _cosine(correct: bool, length: int, max_len: int = 48) -> float:
    """Appendix C.1 of "Demystifying Long Chain-of-Thought Reasoning", TRL's defaults."""
    low, high = (0.5, 1.0) if correct else (-0.5, -1.0)
    return low + 0.5 * (high - low) * (1 + math.cos(length / max_len * math.pi))


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_trl_rewards_and_factories_run_unchanged(isolation: str) -> None:
    scorer = RewardScorer(
        [RewardConfig(**r) for r in TRL_REWARDS], ScoringConfig(isolation=isolation, on_error="stop")
    )
    try:
        completions = [
            [{"role": "assistant", "content": "<think>\nadd\n</think>\nThe answer is $\\boxed{12}$"}],
            [{"role": "assistant", "content": "The answer is $\\boxed{13}$"}],
        ]
        prompt = [{"role": "user", "content": "What is 7 + 5?"}]
        output = scorer.score([prompt, prompt], completions, [[1] * 5, [1] * 8], [{"solution": "$12$"}] * 2)
    finally:
        scorer.close()
    assert scorer.names == ["accuracy_reward", "think_format_reward", "soft_overlong_punishment_reward",
                            "cosine_scaled_reward"]
    assert output.per_function["accuracy_reward"] == [1.0, 0.0]
    assert output.per_function["think_format_reward"] == [1.0, 0.0]
    assert output.per_function["soft_overlong_punishment_reward"] == [0.0, pytest.approx(-0.5, rel=1e-12)]
    cosine = output.per_function["cosine_scaled_reward"]
    assert cosine == [pytest.approx(_cosine(True, 5), rel=1e-12), pytest.approx(_cosine(False, 8), rel=1e-12)]
    # accuracy_reward logs its parses through log_extra, even from a worker process.
    assert output.extras["solution"] == ["$12$", "$12$"]
    assert output.extras["answer_parsed"][1] != "[unparseable]"


def test_factory_under_kwargs_says_to_use_build() -> None:
    with pytest.raises(
        RewardError, match=r"get_cosine_scaled_reward\(max_len.*takes no `completions`.*`build:`"
    ):
        RewardScorer([RewardConfig(fn="trl.rewards:get_cosine_scaled_reward", kwargs={"max_len": 48})])
    with pytest.raises(RewardError, match=r"build: .*not a reward function"):
        RewardScorer([RewardConfig(fn=f"{HERE}:_cosine", build={"correct": True, "length": 1})])


def test_context_reaches_only_rewards_that_take_it() -> None:
    from rft.reward_context import RewardState

    scorer = RewardScorer([RewardConfig(fn=f"{HERE}:state_only"), RewardConfig(fn=f"{HERE}:plain")],
                          ScoringConfig(isolation="thread", on_error="stop"))
    scorer.state = RewardState(global_step=3, max_steps=10, epoch=0.5)
    output = scorer.score(["p"], ["c"], [[1]], [{}])
    assert output.per_function == {"state_only": [3.0], "plain": [1.0]}


def test_log_extra_of_the_wrong_length_fails_the_call() -> None:
    scorer = RewardScorer([RewardConfig(fn=f"{HERE}:bad_extra")], ScoringConfig(on_error="zero"))
    try:
        output = scorer.score(["p", "p"], ["a", "b"], [[1], [1]], [{}, {}])
    finally:
        scorer.close()
    assert output.errors and "log_extra('short'): 1 values for the call's 2 completions" in output.errors[0]


def test_a_logged_metric_cannot_overwrite_the_scorers_own() -> None:
    scorer = RewardScorer([RewardConfig(fn=f"{HERE}:clashing_metric")], ScoringConfig(isolation="thread"))
    with pytest.raises(
        RewardError, match=r"log_metric\('reward/mean'\): names under 'reward/' are the scorer's"
    ):
        scorer.score(["p"], ["a"], [[1]], [{}])


def test_logged_metric_is_the_mean_of_every_value_over_calls_and_processes() -> None:
    """TRL sums values and counts over processes before dividing; so do rft's metric parts."""
    from rft.scoring import ScoreMetrics

    scorer = RewardScorer([RewardConfig(fn=f"{HERE}:first_length")], ScoringConfig(isolation="thread"))
    first = scorer.score(["p", "p"], ["a", "bbb"], [[1], [1]], [{}, {}], group_size=1)  # logs 1 and 3
    second = scorer.score(["p"], ["cccccc"], [[1]], [{}], group_size=1)  # another process: logs 6
    assert first.metrics["first_length"] == 2.0
    combined = ScoreMetrics.of_processes([first.stats, second.stats]).result()
    assert combined["first_length"] == pytest.approx(10 / 3, rel=1e-12)


def test_trainer_state_log_metric_and_log_extra_in_a_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    from rft.trainer import Trainer

    rewards = [{"fn": f"{HERE}:curriculum_len"}, {"fn": f"{HERE}:logged_lengths"}]
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", output={"log_completions": 3})
    recipe["rewards"] = rewards
    trainer = Trainer(load_config(raw=recipe))
    trainer.train()
    metrics = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["curriculum/global_step"] for m in metrics] == [0.0, 1.0]
    assert [m["curriculum/max_steps"] for m in metrics] == [2.0, 2.0]
    assert metrics[0]["curriculum/epoch"] == 0.0
    assert metrics[1]["curriculum/epoch"] == pytest.approx(2 / len(trainer.train_examples), rel=1e-12)
    records = [json.loads(line) for line in (trainer.run_dir / "completions.jsonl").read_text().splitlines()]
    assert len(records) == 6
    assert all(r["extra"]["length"] == len(r["completion"]) for r in records)
    summary = json.loads((trainer.run_dir / "summary.json").read_text())  # the report's numbers
    assert summary["train"]["last"]["curriculum/global_step"] == 1.0


# -- names ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("section", "field", "value", "hint"), [
    ("algorithm", "epsilon_high", 0.28, "did you mean algorithm.eps_high?"),
    ("algorithm", "eps_hihg", 0.28, "did you mean algorithm.eps_high?"),
    ("algorithm", "epsilon", 0.2, "did you mean algorithm.eps_low? (TRL's epsilon; it is both clip bounds"),
    ("rollout", "num_generations", 4, "did you mean rollout.group_size?"),
    ("rollout", "max_completion_length", 64, "did you mean rollout.max_new_tokens?"),
    ("algorithm", "loss_type", "dapo", "did you mean algorithm.loss_agg: token-mean?"),
    ("algorithm", "loss_type", "dr_grpo", "did you mean algorithm.loss_agg: seq-mean-token-sum-norm?"),
    ("algorithm", "scale_rewards", False, "did you mean algorithm.scale: none?"),
    ("algorithm", "scale_rewards", "batch", "did you mean algorithm.scale: batch?"),
    ("training", "beta", 0.04, "did you mean algorithm.beta?"),
    (
        "training", "importance_sampling_level", "sequence",
        "did you mean algorithm.importance_sampling_level?"
    ),
    ("training", "num_iterations", 2, "did you mean algorithm.num_iterations?"),
    ("training", "top_entropy_quantile", 0.2, "did you mean algorithm.top_entropy_quantile?"),
    ("algorithm", "group_size", 4, "did you mean rollout.group_size?"),
])
def test_unknown_fields_get_the_nearest_or_trl_name(
    section: str, field: str, value: object, hint: str
) -> None:
    raw = {
        "data": {"train": "x.jsonl"}, "rewards": [{"fn": "rewards.maths:math_answer"}],
        section: {field: value},
    }
    with pytest.raises(ConfigError) as caught:
        load_config(raw=raw)
    assert str(caught.value).startswith(f"<recipe>: {section}.{field}: unknown field")
    assert hint in str(caught.value)


# -- the Python API -------------------------------------------------------------------------------------


def test_import_rft_stays_light_and_exposes_the_api() -> None:
    code = (
        "import sys, rft\n"
        "assert callable(rft.train) and callable(rft.load_config) "
        "and rft.RecipeConfig.__name__ == 'RecipeConfig'\n"
        "assert 'torch' not in sys.modules, 'import rft pulled in torch'\n"
        "assert rft.Trainer.__module__ == 'rft.trainer'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_python_api_trains_a_recipe(tiny_model_dir: Path, tmp_path: Path) -> None:
    import rft

    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run")
    results = rft.train(recipe, overrides=["training.steps=1"])
    assert results["engine"] == "transformers"
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1]
    config = rft.load_config(raw=recipe)
    with pytest.raises(ValueError, match="overrides apply to a recipe file or dict"):
        rft.train(config, overrides=["training.steps=1"])


# -- rft reward check --completions -------------------------------------------------------------------


def test_completions_file_reaches_chat_style_trl_rewards(tmp_path: Path) -> None:
    config = load_config(raw={"data": {"train": "unused.jsonl"}, "scoring": {"on_error": "stop"},
                              "rewards": [{"fn": "trl.rewards:think_format_reward"},
                                          {"fn": "trl.rewards:accuracy_reward"}]})
    cases = [
        {"messages": [{"role": "user", "content": "7 + 5?"}],
         "completion": "<think>\nadd\n</think>\n$\\boxed{12}$",
         "solution": "$12$", "expect": {"think_format_reward": 1, "accuracy_reward": 1}},
        {"prompt": [{"role": "user", "content": "7 + 5?"}], "completion": "$\\boxed{13}$", "solution": "$12$",
         "expect": {"think_format_reward": 0, "accuracy_reward": 0}},
    ]
    path = tmp_path / "answers.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in cases) + "\n")
    text, _, failures = check_file(config, path)
    assert failures == 0, text
