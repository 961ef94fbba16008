"""Write a merged checkpoint in the layout transformers 4.51.3 reads exactly as we mean it.

Amazon Bedrock Custom Model Import documents transformers 4.51.3. A checkpoint saved by
transformers 5.x loads under 4.51.3 without an error and is silently wrong:

- `config.json` carries `rope_parameters` and `dtype`; 4.51.3 reads `rope_theta`, `rope_scaling`
  and `torch_dtype`, so it falls back to its default rope_theta (the embedded SmolLM2: 10000
  instead of 100000, logits off by up to 2.2);
- 5.x names some fields differently (`num_local_experts` where 4.51.3's Qwen3-MoE reads
  `num_experts`) and leaves out fields equal to its own defaults, which 4.51.3 then fills with *its*
  defaults;
- `tokenizer_config.json` names `TokenizersBackend` (a 5.x-only class) and the chat template sits
  in a separate `chat_template.jinja` that 4.51.3 does not read.

So `config.json` is written from the full config (every field explicit) converted to the 4.x
layout, and `tokenizer_config.json` is written for `PreTrainedTokenizerFast`, which takes
`tokenizer.json` verbatim, with the chat template inside. The tests check, under a real 4.51.3,
every architecture in `TRANSFORMERS4_ARCHITECTURES`: config values, token ids, chat template
and next-token logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from rft.export.merge import ExportError

TRANSFORMERS4_VERSION = "4.51.3"

# Architectures whose 4.51.3 reading of this layout is checked by tests/test_export_transformers4.py.
# Each entry must be there: an architecture not checked is not claimed.
TRANSFORMERS4_ARCHITECTURES = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "MixtralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Qwen3MoeForCausalLM",
    }
)

# Keys 5.x writes that 4.51.3 does not read (their content is carried by the 4.x keys).
_TRANSFORMERS5_ONLY_KEYS = ("dtype", "rope_parameters", "_name_or_path")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def transformers4_config(config: Any, dtype: torch.dtype) -> dict[str, Any]:
    """The model config as a 4.x `config.json` dict: every field explicit, rope in 4.x keys."""
    layout = config.to_dict()
    for key in _TRANSFORMERS5_ONLY_KEYS:
        layout.pop(key, None)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope:
        if "rope_theta" not in rope:
            # Per-layer-type rope ({"full_attention": {...}, ...}) has no 4.x spelling for these models.
            raise ExportError(
                f"config.json: rope_parameters {rope} has no transformers 4.x equivalent (expected one "
                "rope_theta)"
            )
        layout["rope_theta"] = rope.pop("rope_theta")
        if "partial_rotary_factor" in rope:
            layout["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        layout["rope_scaling"] = None if rope_type == "default" else {**rope, "rope_type": rope_type}
    # A field 5.x renamed keeps its old name as an alias (attribute_map: old -> new); writing both
    # spellings lets 4.51.3 find the one it reads, and it ignores the other.
    for alias, canonical in getattr(config, "attribute_map", {}).items():
        if canonical in layout and alias not in layout:
            layout[alias] = layout[canonical]
    layout["torch_dtype"] = _dtype_name(dtype)
    layout["transformers_version"] = TRANSFORMERS4_VERSION
    return layout


def transformers4_tokenizer_config(tokenizer: Any) -> dict[str, Any]:
    """`tokenizer_config.json` for 4.51.3: a class it knows, the special tokens, the chat template inside."""
    layout: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for name, token in tokenizer.special_tokens_map.items():
        layout[name] = str(token) if not isinstance(token, list) else [str(t) for t in token]
    # 5.x keeps what 4.x called additional_special_tokens as extra_special_tokens (a list, or a
    # dict of named tokens); 4.51.3 only reads the list under its old name.
    extra = getattr(tokenizer, "extra_special_tokens", None) or []
    extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
    if extra:
        layout["additional_special_tokens"] = [str(token) for token in extra]
    layout["model_max_length"] = tokenizer.model_max_length
    layout["clean_up_tokenization_spaces"] = bool(tokenizer.clean_up_tokenization_spaces)
    layout["padding_side"] = tokenizer.padding_side
    layout["truncation_side"] = tokenizer.truncation_side
    template = tokenizer.chat_template
    if isinstance(template, dict):
        # 4.x spells several named templates as a list of {"name", "template"}.
        layout["chat_template"] = [{"name": name, "template": text} for name, text in template.items()]
    elif template:
        layout["chat_template"] = template
    return layout


def write_transformers4_checkpoint(
    model: Any,
    tokenizer: Any,
    out_dir: Path,
    *,
    dtype: torch.dtype,
    tokenizer_source_dirs: list[Path | str],
    max_shard_size: str = "5GB",
) -> list[Path]:
    """Save `model` (already merged and cast) and its tokenizer into `out_dir` for transformers 4.51.3.

    Returns the files written. `tokenizer.model` (a sentencepiece model) is copied from the first
    of `tokenizer_source_dirs` that has one.
    """
    architectures = list(getattr(model.config, "architectures", None) or [type(model).__name__])
    if not set(architectures) <= TRANSFORMERS4_ARCHITECTURES:
        raise ExportError(
            f"config.json: architectures {architectures}: no transformers {TRANSFORMERS4_VERSION} layout is "
            f"verified for it (verified: {', '.join(sorted(TRANSFORMERS4_ARCHITECTURES))})"
        )
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(
            f"tokenizer in {tokenizer_source_dirs[0]}: no tokenizer.json (fast tokenizer) to export"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    config = transformers4_config(model.config, dtype)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation_config = out_dir / "generation_config.json"
    if generation_config.exists():
        fields = json.loads(generation_config.read_text())
        fields["transformers_version"] = TRANSFORMERS4_VERSION
        generation_config.write_text(json.dumps(fields, indent=2) + "\n")

    backend.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = transformers4_tokenizer_config(tokenizer)
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    special_tokens = {key: value for key, value in tokenizer_config.items()
                      if key.endswith("_token") or key == "additional_special_tokens"}
    _write_json(out_dir / "special_tokens_map.json", special_tokens)
    for source in tokenizer_source_dirs:
        sentencepiece_model = Path(source) / "tokenizer.model"
        if sentencepiece_model.is_file():
            shutil.copyfile(sentencepiece_model, out_dir / "tokenizer.model")
            break
    return sorted(path for path in out_dir.iterdir() if path.is_file())


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
