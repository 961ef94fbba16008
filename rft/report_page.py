"""The `rft report` page: typed rows built from a run, rendered by jinja2 (rft/templates/report.html.j2).

Every number is formatted here (`num`), every value escaped by the template: the template only lays
out the rows it is given. Torch-free.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jinja2
import yaml

from rft.report_plots import PLOTS
from rft.reward_context import completion_text, conversation_text
from rft.stats import Comparison, compare, reward_change

if TYPE_CHECKING:  # rft.report builds the page from its `Run`; imported for the type only (no cycle)
    from rft.report import Run

TEMPLATE = "report.html.j2"
TRAINING_SAMPLES_SHOWN = 4  # per step shown
PLOT_TITLES = {key: title for key, title, _ in PLOTS}

def num(value: float | None, digits: int = 3, signed: bool = False) -> str:
    """A number as the page shows it: fixed digits, – for none, ±∞ for infinities."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "+∞" if value > 0 else "−∞"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def verdict_cells(row: Comparison) -> tuple[str, str]:
    """(css class, text) of a comparison: the text is `Comparison.verdict`, the wording the CLI prints."""
    css = ("better" if row.change > 0 else "worse") if row.significant else "noise"
    return css, row.verdict


@dataclass(frozen=True)
class ComparisonRow:
    """One line of a before / after table, formatted."""

    css: str
    metric: str
    where: str
    count: int
    before: str
    after: str
    change: str
    stderr: str
    verdict: str

    @classmethod
    def of(cls, row: Comparison) -> ComparisonRow:
        css, verdict = verdict_cells(row)
        return cls(
            css=css, metric=row.metric, where=f"{row.tag} = {row.value}" if row.tag else "all",
            count=row.after.count, before=f"{num(row.before.mean)} ± {num(row.before.stderr)}",
            after=f"{num(row.after.mean)} ± {num(row.after.stderr)}", change=num(row.change, signed=True),
            stderr=num(row.stderr), verdict=verdict,
        )


@dataclass(frozen=True)
class BeforeAfterTable:
    """A pass's first evaluation against its last; `rows` None when the run has no such pair."""

    mode: str
    sigmas: str
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    rows: list[ComparisonRow] | None = None


def before_after_table(run: Run, mode: str) -> BeforeAfterTable:
    """Overall rows for every metric; slice rows for the reward (the per-slice table people read first)."""
    pair = run.before_after(mode)
    if pair is None:
        return BeforeAfterTable(mode, f"{run.sigmas:g}")
    rows = compare(*pair, run.sigmas)
    sliced = [r for r in rows if r.tag is not None and r.metric == "reward"]
    shown = [r for r in rows if r.tag is None] + sliced
    return BeforeAfterTable(mode, f"{run.sigmas:g}", *pair, [ComparisonRow.of(row) for row in shown])


@dataclass(frozen=True)
class OtherRunRow:
    """Another run's final held-out score against this run's, or why they cannot be compared."""

    name: str
    run_dir: str
    reasons: list[str]
    theirs: str = ""
    mine: str = ""
    difference: str = ""
    verdict: str = ""

    @classmethod
    def of(cls, entry: dict[str, Any]) -> OtherRunRow:
        if not entry["comparable"]:
            return cls(entry["name"], entry["run_dir"], entry["reasons"])
        theirs, mine = entry["their_final"], entry["this_final"]
        return cls(
            entry["name"], entry["run_dir"], [], theirs=f"{num(theirs['mean'])} ± {num(theirs['stderr'])}",
            mine=f"{num(mine['mean'])} ± {num(mine['stderr'])}",
            difference=f"{num(entry['difference'], signed=True)} (s.e. {num(entry['stderr'])})",
            verdict="larger than noise" if entry["significant"] else "within noise",
        )


@dataclass(frozen=True)
class Sample:
    """A prompt (as "role: content" lines, no system prompt) and a completion's text (an agent's
    conversation as lines too), with its reward."""

    prompt: str
    completion: str
    reward: str

    @classmethod
    def of(cls, row: dict[str, Any]) -> Sample:
        return cls(_prompt_text(row["prompt"]), _completion_text(row["completion"]), num(row["reward"]))


def _completion_text(completion: Any) -> str:
    """A single answer's text; an agent's whole conversation (tool calls and results, the environment's
    turns) as "role: content" lines."""
    if isinstance(completion, list) and any(message.get("role") != "assistant" for message in completion):
        return conversation_text(completion)
    return completion_text(completion)


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):
        prompt = [message for message in prompt if message.get("role") != "system"]
    return conversation_text(prompt)


