"""`rft reward check`: look at what the rewards say before paying for training.

Two ways in:

- sampled (wired by the trainer): G completions of the base model for N prompts are scored with
  the recipe's rewards; `summarize_scores(output, group_sizes, reward_range)` turns the scores into
  a `CheckReport` and `format_report` prints it;
- from a file (`--completions FILE.jsonl`, this module's `run`): hand-written completions, one JSON
  object a line, to unit-test a reward on known good and bad answers::

      {"prompt": "What is 7 + 5?", "completion": "7 + 5 = 12\\n#### 12", "reference_answer": "12",
       "expect": {"math_answer": 1}}
      {"messages": [{"role": "user", "content": "..."}], "completion": "...", "expect": {"total": [0, 0.5]}}

  `prompt` (text or messages) or `messages` gives the prompt; every other field except
  `completion` and `expect` is a column for the rewards. `expect` is optional: a number for the
  total, or an object from a reward name (or `total`) to a number or an inclusive `[low, high]`.
  Lines with the same prompt form a group. The command exits 1 when an expectation fails.

The report gives each reward's mean, spread and range, the share of groups whose total reward
does not vary (GRPO learns nothing from them: every advantage is 0), and plain warnings when the
base model already scores near the maximum (RFT may not be needed) or near the minimum everywhere
(the reward may be unreachable).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rft.config import ConfigError, RecipeConfig, load_config
from rft.scoring import RewardError, RewardScorer, ScoreOutput

NEAR_MAX = 0.9  # mean total above this share of the range: the base model already does well
NEAR_MIN = 0.05  # every total below this share of the range: nothing to learn from
ZERO_VARIANCE_WARN = 0.5  # share of groups without signal that deserves a warning
_VARIANCE_EPS = 1e-9


@dataclass
class RewardStats:
    name: str
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    none_share: float
    zero_variance_share: float | None  # over groups of two or more scored completions


@dataclass
class CheckReport:
    groups: int
    completions: int
    rewards: list[RewardStats]
    total: RewardStats
    reward_range: tuple[float, float] | None
    failed_share: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stats(name: str, groups: Sequence[Sequence[float | None]]) -> RewardStats:
    values = [v for group in groups for v in group if v is not None]
    count = sum(len(group) for group in groups)
    scored_groups = [[v for v in group if v is not None] for group in groups]
    scored_groups = [group for group in scored_groups if len(group) >= 2]
    zero_variance = (
        sum(1 for group in scored_groups if max(group) - min(group) <= _VARIANCE_EPS) / len(scored_groups)
        if scored_groups
        else None
    )
    if not values:
        return RewardStats(name, None, None, None, None, 1.0 if count else 0.0, zero_variance)
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return RewardStats(name, mean, std, min(values), max(values), 1 - len(values) / count, zero_variance)


def summarize(
    totals: Sequence[Sequence[float]],
    per_function: dict[str, Sequence[Sequence[float | None]]],
    reward_range: tuple[float, float] | None = None,
    failed_share: float = 0.0,
) -> CheckReport:
    """Statistics and warnings for scores grouped by prompt: `totals[g][i]` is the total reward of
    completion i of group g, `per_function[name][g][i]` that function's value."""
    total = _stats("total", totals)
    report = CheckReport(
        groups=len(totals),
        completions=sum(len(group) for group in totals),
        rewards=[_stats(name, groups) for name, groups in per_function.items()],
        total=total,
        reward_range=reward_range,
        failed_share=failed_share,
    )
    report.warnings = _warnings(report)
    return report


