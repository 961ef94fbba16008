"""Find the trained policy in a run directory and turn it into one plain model.

A run directory (written by `rft train`) holds `config.yaml` (the resolved recipe) and `final/`:
with LoRA, a peft adapter plus the tokenizer; without, a full `save_pretrained` model plus the
tokenizer. Intermediate checkpoints (`checkpoints/step-NNNNNN/`) keep the same layout under
`policy/`. Every exporter starts here: `locate_policy` checks the layout and names what is missing
before anything heavy loads; `merge_policy` loads base + adapter and folds the adapter in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rft.config import EMBEDDED_MODEL, ConfigError, load_config

RECIPE_FILE = "config.yaml"
ADAPTER_CONFIG_FILE = "adapter_config.json"
MODEL_CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# The hub id of the model that `embedded:smollm2-135m-instruct` converts, for deployments that
# fetch the base model themselves (a SageMaker endpoint serving only the adapter).
EMBEDDED_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


class ExportError(ValueError):
    """An export that cannot be done; the message says which file or limit and why."""


@dataclass(frozen=True)
class PolicySource:
    """Where the trained policy's pieces are, resolved and checked."""

    checkpoint_dir: Path
    """The adapter folder (is_adapter) or the full model folder."""
    is_adapter: bool
    base_model: str
    """What `from_pretrained` loads as the base: local directory or hub id (the checkpoint itself without
    LoRA)."""
    base_model_name: str
    """The base as the recipe names it (hub id, directory or `embedded:...`)."""
    tokenizer_dir: Path | str
    trust_remote_code: bool
    adapter_config: dict[str, Any] | None

    @property
    def lora_rank(self) -> int | None:
        """The adapter's largest rank (rank_pattern may raise it for some modules)."""
        if self.adapter_config is None:
            return None
        per_module = (self.adapter_config.get("rank_pattern") or {}).values()
        ranks = [int(self.adapter_config["r"]), *(int(r) for r in per_module)]
        return max(ranks)

    @property
    def base_model_hub_id(self) -> str | None:
        """A hub id for the base model when one is known (None for a local directory)."""
        if self.base_model_name == EMBEDDED_MODEL:
            return EMBEDDED_MODEL_HUB_ID
        if Path(self.base_model_name).exists():
            return None
        return self.base_model_name


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: line {exc.lineno}: not valid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path}: expected a JSON object")
    return data


def _policy_dir(run_dir: Path, checkpoint: Path | None) -> Path:
    if checkpoint is None:
        candidate = run_dir / "final"
        if not candidate.is_dir():
            raise ExportError(
                f"{candidate}: not found (has the run finished?); pass --checkpoint "
                f"{run_dir / 'checkpoints' / 'step-NNNNNN'} to export an intermediate checkpoint"
            )
    else:
        candidate = checkpoint
        if not candidate.is_dir():
            raise ExportError(f"--checkpoint {candidate}: not a directory")
    # A step checkpoint keeps the policy beside optimizer and rollout state.
    if (candidate / "policy").is_dir():
        candidate = candidate / "policy"
    if not (candidate / ADAPTER_CONFIG_FILE).exists() and not (candidate / MODEL_CONFIG_FILE).exists():
        raise ExportError(
            f"{candidate}: holds neither a peft adapter ({ADAPTER_CONFIG_FILE}) nor a model "
            f"({MODEL_CONFIG_FILE})"
        )
    return candidate


def locate_policy(run_dir: str | Path, checkpoint: str | Path | None = None) -> PolicySource:
    """Resolve the policy of RUN_DIR (or of `checkpoint`) and its base model, checking the layout.

    The base model comes from the recipe (`model.name_or_path`); without a recipe (an adapter
    folder exported on its own) from the adapter's `base_model_name_or_path`.
    """
    from rft.models import resolve_model_path

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir}: run directory not found")
    policy_dir = _policy_dir(run_dir, Path(checkpoint) if checkpoint is not None else None)
    recipe_path = run_dir / RECIPE_FILE
    recipe = None
    if recipe_path.exists():
        try:
            recipe = load_config(recipe_path)
        except ConfigError as exc:
            raise ExportError(str(exc)) from None

    adapter_config = None
    if (policy_dir / ADAPTER_CONFIG_FILE).exists():
        adapter_config = _read_json(policy_dir / ADAPTER_CONFIG_FILE)
        if adapter_config.get("peft_type") != "LORA":
            raise ExportError(
                f"{policy_dir / ADAPTER_CONFIG_FILE}: peft_type: {adapter_config.get('peft_type')!r}; only "
                "LORA adapters export"
            )
        if recipe is not None:
            base_name = recipe.model.name_or_path
        elif adapter_config.get("base_model_name_or_path"):
            base_name = str(adapter_config["base_model_name_or_path"])
        else:
            raise ExportError(
                f"{policy_dir / ADAPTER_CONFIG_FILE}: base_model_name_or_path is empty and "
                f"{recipe_path} does not exist: the base model is unknown"
            )
        base_model = resolve_model_path(base_name)
    else:
        base_name = recipe.model.name_or_path if recipe is not None else str(policy_dir)
        base_model = str(policy_dir)

    has_tokenizer = any((policy_dir / name).exists() for name in TOKENIZER_FILES)
    return PolicySource(
        checkpoint_dir=policy_dir,
        is_adapter=adapter_config is not None,
        base_model=base_model,
        base_model_name=base_name,
        tokenizer_dir=policy_dir if has_tokenizer else base_model,
        trust_remote_code=recipe.model.trust_remote_code if recipe is not None else False,
        adapter_config=adapter_config,
    )


def load_base_config(source: PolicySource) -> Any:
    """The base model's transformers config (cheap: no weights)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source.base_model, trust_remote_code=source.trust_remote_code)


def load_policy(source: PolicySource, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The policy as trained: base model with the adapter applied, not merged (or the full model)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        source.base_model, dtype=dtype, trust_remote_code=source.trust_remote_code
    )
    if source.is_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(source.checkpoint_dir))
    return model.eval()


def merge_policy(source: PolicySource, dtype: torch.dtype) -> Any:
    """Base + adapter folded into one plain transformers model, cast to `dtype`.

    The merge runs in float32 so that W + scale * B @ A is rounded once, to the export dtype,
    instead of once for the delta and again for the sum.
    """
    model = load_policy(source, torch.float32)
    if source.is_adapter:
        model = model.merge_and_unload()
    return model.to(dtype).eval()


def load_tokenizer(source: PolicySource) -> Any:
    """The tokenizer saved with the policy (the base model's when the checkpoint has none)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source.tokenizer_dir),
                                         trust_remote_code=source.trust_remote_code)


def ensure_empty_dir(out_dir: Path) -> None:
    """Refuse to write into a folder with files: a stale shard beside a new export would be loaded too."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"--out {out_dir}: exists and is not empty; pick a new folder or empty it")
    out_dir.mkdir(parents=True, exist_ok=True)
