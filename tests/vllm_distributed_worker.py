"""One vLLM engine per process under `torchrun`: a step's sampling, gathering, update and weight sync.

`torchrun --nproc_per_node 2 tests/vllm_distributed_worker.py MODEL_DIR RUN_ROOT [TENSOR_PARALLEL [STRATEGY]]`
STRATEGY is how the trainer holds its weights: `ddp` (the default; each process all of them),
`fsdp2` (accelerate's FSDP2, as recipes/accelerate/fsdp2.yaml sets it, sharded over the processes) or
`zero3` (DeepSpeed ZeRO-3 on CPU over gloo, as recipes/accelerate/deepspeed_zero3.yaml sets it,
partitioned over the processes).
For full fine-tuning and then LoRA, each process builds a trainer (and with it its own vLLM engine,
or with TENSOR_PARALLEL 2 its half of one engine sharded over both) and runs one step by hand,
checking in between:
- `rollout.engine: auto` picks vLLM, and a step with fewer prompts than engines is refused;
- under FSDP2 / ZeRO-3 the trainer's weights are really sharded, and the sync gathers them a tensor
  at a time: at most one vLLM layer's gathered tensors are alive at once, never the whole model;
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

import copy
import itertools
import os
import sys
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from safetensors import safe_open
from torch.distributed.tensor import DTensor

from rft import distributed
from rft.batch import Batch
from rft.config import ConfigError, load_config
from rft.rollout import vllm_engine
from rft.rollout.base import check_weights
from rft.rollout.vllm_engine import VLLMEngine
from rft.rollout.weight_sync import _layer_key
from rft.trainer import Trainer
from tests.test_vllm_engine import (
    LOGPROB_TOL,
    STALE_MIN,
    teacher_forced_logprobs,
    trainer_logprobs,
    vllm_recipe,
)

# What `accelerate launch --config_file recipes/accelerate/fsdp2.yaml` puts in the environment
# (mixed precision left off: the checks compare float32 log-probs to 1e-3).
FSDP2_ENVIRONMENT = {
    "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_OFFLOAD_PARAMS": "false",
    "FSDP_CPU_RAM_EFFICIENT_LOADING": "false", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
    "FSDP_ACTIVATION_CHECKPOINTING": "false",
}
# What `accelerate launch --config_file recipes/accelerate/deepspeed_zero3.yaml` puts in the environment
# (mixed precision left off, as above).
ZERO3_ENVIRONMENT = {
    "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_CONFIG_DS_FIELDS": "true",
    "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1",
    "ACCELERATE_GRADIENT_CLIPPING": "1.0", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none",
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none", "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false",
    "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true",
}
STRATEGY_ENVIRONMENTS = {"ddp": {}, "fsdp2": FSDP2_ENVIRONMENT, "zero3": ZERO3_ENVIRONMENT}
make_accelerator = distributed.make_accelerator
checkpoint_tensors = vllm_engine.checkpoint_tensors
Thunk = Callable[[], torch.Tensor]


def fsdp2_accelerator(**options: Any) -> Accelerator:
    """The trainer's `Accelerator`, sharding with FSDP2 on CPU.

    accelerate keeps FSDP for accelerator process groups only and runs a CPU one as plain MULTI_CPU;
    the FSDP2 plugin it reads from the environment shards a CPU model (gloo) just the same.
    """
    accelerator = make_accelerator(**options)
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    # Where accelerate records it itself: every later `AcceleratorState()` copies it from there.
    PartialState._shared_state["distributed_type"] = accelerator.state.distributed_type = DistributedType.FSDP
    return accelerator


def build_trainer(raw: dict, strategy: str) -> Trainer:
    config = load_config(raw=raw)
    if strategy != "fsdp2":  # DDP, or ZeRO-3 which accelerate keeps on CPU (see `make_accelerator`)
        return Trainer(config)
    with mock.patch.object(distributed, "make_accelerator", fsdp2_accelerator):
        return Trainer(config)


class GatherWatch:
    """Which whole tensors of a weight sync are alive at once: wraps `checkpoint_tensors`' thunks.

    For sharded weights only: each gathered tensor is then a fresh one, alive until vLLM lets it go
    (a DDP process hands vLLM its parameters themselves).
    """

    def __init__(self) -> None:
        self.alive: dict[int, str] = {}
        self.peak: list[str] = []
        self.shapes: dict[str, list[int]] = {}
        self._keys = itertools.count()

    def checkpoint_tensors(self, policy: torch.nn.Module) -> tuple[dict[str, Thunk], set[str]]:
        sources, changing = checkpoint_tensors(policy)
        return {name: self._watched(name, thunk) for name, thunk in sources.items()}, changing

    def _watched(self, name: str, thunk: Thunk) -> Thunk:
        def gather() -> torch.Tensor:
            tensor, key = thunk(), next(self._keys)
            assert not isinstance(tensor, DTensor), f"{name}: a shard handed to vLLM"
            self.alive[key], self.shapes[name] = name, list(tensor.shape)
            weakref.finalize(tensor, self.alive.pop, key)
            if len(self.alive) > len(self.peak):
                self.peak = list(self.alive.values())
            return tensor

        return gather


def check_sharded(trainer: Trainer, strategy: str) -> None:
    """Every process holds a part of each of the policy's weights: a DTensor over both processes under
    FSDP2, a ZeRO-3 partition (half of the padded tensor) with nothing in the parameter itself."""
    for name, parameter in trainer.policy.named_parameters():
        if strategy == "fsdp2":
            assert isinstance(parameter, DTensor), f"{name} is not sharded"
            assert parameter.device_mesh.size() == 2, name
        else:
            assert parameter.numel() == 0, f"{name} is whole between forwards"
            assert parameter.ds_tensor.numel() == -(-parameter.ds_numel // 2), f"{name}: not half of it"


def check_gathers(watch: GatherWatch, engine: VLLMEngine, model_dir: Path) -> None:
    """The sync pushed whole tensors, gathered one at a time: alive at once only the parts of one vLLM
    layer (vLLM keeps the parts of a fused layer, q/k/v or gate/up, until the last arrives)."""
    assert watch.shapes and len(watch.shapes) == engine.last_sync["tensors"], watch.shapes
    with safe_open(model_dir / "model.safetensors", "pt") as checkpoint:
        for name, shape in watch.shapes.items():
            assert shape == checkpoint.get_slice(name).get_shape(), f"{name}: {shape} is not the whole tensor"
    fused = {part: layer for layer, parts in engine.packed_modules.items() for part in parts}
    layers = {_layer_key(name, fused) for name in watch.peak}
    assert len(layers) == 1, f"gathered tensors of several layers alive at once: {watch.peak}"


def check_too_few_prompts(raw: dict, strategy: str) -> None:
    """Fewer prompts per step than engines (one per process) is refused before any model loads."""
    raw = copy.deepcopy(raw)
    raw["training"]["prompts_per_step"] = 1
    with pytest.raises(ConfigError, match="every engine generates at least one group"):
        build_trainer(raw, strategy)


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


def one_step(model_dir: Path, root: Path, mode: str, tensor_parallel: int, strategy: str) -> None:
    raw = vllm_recipe(model_dir, root / mode, lora=mode == "lora")
    raw["rollout"].update(engine="auto", vllm_tensor_parallel_size=tensor_parallel)
    raw["training"].update(prompts_per_step=2, learning_rate=5e-2 if mode == "lora" else 1e-3)
    if tensor_parallel == 1:
        check_too_few_prompts(raw, strategy)
    trainer = build_trainer(raw, strategy)
    config, rank, engine = trainer.config, trainer.accelerator.process_index, trainer.engine
    assert engine.name == "vllm", "rollout.engine: auto on many processes"
    if strategy != "ddp":
        check_sharded(trainer, strategy)
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
    # The trainer's policy called directly: whole weights under FSDP2 / ZeRO-3 (a no-op under DDP).
    with distributed.full_weights(trainer.accelerator, trainer.model):
        updated = trainer_logprobs(trainer, prompt, completion, 1.0)
    stale = (teacher_forced_logprobs(engine, prompt, completion) - updated).abs().max().item()
    assert stale > STALE_MIN, f"the step moved log-probs by only {stale:.3g}: nothing to test"
    with pytest.raises(RuntimeError, match="a weight sync was missed"):
        check_weights(engine, 2)
    if strategy != "ddp":
        watch = GatherWatch()
        with mock.patch.object(vllm_engine, "checkpoint_tensors", watch.checkpoint_tensors):
            engine.sync_weights(trainer.policy, step=1)
        check_gathers(watch, engine, model_dir)
        peak = f"; at most {len(watch.peak)} of {len(watch.shapes)} gathered tensors alive at once"
    else:
        engine.sync_weights(trainer.policy, step=1)
        peak = ""
    synced = (teacher_forced_logprobs(engine, prompt, completion) - updated).abs().max().item()
    assert synced < LOGPROB_TOL, f"after the sync vLLM differs from the trainer by {synced:.3g}"
    check_weights(engine, 2)
    print(
        f"process {rank}: {mode} ok (mismatch {metrics['rollout/mismatch_abs_mean']:.2g}; before the sync "
        f"{stale:.3g}, after {synced:.2g}{peak})",
        flush=True,
    )
    engine.close()


if __name__ == "__main__":
    tensor_parallel = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    strategy = sys.argv[4] if len(sys.argv) > 4 else "ddp"
    os.environ.update(STRATEGY_ENVIRONMENTS[strategy])
    for mode in ("full", "lora"):
        one_step(Path(sys.argv[1]), Path(sys.argv[2]), mode, tensor_parallel, strategy)
