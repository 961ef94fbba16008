"""Which of the policy's tensors a rollout engine needs after an update, under checkpoint names.

Pure torch / peft code (no vLLM import), shared by the vLLM engine and tested without it:
`checkpoint_tensors` names the policy's weights as a transformers checkpoint would (a LoRA layer
contributes its merged weight W + B A * scaling, computed on demand), and `sync_plan` picks the
ones to push: those that can change plus the other parts of every fused layer they load into.

Sharded weights (FSDP2's DTensors, DeepSpeed ZeRO-3's partitions) are gathered when their thunk
runs, one tensor at a time, so no process ever holds the whole model: each gather is a collective,
so every process must call the same thunks in the same order (the trainer's processes all sync the
same plan). tests/test_vllm_distributed.py runs both (ZeRO-3 on CPU over gloo).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from peft.tuners.lora import LoraLayer
from torch.distributed.tensor import DTensor

from rft.models import causal_lm


def _layer_key(name: str, fused_groups: dict[str, str]) -> tuple[str, str]:
    """The vLLM layer a checkpoint tensor loads into: (parent module, fused or own module name)."""
    module, _, _ = name.rpartition(".")
    parent, _, leaf = module.rpartition(".")
    return parent, fused_groups.get(leaf, leaf)


@contextmanager
def _gathered(parameters: list[torch.Tensor]) -> Iterator[None]:
    """DeepSpeed ZeRO-3's partitioned parameters among `parameters` whole inside (a collective).

    Parameters an enclosing `_gathered` holds whole already are left to it: DeepSpeed refuses to
    gather one parameter in two nested contexts (a LoRA layer's base weight, see `_merged_weight`).
    """
    partitioned = [p for p in parameters if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    # Imported here: an optional dependency, present only where ZeRO-3 runs.
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    with deepspeed.zero.GatheredParameters(
        [p for p in partitioned if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    ):
        yield


def full_tensor(parameter: torch.Tensor) -> torch.Tensor:
    """All of `parameter`, detached; gathered where the training strategy shards it (a collective then)."""
    with _gathered([parameter]):
        tensor = parameter.detach()
        if isinstance(tensor, DTensor):  # FSDP2
            return tensor.full_tensor()
        # A ZeRO-3 parameter is partitioned again on leaving the context: keep a copy.
        return tensor.clone() if hasattr(parameter, "ds_id") else tensor


def _lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    """peft LoRA layers of a transformers model, by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def _merged_weight(layer: LoraLayer) -> torch.Tensor:
    """W + sum of active adapters' B A * scaling, computed in float32 and rounded once.

    Uses peft's own `get_delta_weight` (handles fan-in/fan-out layouts and scaling) and leaves the
    training model untouched, unlike `merge()` / `unmerge()`, which would round W twice.
    """
    base = layer.get_base_layer().weight
    if layer.merged or layer.disable_adapters:
        return full_tensor(base)
    with _gathered(list(layer.parameters())):
        merged = full_tensor(base).float()
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                delta = layer.get_delta_weight(adapter)
                merged = merged + (delta.full_tensor() if isinstance(delta, DTensor) else delta).float()
    return merged.to(base.dtype)


def checkpoint_tensors(policy: torch.nn.Module) -> tuple[dict[str, Callable[[], torch.Tensor]], set[str]]:
    """The policy's weights under checkpoint (transformers) names, and the names that can change.

    Values are thunks, so a merged LoRA weight is computed only when it is pushed. A tensor can
    change when it is trainable or is a LoRA layer's merged weight; adapter tensors themselves
    never appear (vLLM holds no adapter).
    """
    model = causal_lm(policy)
    adapter_tensors: set[int] = set()
    base_tensors: dict[int, tuple[str, LoraLayer | None]] = {}
    for layer_name, layer in _lora_layers(model).items():
        base = layer.get_base_layer()
        in_base = {id(parameter) for parameter in base.parameters()}
        adapter_tensors.update(id(p) for p in layer.parameters() if id(p) not in in_base)
        for leaf, parameter in base.named_parameters():
            base_tensors[id(parameter)] = (f"{layer_name}.{leaf}", layer if leaf == "weight" else None)
    sources: dict[str, Callable[[], torch.Tensor]] = {}
    changing: set[str] = set()
    # Model order, so that vLLM receives each layer's parts together and buffers little.
    for name, parameter in model.named_parameters():
        if id(parameter) in adapter_tensors:
            continue
        checkpoint_name, merged_layer = base_tensors.get(id(parameter), (name, None))
        if merged_layer is not None:
            sources[checkpoint_name] = lambda layer=merged_layer: _merged_weight(layer)
            changing.add(checkpoint_name)
            continue
        sources[checkpoint_name] = lambda parameter=parameter: full_tensor(parameter)
        if parameter.requires_grad:
            changing.add(checkpoint_name)
    return sources, changing


def sync_plan(names: Sequence[str], changing: set[str], packed_modules: dict[str, list[str]]) -> list[str]:
    """Checkpoint names to push: every tensor of every vLLM layer that receives a changed tensor.

    vLLM reloads a layer once all of its parameters have arrived and rebuilds it from those alone,
    so a fused layer (q/k/v -> qkv_proj, gate/up -> gate_up_proj) gets all its parts or is corrupted.
    """
    fused_groups = {part: fused for fused, parts in packed_modules.items() for part in parts}
    touched = {_layer_key(name, fused_groups) for name in changing}
    return [name for name in names if _layer_key(name, fused_groups) in touched]
