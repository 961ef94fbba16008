"""Save and resume everything a run needs: weights (adapter or model), optimizer, scheduler, RNG, data
position.

A checkpoint is written to a temporary folder and renamed into place, so a run killed while saving
leaves the previous checkpoint intact and never a half one. Its `checkpoint.json` says whose it is
and what it computed: the run id, the step, the resolved recipe and the recipe changes made so far
(`rft.run_dir` compares them on resume); it is small so that a resume can check it before loading.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from rft import distributed

CHECKPOINT_PREFIX = "step-"
INFO_NAME = "checkpoint.json"

logger = logging.getLogger(__name__)


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


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:06d}"


def save_checkpoint(
    run_dir: Path,
    state: TrainerState,
    info: dict[str, Any],
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    keep: int,
    state_dict: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint; `state_dict` / `optimizer_state` stand in for sharded live ones (see
    `save_policy`).

    `info` (run id, recipe, recipe changes) goes to `checkpoint.json` with the step. Of this run's own
    checkpoints the newest `keep` by step stay; other runs' are not this run's to delete.
    """
    final = checkpoint_path(run_dir, state.step)
    partial = final.parent / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_policy(model, tokenizer, partial / "policy", state_dict=state_dict)
    (partial / INFO_NAME).write_text(json.dumps({**info, "step": state.step}, indent=1, default=str))
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
    for old in list_checkpoints(run_dir, run_id=info["run_id"])[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_step(path: Path) -> int | None:
    """The step in a checkpoint folder's name (`step-000012` -> 12); None for anything else."""
    digits = path.name[len(CHECKPOINT_PREFIX):]
    return int(digits) if path.name.startswith(CHECKPOINT_PREFIX) and digits.isdigit() else None


def checkpoint_info(checkpoint: Path) -> dict[str, Any] | None:
    """The checkpoint's `checkpoint.json`; None where there is none (not a checkpoint, or one written
    before it)."""
    try:
        return json.loads((checkpoint / INFO_NAME).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def list_checkpoints(run_dir: Path, run_id: str | None = None) -> list[Path]:
    """Checkpoints in `run_dir`, oldest step first; with `run_id`, only that run's."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    if run_id is not None:
        found = [p for p in found if (checkpoint_info(p) or {}).get("run_id") == run_id]
    return sorted(found, key=checkpoint_step)


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


def apply_optimizer_settings(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, training: Any
) -> None:
    """Put the recipe's optimizer settings into a restored optimizer and scheduler (a recipe change on
    resume).

    Loading their state dicts brings back the old learning rate, betas and weight decay, whatever the
    recipe says now. The scheduler (a LambdaLR, as every transformers schedule offered here) keeps its
    position; the current rate is the new base rate at that position of the (possibly new) schedule.
    """
    for group in optimizer.param_groups:
        group["betas"] = tuple(training.adam_betas)
        group["weight_decay"] = training.weight_decay
        group["initial_lr"] = training.learning_rate
    scheduler.base_lrs = [training.learning_rate] * len(optimizer.param_groups)
    schedule = zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    rates = [base * rate(scheduler.last_epoch) for base, rate in schedule]
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = rates  # what get_last_lr() (the logged learning_rate) reads


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's trainer state, optimizer and scheduler state dicts; restores the RNG states."""
    payload = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    restore_rng_states(payload["rng"])
    return payload


def restore_training_state(
    checkpoint: Path, accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR, training: Any, *, recipe_changed: bool,
) -> TrainerState:
    """Everything but the weights (loaded before `prepare`) into the live (prepared) objects: optimizer,
    scheduler, RNG; returns the trainer state. `recipe_changed`: the recipe's optimizer settings win."""
    payload = load_training_state(checkpoint)
    if not distributed.load_optimizer_state(accelerator, model, optimizer, payload["optimizer"]):
        logger.warning("%s holds no optimizer state (DeepSpeed ZeRO-3): the optimizer moments restart",
                       checkpoint)
    scheduler.load_state_dict(payload["scheduler"])
    if recipe_changed:
        # The checkpoint's optimizer and scheduler carry the old settings; a changed recipe must reach them.
        apply_optimizer_settings(optimizer, scheduler, training)
    return TrainerState(**payload["state"])
