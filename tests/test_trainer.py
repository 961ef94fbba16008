"""End-to-end runs of the loop on a tiny random model: every algorithm option, checkpoints, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rft.config import load_config
from rft.trainer import Trainer
from tests.conftest import REPO, tiny_recipe

TIMING_KEYS = ("time/", "throughput/", "memory/")


def run(recipe: dict) -> tuple[Trainer, list[dict]]:
    trainer = Trainer(load_config(raw=recipe))
    trainer.train()
    lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
    return trainer, [json.loads(line) for line in lines]


def test_run_writes_metrics_config_and_final_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    trainer, metrics = run(tiny_recipe(tiny_model_dir, tmp_path / "run"))
    assert [m["step"] for m in metrics] == [1, 2]
    expected = {
        "reward/mean", "reward/std", "reward/final_number_correct/mean", "groups/zero_variance_share",
        "advantage/mean", "completion/length/mean", "completion/length/max", "completion/truncated_share",
        "clip/clip_low", "clip/clip_high", "clip/clip_region", "kl/old", "entropy", "grad_norm",
        "learning_rate",
        "throughput/tokens_per_s", "time/generation", "time/reward", "time/update", "memory/peak_mb", "loss",
    }
    assert expected <= set(metrics[0])
    assert all(torch.isfinite(torch.tensor(v)) for m in metrics for v in m.values())
    assert (trainer.run_dir / "final" / "adapter_config.json").exists()
    assert (trainer.run_dir / "final" / "tokenizer.json").exists()
    resolved = yaml.safe_load((trainer.run_dir / "config.yaml").read_text())
    assert resolved["algorithm"]["eps_high"] == 0.2


def test_lora_update_changes_only_the_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", training={"steps": 1})
    trainer = Trainer(load_config(raw=recipe))
    before = {k: v.clone() for k, v in trainer.policy.named_parameters()}
    trainer.train()
    changed = {k for k, v in trainer.policy.named_parameters() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)


@pytest.mark.parametrize(
    "algorithm",
    [
        {"preset": "grpo"},  # beta 0.04: KL to the adapter-disabled reference
        {"preset": "dapo", "mask_truncated": True},
        {"preset": "gspo"},
        {"preset": "dr_grpo"},
        {"advantage": "rloo", "scale": "batch", "delta": 4.0, "kl_estimator": "k2", "beta": 0.1},
    ],
)
def test_every_algorithm_runs(tiny_model_dir: Path, tmp_path: Path, algorithm: dict) -> None:
    _, metrics = run(tiny_recipe(tiny_model_dir, tmp_path / "run", algorithm=algorithm))
    assert len(metrics) == 2
    if algorithm.get("beta", 0) > 0 or algorithm.get("preset") == "grpo":
        assert "kl/ref" in metrics[0]
    if algorithm.get("preset") == "dapo":
        assert metrics[0]["dynamic_sampling/rounds"] >= 1
        assert "reward/overlong/mean" in metrics[0]


@pytest.mark.parametrize(
    "algorithm",
    [
        {"loss": "cispo"},
        {"loss": "sapo", "entropy_coef": 0.01},
        {"top_entropy_quantile": 0.2, "rollout_correction": "icepop"},
    ],
    ids=["cispo", "sapo-entropy_bonus", "top_entropy-icepop"],
)
def test_new_losses_train_and_move_the_weights(tiny_model_dir: Path, tmp_path: Path, algorithm: dict) -> None:
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", algorithm=algorithm, training={"steps": 1})
    trainer = Trainer(load_config(raw=recipe))
    before = {k: v.detach().clone() for k, v in trainer.policy.named_parameters() if v.requires_grad}
    trainer.train()
    (row,) = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert row["advantage/max"] > 0  # something to learn from: a moved weight is the loss's doing
    moved = [k for k, v in trainer.policy.named_parameters() if k in before and not torch.equal(v, before[k])]
    assert moved, algorithm
    assert all(torch.isfinite(torch.tensor(v)) for v in row.values())
    if "top_entropy_quantile" in algorithm:
        assert 0 < row["entropy/kept_share"] < 1
        assert "rollout/masked_share" in row


@pytest.mark.parametrize("entropy_coef", [0.0, 0.1])
def test_the_entropy_bonus_alone_moves_the_weights(
    tiny_model_dir: Path, tmp_path: Path, entropy_coef: float
) -> None:
    # A constant reward: every advantage is 0, so only the
    # bonus has a gradient, through the model's entropies.
    constant = tmp_path / "constant.py"
    constant.write_text("def one(completions, **_):\n    return [1.0] * len(completions)\n")
    recipe = tiny_recipe(
        tiny_model_dir, tmp_path / "run", algorithm={"entropy_coef": entropy_coef}, lora={"enabled": False},
        training={"steps": 1},
    )
    recipe["rewards"] = [{"fn": f"{constant}:one"}]
    trainer = Trainer(load_config(raw=recipe))
    before = {k: v.detach().clone() for k, v in trainer.policy.named_parameters()}
    trainer.train()
    moved = [k for k, v in trainer.policy.named_parameters() if not torch.equal(v, before[k])]
    assert bool(moved) == (entropy_coef > 0)


def test_full_finetune_with_reference_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", lora={"enabled": False}, algorithm={"beta": 0.05})
    trainer, metrics = run(recipe)
    assert trainer.reference is not None
    assert metrics[1]["kl/ref"] > 0  # the policy moved away from the frozen reference
    assert (trainer.run_dir / "final" / "model.safetensors").exists()


def test_several_updates_per_batch_use_fixed_old_logprobs(tiny_model_dir: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(
        tiny_model_dir, tmp_path / "run", algorithm={"num_iterations": 2},
        training={"mini_batches": 2, "micro_batch_size": 2, "steps": 1},
    )
    _, metrics = run(recipe)
    # After the first update the policy differs from the one that sampled: the ratio moves off 1.
    assert metrics[0]["kl/old"] > 0
    assert metrics[0]["time/logprobs"] > 0


def test_dynamic_sampling_caps_rounds(tiny_model_dir: Path, tmp_path: Path, caplog) -> None:
    # A constant reward makes every group zero-variance: all rounds are used and the step is skipped.
    constant = tmp_path / "constant.py"
    constant.write_text("def one(completions, **_):\n    return [1.0] * len(completions)\n")
    recipe = tiny_recipe(
        tiny_model_dir, tmp_path / "run", algorithm={"dynamic_sampling": True, "max_gen_batches": 3},
        training={"steps": 1},
    )
    recipe["rewards"] = [{"fn": f"{constant}:one"}]
    _, metrics = run(recipe)
    assert metrics[0]["dynamic_sampling/rounds"] == 3
    assert metrics[0]["dynamic_sampling/pass_rate"] == 0
    assert metrics[0]["update/skipped"] == 1
    assert "0 of 2 groups after 3 rounds" in caplog.text


def test_held_out_evaluation_before_and_after(tiny_model_dir: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(
        tiny_model_dir, tmp_path / "run", eval={"before_training": True, "after_training": True}
    )
    trainer = Trainer(load_config(raw=recipe))
    results = trainer.train()
    assert results["before"]["count"] == results["after"]["count"] == 8
    evaluations = (trainer.run_dir / "evaluations.jsonl").read_text().splitlines()
    assert [json.loads(e)["label"] for e in evaluations] == ["base", "trained"]


KILLING_REWARD = """
import os, signal
from pathlib import Path

