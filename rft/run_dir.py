"""A run folder belongs to one run: its id, its lock, and what a start or a resume may do with it.

- A run gets an id when it starts; the manifest and every checkpoint carry it. Starting a new run
  into a folder that holds another run's records is refused (or, with `--overwrite`, the folder is
  emptied first); `--resume` loads only checkpoints with the folder's run id.
- The main process holds an exclusive lock (`flock` on `RUN_DIR/.lock`) for the run's life, so a
  second run into the same folder stops before its model loads. The kernel drops the lock with the
  process, so a killed run leaves no stale lock behind (the file itself stays, harmlessly).
- On resume the recipe is compared with the one stored in the checkpoint. Fields that only say how
  the run executes or is recorded (`FREE_FIELDS`) may change; any other change is refused unless the
  user forces it, and every change is recorded with its step (`recipe_changes` in the manifest and in
  each later checkpoint).
- The run's logs are JSON lines (`rft.runlog`). Resuming cuts them back to the checkpoint's step; a torn
  last line (a run killed mid-write) is dropped and said so, a broken line elsewhere is an error naming
  file and line.

Everything here reads only small files, so all of it happens before a model loads.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rft.checkpoint import INFO_NAME, checkpoint_info, checkpoint_step, list_checkpoints
from rft.config import ConfigError, RecipeConfig
from rft.manifest import MANIFEST_NAME, read_manifest
from rft.runlog import LOG_NAMES, check_logs, cut_back

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
# What a run writes: a folder holding any of these holds a run.
RECORD_NAMES = (MANIFEST_NAME, "config.yaml", *LOG_NAMES, "results.json", "checkpoints", "final")
# Recipe fields that cannot change what the run computes, only how long it runs, how it executes
# (same maths, other split or kernels) or what is recorded. A prefix ends with a dot.
FREE_FIELDS = (
    "training.steps", "training.threads", "training.micro_batch_size", "training.logprob_chunk_size",
    "training.share_prompts", "training.max_tokens_per_micro_batch",
    "model.gradient_checkpointing", "model.attn_implementation",
    "rollout.batch_size", "rollout.vllm_gpu_memory_utilization", "rollout.vllm_sleep_mode",
    "rollout.vllm_max_model_len",
    # The engines sample the same distribution from the same weights: another engine is another kernel.
    "rollout.engine", "scoring.concurrency", "scoring.isolation", "scoring.memory_mb", "output.", "monitors.",
    "eval.every", "eval.before_training", "eval.after_training", "eval.keep_samples", "eval.batch_size",
    "eval.baseline_cache", "eval.noise_sigmas", "eval.early_stopping", "eval.patience",
    "bedrock_hyperparameters",
)
ABSENT = "(absent)"


class RunDirError(ConfigError):
    """A run folder that this start cannot use (another run's, locked, or a bad --resume); one line."""


class RunLock:
    """An exclusive `flock` on RUN_DIR/.lock, held until `release` or the process ends."""

    def __init__(self, run_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_NAME
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self._fd, 64).decode(errors="replace").strip() or "unknown"
            self.release()
            raise RunDirError(
                f"{run_dir}: in use by another run (process {holder}); wait for it to end or choose another "
                "output.name"
            ) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __del__(self) -> None:
        self.release()


@dataclass
class RunStart:
    """What this start does with the run folder, decided before any model loads."""

    run_id: str
    checkpoint: Path | None = None
    step: int = 0
    # The run's recipe changes so far, this start's included: {step, field, old, new}.
    recipe_changes: list[dict[str, Any]] = field(default_factory=list)
    new_changes: list[dict[str, Any]] = field(default_factory=list)
    overwrite: bool = False
    notes: list[str] = field(default_factory=list)


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def run_records(run_dir: Path) -> list[str]:
    return [name for name in RECORD_NAMES if (run_dir / name).exists()]


def folder_run_id(run_dir: Path) -> str | None:
    manifest = read_manifest(run_dir)
    return manifest.get("run_id") if manifest else None


def plan_start(
    config: RecipeConfig, resume: bool | str, *, allow_recipe_change: bool = False, overwrite: bool = False,
    main: bool = True,
) -> RunStart:
    """Decide the run id and the checkpoint to resume; refuse what would mix two runs or change one silently.

    Reads only. `main`: this is the process that writes the folder (the others check only what they load).
    """
    run_dir = config.run_dir
    if overwrite and resume:
        raise RunDirError("--overwrite starts a new run in the folder; it cannot be combined with --resume")
    records = run_records(run_dir) if main else []
    if not resume:
        if records and not overwrite:
            raise RunDirError(
                f"{run_dir} already holds a run ({', '.join(records)}); continue it with --resume, choose "
                "another output.name (--set output.name=...), or pass --overwrite to delete it"
            )
        return RunStart(new_run_id(), overwrite=bool(records))
    run_id = folder_run_id(run_dir)
    if run_id is None and records:
        raise RunDirError(
            f"{run_dir} holds records of a run without a run id (from an older rft, or its {MANIFEST_NAME} "
            "is gone), so --resume cannot tell its checkpoints; choose another output.name or pass "
            "--overwrite instead"
        )
    checkpoint = _explicit_checkpoint(Path(resume), run_dir, run_id) if isinstance(resume, str) else None
    if checkpoint is None and not isinstance(resume, str):
        own = list_checkpoints(run_dir, run_id=run_id) if run_id else []
        checkpoint = own[-1] if own else None
    if checkpoint is None:
        note = f"--resume: no checkpoint of this run in {run_dir / 'checkpoints'}; starting from scratch"
        return RunStart(run_id or new_run_id(), notes=[note])
    if main:
        check_logs(run_dir)
    return _resume_start(config, checkpoint, run_id or "", allow_recipe_change)


def _explicit_checkpoint(checkpoint: Path, run_dir: Path, run_id: str | None) -> Path:
    info = checkpoint_info(checkpoint)
    if info is None:
        what = "does not exist" if not checkpoint.exists() else f"holds no {INFO_NAME}"
        raise RunDirError(
            f"--resume {checkpoint}: not a checkpoint ({what}); give a folder "
            "RUN_DIR/checkpoints/step-NNNNNN written by this rft, or --resume alone for the run folder's "
            "latest"
        )
    if info.get("run_id") != run_id:
        raise RunDirError(
            f"--resume {checkpoint}: a checkpoint of run {info.get('run_id')}, not of the run in {run_dir} "
            f"(run id {run_id or 'none'}); resume a run in its own folder (output.run_dir)"
        )
    return checkpoint


def _resume_start(config: RecipeConfig, checkpoint: Path, run_id: str, allow_recipe_change: bool) -> RunStart:
    info = checkpoint_info(checkpoint) or {}
    step = int(info.get("step", checkpoint_step(checkpoint) or 0))
    changes = recipe_changes(info.get("recipe", {}), config.model_dump(mode="json"), step)
    meaningful = [change for change in changes if not is_free_field(change["field"])]
    listed = "; ".join(f"{c['field']} {_show(c['old'])} -> {_show(c['new'])}" for c in meaningful)
    if meaningful and not allow_recipe_change:
        raise RunDirError(
            f"--resume {checkpoint.name}: the recipe differs from the checkpoint's in what the run computes: "
            f"{listed}; "
            "resume with the checkpoint's values, or pass --allow-recipe-change to apply them from step "
            f"{step} (recorded in the manifest)"
        )
    notes = [f"recipe changes from step {step}: " + "; ".join(
        f"{c['field']} {_show(c['old'])} -> {_show(c['new'])}" for c in changes
    )] if changes else []
    return RunStart(
        run_id, checkpoint=checkpoint, step=step, recipe_changes=[*info.get("recipe_changes", []), *changes],
        new_changes=changes, notes=notes,
    )


def _show(value: Any) -> str:
    return ABSENT if value is ABSENT else json.dumps(value)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted leaves of a dumped recipe (`rewards.1.weight`); a list of plain values is one leaf."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and any(isinstance(item, dict | list) for item in value):
        items = ((str(index), item) for index, item in enumerate(value))
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def recipe_changes(old: dict[str, Any], new: dict[str, Any], step: int) -> list[dict[str, Any]]:
    """The fields that differ between two dumped recipes, each as {step, field, old, new}."""
    before, after = flatten(old), flatten(new)
    return [
        {"step": step, "field": key, "old": before.get(key, ABSENT), "new": after.get(key, ABSENT)}
        for key in sorted(before.keys() | after.keys())
        if before.get(key, ABSENT) != after.get(key, ABSENT)
    ]


def is_free_field(name: str) -> bool:
    return any(name.startswith(free) if free.endswith(".") else name == free for free in FREE_FIELDS)


def apply_start(run_dir: Path, start: RunStart) -> list[str]:
    """The main process's changes to the folder once every process agrees: empty it, or cut its logs back.

    A new run (or one restarting from scratch) starts with empty logs; a resumed one keeps what happened
    up to its checkpoint (`rft.runlog.cut_back`). Returns the lines to tell the user.
    """
    notes = list(start.notes)
    if start.overwrite:
        for path in run_dir.iterdir():
            if path.name != LOCK_NAME:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        notes.append(f"--overwrite: deleted the previous run in {run_dir}")
    return notes + cut_back(run_dir, start.step)


def decide_start(
    config: RecipeConfig, resume: bool | str, *, allow_recipe_change: bool, overwrite: bool, main: bool,
    gather: Callable[[Any], list[Any]], lock: RunLock | None,
) -> RunStart:
    """Decide (before any model loads) the run id and checkpoint, the same in every process; the main
    process then applies it to the folder (`apply_start`). `gather`: one value from every process."""
    try:
        local: RunStart | str = plan_start(
            config, resume, allow_recipe_change=allow_recipe_change, overwrite=overwrite, main=main
        )
    except RunDirError as exc:
        local = str(exc)
    start = agree_start(local, gather, lock, config.run_dir / "checkpoints")
    if main:
        for note in apply_start(config.run_dir, start):
            logger.warning(note)
    return start


def agree_start(
    local: RunStart | str, gather: Callable[[Any], list[Any]], lock: RunLock | None, checkpoints: Path
) -> RunStart:
    """Every process's start (or refusal, as its text) made one decision, the same in every process.

    `gather` collects one value from every process, in process order (the main one first).
    """
    plans = gather(local)
    seen = [plan.checkpoint.name if plan.checkpoint else None for plan in plans if not isinstance(plan, str)]
    errors = [plan for plan in plans if isinstance(plan, str)]
    if (errors or len(set(seen)) > 1) and lock is not None:
        lock.release()  # this start ends here; the folder is free for the next
    # A refusal anywhere stops every process, or the others would wait for it in the next collective.
    if errors:
        raise RunDirError(errors[0])
    # Each machine reads its own copy of the run directory; a process that saw another checkpoint (or
    # none) would train from a different step and leave the others waiting in a collective.
    if len(set(seen)) > 1:
        raise RuntimeError(
            f"--resume: the processes see different checkpoints in {checkpoints} (by process: {seen}); "
            "every machine needs the same run directory (shared, or synced as SageMaker does with "
            "/opt/ml/checkpoints)"
        )
    assert not isinstance(local, str)
    # The main process's run id is the run's: only it writes the manifest and checkpoints.
    local.run_id = plans[0].run_id
    return local
