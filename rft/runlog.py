"""Every file the trainer writes into the run folder, in one place, and how a resume cuts them back.

- `metrics.jsonl`: one row a step (`RunLog.step`), also sent to the trackers and, every
  `output.log_every` steps, printed as a log line;
- `completions.jsonl`: the first `output.log_completions` completions of each scored round;
- `evaluations.jsonl`: one row per held-out pass, with its samples;
- `alerts.jsonl` (written by `rft.monitors`), the manifest, `config.yaml`, `results.json`.

The logs are JSON lines appended whole. Resuming cuts them back once, to the checkpoint's step
(`cut_back`): a torn last line (a run killed mid-write) is dropped and said so, a broken line
elsewhere is an error naming file and line. Only the main process writes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from rft.bedrock_job import BEDROCK_HYPERPARAMETERS_NAME
from rft.config import ConfigError, RecipeConfig, dump_config
from rft.data import Example
from rft.jsonl import JSONLError, append_jsonl, read_log
from rft.log_lines import held_out_line, step_line
from rft.manifest import build_manifest, read_manifest, record_evaluation, write_manifest
from rft.monitors import ALERTS_NAME, Monitors
from rft.tracking import start_trackers

METRICS_NAME = "metrics.jsonl"
COMPLETIONS_NAME = "completions.jsonl"
EVALUATIONS_NAME = "evaluations.jsonl"
RESULTS_NAME = "results.json"
LOG_NAMES = (METRICS_NAME, EVALUATIONS_NAME, COMPLETIONS_NAME, ALERTS_NAME)


class RunLogError(ConfigError):
    """A run log that resuming cannot cut back (a broken line before the last)."""


def _read(path: Path) -> tuple[list[dict[str, Any]], bool]:
    try:
        return read_log(path)
    except JSONLError as exc:
        raise RunLogError(str(exc)) from None


def check_logs(run_dir: Path) -> None:
    """Fail now, before a model loads, on a log that resuming could not cut back."""
    for name in LOG_NAMES:
        _read(run_dir / name)


def cut_back(run_dir: Path, step: int) -> list[str]:
    """Empty the logs (`step` 0) or keep their rows up to `step`; returns the lines to tell the user.

    A resumed run keeps what happened up to its checkpoint, not what the killed run did after it.
    """
    notes = []
    for name in LOG_NAMES:
        path = run_dir / name
        if step == 0 or not path.exists():
            path.unlink(missing_ok=True)
            continue
        rows, torn = _read(path)
        if torn:
            notes.append(f"{path}: dropped a torn last line (the previous run was stopped while writing it)")
        path.write_text("")
        append_jsonl(path, [row for row in rows if row["step"] <= step])
    return notes


def read_rows(run_dir: Path, name: str) -> list[dict[str, Any]]:
    """A log's rows (none if it does not exist), a torn last line left out."""
    return _read(run_dir / name)[0]


class RunLog:
    """The run folder's writer. Every method may be called on every process; only the main one writes."""

    def __init__(self, config: RecipeConfig, accelerator: Accelerator, reward_names: Sequence[str]):
        self.config, self.accelerator, self.reward_names = config, accelerator, list(reward_names)
        self.run_dir = config.run_dir
        self.main = accelerator.is_main_process
        self.monitors: Monitors | None = None

    def start(
        self, train: list[Example], held_out: list[Example], engine_name: str, *, run_id: str,
        recipe_changes: list[dict[str, Any]], start_step: int, main_mode: str,
    ) -> list[dict[str, Any]]:
        """Open the trackers, write the recipe and the manifest, start the monitors (replayed on resume);
        returns the main mode's evaluation rows so far (what early stopping replays)."""
        config = self.config
        start_trackers(self.accelerator, config)
        if not self.main:
            return []
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(config))
        if config.bedrock_hyperparameters:
            shutil.copyfile(config.bedrock_hyperparameters, self.run_dir / BEDROCK_HYPERPARAMETERS_NAME)
        # The logs were cut back to the checkpoint's step (or emptied) before the model loaded (`cut_back`).
        previous = read_manifest(self.run_dir) if start_step > 0 else None
        manifest = build_manifest(config, train, held_out, engine_name)
        manifest.update(run_id=run_id, recipe_changes=recipe_changes)
        if previous is not None:
            manifest["evaluation"] = previous.get("evaluation", {})
            manifest["resumed_at_step"] = start_step
        write_manifest(self.run_dir, manifest)
        self.monitors = Monitors.from_recipe(config, self.reward_names, self.run_dir / ALERTS_NAME)
        if start_step == 0:
            return []
        evaluations = [row for row in read_rows(self.run_dir, EVALUATIONS_NAME)
                       if row.get("mode", "greedy") == main_mode]
        self.monitors.replay(read_rows(self.run_dir, METRICS_NAME), evaluations)
        return evaluations

    def step(self, step: int, metrics: dict[str, float]) -> None:
        """A step's row: the metrics file, the trackers, the log line, the monitors."""
        if not self.main:
            return
        append_jsonl(self.run_dir / METRICS_NAME, [{"step": step, **metrics}])
        self.accelerator.log(metrics, step=step)
        if self.config.output.log_every and step % self.config.output.log_every == 0:
            tqdm.write(step_line(step, self.config.training.steps, metrics, self.reward_names))
        if self.monitors is not None:
            self.monitors.observe_step(step, metrics)

    def completions(
        self, step: int, rows: list[Example], completions: list[Any], rewards: torch.Tensor,
        extras: dict[str, list[Any]],
    ) -> None:
        """The first `output.log_completions` completions of a scored round."""
        keep = self.config.output.log_completions
        if not keep or not self.main:
            return
        records = []
        for i, (row, completion, reward) in enumerate(zip(rows, completions, rewards.tolist(), strict=True)):
            if i == keep:
                break
            record = {"step": step, "prompt": row.prompt, "completion": completion, "reward": reward}
            if extras:  # what rewards logged through log_extra (TRL's completions table columns)
                record["extra"] = {column: values[i] for column, values in extras.items()}
            records.append(record)
        append_jsonl(self.run_dir / COMPLETIONS_NAME, records)

    def evaluation(self, step: int, label: str, results: list[Any]) -> None:
        """A held-out evaluation's passes (`EvalResult`s, the main mode first): rows, trackers, manifest."""
        if not self.main:
            return
        tracked: dict[str, float] = {}
        rows = []
        for result in results:
            result.label = label
            rows.append({"step": step, **result.summary(), "samples": result.samples})
            tracked.update(result.tracker_metrics())
            line = held_out_line(label, result.mode, result.mean, result.stderr, result.count, result.cached)
            tqdm.write(line)
        append_jsonl(self.run_dir / EVALUATIONS_NAME, rows)
        self.accelerator.log(tracked, step=step)
        self.record_evaluation(label, results)
        if self.monitors is not None:
            self.monitors.observe_eval(step, results[0].summary())

    def record_evaluation(self, label: str, results: list[Any]) -> None:
        """The passes' summaries in the manifest under `label`."""
        if self.main:
            record_evaluation(self.run_dir, label, [result.summary() for result in results])

    def results(self, results: dict[str, Any]) -> None:
        if self.main:
            (self.run_dir / RESULTS_NAME).write_text(json.dumps(results, indent=2))