def _warnings(report: CheckReport) -> list[str]:
    warnings = []
    total = report.total
    if total.mean is None:
        return ["No completion received a reward: check that the rewards apply to these rows."]
    if report.reward_range is not None:
        low, high = report.reward_range
        span = high - low
        if span > 0 and total.mean >= low + NEAR_MAX * span:
            warnings.append(
                f"The base model already scores {total.mean:.3f} on average (maximum {high:g}): "
                "RFT may not be needed. Harder prompts or a stricter reward would leave room to learn."
            )
        if span > 0 and total.max is not None and total.max <= low + NEAR_MIN * span:
            warnings.append(
                f"No completion scored above {total.max:.3f} (minimum {low:g}, maximum {high:g}): the reward may "
                "be unreachable. Check the reward on hand-written answers (--completions), the answer "
                "format the prompt asks for, and max_new_tokens."
            )
    elif total.max is not None and total.max <= 0.0:
        warnings.append(
            "No completion scored above 0: the reward may be unreachable. Check the reward on hand-written "
            "answers (--completions), the answer format the prompt asks for, and max_new_tokens."
        )
    if total.zero_variance_share is not None and total.zero_variance_share >= ZERO_VARIANCE_WARN:
        warnings.append(
            f"{total.zero_variance_share:.0%} of groups have the same total reward for every completion: "
            "they teach nothing (advantages are 0). More completions per prompt, a higher temperature, "
            "partial credit, or DAPO's dynamic sampling help."
        )
    if report.failed_share > 0:
        warnings.append(f"{report.failed_share:.0%} of completions had a failed reward call.")
    return warnings


def summarize_scores(
    output: ScoreOutput, group_sizes: Sequence[int], reward_range: tuple[float, float] | None = None
) -> CheckReport:
    """`summarize` for a scored batch whose completions are consecutive groups of the given sizes."""
    if sum(group_sizes) != len(output.total):
        raise ValueError(f"group sizes add up to {sum(group_sizes)}, but {len(output.total)} completions were scored")
    bounds = []
    start = 0
    for size in group_sizes:
        bounds.append((start, start + size))
        start += size
    totals = [output.total[a:b] for a, b in bounds]
    per_function = {name: [values[a:b] for a, b in bounds] for name, values in output.per_function.items()}
    failed_share = sum(output.failed) / len(output.failed) if output.failed else 0.0
    return summarize(totals, per_function, reward_range, failed_share)


def recipe_reward_range(scorer: RewardScorer) -> tuple[float, float] | None:
    """The total reward's range from the functions' `reward_range` and the weights, when every
    function declares one (the library's do; a user's function may set the attribute)."""
    low = high = 0.0
    for _, weight, function in scorer.functions:
        declared = getattr(function, "reward_range", None) or getattr(getattr(function, "func", None), "reward_range", None)
        if declared is None:
            return None
        ends = (weight * declared[0], weight * declared[1])
        low += min(ends)
        high += max(ends)
    return low, high


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_report(report: CheckReport) -> str:
    """The report as the lines `rft reward check` prints."""
    lines = [f"{report.completions} completions in {report.groups} groups", ""]
    header = f"{'reward':<28} {'mean':>7} {'std':>7} {'min':>7} {'max':>7} {'n/a':>6} {'flat groups':>12}"
    lines.append(header)
    for stats in [*report.rewards, report.total]:
        flat = "-" if stats.zero_variance_share is None else f"{stats.zero_variance_share:.0%}"
        lines.append(
            f"{stats.name:<28} {_fmt(stats.mean):>7} {_fmt(stats.std):>7} {_fmt(stats.min):>7} "
            f"{_fmt(stats.max):>7} {stats.none_share:>6.0%} {flat:>12}"
        )
    lines.append("")
    if report.reward_range is None:
        lines.append("Total reward range unknown (a reward declares none): pass --reward-range LOW HIGH to check for a "
                     "base model that already aces the task.")
    else:
        lines.append(f"Total reward range: {report.reward_range[0]:g} .. {report.reward_range[1]:g}")
    lines.extend(f"WARNING: {warning}" for warning in report.warnings)
    if not report.warnings:
        lines.append("No warnings.")
    return "\n".join(lines)


# -- from-file mode ---------------------------------------------------------------------------------


@dataclass
class _Case:
    line: int
    prompt: Any
    completion: Any
    row: dict[str, Any]
    expect: dict[str, float | tuple[float, float]]


