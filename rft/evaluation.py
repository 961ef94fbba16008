"""Held-out evaluation: sample each held-out prompt, score it, summarise with noise, slice by metadata.

What is reported, per evaluation pass (`greedy` and/or `sampled`):
- `reward`: the recipe's weighted reward; `reward/<fn>`: each reward function;
- `exact_match` (eval.exact_match), `pass@k` (eval.pass_k, sampled pass), `metric/<name>` (eval.metrics:
  evaluation-only scorers such as an LLM judge, run through the same `RewardScorer`);
- each as mean and standard error over prompts (a prompt's several samples are averaged first, so the
  error counts prompts, not correlated samples), overall and per value of every slice tag.

"Larger than its noise" (here, in `rft eval`, the report and the monitors): |after - before| >
`eval.noise_sigmas` (default 2) x the two-sample standard error sqrt(se_before^2 + se_after^2).
Before and after share prompts, so this error is conservative (it ignores their positive correlation).

The base model's scores are cached in $RFT_CACHE/baselines, keyed on the model weights' fingerprint,
the held-out data's fingerprint, the reward and metric sources' hashes, the engine and every
evaluation setting: a rerun with any of them changed evaluates again.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rft.config import ConfigError, EvalConfig, RecipeConfig, load_config
from rft.data import Example, load_splits
from rft.manifest import data_fingerprint, model_fingerprint, reward_fingerprints, sha256_json
from rft.rollout.base import RolloutEngine, SamplingSettings
from rft.scoring import RewardScorer

logger = logging.getLogger(__name__)

# Auto slices: fields that look like tags, not answers or free text.
AUTO_SLICE_MAX_VALUES = 20
NOT_SLICE_FIELDS = frozenset({"prompt", "messages", "reference_answer", "answer", "solution", "completion", "id"})
BASELINE_VERSION = 1  # bump when the cached result format or the meaning of a score changes


class EvalError(ValueError):
    """Bad evaluation input (a slice field on no row, a checkpoint folder without weights)."""


@dataclass
class Stat:
    """Mean, standard error of the mean (sample std / sqrt(n)) and count."""

    mean: float
    stderr: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        mean, stderr = mean_and_stderr(list(values))
        return cls(mean, stderr, len(values))

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "stderr": self.stderr, "count": self.count}


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n))."""
    count = len(values)
    mean = sum(values) / count
    if count < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (count - 1)
    return mean, math.sqrt(variance / count)


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """Unbiased pass@k from `samples` completions of which `correct` pass (Chen et al. 2021):
    1 - C(n - c, k) / C(n, k), the chance that k of the n drawn without replacement hold a pass."""
    if samples - correct < k:
        return 1.0
    return 1.0 - math.comb(samples - correct, k) / math.comb(samples, k)


def normalize_answer(text: str) -> str:
    """Exact-match normal form: trimmed, case-folded, single spaces, no final period."""
    return re.sub(r"\s+", " ", text.strip()).casefold().rstrip(".").strip()


def completion_text(completion: Any) -> str:
    """Text of a completion: a string, or TRL's chat form [{"role": "assistant", "content": ...}]."""
    if isinstance(completion, list):
        return "".join(str(message.get("content", "")) for message in completion)
    return str(completion)


