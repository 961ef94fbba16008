"""Many processes, one result: process-group set-up, sharding of prompts, gathering, gradient accumulation.

The trainer runs the same loop in every process (`accelerate launch` or `torchrun`). Every process
draws the same global prompt list, generates and scores its contiguous share of whole groups, and
gathers the scored groups of all processes; from there on every decision (advantages, dynamic
sampling, normalisers, metrics) is taken on the global batch, identically everywhere. Only the
forward/backward passes are split again, and every process runs the same number of them, because
DDP, FSDP2 and DeepSpeed ZeRO-3 all hold a collective in each.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import timedelta
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, InitProcessGroupKwargs, gather_object

TIMEOUT_ENV = "RFT_DISTRIBUTED_TIMEOUT_S"
# Set by `accelerate launch` for a DeepSpeed config (as the other ACCELERATE_USE_* for theirs).
DEEPSPEED_ENV = "ACCELERATE_USE_DEEPSPEED"
# Long enough for a slow generation round or a checkpoint on one process while the others wait in a
# collective; short enough that a job with a hung process dies within the hour instead of burning it.
DEFAULT_TIMEOUT_S = 1800.0


def collective_timeout() -> timedelta:
    """How long a process waits in a collective for the others: $RFT_DISTRIBUTED_TIMEOUT_S, else 30 min."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: must be positive")
    return timedelta(seconds=seconds)


def make_accelerator(**options: Any) -> Accelerator:
    """An `Accelerator` whose process group gives up on a missing process after `collective_timeout()`.

    Without a timeout a process that hangs (or a node that vanishes without closing its sockets)
    leaves the others blocked in their next all-reduce for good; with it they raise
    (gloo: "Timed out waiting ... for recv"; NCCL: the watchdog aborts the communicator) and the
    launcher reports the failure. A process that dies outright is caught sooner: torchrun (and
    `accelerate launch`, which uses it) stops the others as soon as one exits with an error.
    `options` go to `Accelerator` (trackers, project directory, mixed precision).

    DeepSpeed without CUDA (its CPU accelerator, over gloo): `accelerate` ignores DeepSpeed when told
    `cpu=True` and would silently train with plain data parallelism instead, and without `cpu=True`
    it finds no GPU backend and counts every process as process 0. Naming gloo avoids both.
    """
    precision = _mixed_precision(options.pop("mixed_precision", None))
    cpu = not torch.cuda.is_available()
    deepspeed_on_cpu = cpu and os.environ.get(DEEPSPEED_ENV, "false").lower() == "true"
    process_group = InitProcessGroupKwargs(timeout=collective_timeout())
    if deepspeed_on_cpu:
        process_group = InitProcessGroupKwargs(backend="gloo", timeout=collective_timeout())
    return Accelerator(
        cpu=cpu and not deepspeed_on_cpu, kwargs_handlers=[process_group], mixed_precision=precision,
        **options,
    )


def _mixed_precision(asked: str | None) -> str:
    """The precision this process's Accelerator takes: `asked`, else accelerate's own setting
    (`accelerate launch --mixed_precision`), as Accelerator would read it."""
    precision = asked or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != precision:
        # accelerate keeps the first Accelerator's precision for the whole process and refuses another;
        # a process may build several trainers (a notebook, the tests), each with its recipe's. The
        # process group (PartialState) is kept.
        AcceleratorState._reset_state()
    return precision


def process_share(count: int, index: int, processes: int) -> slice:
    """The contiguous part of `count` items that process `index` of `processes` takes.

    Shares differ by at most one item; the first `count % processes` processes take the larger ones.
    """
    base, extra = divmod(count, processes)
    start = index * base + min(index, extra)
    return slice(start, start + base + (1 if index < extra else 0))


def gather_from_processes(accelerator: Accelerator, value: Any) -> list[Any]:
    """`value` from every process, in process order (a one-element list in a single process)."""
    if accelerator.num_processes == 1:
        return [value]
    return gather_object([value])


