"""One vLLM engine per process under `torchrun`: a step's sampling, gathering, update and weight sync.

`torchrun --nproc_per_node 2 tests/vllm_distributed_worker.py MODEL_DIR RUN_ROOT [TENSOR_PARALLEL]`.
For full fine-tuning and then LoRA, each process builds a trainer (and with it its own vLLM engine,
or with TENSOR_PARALLEL 2 its half of one engine sharded over both) and runs one step by hand,
checking in between:
- each engine sampled its own share (one group each, or both groups for the shared engine), and
  every process holds the same gathered batch; the ranks of one engine sample the same completions
  for the same prompts;
- the step's global metrics equal those recomputed from the gathered batch;
- the update's sampler-vs-trainer mismatch, over the global batch, is below LOGPROB_TOL (each engine
  served the weights its trainer had);
- after the update and before the sync, the engine's teacher-forced log-probs of a fixed sequence
  (its own first completion) differ from the trainer's by more than STALE_MIN; after
  `sync_weights` they agree within LOGPROB_TOL; a skipped sync is refused before sampling.
Prints "<mode> ok" per process and mode; the test counts those lines.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from rft import distributed
from rft.batch import Batch
from rft.config import load_config
from rft.rollout.base import check_weights
from rft.trainer import Trainer
from tests.test_vllm_engine import (
    LOGPROB_TOL,
    STALE_MIN,
    teacher_forced_logprobs,
    trainer_logprobs,
    vllm_recipe,
)


def check_global_metrics(trainer: Trainer, batch: Batch) -> None:
    """The logged quantities are those of the gathered batch, identical on every process."""
    lengths = torch.tensor([len(c) for c in batch.completion_ids], dtype=torch.float64)
    expected = {
        "reward/mean": batch.rewards.mean().item(), "reward/std": batch.rewards.std().item(),
        "completion/length/mean": lengths.mean().item(), "completion/tokens": lengths.sum().item(),
    }
    for key, value in expected.items():
        assert batch.metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    # Timings are each process's own; everything else is the global batch's.
    shared = {key: value for key, value in batch.metrics.items() if not key.startswith("time/")}
    seen = distributed.gather_from_processes(trainer.accelerator, (batch.completion_ids, shared))
    assert all(part == seen[0] for part in seen), "the processes hold different batches"


def check_same_samples(trainer: Trainer, prompt: list[int], tensor_parallel: int) -> None:
    """The ranks of one tensor-parallel engine sample the same completions (and log-probs) for a prompt."""
    rollout = trainer.engine.generate([prompt], trainer.config.rollout.group_size, trainer.sampling)
    seen = distributed.gather_from_processes(trainer.accelerator, (rollout.completion_ids, rollout.logprobs))
    for first in range(0, len(seen), tensor_parallel):
        group = seen[first : first + tensor_parallel]
        assert all(part == group[0] for part in group), f"one engine, different samples: {group}"


def one_step(model_dir: Path, root: Path, mode: str, tensor_parallel: int) -> None:
    raw = vllm_recipe(model_dir, root / mode, lora=mode == "lora")
    raw["rollout"]["vllm_tensor_parallel_size"] = tensor_parallel
    raw["training"].update(prompts_per_step=2, learning_rate=5e-2 if mode == "lora" else 1e-3)
    config = load_config(raw=raw)
    trainer = Trainer(config)
    rank, engine = trainer.accelerator.process_index, trainer.engine
    assert engine.name == "vllm"
    check_weights(engine, 1)
    batch = trainer.collect_batch()
    group_size = config.rollout.group_size
    assert len(batch) == 2 * group_size, "two groups: one per process, or both from the shared engine"
    check_global_metrics(trainer, batch)
    metrics = trainer.update(batch)
    assert metrics["rollout/mismatch_abs_mean"] < LOGPROB_TOL, metrics["rollout/mismatch_abs_mean"]

    # The engine's first completion; the ranks of one engine send it the same requests.
    own = rank // tensor_parallel * group_size
    prompt, completion = batch.prompt_ids[own], batch.completion_ids[own]
    check_same_samples(trainer, prompt, tensor_parallel)
    updated = trainer_logprobs(trainer, prompt, completion, 1.0)
    stale = (teacher_forced_logprobs(engine, prompt, completion) - updated).abs().max().item()
    assert stale > STALE_MIN, f"the step moved log-probs by only {stale:.3g}: nothing to test"
    with pytest.raises(RuntimeError, match="a weight sync was missed"):
        check_weights(engine, 2)
    engine.sync_weights(trainer.policy, step=1)
    synced = (teacher_forced_logprobs(engine, prompt, completion) - updated).abs().max().item()
    assert synced < LOGPROB_TOL, f"after the sync vLLM differs from the trainer by {synced:.3g}"
    check_weights(engine, 2)
    print(f"process {rank}: {mode} ok (before the sync {stale:.3g}, after {synced:.2g})", flush=True)
    engine.close()


if __name__ == "__main__":
    tensor_parallel = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    for mode in ("full", "lora"):
        one_step(Path(sys.argv[1]), Path(sys.argv[2]), mode, tensor_parallel)