def read_cases(path: Path, reward_names: Sequence[str]) -> list[_Case]:
    """Parse and validate a completions file; one ConfigError lists every bad line."""
    cases: list[_Case] = []
    problems: list[str] = []
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc
    known = {*reward_names, "total"}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not JSON ({exc.msg})")
            continue
        if not isinstance(record, dict):
            problems.append(f"{where}: expected a JSON object")
            continue
        if "completion" not in record:
            problems.append(f"{where}: field completion: missing")
            continue
        prompt = record.get("prompt", record.get("messages"))
        if prompt is None:
            problems.append(f"{where}: field prompt: missing (give `prompt` or `messages`)")
            continue
        expect_raw = record.get("expect", {})
        if isinstance(expect_raw, int | float) and not isinstance(expect_raw, bool):
            expect_raw = {"total": expect_raw}
        expect: dict[str, float | tuple[float, float]] = {}
        if not isinstance(expect_raw, dict):
            problems.append(f"{where}: field expect: a number or an object of reward name -> number or [low, high]")
            continue
        for name, value in expect_raw.items():
            if name not in known:
                problems.append(f"{where}: field expect.{name}: no such reward (have {sorted(known)})")
            elif isinstance(value, int | float) and not isinstance(value, bool):
                expect[name] = float(value)
            elif isinstance(value, list) and len(value) == 2 and all(isinstance(v, int | float) for v in value):
                expect[name] = (float(value[0]), float(value[1]))
            else:
                problems.append(f"{where}: field expect.{name}: a number or [low, high], got {value!r}")
        row = {k: v for k, v in record.items() if k not in ("completion", "expect", "prompt")}
        cases.append(_Case(number, prompt, record["completion"], row, expect))
    if problems:
        raise ConfigError("\n".join(problems))
    if not cases:
        raise ConfigError(f"{path}: no completions in the file")
    return cases


def _meets(value: float | None, expectation: float | tuple[float, float]) -> bool:
    if value is None:
        return False
    if isinstance(expectation, tuple):
        return expectation[0] - 1e-9 <= value <= expectation[1] + 1e-9
    return abs(value - expectation) <= 1e-6