def reward(completions, **_):
    counter = Path(os.environ["RFT_TEST_COUNTER"])
    calls = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(calls))
    if calls == int(os.environ.get("RFT_TEST_KILL_AT", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    return [float(len(c[0]["content"]) % 3) for c in completions]
"""


def _train_subprocess(
    recipe_path: Path, counter: Path, kill_at: int, *extra: str
) -> subprocess.CompletedProcess:
    env = {
        **os.environ, "RFT_TEST_COUNTER": str(counter), "RFT_TEST_KILL_AT": str(kill_at),
        "PYTHONPATH": str(REPO),
    }
    return subprocess.run(
        [sys.executable, "-m", "rft", "train", str(recipe_path), *extra], env=env, capture_output=True,
        text=True,
        timeout=600,
    )


def test_killed_run_resumes_to_the_same_metrics(tiny_model_dir: Path, tmp_path: Path) -> None:
    reward_file = tmp_path / "killing_reward.py"
    reward_file.write_text(KILLING_REWARD)
    recipes = {}
    for name in ("straight", "killed"):
        recipe = tiny_recipe(tiny_model_dir, tmp_path / name, training={"steps": 4}, output={"save_every": 2})
        recipe["rewards"] = [{"fn": f"{reward_file}:reward"}]
        # One call per group, in order: call 5 is step 3's first. In the trainer's own threads, so that the
        # reward's SIGKILL hits the trainer (a worker process would shield it).
        recipe["scoring"] = {"concurrency": 1, "isolation": "thread"}
        recipes[name] = tmp_path / f"{name}.yaml"
        recipes[name].write_text(yaml.safe_dump(recipe))

    straight = _train_subprocess(recipes["straight"], tmp_path / "c1", kill_at=0)
    assert straight.returncode == 0, straight.stderr[-2000:]
    # SIGKILL inside step 3's scoring, after the step-2 checkpoint was written.
    killed = _train_subprocess(recipes["killed"], tmp_path / "c2", kill_at=5)
    assert killed.returncode == -9
    assert (tmp_path / "killed" / "checkpoints" / "step-000002").is_dir()
    assert not (tmp_path / "killed" / "final").exists()
    resumed = _train_subprocess(recipes["killed"], tmp_path / "c3", 0, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def comparable(run_dir: Path) -> list[dict]:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if not k.startswith(TIMING_KEYS)} for row in rows]

    assert comparable(tmp_path / "killed") == comparable(tmp_path / "straight")
    from safetensors.torch import load_file

    final_straight = load_file(str(tmp_path / "straight" / "final" / "adapter_model.safetensors"))
    final_resumed = load_file(str(tmp_path / "killed" / "final" / "adapter_model.safetensors"))
    assert all(torch.equal(final_straight[k], final_resumed[k]) for k in final_straight)


def test_bad_recipe_fails_before_model_loads(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(
        yaml.safe_dump({
            "data": {"train": "x.jsonl"}, "rewards": [{"fn": "r.py:f"}], "rollout": {"engine": "sglang"}
        })
    )
    result = subprocess.run(
        [sys.executable, "-m", "rft", "train", str(recipe)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2
    assert "rollout.engine: got 'sglang'" in result.stderr and "'transformers'" in result.stderr
