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
# With SGD (the worker's `--sgd`, see there why not AdamW) a learning rate this large moves the
# weights by about 1e-2 in two steps, far above their float32 rounding.
LEARNING_RATE = 3e-2
# One and two processes sum the same float32 terms in another order (per-process partial sums,
# other batch shapes, so other kernel blockings). Measured on an AMD EPYC with 1 and 2 threads: at
# most 1.9e-6 relative (per tensor, gradients and weight movement alike). A missing gradient sync
# gives 0.57 or more; a wrong weighting of the processes' shares is of the order of their ratio.
RELATIVE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def stopping_model_dir(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> Path:
    """The tiny random model, with 8000 end-of-sequence ids
    so that completion lengths vary (token-mean matters)."""
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
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
        *arguments,
    ]
    result = subprocess.run(
        command, env=_environment(), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _relative_difference(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> tuple[float, str]:
    """The largest, over tensors, of |actual - expected| /
    |expected| (Frobenius norms, float64), and its tensor.

    Per tensor, so that a tensor with small values (a norm's weight) is held to its own scale; by norm,
    not element by element, as an element whose terms cancel has no relative precision to hold.
    """
    assert actual.keys() == expected.keys()
    worst, name = 0.0, ""
    for key, reference in expected.items():
        scale = reference.double().norm().item()
        assert scale > 0, f"{key} is all zeros: nothing to compare"
        difference = (actual[key].double() - reference.double()).norm().item() / scale
        if difference >= worst:
            worst, name = difference, key
    return worst, name


def _gradients(directory: Path, rank: int = 0) -> list[dict[str, torch.Tensor]]:
    """Each update's gradients as process `rank` handed them
    to its optimizer (see the worker's --record-gradients)."""
    updates = len(list(directory.glob(f"update-*-rank-{rank}.safetensors")))
    return [load_file(str(directory / f"update-{n}-rank-{rank}.safetensors")) for n in range(1, updates + 1)]


def _movement(run_dir: Path, initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    final = load_file(str(run_dir / "final" / "model.safetensors"))
    return {key: final[key].double() - initial[key].double() for key in initial}


def _equivalence_recipe(model_dir: Path, run_dir: Path, steps: int = 2) -> dict:
    recipe = tiny_recipe(
        model_dir, run_dir,
        lora={"enabled": False},
        # Batch-level std, dynamic sampling and token-mean all need the global batch.
        algorithm={
            "loss_agg": "token-mean", "scale": "batch", "dynamic_sampling": True, "max_gen_batches": 3
        },
        rollout={"group_size": 3, "max_new_tokens": 6},
        # 3 prompts over 2 processes: shares of 2 and 1 groups. 9 sequences in 2 mini-batches of 5 and 4,
        # split 3/2 and 2/2 between the processes, 2 per micro-batch: process 1 needs a padding pass.
        training={
            "steps": steps, "prompts_per_step": 3, "mini_batches": 2, "micro_batch_size": 2,
            "learning_rate": LEARNING_RATE, "threads": 1,
        },
        output={"save_every": 1, "keep_checkpoints": 2, "log_completions": 0},
    )
    recipe["rewards"] = [{"fn": f"{REWARDS}:first_token_grade"}]
    return recipe


@pytest.fixture(scope="module")
def equivalence_runs(stopping_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same two steps trained (with SGD) on one process and on two, each update's gradients recorded."""
    root = tmp_path_factory.mktemp("equivalence")
    for processes, name in ((1, "single"), (2, "double")):
        recipe = _write_recipe(root / f"{name}.yaml", _equivalence_recipe(stopping_model_dir, root / name))
        _torchrun(
            processes, str(WORKER), str(recipe), "--sgd", "--record-gradients",
            str(root / f"{name}-gradients"),
        )
    return root


def test_two_processes_compute_the_gradients_of_one_process(
    equivalence_runs: Path, stopping_model_dir: Path
) -> None:
    single, double = equivalence_runs / "single", equivalence_runs / "double"
    one, two = (
        _gradients(equivalence_runs / "single-gradients"), _gradients(equivalence_runs / "double-gradients")
    )
    assert len(one) == len(two) == 4, "2 steps of 2 mini-batches: 4 optimizer updates"
    for update, (expected, actual, other_process) in enumerate(
        zip(one, two, _gradients(equivalence_runs / "double-gradients", rank=1), strict=True), start=1
    ):
        difference, name = _relative_difference(actual, expected)
        assert difference < RELATIVE_TOLERANCE, (
            f"update {update}, {name}: relative difference {difference:.3g}"
        )
        assert all(
            torch.equal(actual[key], other_process[key]) for key in actual
        ), "the processes' gradients differ"

    # The weights follow linearly (SGD): their movement agrees to the same precision.
    initial = load_file(str(stopping_model_dir / "model.safetensors"))
    moved_one, moved_two = _movement(single, initial), _movement(double, initial)
    assert max(
        m.abs().max().item() for m in moved_one.values()
    ) > 1e-3, "the weights barely moved: nothing compared"
    # Each update also rounds every weight to float32 (half an ulp, an ulp <= eps x |w|), in either run:
    # a norm's weight of about 1 that moved by 5e-4 cannot agree to 1e-4 of its movement.
    rounding = len(one) * torch.finfo(torch.float32).eps
    for key, expected in moved_one.items():
        difference = (moved_two[key] - expected).norm().item()
        allowed = (
            RELATIVE_TOLERANCE * expected.norm().item()
            + rounding * (initial[key].double() + expected).norm().item()
        )
        assert difference <= allowed, (
            f"{key}: the weights moved differently by {difference:.3g} (allowed {allowed:.3g})"
        )

    # Only the main process writes: one line per step. Global quantities agree with the single process;
    # `grad_norm` is the norm before clipping, so it also carries the gradients' scale.
    metrics_one, metrics_two = _metrics(single), _metrics(double)
    assert [m["step"] for m in metrics_two] == [1, 2]
    for first, second in zip(metrics_one, metrics_two, strict=True):
        for key in ("reward/mean", "reward/std", "reward/first_token_grade/std", "advantage/std",
                    "completion/length/mean",
                    "completion/tokens", "dynamic_sampling/groups", "dynamic_sampling/rounds", "loss",
                    "grad_norm"):
            # All of scale 1 (rewards in [0, 1], normalised advantages, clipped updates): the absolute
            # term only serves a loss that happens to be near 0.
            assert second[key] == pytest.approx(first[key], rel=RELATIVE_TOLERANCE, abs=1e-6), key
    lengths = (
        [m["completion/length/min"] for m in metrics_one] + [m["completion/length/max"] for m in metrics_one]
    )
    assert min(lengths) < max(lengths), "all completions equally long: token-mean would not be exercised"


def test_two_processes_share_the_step_wide_masks_of_one_process(
    stopping_model_dir: Path, tmp_path: Path
) -> None:
    # The entropy quantile is over every token of the step (gathered from both processes, the padding pass
    # included), the rollout mask and the entropy bonus's token count over the global batch: CISPO with all
    # of them trains one step on two processes as on one.
    options = {"loss": "cispo", "top_entropy_quantile": 0.5, "entropy_coef": 0.05,
               "rollout_correction": "icepop",
               "rollout_ratio_min": 0.999, "rollout_ratio_max": 1.001}
    gradients, metrics = {}, {}
    for processes, name in ((1, "single"), (2, "double")):
        recipe = _equivalence_recipe(stopping_model_dir, tmp_path / name, steps=1)
        recipe["algorithm"].update(options)
        path = _write_recipe(tmp_path / f"{name}.yaml", recipe)
        _torchrun(
            processes, str(WORKER), str(path), "--sgd", "--record-gradients",
            str(tmp_path / f"{name}-gradients"),
        )
        gradients[name], (metrics[name],) = (
            _gradients(tmp_path / f"{name}-gradients"), _metrics(tmp_path / name)
        )
    assert 0 < metrics["single"]["entropy/kept_share"] < 1
    for key in ("entropy/kept_share", "rollout/masked_share", "rollout/kl", "entropy", "loss", "grad_norm"):
        assert metrics["double"][key] == pytest.approx(
            metrics["single"][key], rel=RELATIVE_TOLERANCE, abs=1e-9
        ), key
    for update, (expected, actual) in enumerate(
        zip(gradients["single"], gradients["double"], strict=True), start=1
    ):
        difference, name = _relative_difference(actual, expected)
        assert difference < RELATIVE_TOLERANCE, (
            f"update {update}, {name}: relative difference {difference:.3g}"
        )


def test_a_missing_gradient_sync_fails_the_comparison(
    equivalence_runs: Path, stopping_model_dir: Path, tmp_path: Path
) -> None:
    """The negative control: the comparison above must catch
    processes that each step on their own gradients."""
    recipe = _write_recipe(
        tmp_path / "broken.yaml", _equivalence_recipe(stopping_model_dir, tmp_path / "broken", steps=1)
    )
    _torchrun(
        2, str(WORKER), str(recipe), "--sgd", "--break-gradient-sync", "--record-gradients",
        str(tmp_path / "gradients"),
    )
    expected = _gradients(equivalence_runs / "single-gradients")[0]
    for rank in (0, 1):
        difference, _ = _relative_difference(_gradients(tmp_path / "gradients", rank)[0], expected)
        assert difference > 1000 * RELATIVE_TOLERANCE, (rank, difference)


def test_resume_on_two_processes_reproduces_the_uninterrupted_run(
    equivalence_runs: Path, stopping_model_dir: Path, tmp_path: Path
) -> None:
    """Resume from the step-1 checkpoint (weights, SGD momentum,
    sampler): same processes, same kernels, same bits."""
    double, resumed = equivalence_runs / "double", tmp_path / "resumed"
    shutil.copytree(double, resumed, ignore=shutil.ignore_patterns("final", "step-000002"))
    assert [p.name for p in (resumed / "checkpoints").iterdir()] == ["step-000001"]
    recipe = _write_recipe(tmp_path / "resumed.yaml", _equivalence_recipe(stopping_model_dir, resumed))
    _torchrun(2, str(WORKER), str(recipe), "--sgd", "--resume")
    again, uninterrupted = (load_file(str(run / "final" / "model.safetensors")) for run in (resumed, double))
    assert all(torch.equal(again[key], uninterrupted[key]) for key in uninterrupted)
    assert [m["step"] for m in _metrics(resumed)] == [1, 2]


def test_processes_that_see_different_checkpoints_refuse_to_resume(
    stopping_model_dir: Path, tmp_path: Path
) -> None:
    recipe = tiny_recipe(stopping_model_dir, tmp_path / "run", training={"steps": 1, "threads": 1},
                         output={"save_every": 1, "log_completions": 0})
    recipe_path = _write_recipe(tmp_path / "recipe.yaml", recipe)
    _torchrun(1, str(WORKER), str(recipe_path))
    # Process 0's run directory has the checkpoint, process
    # 1's has none: as two machines without a shared disk.
    shutil.copytree(tmp_path / "run", tmp_path / "run-0")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(recipe_path), "--resume", "--run-dir-per-process"]
    result = subprocess.run(
        command, env=_environment(), capture_output=True, text=True, timeout=300, cwd=REPO
    )
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
    recipe = tiny_recipe(
        stopping_model_dir, tmp_path / "run", training={"steps": 2, "prompts_per_step": 2, "threads": 1}
    )
    recipe["rewards"] = [{"fn": f"{REWARDS}:second_process_fails"}]
    recipe["scoring"] = {"isolation": "thread"}  # the process itself hangs or dies, not a reward worker
    recipe_path = _write_recipe(tmp_path / "recipe.yaml", recipe)
    port = _free_port()
    processes = []
    for rank in range(2):
        environment = {
            **_environment(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
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
    result = subprocess.run(
        command, env=_environment(), capture_output=True, text=True, timeout=300, cwd=REPO
    )
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
