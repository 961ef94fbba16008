"""Run directories for the export tests: tiny random models of each exported architecture.

Each run directory has the layout `rft train` writes: `config.yaml` (a recipe whose
`model.name_or_path` is the base model folder) and `final/` (a peft LoRA adapter plus the
tokenizer, saved by transformers 5.x, as the trainer saves them). The adapter's lora_B weights are
random and non-zero, so merging it moves the logits well beyond bf16 rounding: a test that compares
the export with the trained policy can fail.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml

SMOLLM2_DIR_NAME = "smollm2-135m-instruct"
CHAT_PROMPTS = (
    [{"role": "user", "content": "What is 7 + 5?"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a prime number above 10."},
    ],
    [{"role": "user", "content": "Say hello in French, then count to three."}],
)
TINY_LORA_RANK = 8


def cache_dir() -> Path:
    return Path(os.environ.get("RFT_CACHE", Path.home() / ".cache" / "rft"))


def embedded_model_dir() -> Path:
    """The converted embedded SmolLM2 (converted once by rft.models on first use)."""
    from rft.config import EMBEDDED_MODEL
    from rft.models import resolve_model_path

    return Path(resolve_model_path(EMBEDDED_MODEL))


def _tiny_config(architecture: str, vocab_size: int) -> Any:
    import transformers

    common: dict[str, Any] = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "tie_word_embeddings": False,
    }
    specs: dict[str, tuple[str, dict[str, Any]]] = {
        "LlamaForCausalLM": ("LlamaConfig", {"rope_theta": 100000.0}),
        "MistralForCausalLM": ("MistralConfig", {"rope_theta": 1000000.0, "sliding_window": None}),
        "MixtralForCausalLM": (
            "MixtralConfig",
            {
                "rope_theta": 1000000.0, "num_local_experts": 4, "num_experts_per_tok": 2,
                "sliding_window": None,
            },
        ),
        "Qwen2ForCausalLM": ("Qwen2Config", {"rope_theta": 1000000.0}),
        "Qwen3ForCausalLM": ("Qwen3Config", {"rope_theta": 1000000.0, "head_dim": 16}),
        "Qwen3MoeForCausalLM": (
            "Qwen3MoeConfig",
            {
                "rope_theta": 1000000.0,
                "head_dim": 16,
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 32,
                "norm_topk_prob": True,
            },
        ),
    }
    config_class, extra = specs[architecture]
    config = getattr(transformers, config_class)(**common, **extra)
    config.architectures = [architecture]
    return config


def build_base_model(architecture: str, out_dir: Path, seed: int = 0) -> Path:
    """A tiny random model of `architecture` with the SmolLM2 tokenizer (it has a chat template)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    config = _tiny_config(architecture, vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == architecture, (type(model), transformers.__version__)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_recipe(
    run_dir: Path, base_model: str, lora_rank: int, lora_alpha: float, lora_enabled: bool = True
) -> None:
    """The resolved recipe `rft train` writes beside its outputs (fields the export reads filled in)."""
    recipe = {
        "model": {"name_or_path": base_model, "dtype": "float32"},
        "lora": {
            "enabled": lora_enabled, "r": lora_rank, "alpha": lora_alpha, "target_modules": "all-linear"
        },
        "data": {"train": "train.jsonl"},
        "rewards": [{"fn": "rewards.math:accuracy"}],
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))


def build_lora_run(
    base_dir: Path,
    run_dir: Path,
    *,
    base_model_name: str | None = None,
    rank: int = TINY_LORA_RANK,
    lora_b_std: float = 0.3,
    seed: int = 1,
) -> Path:
    """A run directory whose final policy is a LoRA adapter on `base_dir` with random non-zero lora_B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0)
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * lora_b_std)
    peft_model.save_pretrained(run_dir / "final")
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(run_dir / "final")
    write_recipe(run_dir, base_model_name or str(base_dir), rank, 2.0 * rank)
    return run_dir


def build_full_run(base_dir: Path, run_dir: Path, seed: int = 2) -> Path:
    """A run directory from full fine-tuning: `final/` is a whole model (weights perturbed) plus tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    model.save_pretrained(run_dir / "final")
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(run_dir / "final")
    write_recipe(run_dir, str(base_dir), 16, 32.0, lora_enabled=False)
    return run_dir


def chat_prompt_ids(tokenizer: Any) -> list[list[int]]:
    """Token ids of the chat prompts, rendered with the tokenizer's own chat template."""
    rendered = [
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        for messages in CHAT_PROMPTS
    ]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]


def bf16_tolerance(policy_float32: torch.Tensor, policy_bfloat16: torch.Tensor) -> float:
    """Allowed |logit difference| for a bfloat16 export: twice what running the unmerged policy in
    bfloat16 costs (the rounding any bf16 copy of the policy pays), plus a hair for tiny logits."""
    return 2 * (policy_bfloat16 - policy_float32).abs().max().item() + 1e-3


@torch.no_grad()
def next_token_logits(model: Any, prompts: list[list[int]]) -> torch.Tensor:
    """Float32 next-token logits after each prompt, one row per prompt."""
    rows = [model(input_ids=torch.tensor([ids])).logits[0, -1].float() for ids in prompts]
    return torch.stack(rows)
