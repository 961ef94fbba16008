"""Early stopping on a held-out plateau (noise rule of rft/evaluation.py) and the automatic eval interval."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from rft.config import eval_interval, load_config, runs_evaluation
from rft.early_stopping import EarlyStopping
from rft.trainer import Trainer
from tests.conftest import REPO, tiny_recipe

CONSTANT = f"{REPO / 'tests' / 'plateau_rewards.py'}:constant_half"


def _summary(mean: float, stderr: float, count: int = 16) -> dict:
    stat = {"mean": mean, "stderr": stderr, "count": count}
    return {"mean": mean, "stderr": stderr, "count": count, "stats": {"reward": stat}, "slices": {}}


def test_a_flat_reward_stops_after_patience_evaluations() -> None:
    stopping = EarlyStopping(patience=3, sigmas=2.0)
    # Changes within 2 s.e. (sqrt(0.1^2 + 0.1^2) = 0.141 -> 0.283) are noise, whichever the direction.
    means = [0.50, 0.60, 0.45, 0.70]
    reasons = [stopping.observe(step, _summary(mean, 0.1)) for step, mean in enumerate(means)]
    assert reasons[:3] == [None, None, None]
    assert reasons[3] is not None and reasons[3].startswith("early stopping after step 3:")
    assert "on 3 evaluations since step 0 (0.500 -> 0.700" in reasons[3]


def test_an_improving_reward_never_stops() -> None:
    stopping = EarlyStopping(patience=1, sigmas=2.0)
    # Each step 0.3 above the last: z = 0.3 / 0.141 = 2.1 > 2.
    assert all(stopping.observe(step, _summary(0.1 + 0.3 * step, 0.1)) is None for step in range(8))


def test_an_improvement_resets_the_count() -> None:
    stopping = EarlyStopping(patience=2, sigmas=2.0)
    means = [0.0, 0.1, 1.0, 1.1, 0.9]  # noise, better (resets), noise, noise -> stop
    reasons = [stopping.observe(step, _summary(mean, 0.1)) for step, mean in enumerate(means)]
    assert reasons[:4] == [None] * 4 and "since step 2" in reasons[4]


def test_too_few_prompts_count_neither_way() -> None:
    stopping = EarlyStopping(patience=1, sigmas=2.0)
    assert [stopping.observe(step, _summary(0.5, 0.0, count=1)) for step in range(4)] == [None] * 4


def test_the_automatic_interval_gives_about_ten_evaluations(tiny_model_dir: Path, tmp_path: Path) -> None:
    def interval(steps: int, every: int | None = None) -> int:
        recipe = tiny_recipe(tiny_model_dir, tmp_path, training={"steps": steps}, eval={"every": every})
        return eval_interval(load_config(raw=recipe))

    assert [interval(steps) for steps in (2, 40, 200, 5000)] == [5, 5, 20, 50]
    assert interval(200, every=0) == 0 and interval(200, every=3) == 3


def test_a_run_evaluates_when_any_evaluation_is_asked_for(tiny_model_dir: Path, tmp_path: Path) -> None:
    def evaluates(**eval_options: object) -> bool:
        return runs_evaluation(load_config(raw=tiny_recipe(tiny_model_dir, tmp_path, eval=eval_options)))

    never = {"before_training": False, "after_training": False, "every": 0}
    assert not evaluates(**never)
    assert evaluates(**{**never, "after_training": True}) and evaluates(**{**never, "every": 3})
    assert evaluates(**{**never, "before_training": True}) and evaluates(**{**never, "every": None})


def test_a_constant_reward_run_stops_early_and_ends_as_a_finished_one(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(
        tiny_model_dir, run_dir, training={"steps": 10},
        eval={
            "before_training": True, "after_training": True, "every": 1, "patience": 2,
            "baseline_cache": False,
        },
    )
    recipe["rewards"] = [{"fn": CONSTANT}]
    results = Trainer(load_config(raw=recipe)).train()
    # Base at step 0, then steps 1 and 2 equal to it (z = 0): two evaluations without improvement.
    assert results["early_stopped"] == {"step": 2, "of": 10}
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert (run_dir / "checkpoints" / "step-000002").is_dir()
    assert (run_dir / "final" / "adapter_config.json").exists()
    assert (run_dir / "report.html").exists() and results["after"]["mean"] == 0.5


def test_a_run_is_not_stopped_early_when_early_stopping_is_off(tiny_model_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(
        tiny_model_dir, run_dir, training={"steps": 3}, output={"report": False},
        eval={"every": 1, "patience": 1, "early_stopping": False},
    )
    recipe["rewards"] = [{"fn": CONSTANT}]
    results = Trainer(load_config(raw=recipe)).train()
    assert "early_stopped" not in results
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_resumed_run_keeps_counting_from_the_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    evaluation = {"before_training": True, "every": 1, "patience": 3, "baseline_cache": False}
    recipe = tiny_recipe(
        tiny_model_dir, run_dir, training={"steps": 2}, output={"report": False, "save_every": 2},
        eval=evaluation,
    )
    recipe["rewards"] = [{"fn": CONSTANT}]
    assert "early_stopped" not in Trainer(load_config(raw=recipe)).train()
    recipe["training"]["steps"] = 10
    # Base, step 1 and step 2 come from evaluations.jsonl: step 3 is the third without improvement.
    results = Trainer(load_config(raw=recipe), resume=True).train()
    assert results["early_stopped"] == {"step": 3, "of": 10}


def test_two_processes_stop_early_together(tiny_model_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(
        tiny_model_dir, run_dir, training={"steps": 6}, output={"report": False},
        eval={"before_training": True, "every": 1, "patience": 2, "baseline_cache": False},
    )
    recipe["rewards"] = [{"fn": CONSTANT}]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "rft", "train", str(tmp_path / "recipe.yaml")]
    environment = {
        **os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"
    }
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (
        result.stderr.count("early stopping after step 2:")
        + result.stdout.count("early stopping after step 2:") == 1
    )
    assert json.loads((run_dir / "results.json").read_text())["early_stopped"] == {"step": 2, "of": 6}
    assert (run_dir / "final" / "adapter_config.json").exists()