@dataclass(frozen=True)
class SamplePair:
    """One held-out prompt's first completion at the first evaluation and at the last."""

    prompt: str
    before: Sample
    after: Sample


@dataclass(frozen=True)
class HeldOutSamples:
    """The same held-out prompts answered at the main pass's first and last evaluation."""

    first_step: int
    last_step: int
    pairs: list[SamplePair]


def held_out_samples(run: Run) -> HeldOutSamples | None:
    evaluations = run.evaluations_of(run.main_mode)
    if len(evaluations) < 2 or not evaluations[0].get("samples") or not evaluations[-1].get("samples"):
        return None
    first, last = evaluations[0], evaluations[-1]
    pairs = [SamplePair(_prompt_text(before["prompt"]), Sample.of(before), Sample.of(after))
             for before, after in zip(first["samples"], last["samples"], strict=False)]
    return HeldOutSamples(first["step"], last["step"], pairs)


@dataclass(frozen=True)
class TrainingSamples:
    title: str  # "first", "last" or "only"
    step: int
    samples: list[Sample]


def training_samples(run: Run) -> list[TrainingSamples]:
    """A few completions logged at the first and at the last training step."""
    if not run.completions:
        return []
    steps = sorted({c["step"] for c in run.completions})
    shown = ((steps[0], "first"), (steps[-1], "last")) if len(steps) > 1 else ((steps[0], "only"),)
    return [
        TrainingSamples(title, step, [Sample.of(c) for c in run.completions if c["step"] == step][
            :TRAINING_SAMPLES_SHOWN])
        for step, title in shown
    ]


@dataclass(frozen=True)
class ManifestView:
    rows: list[tuple[str, Any]]
    rewards: list[dict[str, Any]]  # the manifest's reward and eval-metric entries


def manifest_view(manifest: dict[str, Any] | None) -> ManifestView | None:
    if manifest is None:
        return None
    git, data = manifest.get("git", {}), manifest.get("data", {})
    rows = [
        ("created", manifest.get("created")),
        ("model", json.dumps(manifest.get("model"))),
        ("engine", manifest.get("engine")),
        ("seeds", json.dumps(manifest.get("seeds"))),
        ("git (project)", json.dumps(git.get("project"))),
        ("git (rft)", json.dumps(git.get("rft"))),
        ("train data", json.dumps(data.get("train"))),
        ("held-out data", json.dumps(data.get("held_out"))),
        ("packages", ", ".join(f"{k} {v}" for k, v in manifest.get("packages", {}).items())),
    ]
    return ManifestView(rows, manifest.get("rewards", []) + manifest.get("eval_metrics", []))


@dataclass(frozen=True)
class Plot:
    title: str
    png_base64: str


def headline(summary: dict[str, Any], sigmas: float) -> str:
    """The held-out reward before -> after with the noise rule's verdict, or that there is no such pair."""
    held_out = summary.get("held_out")
    if not held_out:
        return "No before / after held-out comparison in this run."
    before, after = ({"stats": {"reward": held_out[side]}} for side in ("before", "after"))
    row = reward_change(before, after, sigmas)
    return (
        f"Held-out reward {num(row.before.mean)} ± {num(row.before.stderr)} → "
        f"{num(row.after.mean)} ± {num(row.after.stderr)} "
        f"(change {num(row.change, signed=True)}: {row.verdict})"
    )


_ENVIRONMENT = jinja2.Environment(
    loader=jinja2.PackageLoader("rft", "templates"), autoescape=True, undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
)
_ENVIRONMENT.filters["pyrepr"] = repr


def render_html(run: Run, summary: dict[str, Any], plots: dict[str, bytes]) -> str:
    """The page: the run's rows laid out by the template."""
    manifest = run.manifest or {}
    model = manifest.get("model", {}).get("name_or_path") or run.config.get("model", {}).get("name_or_path")
    others = [OtherRunRow.of(entry) for entry in summary["comparisons"]] if "comparisons" in summary else None
    return _ENVIRONMENT.get_template(TEMPLATE).render(
        run=run, summary=summary, model=model, headline=headline(summary, run.sigmas),
        tables=[before_after_table(run, mode) for mode in run.modes], others=others,
        plots=[Plot(PLOT_TITLES[key], base64.b64encode(png).decode("ascii")) for key, png in plots.items()],
        held_out_samples=held_out_samples(run), training_samples=training_samples(run),
        manifest=manifest_view(run.manifest), config_yaml=yaml.safe_dump(run.config, sort_keys=False),
    )
