"""The report's plots, drawn from a run's metrics.jsonl and evaluations.jsonl as PNG bytes.

Each `plot_*` takes a `RunLogs` and returns a PNG, or None when the run logged nothing to draw;
`PLOTS` lists them in the order the page shows them. Drawn with matplotlib's Agg canvas (no display,
no pyplot state), torch-free.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any, Protocol

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from rft import metrics as names


class RunLogs(Protocol):
    """What the plots read of a run (`rft.report.Run` provides it)."""

    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    evaluations: list[dict[str, Any]]

    @property
    def main_mode(self) -> str: ...

    def evaluations_of(self, mode: str) -> list[dict[str, Any]]: ...

    def series(self, key: str) -> tuple[list[int], list[float]]: ...

    def metric_keys(self) -> list[str]: ...


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


def plot_reward(run: RunLogs) -> bytes | None:
    steps, rewards = run.series(names.REWARD_MEAN)
    evaluations = [e for e in run.evaluations if "mean" in e]
    if not steps and not evaluations:
        return None
    figure, (ax,) = _new_figure()
    if steps:
        width = max(1, len(steps) // 10)
        ax.plot(steps, rewards, color="C0", alpha=0.35 if width > 1 else 1.0, lw=1,
                label="train reward (step mean)")
        if width > 1:
            ax.plot(steps, _rolling(rewards, width), color="C0", lw=2,
                    label=f"train reward ({width}-step mean)")
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


def plot_components(run: RunLogs) -> bytes | None:
    keys = [k for k in run.metric_keys() if names.reward_name(k) is not None]
    if not keys:
        return None
    figure, (ax,) = _new_figure()
    for index, key in enumerate(keys):
        name = names.reward_name(key)
        ax.plot(*run.series(key), color=f"C{index}", label=f"train {name}")
        held_out_key = names.reward_key(name)
        held_out = [(e["step"], e["stats"][held_out_key]["mean"]) for e in run.evaluations_of(run.main_mode)
                    if held_out_key in e.get("stats", {})]
        if held_out:
            ax.plot(*zip(*held_out, strict=True), color=f"C{index}", ls="--", marker="o",
                    label=f"held-out {name}")
    ax.set_ylabel("mean reward")
    ax.set_title("Reward components")
    ax.legend(fontsize=8)
    return _png(figure)


def plot_lengths(run: RunLogs) -> bytes | None:
    steps, means = run.series(names.LENGTH_MEAN)
    if not steps:
        return None
    figure, (ax, ax_truncated) = _new_figure(width=10, columns=2)
    _, stds = run.series(names.LENGTH_STD)
    _, lows = run.series(names.LENGTH_MIN)
    _, highs = run.series(names.LENGTH_MAX)
    if len(stds) == len(means):
        # The band stays within the observed range: lengths are bounded by 0 and the token limit.
        if not len(lows) == len(highs) == len(means):
            lows, highs = [0.0] * len(means), [math.inf] * len(means)
        ax.fill_between(
            steps, [max(m - s, lo) for m, s, lo in zip(means, stds, lows, strict=True)],
            [min(m + s, hi) for m, s, hi in zip(means, stds, highs, strict=True)], color="C0", alpha=0.2,
            label="mean ± std",
        )
    for key, style in ((names.LENGTH_MIN, ":"), (names.LENGTH_MAX, ":")):
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
    xs, ys = run.series(names.TRUNCATED_SHARE.name)
    if xs:
        ax_truncated.plot(xs, ys, color="C3")
    ax_truncated.set_ylim(-0.02, 1.02)
    ax_truncated.set_ylabel("share truncated at the limit")
    ax_truncated.set_title("Truncated completions")
    return _png(figure)


def plot_clip(run: RunLogs) -> bytes | None:
    keys = [k for k in run.metric_keys() if k.startswith(f"{names.CLIP_PREFIX}/")]
    if not keys:
        return None
    figure, (ax,) = _new_figure()
    for key in keys:
        ax.plot(*run.series(key), label=key.removeprefix(f"{names.CLIP_PREFIX}/"))
    ax.set_ylabel("share of tokens")
    ax.set_title("Clip fractions")
    ax.legend(fontsize=8)
    return _png(figure)


def plot_kl_entropy(run: RunLogs) -> bytes | None:
    kl_keys = [k for k in run.metric_keys() if k.startswith(f"{names.KL_PREFIX}/")]
    entropy = run.series(names.ENTROPY.name)
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
TIME_PARTS = (
    (names.TIME_GENERATION, "generation"), (names.TIME_REWARD, "reward"),
    (names.TIME_LOGPROBS, "old/ref log-probs"),
)


def plot_time(run: RunLogs) -> bytes | None:
    rows = [row for row in run.metrics if names.TIME_STEP in row]
    if not rows:
        return None
    figure, (ax,) = _new_figure()
    steps = [row["step"] for row in rows]
    bottom = [0.0] * len(rows)
    parts = [(key, label, [row.get(key, 0.0) for row in rows]) for key, label in TIME_PARTS]
    update_only = [max(0.0, row.get(names.TIME_UPDATE, 0.0) - row.get(names.TIME_LOGPROBS, 0.0))
                   for row in rows]
    parts.append(("", "policy update", update_only))
    sync = [row.get(names.TIME_WEIGHT_SYNC, 0.0) for row in rows]
    parts.append((names.TIME_WEIGHT_SYNC, "weight sync", sync))
    accounted = [sum(p[2][i] for p in parts) for i in range(len(rows))]
    parts.append(("", "other", [max(0.0, row[names.TIME_STEP] - accounted[i]) for i, row in enumerate(rows)]))
    for index, (_, label, values) in enumerate(parts):
        if any(values):
            ax.bar(steps, values, bottom=bottom, color=f"C{index}", label=label, width=0.8)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("seconds")
    ax.set_title("Time per step")
    ax.legend(fontsize=8)
    return _png(figure)


PLOTS: tuple[tuple[str, str, Callable[[RunLogs], bytes | None]], ...] = (
    ("reward", "Train and held-out reward", plot_reward),
    ("components", "Reward components", plot_components),
    ("lengths", "Completion lengths", plot_lengths),
    ("clip", "Clip fractions", plot_clip),
    ("kl_entropy", "KL and entropy", plot_kl_entropy),
    ("time", "Time per step", plot_time),
)
