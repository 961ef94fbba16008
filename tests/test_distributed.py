"""Several processes (gloo on CPU, through torchrun) give the result of one process on the same global batch.

`accelerate launch --cpu` starts a single process whatever --num_processes says, so these tests use
torchrun, which `accelerate launch` itself uses on GPUs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rft import distributed
from tests.conftest import REPO, build_tiny_model, tiny_recipe

WORKER = REPO / "tests" / "distributed_worker.py"
REWARDS = REPO / "tests" / "distributed_rewards.py"
LEARNING_RATE = 3e-3


@pytest.fixture(scope="module")
def stopping_model_dir(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> Path:
    """The tiny random model, with 8000 end-of-sequence ids so that completion lengths vary (token-mean matters)."""
    from transformers import GenerationConfig

    directory = build_tiny_model(tmp_path_factory.mktemp("tiny-stopping"), embedded_model_dir)
    config = GenerationConfig.from_pretrained(directory)
    config.eos_token_id = list(range(1000, 9000))
    config.save_pretrained(directory)
    return directory


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def _torchrun(processes: int, *arguments: str, timeout: float = 300) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *arguments]
    result = subprocess.run(command, env=_environment(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Equal up to float summation order, as AdamW amplifies it.

    Gradients summed over two processes differ from one process's in the last bits. AdamW divides
    each gradient by its own running magnitude, so for the few elements whose gradient is nearly
    zero (cancelling contributions) that noise becomes a visible part of an update: measured here, a
    few dozen of 3.3 million elements differ by more than 1e-6, the worst by 0.05 x the learning
    rate. A missing gradient sync or a wrong loss scale moves most elements by about the learning rate.
    """
    assert actual.keys() == expected.keys()
    difference = torch.cat([(actual[key] - expected[key]).abs().flatten() for key in expected])
    assert difference.max().item() < 0.1 * LEARNING_RATE, difference.max().item()
    assert (difference > 2e-6).float().mean().item() < 1e-4, (difference > 2e-6).sum().item()


def _equivalence_recipe(model_dir: Path, run_dir: Path) -> dict:
    recipe = tiny_recipe(
        model_dir, run_dir,
        lora={"enabled": False},
        # Batch-level std, dynamic sampling and token-mean all need the global batch.
        algorithm={"loss_agg": "token-mean", "scale": "batch", "dynamic_sampling": True, "max_gen_batches": 3},
        rollout={"group_size": 3, "max_new_tokens": 6},
        # 3 prompts over 2 processes: shares of 2 and 1 groups. 9 sequences in 2 mini-batches of 5 and 4,
        # split 3/2 and 2/2 between the processes, 2 per micro-batch: process 1 needs a padding pass.
        training={
            "steps": 2, "prompts_per_step": 3, "mini_batches": 2, "micro_batch_size": 2, "learning_rate": LEARNING_RATE,
            "threads": 1,
        },
        output={"save_every": 1, "keep_checkpoints": 2, "log_completions": 0},
    )
    recipe["rewards"] = [{"fn": f"{REWARDS}:first_token_grade"}]
    return recipe


def test_two_processes_match_one_process_and_resume(stopping_model_dir: Path, tmp_path: Path) -> None:
    single, double, resumed = tmp_path / "single", tmp_path / "double", tmp_path / "resumed"
    _torchrun(1, str(WORKER), str(_write_recipe(tmp_path / "single.yaml", _equivalence_recipe(stopping_model_dir, single))))
    double_recipe = _write_recipe(tmp_path / "double.yaml", _equivalence_recipe(stopping_model_dir, double))
    _torchrun(2, str(WORKER), str(double_recipe))

    initial = load_file(str(stopping_model_dir / "model.safetensors"))
    one = load_file(str(single / "final" / "model.safetensors"))
    two = load_file(str(double / "final" / "model.safetensors"))
    moved = max((one[k] - initial[k]).abs().max().item() for k in one)
    assert moved > 1e-3, "training did not move the weights: the comparison would prove nothing"
    _assert_same_weights(two, one)

    # Only the main process writes: one line per step. Global quantities agree with the single process.
    metrics_one, metrics_two = _metrics(single), _metrics(double)
    assert [m["step"] for m in metrics_two] == [1, 2]
    for first, second in zip(metrics_one, metrics_two, strict=True):
        for key in ("reward/mean", "reward/std", "reward/first_token_grade/std", "advantage/std", "completion/length/mean", "completion/tokens",
                    "dynamic_sampling/groups", "dynamic_sampling/rounds", "loss", "grad_norm"):
            assert second[key] == pytest.approx(first[key], rel=1e-4, abs=1e-6), key
    lengths = [m["completion/length/min"] for m in metrics_one] + [m["completion/length/max"] for m in metrics_one]
    assert min(lengths) < max(lengths), "all completions equally long: token-mean would not be exercised"

    # Resume on two processes from the step-1 checkpoint: the same final weights as the uninterrupted run.
    shutil.copytree(double, resumed, ignore=shutil.ignore_patterns("final", "step-000002"))
    assert [p.name for p in (resumed / "checkpoints").iterdir()] == ["step-000001"]
    resume_recipe = _equivalence_recipe(stopping_model_dir, resumed)
    _torchrun(2, str(WORKER), str(_write_recipe(tmp_path / "resumed.yaml", resume_recipe)), "--resume")
    again = load_file(str(resumed / "final" / "model.safetensors"))
    _assert_same_weights(again, two)
    assert [m["step"] for m in _metrics(resumed)] == [1, 2]