def check_file(
    config: RecipeConfig, path: Path, reward_range: tuple[float, float] | None = None
) -> tuple[str, CheckReport, int]:
    """Score a completions file with the recipe's rewards: (printed text, report, failed expectations)."""
    scorer = RewardScorer(config.rewards, config.scoring)
    cases = read_cases(path, scorer.names)
    output = scorer.score(
        [c.prompt for c in cases], [c.completion for c in cases], [[] for _ in cases], [c.row for c in cases]
    )
    lines = []
    failures = 0
    for index, case in enumerate(cases):
        values = {name: output.per_function[name][index] for name in scorer.names}
        values["total"] = output.total[index]
        shown = "  ".join(f"{name}={_fmt(value)}" for name, value in values.items())
        verdicts = []
        for name, expectation in case.expect.items():
            ok = _meets(values[name], expectation)
            failures += not ok
            if not ok:
                wanted = f"[{expectation[0]:g}, {expectation[1]:g}]" if isinstance(expectation, tuple) else f"{expectation:g}"
                verdicts.append(f"{name} expected {wanted}")
        status = "" if not case.expect else ("  PASS" if not verdicts else "  FAIL: " + "; ".join(verdicts))
        lines.append(f"line {case.line}: {shown}{status}")
    for error in output.errors:
        lines.append(f"reward call failed: {error}")
    group_index: dict[str, int] = {}
    group_sizes: list[int] = []
    order: list[int] = []
    for index, case in enumerate(cases):
        key = json.dumps(case.prompt, sort_keys=True, default=str)
        if key not in group_index:
            group_index[key] = len(group_sizes)
            group_sizes.append(0)
        group_sizes[group_index[key]] += 1
        order.append(index)
    # Completions of one prompt may be spread over the file: regroup them before summarising.
    order.sort(key=lambda i: group_index[json.dumps(cases[i].prompt, sort_keys=True, default=str)])
    regrouped = ScoreOutput(
        total=[output.total[i] for i in order],
        per_function={name: [values[i] for i in order] for name, values in output.per_function.items()},
        failed=[output.failed[i] for i in order],
    )
    report = summarize_scores(regrouped, group_sizes, reward_range or recipe_reward_range(scorer))
    text = "\n".join([*lines, "", format_report(report)])
    if any(case.expect for case in cases):
        text += f"\n{'All expectations met.' if not failures else f'{failures} expectation(s) FAILED.'}"
    return text, report, failures


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML whose `rewards:` (and `scoring:`) are checked")
    parser.add_argument(
        "--completions", type=Path, help="JSONL of hand-written completions to score instead of sampling the base model"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. --set rewards.0.weight=2")
    parser.add_argument("--reward-range", nargs=2, type=float, metavar=("LOW", "HIGH"),
                        help="range of the total reward, for the 'already aces it' and 'unreachable' warnings "
                        "(default: from the rewards' declared ranges)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    parser.add_argument("--prompts", type=int, default=16, help="sampling mode: training prompts to sample (default 16)")
    parser.add_argument(
        "--group-size", type=int, default=None, help="sampling mode: completions per prompt (default rollout.group_size)"
    )


def sample_and_score(
    config: RecipeConfig, scorer: RewardScorer, prompts: int, group_size: int
) -> tuple[ScoreOutput, list[int]]:
    """Sample `group_size` completions from the base model for `prompts` training prompts and score them."""
    import torch

    from rft.data import PromptSampler, load_splits
    from rft.evaluation import decode_completions
    from rft.models import load_policy
    from rft.rollout import make_engine
    from rft.rollout.base import SamplingSettings

    load_splits(config.data, None, config.training.seed)  # bad rows fail before the model loads
    base = config.model_copy(update={"lora": config.lora.model_copy(update={"enabled": False})})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_policy(base, device)
    train, _ = load_splits(config.data, tokenizer, config.training.seed)
    examples = PromptSampler(train, config.training.seed, config.data.shuffle).take(min(prompts, len(train)))
    engine = make_engine(base, model, tokenizer)
    rollout_settings = config.rollout
    sampling = SamplingSettings(
        max_new_tokens=rollout_settings.max_new_tokens, temperature=rollout_settings.temperature,
        top_p=rollout_settings.top_p, top_k=rollout_settings.top_k,
    )
    try:
        rollout = engine.generate([e.prompt_ids for e in examples], group_size, sampling)
    finally:
        engine.close()
    completions = decode_completions(tokenizer, examples, rollout.completion_ids, group_size)
    rows = [examples[i // group_size] for i in range(len(completions))]
    output = scorer.score(
        [e.prompt for e in rows], completions, rollout.completion_ids, [e.row for e in rows], group_size=group_size
    )
    return output, [group_size] * len(examples)


def run(args: argparse.Namespace) -> int:
    """`rft reward check`: sample the base model and report, or (--completions) score a file of
    hand-written completions; returns the exit code (1: an expectation failed)."""
    if args.reward_range is not None and args.reward_range[0] >= args.reward_range[1]:
        raise ConfigError(f"--reward-range: LOW {args.reward_range[0]} must be below HIGH {args.reward_range[1]}")
    config = load_config(args.recipe, args.overrides)
    if args.completions is None:
        scorer = RewardScorer(config.rewards, config.scoring)
        output, group_sizes = sample_and_score(config, scorer, args.prompts, args.group_size or config.rollout.group_size)
        reward_range = tuple(args.reward_range) if args.reward_range else recipe_reward_range(scorer)
        report = summarize_scores(output, group_sizes, reward_range)
        print(format_report(report))
        if args.json is not None:
            args.json.write_text(json.dumps(report.to_dict(), indent=2))
        return 0
    try:
        text, report, failures = check_file(config, args.completions, tuple(args.reward_range) if args.reward_range else None)
    except RewardError as exc:
        raise ConfigError(str(exc)) from exc
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_dict(), indent=2))
    return 1 if failures else 0