def decode_completions(tokenizer: Any, examples: list[Example], completion_ids: list[list[int]], n: int) -> list[Any]:
    """Completion texts; for chat prompts, TRL's form: [{"role": "assistant", "content": text}]."""
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    completions: list[Any] = []
    for i, text in enumerate(texts):
        completions.append([{"role": "assistant", "content": text}] if examples[i // n].is_chat else text)
    return completions


# ---------------------------------------------------------------------------- plans and slices
@dataclass(frozen=True)
class EvalPlan:
    """One evaluation pass: how to decode and what to compute."""

    mode: str  # "greedy" or "sampled"
    sampling: SamplingSettings
    samples_per_prompt: int
    pass_k: tuple[int, ...]
    pass_threshold: float
    exact_match: str | None
    seed: int
    batch_size: int
    keep_samples: int

    def settings(self) -> dict[str, Any]:
        """Everything that changes the scores (part of the baseline cache key and of every summary)."""
        settings = {
            "mode": self.mode, "sampling": self.sampling.__dict__, "samples_per_prompt": self.samples_per_prompt,
            "pass_k": list(self.pass_k), "pass_threshold": self.pass_threshold, "exact_match": self.exact_match,
            "keep_samples": self.keep_samples,
        }
        # Greedy decoding draws no random numbers: runs with other seeds score (and cache) the same.
        return settings if self.sampling.greedy else {**settings, "seed": self.seed}


def eval_plans(config: RecipeConfig) -> list[EvalPlan]:
    """The passes a recipe asks for, main one first (it feeds before/after, monitors and the report)."""
    evaluation, rollout = config.eval, config.rollout
    max_new_tokens = evaluation.max_new_tokens or rollout.max_new_tokens
    common = dict(
        pass_threshold=evaluation.pass_threshold, exact_match=evaluation.exact_match, seed=config.training.seed,
        batch_size=evaluation.batch_size, keep_samples=evaluation.keep_samples,
    )
    sampled = EvalPlan(
        mode="sampled",
        sampling=rollout.sampling(max_new_tokens=max_new_tokens),
        samples_per_prompt=evaluation.samples_per_prompt, pass_k=tuple(evaluation.pass_k), **common,
    )
    if not evaluation.greedy:
        return [sampled]
    # Greedy decoding is deterministic: one completion per prompt says all there is.
    greedy = EvalPlan(
        mode="greedy", sampling=rollout.sampling(max_new_tokens=max_new_tokens, greedy=True),
        samples_per_prompt=1, pass_k=(), **common,
    )
    return [greedy, sampled] if evaluation.sampled else [greedy]


def _tag_value(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return json.dumps(value, sort_keys=True, default=str)


def resolve_slices(examples: Sequence[Example], slices: list[str] | str) -> list[str]:
    """The metadata fields to slice by. Explicit fields must exist on some row; `auto` picks tag-like fields."""
    fields = sorted({key for example in examples for key in example.row})
    if slices != "auto":
        missing = [name for name in slices if name not in fields]
        if missing:
            raise EvalError(f"eval.slices: {missing} on no held-out row (rows have {fields})")
        return list(slices)
    chosen = []
    for name in fields:
        if name in NOT_SLICE_FIELDS:
            continue
        values = [example.row.get(name) for example in examples]
        # Floats are measurements, not tags; lists and dicts are content.
        if not all(v is None or isinstance(v, str | int | bool) for v in values):
            continue
        distinct = {_tag_value(v) for v in values if v is not None}
        if 2 <= len(distinct) <= AUTO_SLICE_MAX_VALUES and len(distinct) * 2 <= len(examples):
            chosen.append(name)
    return chosen


def check_held_out(examples: Sequence[Example], config: EvalConfig) -> list[str]:
    """Reject evaluation settings the held-out rows cannot serve (before any model loads); the slices to use."""
    if config.exact_match is not None:
        lacking = [example.source for example in examples if config.exact_match not in example.row]
        if lacking:
            raise EvalError(
                f"eval.exact_match: field {config.exact_match!r} missing on {len(lacking)} held-out row(s), e.g. {lacking[0]}"
            )
    return resolve_slices(examples, config.slices)


# ---------------------------------------------------------------------------- results
@dataclass
class EvalResult:
    label: str
    mode: str
    stats: dict[str, Stat]
    slices: dict[str, dict[str, dict[str, Stat]]]
    rewards: list[float]
    samples: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    cached: bool = False

    @property
    def mean(self) -> float:
        return self.stats["reward"].mean

    @property
    def stderr(self) -> float:
        return self.stats["reward"].stderr

    @property
    def count(self) -> int:
        return self.stats["reward"].count

    @property
    def per_function(self) -> dict[str, float]:
        return {key.split("/", 1)[1]: stat.mean for key, stat in self.stats.items() if key.startswith("reward/")}

    def summary(self) -> dict[str, Any]:
        """Scores as plain JSON (what evaluations.jsonl, the manifest and the report hold)."""
        return {
            "label": self.label, "mode": self.mode, "mean": self.mean, "stderr": self.stderr, "count": self.count,
            "per_function": self.per_function,
            "stats": {key: stat.to_dict() for key, stat in self.stats.items()},
            "slices": {
                tag: {value: {key: stat.to_dict() for key, stat in stats.items()} for value, stats in values.items()}
                for tag, values in self.slices.items()
            },
            "settings": self.settings, "cached": self.cached,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "rewards": self.rewards, "samples": self.samples}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        return cls(
            label=data["label"], mode=data["mode"],
            stats={key: Stat(**stat) for key, stat in data["stats"].items()},
            slices={
                tag: {value: {key: Stat(**stat) for key, stat in stats.items()} for value, stats in values.items()}
                for tag, values in data["slices"].items()
            },
            rewards=data["rewards"], samples=data["samples"], settings=data["settings"], cached=data.get("cached", False),
        )

    def tracker_metrics(self) -> dict[str, float]:
        """Flat `eval/<mode>/<metric>` values for logs and experiment trackers."""
        metrics: dict[str, float] = {}
        for key, stat in self.stats.items():
            metrics[f"eval/{self.mode}/{key}"] = stat.mean
            metrics[f"eval/{self.mode}/{key}_stderr"] = stat.stderr
        return metrics


def evaluate(
    label: str,
    engine: RolloutEngine,
    tokenizer: Any,
    examples: list[Example],
    scorer: RewardScorer,
    plan: EvalPlan,
    slices: Sequence[str] = (),
    metric_scorer: RewardScorer | None = None,
) -> EvalResult:
    """Sample `plan.samples_per_prompt` completions per held-out prompt, score them, summarise.

    Sampling runs under a forked RNG seeded with `plan.seed`: the same prompts get the same random
    stream before and after training, and evaluating does not shift the training run's randomness.
    """
    n = plan.samples_per_prompt
    per_prompt: list[dict[str, float]] = []
    samples: list[dict[str, Any]] = []
    with torch.random.fork_rng():
        torch.manual_seed(plan.seed)
        for start in range(0, len(examples), plan.batch_size):
            chunk = examples[start : start + plan.batch_size]
            rollout = engine.generate([e.prompt_ids for e in chunk], n, plan.sampling)
            completions = decode_completions(tokenizer, chunk, rollout.completion_ids, n)
            rows = [e for e in chunk for _ in range(n)]
            prompts, row_dicts = [e.prompt for e in rows], [e.row for e in rows]
            scores = scorer.score(prompts, completions, rollout.completion_ids, row_dicts)
            extra = metric_scorer.score(prompts, completions, rollout.completion_ids, row_dicts) if metric_scorer else None
            for i, example in enumerate(chunk):
                members = range(i * n, (i + 1) * n)
                totals = [scores.total[j] for j in members]
                values: dict[str, float] = {"reward": sum(totals) / n}
                for name, function_values in scores.per_function.items():
                    present = [function_values[j] for j in members if function_values[j] is not None]
                    if present:
                        values[f"reward/{name}"] = sum(present) / len(present)
                if plan.exact_match is not None:
                    values["exact_match"] = _exact_match(example, [completions[j] for j in members], plan.exact_match)
                passed = sum(total >= plan.pass_threshold for total in totals)
                for k in plan.pass_k:
                    values[f"pass@{k}"] = pass_at_k(n, passed, k)
                if extra is not None:
                    for name, metric_values in extra.per_function.items():
                        present = [metric_values[j] for j in members if metric_values[j] is not None]
                        if present:
                            values[f"metric/{name}"] = sum(present) / len(present)
                per_prompt.append(values)
                if len(samples) < plan.keep_samples:
                    first = i * n
                    samples.append({
                        "prompt": example.prompt, "completion": completions[first], "reward": scores.total[first],
                        "tags": {tag: _tag_value(example.row.get(tag)) for tag in slices},
                    })
    keys = sorted({key for values in per_prompt for key in values}, key=lambda k: (k != "reward", k))
    stats = {key: Stat.of([v[key] for v in per_prompt if key in v]) for key in keys}
    slice_stats: dict[str, dict[str, dict[str, Stat]]] = {}
    for tag in slices:
        groups: dict[str, list[dict[str, float]]] = {}
        for example, values in zip(examples, per_prompt, strict=True):
            value = _tag_value(example.row.get(tag))
            if value is not None:
                groups.setdefault(value, []).append(values)
        slice_stats[tag] = {
            value: {key: Stat.of([v[key] for v in group if key in v]) for key in keys if any(key in v for v in group)}
            for value, group in sorted(groups.items())
        }
    return EvalResult(
        label=label, mode=plan.mode, stats=stats, slices=slice_stats, rewards=[v["reward"] for v in per_prompt],
        samples=samples, settings=plan.settings(),
    )


def _exact_match(example: Example, completions: list[Any], field_name: str) -> float:
    expected = example.row[field_name]
    expected_text = normalize_answer(expected if isinstance(expected, str) else json.dumps(expected))
    return sum(normalize_answer(completion_text(c)) == expected_text for c in completions) / len(completions)


def run_plans(
    label: str, engine: RolloutEngine, tokenizer: Any, examples: list[Example], scorer: RewardScorer,
    plans: Sequence[EvalPlan], slices: Sequence[str], metric_scorer: RewardScorer | None = None,
) -> list[EvalResult]:
    return [evaluate(label, engine, tokenizer, examples, scorer, plan, slices, metric_scorer) for plan in plans]


# ---------------------------------------------------------------------------- before / after
def compare(before: dict[str, Any], after: dict[str, Any], sigmas: float) -> list[dict[str, Any]]:
    """Change of every metric present in both summaries, overall and per slice value, with its noise.

    `stderr` is the two-sample standard error sqrt(se_b^2 + se_a^2); `significant` means
    |change| > sigmas x stderr. With fewer than 2 prompts on a side there is no noise estimate and
    nothing is called significant.
    """
    rows = []

    def add(metric: str, tag: str | None, value: str | None, b: dict[str, Any], a: dict[str, Any]) -> None:
        change = a["mean"] - b["mean"]
        stderr = math.hypot(b["stderr"], a["stderr"])
        measurable = b["count"] >= 2 and a["count"] >= 2
        if not measurable:
            z = None
        elif stderr > 0:
            z = change / stderr
        else:
            z = 0.0 if change == 0 else math.copysign(math.inf, change)
        rows.append({
            "metric": metric, "tag": tag, "value": value, "before": b, "after": a, "change": change,
            "stderr": stderr, "z": z, "significant": bool(z is not None and abs(z) > sigmas),
        })

    for metric, stat in before["stats"].items():
        if metric in after["stats"]:
            add(metric, None, None, stat, after["stats"][metric])
    for tag, values in before.get("slices", {}).items():
        for value, stats in values.items():
            after_stats = after.get("slices", {}).get(tag, {}).get(value, {})
            for metric, stat in stats.items():
                if metric in after_stats:
                    add(metric, tag, value, stat, after_stats[metric])
    return rows


def verdict(row: dict[str, Any], sigmas: float) -> str:
    """The noise rule's outcome for a `compare` row, in the one wording the CLI, tables and report share."""
    if row["z"] is None:
        return "too few prompts to tell"
    z = "+inf" if row["z"] == math.inf else "-inf" if row["z"] == -math.inf else f"{row['z']:+.1f}"
    if row["significant"]:
        return f"{'better' if row['change'] > 0 else 'worse'} ({z} s.e. > {sigmas:g})"
    return f"within noise ({z} s.e. ≤ {sigmas:g})"


def overall_change(before: dict[str, Any], after: dict[str, Any], sigmas: float) -> str:
    """One line: the held-out reward before -> after, its change and the noise rule's verdict."""
    row = next(r for r in compare(before, after, sigmas) if r["metric"] == "reward" and r["tag"] is None)
    b, a = row["before"], row["after"]
    return (
        f"{b['mean']:.3f} ± {b['stderr']:.3f} -> {a['mean']:.3f} ± {a['stderr']:.3f} (n={a['count']}; "
        f"change {row['change']:+.3f}, {verdict(row, sigmas)})"
    )


def format_comparison(rows: list[dict[str, Any]], sigmas: float, slice_metrics: Sequence[str] = ("reward",)) -> str:
    """A plain-text before / after table: every metric overall, then `slice_metrics` per slice value."""
    shown = [r for r in rows if r["tag"] is None] + [r for r in rows if r["tag"] is not None and r["metric"] in slice_metrics]
    wheres = [f"{r['tag']}={r['value']}" if r["tag"] else "(all)" for r in shown]
    metric_width = max([len("metric"), *(len(r["metric"]) for r in shown)])
    where_width = max([len("slice"), *(len(w) for w in wheres)])
    lines = [f"{'metric':<{metric_width}} {'slice':<{where_width}} {'before':>15} {'after':>15} {'change':>8} {'s.e.':>6}  verdict"]
    for row, where in zip(shown, wheres, strict=True):
        b, a = row["before"], row["after"]
        lines.append(
            f"{row['metric']:<{metric_width}} {where:<{where_width}} {b['mean']:>7.3f} ± {b['stderr']:<5.3f} "
            f"{a['mean']:>7.3f} ± {a['stderr']:<5.3f} {row['change']:>+8.3f} {row['stderr']:>6.3f}  {verdict(row, sigmas)}"
        )
    return "\n".join(lines)


def format_result(result: EvalResult) -> str:
    """Every metric of one pass, then the reward per slice value."""
    names = [*result.stats, *(f"{tag}={value}" for tag, values in result.slices.items() for value in values)]
    width = max(len(name) for name in names)
    lines = [f"[{result.label}] {result.mode}, n={result.count}{' (cached)' if result.cached else ''}"]
    for key, stat in result.stats.items():
        lines.append(f"  {key:<{width}}  {stat.mean:.3f} ± {stat.stderr:.3f}")
    for tag, values in result.slices.items():
        for value, stats in values.items():
            reward = stats["reward"]
            lines.append(f"  {f'{tag}={value}':<{width}}  {reward.mean:.3f} ± {reward.stderr:.3f} reward (n={reward.count})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- baseline cache
def baseline_key(
    config: RecipeConfig, examples: Sequence[Example], plans: Sequence[EvalPlan], slices: Sequence[str], engine: str
) -> tuple[str, dict[str, Any]]:
    """(cache key, what it was made of): model weights, held-out data, reward and metric sources, settings."""
    parts = {
        "version": BASELINE_VERSION,
        "model": {**model_fingerprint(config.model.name_or_path), "dtype": config.model.dtype},
        "data": data_fingerprint(examples),
        "rewards": reward_fingerprints(config.rewards),
        "metrics": reward_fingerprints(config.eval.metrics),
        "plans": [plan.settings() for plan in plans],
        "slices": list(slices),
        "engine": engine,
    }
    for group in ("rewards", "metrics"):
        # The source file's location does not change what it computes; its hash does.
        for fingerprint in parts[group]:
            fingerprint.pop("source_file")
            if fingerprint["source_sha256"] is None:
                fingerprint["uncacheable"] = True
    return sha256_json(parts), parts


def baseline_path(key: str) -> Path:
    from rft.models import cache_dir

    return cache_dir() / "baselines" / f"{key}.json"


def load_baseline(key: str) -> list[EvalResult] | None:
    path = baseline_path(key)
    try:
        payload = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    results = [EvalResult.from_dict(data) for data in payload["results"]]
    for result in results:
        result.cached = True
    return results


def store_baseline(key: str, parts: dict[str, Any], results: Sequence[EvalResult]) -> None:
    path = baseline_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Every process of a multi-process run evaluates; each writes its own partial file, the rename is atomic.
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps({"key": parts, "results": [r.to_dict() for r in results]}, default=str))
    partial.replace(path)


def baseline_results(
    config: RecipeConfig, engine: RolloutEngine, tokenizer: Any, examples: list[Example], scorer: RewardScorer,
    plans: Sequence[EvalPlan], slices: Sequence[str], metric_scorer: RewardScorer | None = None,
) -> list[EvalResult]:
    """The base model's scores: from the cache when nothing they depend on changed, else evaluated (and cached).

    A reward whose source cannot be found (e.g. a built-in or a lambda) is never cached: its code
    could change without the key noticing.
    """
    if not config.eval.baseline_cache:
        return run_plans("base", engine, tokenizer, examples, scorer, plans, slices, metric_scorer)
    key, parts = baseline_key(config, examples, plans, slices, engine.name)
    cacheable = not any(f.get("uncacheable") for group in ("rewards", "metrics") for f in parts[group])
    cached = load_baseline(key) if cacheable else None
    if cached is not None:
        logger.info("base model scores from the baseline cache (%s)", baseline_path(key))
        return cached
    results = run_plans("base", engine, tokenizer, examples, scorer, plans, slices, metric_scorer)
    if cacheable:
        store_baseline(key, parts, results)
    return results


# ---------------------------------------------------------------------------- `rft eval`
def resolve_checkpoint(path: Path) -> Path:
    """A folder with weights: RUN_DIR -> RUN_DIR/final, checkpoints/step-N -> its policy/, or the folder itself."""
    for candidate in (path / "final", path / "policy", path):
        if (candidate / "adapter_config.json").is_file() or (candidate / "config.json").is_file():
            return candidate
    raise EvalError(
        f"--checkpoint {path}: no adapter_config.json or config.json there (expected a run directory, "
        "its final/, or checkpoints/step-N/)"
    )


def load_checkpoint_policy(config: RecipeConfig, checkpoint: Path, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The base model with a saved LoRA adapter, or a saved full model; with the checkpoint's tokenizer."""
    from rft.models import load_policy, load_tokenizer, pick_dtype

    base_config = config.base_model()
    tokenizer = load_tokenizer(str(checkpoint), config.model.trust_remote_code)
    if (checkpoint / "adapter_config.json").is_file():
        from peft import PeftModel

        base, _ = load_policy(base_config, device)
        return PeftModel.from_pretrained(base, str(checkpoint)).to(device), tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=pick_dtype(config.model.dtype, device), trust_remote_code=config.model.trust_remote_code
    )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file (its held-out split, rewards and eval settings are used)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set eval.sampled=true (repeatable)",
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=None, metavar="DIR",
        help="a run directory, its final/, or checkpoints/step-N/ (default: the base model)",
    )
    parser.add_argument(
        "--compare-with-base", action="store_true",
        help="also score the base model (cached) and show before / after with each change and its noise",
    )
    parser.add_argument("--output", type=Path, default=None, metavar="FILE", help="write all scores as JSON")
    parser.add_argument("--no-cache", action="store_true", help="re-evaluate the base model even if cached")


def held_out_split(config: RecipeConfig, tokenizer_path: str, recipe: str) -> list[Example]:
    """The held-out examples as a model's tokenizer sees them (prompts too long dropped), before any model loads."""
    from rft.models import load_tokenizer

    _, held_out = load_splits(config.data, load_tokenizer(tokenizer_path, config.model.trust_remote_code), config.training.seed)
    if not held_out:
        raise ConfigError(f"{recipe}: no held-out rows: set data.eval or data.eval_size")
    return held_out


def run(args: argparse.Namespace) -> int:
    """`rft eval`: score the base model or a checkpoint on the held-out split."""
    from rft.models import load_policy, resolve_model_path
    from rft.rollout import make_engine

    overrides = [*args.overrides, *(["eval.baseline_cache=false"] if args.no_cache else [])]
    config = load_config(args.recipe, overrides)
    # Everything that can be wrong with the input is found before a model loads.
    scorer = RewardScorer(config.rewards)
    metric_scorer = RewardScorer(config.eval.metrics) if config.eval.metrics else None
    try:
        checkpoint = resolve_checkpoint(args.checkpoint) if args.checkpoint is not None else None
        held_out: dict[str, list[Example]] = {}
        if checkpoint is None or args.compare_with_base:
            held_out["base"] = held_out_split(config, resolve_model_path(config.model.name_or_path), str(args.recipe))
        if checkpoint is not None:
            held_out["checkpoint"] = held_out_split(config, str(checkpoint), str(args.recipe))
        # Each split must serve the evaluation settings; the slices are the first one's.
        slices, *_ = [check_held_out(examples, config.eval) for examples in held_out.values()]
    except EvalError as exc:
        raise ConfigError(str(exc)) from None
    plans = eval_plans(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    output: dict[str, Any] = {"recipe": str(args.recipe), "checkpoint": str(checkpoint) if checkpoint else None}
    base: list[EvalResult] | None = None
    if "base" in held_out:
        base_config = config.base_model()
        model, tokenizer = load_policy(base_config, device)
        engine = make_engine(config, model, tokenizer)
        base = baseline_results(config, engine, tokenizer, held_out["base"], scorer, plans, slices, metric_scorer)
        engine.close()
        del model, engine
        output["base"] = [r.to_dict() for r in base]
    results: list[EvalResult] = []
    if checkpoint is not None:
        model, tokenizer = load_checkpoint_policy(config, checkpoint, device)
        # The engine serves `model`, the checkpoint's weights, whatever files it starts from.
        engine = make_engine(config, model, tokenizer)
        results = run_plans(str(checkpoint), engine, tokenizer, held_out["checkpoint"], scorer, plans, slices, metric_scorer)
        engine.close()
        output["checkpoint_results"] = [r.to_dict() for r in results]
    sigmas = config.eval.noise_sigmas
    for result in base or []:
        print(format_result(result))
    for result in results:
        print(format_result(result))
    if base and results:
        output["comparisons"] = {}
        for before, after in zip(base, results, strict=True):
            rows = compare(before.summary(), after.summary(), sigmas)
            output["comparisons"][after.mode] = rows
            print(f"\nbefore / after ({after.mode}; larger than noise: |change| > {sigmas:g} two-sample s.e.)")
            print(format_comparison(rows, sigmas))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(output, indent=2, default=str))
    return 0