def test_processes_that_see_different_checkpoints_refuse_to_resume(stopping_model_dir: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(stopping_model_dir, tmp_path / "run", training={"steps": 1, "threads": 1},
                         output={"save_every": 1, "log_completions": 0})
    recipe_path = _write_recipe(tmp_path / "recipe.yaml", recipe)
    _torchrun(1, str(WORKER), str(recipe_path))
    # Process 0's run directory has the checkpoint, process 1's has none: as two machines without a shared disk.
    shutil.copytree(tmp_path / "run", tmp_path / "run-0")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(recipe_path), "--resume", "--run-dir-per-process"]
    result = subprocess.run(command, env=_environment(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode != 0
    assert "the processes see different checkpoints" in result.stdout + result.stderr
    assert "['step-000001', None]" in result.stdout + result.stderr


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("failure", ["hang", "die"])
def test_a_lost_process_stops_the_other_with_an_error(
    failure: str, stopping_model_dir: Path, tmp_path: Path
) -> None:
    """Process 1 hangs (SIGSTOP) or dies inside its reward function; process 0 must not wait forever.

    The processes are started by hand, as on two nodes, so no launcher kills the survivor: only the
    collective timeout (hang) or the closed connection (die) can stop it.
    """
    timeout_s = 10
    recipe = tiny_recipe(stopping_model_dir, tmp_path / "run", training={"steps": 2, "prompts_per_step": 2, "threads": 1})
    recipe["rewards"] = [{"fn": f"{REWARDS}:second_process_fails"}]
    recipe["scoring"] = {"isolation": "thread"}  # the process itself hangs or dies, not a reward worker
    recipe_path = _write_recipe(tmp_path / "recipe.yaml", recipe)
    port = _free_port()
    processes = []
    for rank in range(2):
        environment = {
            **_environment(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), distributed.TIMEOUT_ENV: str(timeout_s),
            "RFT_TEST_FAILURE": failure,
        }
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "rft", "train", str(recipe_path)], env=environment, cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    survivor, lost = processes
    try:
        started = time.monotonic()
        output, _ = survivor.communicate(timeout=240)
        waited = time.monotonic() - started
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
    assert survivor.returncode != 0, output[-3000:]
    assert not (tmp_path / "run" / "final").exists()
    if failure == "hang":
        assert "Timed out" in output or "timed out" in output, output[-3000:]
        assert waited >= timeout_s
    else:
        assert lost.returncode == 3
        assert "Connection closed by peer" in output or "Connection reset" in output, output[-3000:]


def test_process_share_splits_evenly_and_covers_everything() -> None:
    for count in range(0, 12):
        for processes in range(1, 5):
            shares = [distributed.process_share(count, rank, processes) for rank in range(processes)]
            items = [i for share in shares for i in range(count)[share]]
            assert items == list(range(count))
            sizes = [share.stop - share.start for share in shares]
            assert max(sizes) - min(sizes) <= 1


def test_collective_timeout_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "90")
    assert distributed.collective_timeout().total_seconds() == 90
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=distributed.TIMEOUT_ENV):
        distributed.collective_timeout()
    monkeypatch.delenv(distributed.TIMEOUT_ENV)
    assert distributed.collective_timeout().total_seconds() == distributed.DEFAULT_TIMEOUT_S


def test_fsdp2_logprob_gradients_and_generation(stopping_model_dir: Path) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(REPO / "tests" / "fsdp2_worker.py"), str(stopping_model_dir),
    ]
    result = subprocess.run(command, env=_environment(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.count("fsdp2 ok") == 2


def test_pooled_reward_metrics_equal_those_of_the_whole_batch() -> None:
    """Two processes' scorer metrics, combined, match the scorer's metrics on all completions at once."""
    from rft.config import RewardConfig, ScoringConfig
    from rft.scoring import RewardScorer, ScoreMetrics

    rewards = [
        RewardConfig(fn=f"{REWARDS}:first_token_grade"),
        RewardConfig(fn=f"{REPO / 'tests' / 'tiny_rewards.py'}:length_mod_three", name="length"),
    ]
    scorer = RewardScorer(rewards, ScoringConfig())
    ids = [[3], [8], [12, 1], [7, 7, 7], [5], [9, 9], [4], [11, 2, 6], [0]]

    def score(rows: list[list[int]]) -> ScoreMetrics:
        count, texts = len(rows), ["x" * sum(row) for row in rows]
        return scorer.score(["p"] * count, texts, rows, [{"answer": 1}] * count, group_size=1).stats

    whole = score(ids).result()
    pooled = ScoreMetrics.of_processes([score(ids[:4]), score(ids[4:])]).result()
    assert pooled.keys() == whole.keys()
    for key, value in whole.items():
        if key.startswith("time/") or key.endswith("failures_total"):
            continue
        assert pooled[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
