"""Save and resume everything a run needs: weights (adapter or model), optimizer, scheduler, RNG, data position.

A checkpoint is written to a temporary folder and renamed into place, so a run killed while saving
leaves the previous checkpoint intact and never a half one.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_PREFIX = "step-"


@dataclass
class TrainerState:
    step: int
    data_position: int
    engine_name: str


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_policy(
    model: torch.nn.Module, tokenizer: Any, directory: Path, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """Adapter (peft) or full model, with the tokenizer, in `save_pretrained` layout.

    `state_dict`: the model's full weights when the live ones are sharded across processes (FSDP, ZeRO-3).
    """
    model.save_pretrained(directory, state_dict=state_dict)
    tokenizer.save_pretrained(directory)


def save_checkpoint(
    run_dir: Path,
    state: TrainerState,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    keep: int,
    state_dict: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint; `state_dict` / `optimizer_state` stand in for sharded live ones (see `save_policy`)."""
    root = run_dir / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{state.step:06d}"
    partial = root / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_policy(model, tokenizer, partial / "policy", state_dict=state_dict)
    torch.save(
        {
            "state": state.__dict__,
            "optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_states(),
        },
        partial / "trainer_state.pt",
    )
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX))


def load_checkpoint(
    checkpoint: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> TrainerState:
    """Restore weights, optimizer, scheduler and RNG from `checkpoint` into live objects."""
    load_policy_weights(checkpoint, model)
    payload = load_training_state(checkpoint)
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    return TrainerState(**payload["state"])


def load_policy_weights(checkpoint: Path, model: torch.nn.Module) -> None:
    """Copy the checkpoint's adapter (peft) or full weights into `model`."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    policy_dir = checkpoint / "policy"
    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, load_file(str(policy_dir / "adapter_model.safetensors")))
    else:
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=next(model.parameters()).dtype)
        model.load_state_dict(saved.state_dict())


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's trainer state, optimizer and scheduler state dicts; restores the RNG states."""
    payload = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    restore_rng_states(payload["rng"])
    return payload