def shards_parameters(accelerator: Accelerator) -> bool:
    """True under FSDP or DeepSpeed ZeRO-3, where no process holds all the weights between forwards."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = accelerator.state.deepspeed_plugin
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    return deepspeed and plugin is not None and plugin.zero_stage == 3


@contextmanager
def accumulate_gradients(accelerator: Accelerator, model: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Backward passes inside add to the local gradients; with `sync` they are also reduced across processes.

    Only the last micro-batch of an optimizer update syncs, so the gradients travel once per update
    rather than once per micro-batch. DDP and FSDP2 are told through `accelerator.no_sync`;
    DeepSpeed reads the accumulation boundary from `accelerator.sync_gradients` in
    `accelerator.backward` (and would otherwise step its optimizer after every micro-batch).
    """
    if sync:
        yield
        return
    accelerator.gradient_state._set_sync_gradients(False)
    try:
        with accelerator.no_sync(model):
            yield
    finally:
        accelerator.gradient_state._set_sync_gradients(True)


@contextmanager
def full_weights(accelerator: Accelerator, model: torch.nn.Module) -> Iterator[None]:
    """Every process holds all the weights inside, so each can generate on its own (FSDP2 / ZeRO-3).

    Generation runs one forward per new token and processes stop at different lengths; with sharded
    weights every such forward would be a collective that the others must join. Gathering the
    weights once around generation (as TRL does for ZeRO-3) keeps generation local. A no-op when
    the weights are not sharded.
    """
    if not shards_parameters(accelerator):
        yield
        return
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        import deepspeed
        from trl.models.utils import add_hooks, remove_hooks

        gathered = deepspeed.zero.GatheredParameters(list(model.parameters()))
        with gathered, _transformers_unaware_of_zero3(accelerator):
            # ZeRO-3's per-module hooks would re-partition the gathered weights after each forward.
            remove_hooks(model)
            try:
                yield
            finally:
                add_hooks(model)
        return
    with fsdp2_full_weights(model, bool(accelerator.state.fsdp_plugin.reshard_after_forward)):
        yield


@contextmanager
def whole_weights_loading(accelerator: Accelerator) -> Iterator[None]:
    """Models loaded inside hold all their weights on every process; under ZeRO-3 as well.

    Under ZeRO-3, transformers partitions every model as it loads (`deepspeed.zero.Init`, see
    `_transformers_unaware_of_zero3`). That load is a collective, which deadlocks against
    `local_main_process_first`, and its partitioned tensors are not what a checkpoint restore, the
    reference model or the vLLM engine's copy can read. ZeRO-3 partitions the policy at `prepare`.
    """
    with _transformers_unaware_of_zero3(accelerator):
        yield


@contextmanager
def _transformers_unaware_of_zero3(accelerator: Accelerator) -> Iterator[None]:
    """transformers acts as without DeepSpeed inside: whole-weight loading, process-local `generate`.

    accelerate (1.15) registers a ZeRO-3 config with transformers whatever its `zero3_init_flag`
    says; transformers then loads under `deepspeed.zero.Init` and generates with `synced_gpus`
    (an all-reduce per token), which hangs when processes make different numbers of `generate` calls.
    """
    plugin = accelerator.state.deepspeed_plugin
    if not (shards_parameters(accelerator) and plugin is not None):
        yield
        return
    # Imported here: transformers' DeepSpeed integration is only wanted where DeepSpeed runs.
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(plugin.dschf)


def sampling_weights(
    accelerator: Accelerator, model: torch.nn.Module, engine_reads_policy: bool
) -> AbstractContextManager[None]:
    """`full_weights` for an engine that generates with the training model itself; nothing for one with
    its own copy of the weights (vLLM), which sharded weights reach a tensor at a time at each sync."""
    return full_weights(accelerator, model) if engine_reads_policy else nullcontext()


