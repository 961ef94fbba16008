"""`rft report RUN_DIR`: one self-contained HTML page (PNG plots inlined as base64) and summary.json.

The page shows train and held-out reward against step, each reward component, completion lengths
over time, clip fractions, KL and entropy, where each step's time went, a before / after table per
slice with each change against its noise, the monitors that fired, sampled completions at the start
and the end, and the run's manifest. `summary.json` holds the same numbers for machines, and
`--compare OTHER_RUN ...` adds how this run's final held-out score compares with other runs' where
that comparison means something (same held-out data, rewards and evaluation settings).

Everything is read from the run directory's files (metrics.jsonl, evaluations.jsonl,
completions.jsonl, alerts.jsonl, manifest.json, config.yaml): a report can be made for a finished,
running or killed run. The page is rendered by jinja2 (rft/templates/report.html.j2) over the typed
rows built here; plots are drawn by rft/report_plots.py. Torch-free.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rft.jsonl import read_log
from rft.manifest import read_manifest
from rft.monitors import read_alerts
from rft.report_page import render_html
from rft.report_plots import PLOTS
from rft.stats import compare, overall, reward_change

REPORT_NAME = "report.html"
SUMMARY_NAME = "summary.json"
DEFAULT_SIGMAS = 2.0


class ReportError(ValueError):
    """A folder that is not a run directory (nothing to report)."""


def _with_stats(evaluation: dict[str, Any]) -> dict[str, Any]:
    """Rows written before per-metric stats existed carry only the overall reward: give them that much."""
    if "stats" in evaluation:
        return evaluation
    reward = {key: evaluation[key] for key in ("mean", "stderr", "count")}
    return {**evaluation, "stats": {"reward": reward}, "slices": {}}


@dataclass
class Run:
    """Everything a run directory holds, read once."""

    run_dir: Path
    config: dict[str, Any]
    manifest: dict[str, Any] | None
    metrics: list[dict[str, Any]]
    evaluations: list[dict[str, Any]]
    completions: list[dict[str, Any]]
    alerts: list[dict[str, Any]]

    @classmethod
    def load(cls, run_dir: Path) -> Run:
        if not run_dir.is_dir():
            raise ReportError(f"{run_dir}: not a directory")
        manifest = read_manifest(run_dir)
        config_path = run_dir / "config.yaml"
        if manifest is not None:
            config = manifest["config"]
        elif config_path.is_file():
            config = yaml.safe_load(config_path.read_text())
        else:
            raise ReportError(f"{run_dir}: no manifest.json or config.yaml: not an rft run directory")
        metrics, _ = read_log(run_dir / "metrics.jsonl")
        evaluations, _ = read_log(run_dir / "evaluations.jsonl")
        completions, _ = read_log(run_dir / "completions.jsonl")
        return cls(
            run_dir=run_dir, config=config, manifest=manifest, metrics=metrics,
            evaluations=[_with_stats(row) for row in evaluations], completions=completions,
            alerts=read_alerts(run_dir),
        )

    @property
    def name(self) -> str:
        return str(self.config.get("output", {}).get("name", self.run_dir.name))

    @property
    def sigmas(self) -> float:
        return float(self.config.get("eval", {}).get("noise_sigmas", DEFAULT_SIGMAS))

    @property
    def main_mode(self) -> str:
        return "greedy" if self.config.get("eval", {}).get("greedy", True) else "sampled"

    def evaluations_of(self, mode: str) -> list[dict[str, Any]]:
        of_mode = [e for e in self.evaluations if e.get("mode", "greedy") == mode]
        return sorted(of_mode, key=lambda e: e["step"])

    @property
    def modes(self) -> list[str]:
        """Evaluation passes present, the main one first."""
        others = sorted({e.get("mode", "greedy") for e in self.evaluations} - {self.main_mode})
        return [self.main_mode, *others]

    def before_after(self, mode: str | None = None) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """First and last evaluation of a pass (default the main one), when they are at different steps."""
        evaluations = self.evaluations_of(mode or self.main_mode)
        if len(evaluations) < 2 or evaluations[0]["step"] == evaluations[-1]["step"]:
            return None
        return evaluations[0], evaluations[-1]

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(row["step"], row[key]) for row in self.metrics if isinstance(row.get(key), int | float)]
        return [p[0] for p in points], [float(p[1]) for p in points]

    def metric_keys(self) -> list[str]:
        return sorted({key for row in self.metrics for key in row if key != "step"})

    def final(self) -> dict[str, Any] | None:
        """The last evaluation of the main pass."""
        evaluations = self.evaluations_of(self.main_mode)
        return evaluations[-1] if evaluations else None


# ---------------------------------------------------------------------------- summary
def _fingerprints(manifest: dict[str, Any] | None) -> dict[str, Any]:
    if manifest is None:
        return {}
    return {
        "model": manifest.get("model"),
        "train": manifest.get("data", {}).get("train"),
        "held_out": manifest.get("data", {}).get("held_out"),
        "rewards": [
            {key: r.get(key) for key in ("name", "version", "weight", "kwargs", "source_sha256")}
            for r in manifest.get("rewards", [])
        ],
    }


def _not_comparable(run: Run, other: Run) -> list[str]:
    """Why the two runs' final held-out scores do not measure the same thing (none: they do)."""
    mine, theirs = _fingerprints(run.manifest), _fingerprints(other.manifest)
    reasons = []
    if not mine or not theirs:
        reasons.append("a run has no manifest.json")
    else:
        if mine["held_out"] != theirs["held_out"]:
            reasons.append("different held-out data")
        if mine["rewards"] != theirs["rewards"]:
            reasons.append("different reward functions, weights or sources")
    my_final, their_final = run.final(), other.final()
    if my_final is None or their_final is None:
        reasons.append("a run has no held-out evaluation")
    elif my_final.get("settings") != their_final.get("settings"):
        reasons.append("different evaluation settings")
    return reasons


