"""`rft report RUN_DIR`: one self-contained HTML page (PNG plots inlined as base64) and summary.json.

The page shows train and held-out reward against step, each reward component, completion lengths
over time, clip fractions, KL and entropy, where each step's time went, a before / after table per
slice with each change against its noise, the monitors that fired, sampled completions at the start
and the end, and the run's manifest. `summary.json` holds the same numbers for machines, and
`--compare OTHER_RUN ...` adds how this run's final held-out score compares with other runs' where
that comparison means something (same held-out data, rewards and evaluation settings).

Everything is read from the run directory's files (metrics.jsonl, evaluations.jsonl,
completions.jsonl, alerts.jsonl, manifest.json, config.yaml): a report can be made for a finished,
running or killed run.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from rft.evaluation import compare, completion_text, verdict
from rft.manifest import read_manifest
from rft.monitors import read_alerts

REPORT_NAME = "report.html"
SUMMARY_NAME = "summary.json"
DEFAULT_SIGMAS = 2.0


class ReportError(ValueError):
    """A folder that is not a run directory (nothing to report)."""


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


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
        return cls(
            run_dir=run_dir, config=config, manifest=manifest,
            metrics=_read_jsonl(run_dir / "metrics.jsonl"),
            evaluations=[_with_stats(row) for row in _read_jsonl(run_dir / "evaluations.jsonl")],
            completions=_read_jsonl(run_dir / "completions.jsonl"),
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
        return sorted((e for e in self.evaluations if e.get("mode", "greedy") == mode), key=lambda e: e["step"])

    @property
    def modes(self) -> list[str]:
        """Evaluation passes present, the main one first."""
        others = sorted({e.get("mode", "greedy") for e in self.evaluations} - {self.main_mode})
        return [self.main_mode, *others]

    def before_after(self, mode: str | None = None) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """First and last evaluation of a pass (default the main one), when there are two at different steps."""
        evaluations = self.evaluations_of(mode or self.main_mode)
        if len(evaluations) < 2 or evaluations[0]["step"] == evaluations[-1]["step"]:
            return None
        return evaluations[0], evaluations[-1]

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(row["step"], row[key]) for row in self.metrics if isinstance(row.get(key), int | float)]
        return [p[0] for p in points], [float(p[1]) for p in points]

    def metric_keys(self) -> list[str]:
        return sorted({key for row in self.metrics for key in row if key != "step"})


# ---------------------------------------------------------------------------- plots
def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return buffer.getvalue()


def _new_figure(width: float = 7.5, height: float = 3.6, columns: int = 1) -> tuple[Figure, list[Any]]:
    figure = Figure(figsize=(width, height))
    axes = [figure.add_subplot(1, columns, i + 1) for i in range(columns)]
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        # Plain tick labels: an offset like "1e-5 + 10.79" hides the values people want to read.
        ax.ticklabel_format(axis="y", useOffset=False)
    return figure, axes


def _rolling(values: list[float], width: int) -> list[float]:
    out = []
    for i in range(len(values)):
        window = values[max(0, i - width + 1) : i + 1]
        out.append(sum(window) / len(window))
    return out


def plot_reward(run: Run) -> bytes | None:
    steps, rewards = run.series("reward/mean")
    evaluations = [e for e in run.evaluations if "mean" in e]
    if not steps and not evaluations:
        return None
    figure, (ax,) = _new_figure()
    if steps:
        width = max(1, len(steps) // 10)
        ax.plot(steps, rewards, color="C0", alpha=0.35 if width > 1 else 1.0, lw=1, label="train reward (step mean)")
        if width > 1:
            ax.plot(steps, _rolling(rewards, width), color="C0", lw=2, label=f"train reward ({width}-step mean)")
    for index, mode in enumerate(sorted({e.get("mode", "greedy") for e in evaluations})):
        points = run.evaluations_of(mode)
        ax.errorbar(
            [e["step"] for e in points], [e["mean"] for e in points], yerr=[e["stderr"] for e in points],
            color=f"C{1 + index}", marker="o", capsize=3, label=f"held-out ({mode}) ± 1 s.e.",
        )
    ax.set_ylabel("reward")
    ax.set_title("Reward: training batches and held-out evaluations")
    ax.legend(fontsize=8)
    return _png(figure)


def plot_components(run: Run) -> bytes | None:
    keys = [k for k in run.metric_keys() if k.startswith("reward/") and k.endswith("/mean") and k != "reward/mean"]
    if not keys:
        return None
    figure, (ax,) = _new_figure()
    for index, key in enumerate(keys):
        name = key.removeprefix("reward/").removesuffix("/mean")
        ax.plot(*run.series(key), color=f"C{index}", label=f"train {name}")
        held_out = [(e["step"], e["stats"][f"reward/{name}"]["mean"]) for e in run.evaluations_of(run.main_mode)
                    if f"reward/{name}" in e.get("stats", {})]
        if held_out:
            ax.plot(*zip(*held_out, strict=True), color=f"C{index}", ls="--", marker="o", label=f"held-out {name}")
    ax.set_ylabel("mean reward")
    ax.set_title("Reward components")
    ax.legend(fontsize=8)
    return _png(figure)


def plot_lengths(run: Run) -> bytes | None:
    steps, means = run.series("completion/length/mean")
    if not steps:
        return None
    figure, (ax, ax_truncated) = _new_figure(width=10, columns=2)
    _, stds = run.series("completion/length/std")
    _, lows = run.series("completion/length/min")
    _, highs = run.series("completion/length/max")
    if len(stds) == len(means):
        # The band stays within the observed range: lengths are bounded by 0 and the token limit.
        if not len(lows) == len(highs) == len(means):
            lows, highs = [0.0] * len(means), [math.inf] * len(means)
        ax.fill_between(
            steps, [max(m - s, lo) for m, s, lo in zip(means, stds, lows, strict=True)],
            [min(m + s, hi) for m, s, hi in zip(means, stds, highs, strict=True)], color="C0", alpha=0.2,
            label="mean ± std",
        )
    for key, style in (("completion/length/min", ":"), ("completion/length/max", ":")):
        xs, ys = run.series(key)
        if xs:
            ax.plot(xs, ys, color="C0", ls=style, lw=1, label=key.rsplit("/", 1)[1])
    ax.plot(steps, means, color="C0", lw=2, label="mean")
    limit = run.config.get("rollout", {}).get("max_new_tokens")
    if limit:
        ax.axhline(limit, color="C3", ls="--", lw=1, label=f"limit ({limit})")
    ax.set_ylabel("completion tokens")
    ax.set_title("Completion length distribution")
    ax.legend(fontsize=8)
    xs, ys = run.series("completion/truncated_share")
    if xs:
        ax_truncated.plot(xs, ys, color="C3")
    ax_truncated.set_ylim(-0.02, 1.02)
    ax_truncated.set_ylabel("share truncated at the limit")
    ax_truncated.set_title("Truncated completions")
    return _png(figure)


def plot_clip(run: Run) -> bytes | None:
    keys = [k for k in run.metric_keys() if k.startswith("clip/")]
    if not keys:
        return None
    figure, (ax,) = _new_figure()
    for key in keys:
        ax.plot(*run.series(key), label=key.removeprefix("clip/"))
    ax.set_ylabel("share of tokens")
    ax.set_title("Clip fractions")
    ax.legend(fontsize=8)
    return _png(figure)


def plot_kl_entropy(run: Run) -> bytes | None:
    kl_keys = [k for k in run.metric_keys() if k.startswith("kl/")]
    entropy = run.series("entropy")
    if not kl_keys and not entropy[0]:
        return None
    figure, (ax_kl, ax_entropy) = _new_figure(width=10, columns=2)
    for key in kl_keys:
        ax_kl.plot(*run.series(key), label=key)
    ax_kl.set_title("KL (k3 per token)")
    if kl_keys:
        ax_kl.legend(fontsize=8)
    if entropy[0]:
        ax_entropy.plot(*entropy, color="C2")
    ax_entropy.set_title("Entropy (nats per token)")
    return _png(figure)


# Parts of a step, in the order they happen. Log-prob time is spent inside the update.
TIME_PARTS = (("time/generation", "generation"), ("time/reward", "reward"), ("time/logprobs", "old/ref log-probs"))


def plot_time(run: Run) -> bytes | None:
    rows = [row for row in run.metrics if "time/step" in row]
    if not rows:
        return None
    figure, (ax,) = _new_figure()
    steps = [row["step"] for row in rows]
    bottom = [0.0] * len(rows)
    parts = [(key, label, [row.get(key, 0.0) for row in rows]) for key, label in TIME_PARTS]
    parts.append(("", "policy update",
                  [max(0.0, row.get("time/update", 0.0) - row.get("time/logprobs", 0.0)) for row in rows]))
    parts.append(("time/weight_sync", "weight sync", [row.get("time/weight_sync", 0.0) for row in rows]))
    accounted = [sum(p[2][i] for p in parts) for i in range(len(rows))]
    parts.append(("", "other", [max(0.0, row["time/step"] - accounted[i]) for i, row in enumerate(rows)]))
    for index, (_, label, values) in enumerate(parts):
        if any(values):
            ax.bar(steps, values, bottom=bottom, color=f"C{index}", label=label, width=0.8)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("seconds")
    ax.set_title("Time per step")
    ax.legend(fontsize=8)
    return _png(figure)


PLOTS = (
    ("reward", "Train and held-out reward", plot_reward),
    ("components", "Reward components", plot_components),
    ("lengths", "Completion lengths", plot_lengths),
    ("clip", "Clip fractions", plot_clip),
    ("kl_entropy", "KL and entropy", plot_kl_entropy),
    ("time", "Time per step", plot_time),
)


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


def _final(run: Run) -> dict[str, Any] | None:
    evaluations = run.evaluations_of(run.main_mode)
    return evaluations[-1] if evaluations else None


def _compare_runs(run: Run, others: Sequence[Run]) -> list[dict[str, Any]]:
    """This run's final held-out score against each other run's, where the two measure the same thing."""
    results = []
    mine, my_final = _fingerprints(run.manifest), _final(run)
    for other in others:
        theirs, their_final = _fingerprints(other.manifest), _final(other)
        reasons = []
        if not mine or not theirs:
            reasons.append("a run has no manifest.json")
        else:
            if mine["held_out"] != theirs["held_out"]:
                reasons.append("different held-out data")
            if mine["rewards"] != theirs["rewards"]:
                reasons.append("different reward functions, weights or sources")
        if my_final is None or their_final is None:
            reasons.append("a run has no held-out evaluation")
        elif my_final.get("settings") != their_final.get("settings"):
            reasons.append("different evaluation settings")
        entry: dict[str, Any] = {"run_dir": str(other.run_dir), "name": other.name, "comparable": not reasons}
        if reasons:
            entry["reasons"] = reasons
        else:
            assert my_final is not None and their_final is not None
            row = next(r for r in compare(their_final, my_final, run.sigmas) if r["metric"] == "reward" and r["tag"] is None)
            entry.update({
                "their_final": {k: their_final[k] for k in ("step", "mean", "stderr", "count")},
                "this_final": {k: my_final[k] for k in ("step", "mean", "stderr", "count")},
                "difference": row["change"], "stderr": row["stderr"], "z": row["z"], "significant": row["significant"],
            })
        results.append(entry)
    return results


def build_summary(run: Run, others: Sequence[Run] = ()) -> dict[str, Any]:
    """The report's numbers as JSON: held-out before / after with noise, per slice, monitors, fingerprints."""
    steps = [row["step"] for row in run.metrics]
    summary: dict[str, Any] = {
        "run_dir": str(run.run_dir), "name": run.name, "report": REPORT_NAME,
        "steps_completed": max(steps) if steps else 0,
        "steps_planned": run.config.get("training", {}).get("steps"),
        "noise_rule": f"|change| > {run.sigmas:g} x two-sample standard error",
        "train": {},
        "evaluations": [
            {key: e.get(key) for key in ("step", "label", "mode", "mean", "stderr", "count", "cached")}
            for e in run.evaluations
        ],
        "alerts": run.alerts,
        "fingerprints": _fingerprints(run.manifest),
    }
    _, rewards = run.series("reward/mean")
    if rewards:
        width = max(1, len(rewards) // 10)
        summary["train"] = {
            "reward_first_steps": sum(rewards[:width]) / width, "reward_last_steps": sum(rewards[-width:]) / width,
            "steps_averaged": width, "last": run.metrics[-1],
        }
    pair = run.before_after()
    if pair is not None:
        before, after = pair
        rows = compare(before, after, run.sigmas)
        overall = next(row for row in rows if row["metric"] == "reward" and row["tag"] is None)
        summary["held_out"] = {
            "mode": run.main_mode, "before_step": before["step"], "after_step": after["step"],
            "before": before["stats"]["reward"], "after": after["stats"]["reward"],
            "change": overall["change"], "stderr": overall["stderr"], "z": overall["z"],
            "significant": overall["significant"],
        }
    summary["before_after"] = {
        mode: compare(pair[0], pair[1], run.sigmas) for mode in run.modes if (pair := run.before_after(mode)) is not None
    }
    if others:
        summary["comparisons"] = _compare_runs(run, others)
    return summary


# ---------------------------------------------------------------------------- HTML
STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1100px;
       color: #1d2330; line-height: 1.4; padding: 0 16px; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 1px solid #d6dae3; padding-bottom: 4px; margin-top: 32px; }
.muted { color: #667085; } .headline { font-size: 1.15em; margin: 12px 0; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.92em; }
th, td { border: 1px solid #d6dae3; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f2f4f8; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.better { background: #e3f6e8; } .worse { background: #fde7e7; } .noise { color: #667085; }
.alert { background: #fff4e0; }
img { max-width: 100%; display: block; margin: 8px 0 16px; }
pre { white-space: pre-wrap; background: #f6f7f9; padding: 8px; margin: 0; font-size: 0.88em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float | None, digits: int = 3, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "+∞" if value > 0 else "−∞"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _verdict(row: dict[str, Any], sigmas: float) -> tuple[str, str]:
    """(css class, text): the text is `rft.evaluation.verdict`'s, the wording the CLI prints."""
    css = ("better" if row["change"] > 0 else "worse") if row["significant"] else "noise"
    return css, verdict(row, sigmas)


def _before_after_html(run: Run, mode: str) -> str:
    pair = run.before_after(mode)
    if pair is None:
        return f"<p class='muted'>No {_e(mode)} held-out evaluation both before and after training in this run.</p>"
    before, after = pair
    rows = compare(before, after, run.sigmas)
    out = [
        f"<h3>{_e(mode)} decoding</h3><p>Step {before['step']} ({_e(before.get('label'))}"
        f"{', cached baseline' if before.get('cached') else ''}) against step {after['step']} ({_e(after.get('label'))}). "
        f"A change is larger than its noise when it exceeds {run.sigmas:g} two-sample standard errors.</p>",
        "<table><tr><th>metric</th><th>slice</th><th>n</th><th>before</th><th>after</th><th>change</th>"
        "<th>s.e.</th><th>verdict</th></tr>",
    ]
    # Overall rows for every metric; slice rows for the reward (the per-slice table people read first).
    shown = [r for r in rows if r["tag"] is None] + [r for r in rows if r["tag"] is not None and r["metric"] == "reward"]
    for row in shown:
        css, verdict = _verdict(row, run.sigmas)
        where = f"{row['tag']} = {row['value']}" if row["tag"] else "all"
        out.append(
            f"<tr class='{css}'><td>{_e(row['metric'])}</td><td>{_e(where)}</td><td class='num'>{row['after']['count']}</td>"
            f"<td class='num'>{_num(row['before']['mean'])} ± {_num(row['before']['stderr'])}</td>"
            f"<td class='num'>{_num(row['after']['mean'])} ± {_num(row['after']['stderr'])}</td>"
            f"<td class='num'>{_num(row['change'], signed=True)}</td><td class='num'>{_num(row['stderr'])}</td>"
            f"<td>{_e(verdict)}</td></tr>"
        )
    out.append("</table>")
    return "\n".join(out)


def _alerts_html(run: Run) -> str:
    if not run.alerts:
        return "<p>No monitor fired.</p>"
    out = ["<table><tr><th>step</th><th>monitor</th><th>what happened</th></tr>"]
    for alert in run.alerts:
        out.append(f"<tr class='alert'><td class='num'>{alert['step']}</td><td>{_e(alert['monitor'])}</td>"
                   f"<td>{_e(alert['message'])}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _completion_html(completion: Any) -> str:
    text = completion_text(completion)
    # An empty or blank completion would otherwise look like a rendering fault.
    return f"<pre>{_e(text)}</pre>" if text.strip() else f"<pre class='muted'>(blank: {_e(repr(text))})</pre>"


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt if m.get("role") != "system")
    return str(prompt)


def _samples_html(run: Run) -> str:
    out = []
    evaluations = run.evaluations_of(run.main_mode)
    if len(evaluations) >= 2 and evaluations[0].get("samples") and evaluations[-1].get("samples"):
        first, last = evaluations[0], evaluations[-1]
        out.append(f"<h3>Held-out prompts: step {first['step']} against step {last['step']}</h3>")
        out.append(f"<table><tr><th>prompt</th><th>step {first['step']}</th><th>step {last['step']}</th></tr>")
        for before, after in zip(first["samples"], last["samples"], strict=False):
            out.append(
                f"<tr><td><pre>{_e(_prompt_text(before['prompt']))}</pre></td>"
                f"<td>{_completion_html(before['completion'])}reward {_num(before['reward'])}</td>"
                f"<td>{_completion_html(after['completion'])}reward {_num(after['reward'])}</td></tr>"
            )
        out.append("</table>")
    if run.completions:
        steps = sorted({c["step"] for c in run.completions})
        for step, title in ((steps[0], "first"), (steps[-1], "last")) if len(steps) > 1 else ((steps[0], "only"),):
            out.append(f"<h3>Training samples, {title} step ({step})</h3>")
            out.append("<table><tr><th>prompt</th><th>completion</th><th>reward</th></tr>")
            for sample in [c for c in run.completions if c["step"] == step][:4]:
                out.append(
                    f"<tr><td><pre>{_e(_prompt_text(sample['prompt']))}</pre></td>"
                    f"<td>{_completion_html(sample['completion'])}</td>"
                    f"<td class='num'>{_num(sample['reward'])}</td></tr>"
                )
            out.append("</table>")
    return "\n".join(out) or "<p class='muted'>No completions logged.</p>"


def _comparisons_html(comparisons: list[dict[str, Any]]) -> str:
    out = ["<table><tr><th>other run</th><th>its final held-out</th><th>this run's</th><th>difference</th>"
           "<th>verdict</th></tr>"]
    for entry in comparisons:
        if not entry["comparable"]:
            out.append(f"<tr><td>{_e(entry['name'])}<br><span class='muted'>{_e(entry['run_dir'])}</span></td>"
                       f"<td colspan='4' class='muted'>not comparable: {_e('; '.join(entry['reasons']))}</td></tr>")
            continue
        theirs, mine = entry["their_final"], entry["this_final"]
        verdict = "larger than noise" if entry["significant"] else "within noise"
        out.append(
            f"<tr><td>{_e(entry['name'])}<br><span class='muted'>{_e(entry['run_dir'])}</span></td>"
            f"<td class='num'>{_num(theirs['mean'])} ± {_num(theirs['stderr'])}</td>"
            f"<td class='num'>{_num(mine['mean'])} ± {_num(mine['stderr'])}</td>"
            f"<td class='num'>{_num(entry['difference'], signed=True)} (s.e. {_num(entry['stderr'])})</td>"
            f"<td>{verdict}</td></tr>"
        )
    out.append("</table>")
    return "\n".join(out)


def _manifest_html(run: Run) -> str:
    manifest = run.manifest
    if manifest is None:
        return f"<p class='muted'>No manifest.json.</p><details><summary>config</summary><pre>{_e(yaml.safe_dump(run.config, sort_keys=False))}</pre></details>"
    rows = [
        ("created", manifest.get("created")),
        ("model", json.dumps(manifest.get("model"))),
        ("engine", manifest.get("engine")),
        ("seeds", json.dumps(manifest.get("seeds"))),
        ("git (project)", json.dumps(manifest.get("git", {}).get("project"))),
        ("git (rft)", json.dumps(manifest.get("git", {}).get("rft"))),
        ("train data", json.dumps(manifest.get("data", {}).get("train"))),
        ("held-out data", json.dumps(manifest.get("data", {}).get("held_out"))),
        ("packages", ", ".join(f"{k} {v}" for k, v in manifest.get("packages", {}).items())),
    ]
    out = ["<table>"] + [f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows] + ["</table>"]
    out.append("<table><tr><th>reward</th><th>version</th><th>weight</th><th>source sha256</th></tr>")
    for reward in manifest.get("rewards", []) + manifest.get("eval_metrics", []):
        out.append(f"<tr><td>{_e(reward['name'])}<br><span class='muted'>{_e(reward['fn'])}</span></td>"
                   f"<td>{_e(reward.get('version') or '–')}</td><td class='num'>{_e(reward['weight'])}</td>"
                   f"<td><code>{_e(reward.get('source_sha256') or 'source not found')}</code></td></tr>")
    out.append("</table>")
    out.append(f"<details><summary>resolved recipe</summary><pre>{_e(yaml.safe_dump(run.config, sort_keys=False))}</pre></details>")
    return "\n".join(out)


def render_html(run: Run, summary: dict[str, Any], plots: dict[str, bytes]) -> str:
    held_out = summary.get("held_out")
    if held_out:
        headline = (
            f"Held-out reward {_num(held_out['before']['mean'])} ± {_num(held_out['before']['stderr'])} → "
            f"{_num(held_out['after']['mean'])} ± {_num(held_out['after']['stderr'])} "
            f"(change {_num(held_out['change'], signed=True)}: {verdict(held_out, run.sigmas)})"
        )
    else:
        headline = "No before / after held-out comparison in this run."
    model = (run.manifest or {}).get("model", {}).get("name_or_path") or run.config.get("model", {}).get("name_or_path")
    parts = [
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>rft report: {_e(run.name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>rft run: {_e(run.name)}</h1>",
        f"<p class='muted'>{_e(run.run_dir)} · model {_e(model)} · steps {summary['steps_completed']} of "
        f"{_e(summary['steps_planned'])} · {len(run.alerts)} monitor alert(s)</p>",
        f"<p class='headline'>{_e(headline)}</p>",
        "<h2>Monitors</h2>", _alerts_html(run),
        "<h2>Before and after, per slice</h2>", *[_before_after_html(run, mode) for mode in run.modes],
    ]
    if "comparisons" in summary:
        parts += ["<h2>Other runs</h2>", _comparisons_html(summary["comparisons"])]
    parts.append("<h2>Training curves</h2>")
    for key, title, _ in PLOTS:
        if key in plots:
            encoded = base64.b64encode(plots[key]).decode("ascii")
            parts.append(f"<h3>{_e(title)}</h3><img alt='{_e(title)}' src='data:image/png;base64,{encoded}'>")
    if not plots:
        parts.append("<p class='muted'>No training metrics logged.</p>")
    parts += ["<h2>Sampled completions</h2>", _samples_html(run), "<h2>Manifest</h2>", _manifest_html(run),
              "</body></html>"]
    return "\n".join(parts)


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
        help="other run directories to compare final held-out scores with (when data, rewards and settings match)",
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