@contextmanager
def fsdp2_full_weights(model: torch.nn.Module, reshard_after_forward: bool) -> Iterator[None]:
    """`full_weights` for a model sharded with FSDP2's `fully_shard` (root and blocks).

    `reshard_after_forward`: the blocks' setting, restored on the way out.
    """
    from torch.distributed.fsdp import FSDPModule

    root, *blocks = [module for module in model.modules() if isinstance(module, FSDPModule)]
    # FSDP2 initialises its state on the root's first forward and refuses a block called before it;
    # generation calls the policy's blocks directly, so initialise here (there is no public call).
    root._get_fsdp_state()._lazy_init()
    for unit in (root, *blocks):
        unit.unshard()
    for block in blocks:
        # Otherwise each block's post-forward hook re-shards it after the first generated token.
        block.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for block in blocks:
            block.set_reshard_after_forward(reshard_after_forward, recurse=False)
        for unit in (root, *blocks):
            unit.reshard()


def full_state_dict(
    accelerator: Accelerator, model: torch.nn.Module, prefix: str
) -> dict[str, torch.Tensor] | None:
    """The full state dict of a sharded model (keys under `prefix`, prefix removed), else None.

    A collective under FSDP / ZeRO-3: every process must call it; the main process gets the tensors.
    """
    if not shards_parameters(accelerator):
        return None
    state = accelerator.get_state_dict(model)
    if state is None:
        return None
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def optimizer_state(accelerator: Accelerator, model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """The optimizer state a checkpoint keeps. A collective under FSDP2: every process must call it.

    FSDP2: the full (unsharded) state, gathered with torch's distributed-checkpoint helpers, so a job
    may resume on another number of processes. DeepSpeed ZeRO-3 partitions the optimizer inside its
    engine and has its own checkpoint format: nothing is kept (an empty dict), and a resumed run
    restarts the optimizer moments. Otherwise every process holds the same state: `state_dict()`.
    """
    if accelerator.is_fsdp2:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, optimizer.optimizer, options=options)
    if shards_parameters(accelerator):
        return {}
    return optimizer.state_dict()


def load_optimizer_state(
    accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, state: dict[str, Any]
) -> bool:
    """Restore what `optimizer_state` kept; False when there was nothing to restore (DeepSpeed ZeRO-3)."""
    if not state:
        return False
    if accelerator.is_fsdp2:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(model, optimizer.optimizer, state, options=options)
        return True
    optimizer.load_state_dict(state)
    return True


def configure_strategy(accelerator: Accelerator, micro_batch_size: int, max_grad_norm: float | None) -> None:
    """Check the sharding strategy and fill the DeepSpeed settings `accelerate` would take from a dataloader.

    FSDP must be version 2 (`full_weights` and the optimizer checkpoint use FSDP2's API). Gradient
    accumulation is driven by the trainer (`accumulate_gradients` marks the boundary), so DeepSpeed's
    own accumulation count must stay 1: above 1 it would also divide every loss by it.
    """
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ValueError(
            "FSDP: set fsdp_version: 2 in the accelerate config (see recipes/accelerate/fsdp2.yaml)"
        )
    plugin = accelerator.state.deepspeed_plugin
    if accelerator.distributed_type != DistributedType.DEEPSPEED or plugin is None:
        return
    config = plugin.deepspeed_config
    if plugin.is_auto("train_micro_batch_size_per_gpu"):
        config["train_micro_batch_size_per_gpu"] = micro_batch_size
    if plugin.is_auto("gradient_accumulation_steps"):
        config["gradient_accumulation_steps"] = 1
    if config.get("gradient_accumulation_steps", 1) != 1:
        raise ValueError(
            "DeepSpeed config: gradient_accumulation_steps must be 1 (or auto); the trainer accumulates over "
            "training.micro_batch_size itself"
        )
    if plugin.is_auto("gradient_clipping"):
        config["gradient_clipping"] = max_grad_norm or 0.0