def _compare_runs(run: Run, others: Sequence[Run]) -> list[dict[str, Any]]:
    """This run's final held-out score against each other run's, where the two measure the same thing."""
    results = []
    for other in others:
        entry: dict[str, Any] = {"run_dir": str(other.run_dir), "name": other.name}
        reasons = _not_comparable(run, other)
        entry["comparable"] = not reasons
        if reasons:
            results.append({**entry, "reasons": reasons})
            continue
        my_final, their_final = run.final(), other.final()
        assert my_final is not None and their_final is not None  # else a reason above
        row = reward_change(their_final, my_final, run.sigmas)
        results.append({
            **entry,
            "their_final": {k: their_final[k] for k in ("step", "mean", "stderr", "count")},
            "this_final": {k: my_final[k] for k in ("step", "mean", "stderr", "count")},
            "difference": row.change, "stderr": row.stderr, "z": row.z, "significant": row.significant,
        })
    return results


def _train_summary(run: Run) -> dict[str, Any]:
    _, rewards = run.series("reward/mean")
    if not rewards:
        return {}
    width = max(1, len(rewards) // 10)
    return {
        "reward_first_steps": sum(rewards[:width]) / width,
        "reward_last_steps": sum(rewards[-width:]) / width,
        "steps_averaged": width, "last": run.metrics[-1],
    }


def _held_out_summary(run: Run) -> dict[str, Any] | None:
    pair = run.before_after()
    if pair is None:
        return None
    before, after = pair
    row = overall(compare(before, after, run.sigmas))
    assert row is not None  # every evaluation summary holds the reward
    return {
        "mode": run.main_mode, "before_step": before["step"], "after_step": after["step"],
        "before": before["stats"]["reward"], "after": after["stats"]["reward"],
        "change": row.change, "stderr": row.stderr, "z": row.z, "significant": row.significant,
    }


def build_summary(run: Run, others: Sequence[Run] = ()) -> dict[str, Any]:
    """The report's numbers as JSON: held-out before / after with noise, per slice, monitors, fingerprints."""
    steps = [row["step"] for row in run.metrics]
    summary: dict[str, Any] = {
        "run_dir": str(run.run_dir), "name": run.name, "report": REPORT_NAME,
        "steps_completed": max(steps) if steps else 0,
        "steps_planned": run.config.get("training", {}).get("steps"),
        "noise_rule": f"|change| > {run.sigmas:g} x two-sample standard error",
        "train": _train_summary(run),
        "evaluations": [
            {key: e.get(key) for key in ("step", "label", "mode", "mean", "stderr", "count", "cached")}
            for e in run.evaluations
        ],
        "alerts": run.alerts,
        "fingerprints": _fingerprints(run.manifest),
    }
    held_out = _held_out_summary(run)
    if held_out is not None:
        summary["held_out"] = held_out
    summary["before_after"] = {
        mode: [row.to_dict() for row in compare(*pair, run.sigmas)]
        for mode in run.modes if (pair := run.before_after(mode)) is not None
    }
    if others:
        summary["comparisons"] = _compare_runs(run, others)
    return summary


def write_report(run_dir: Path, compare_with: Sequence[Path] = ()) -> Path:
    """Write RUN_DIR/report.html and RUN_DIR/summary.json; returns the HTML path."""
    run = Run.load(run_dir)
    others = [Run.load(other) for other in compare_with]
    summary = build_summary(run, others)
    plots = {key: png for key, _, make in PLOTS if (png := make(run)) is not None}
    summary["plots"] = sorted(plots)
    path = run_dir / REPORT_NAME
    path.write_text(render_html(run, summary, plots), encoding="utf-8")
    (run_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, default=str))
    return path


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run directory (written by `rft train`)")
    parser.add_argument(
        "--compare", type=Path, nargs="+", default=[], metavar="OTHER_RUN",
        help="other run directories to compare final held-out scores with (when data, rewards and settings "
        "match)",
    )


def run(args: argparse.Namespace) -> int:
    """`rft report`: write report.html and summary.json into the run directory."""
    try:
        path = write_report(args.run_dir, args.compare)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {path}\nsummary: {path.with_name(SUMMARY_NAME)}")
    return 0
