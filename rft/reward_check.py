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
  `completion` and `expect` is a column for the rewards. `completion` is text, or a list of
  messages; after a chat prompt, text reaches the rewards as the trainer gives it, TRL's
  `[{"role": "assistant", "content": text}]`, so chat-style rewards (TRL's) work unchanged. `expect`
  is optional: a number for the total, or an object from a reward name (or `total`) to a number or an
  inclusive `[low, high]`.
  Lines with the same prompt form a group. The command exits 1 when an expectation fails.

What the report holds is `rft.reward_report`'s.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rft.config import ConfigError, RecipeConfig, load_config
from rft.jsonl import JSONLine, json_lines
from rft.reward_context import RewardState
from rft.reward_report import (
    CheckReport,
    format_report,
    format_value,
    pick_samples,
    recipe_reward_range,
    summarize,
    summarize_scores,
)
from rft.scoring import RewardError, RewardScorer, ScoreOutput, score_groups

__all__ = ["CheckReport", "check_file", "configure_parser", "format_report", "read_cases",
           "recipe_reward_range",
           "run", "sample_and_score", "summarize", "summarize_scores"]

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
    try:
        lines = list(json_lines(path, invalid_json="not JSON"))
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc
    known = {*reward_names, "total"}
    cases: list[_Case] = []
    problems: list[str] = []
    for line in lines:
        case, line_problems = _case(line, known)
        problems.extend(line_problems)
        if case is not None:
            cases.append(case)
    if problems:
        raise ConfigError("\n".join(problems))
    if not cases:
        raise ConfigError(f"{path}: no completions in the file")
    return cases


def _case(line: JSONLine, known: set[str]) -> tuple[_Case | None, list[str]]:
    """One line's case (None when it has none) and what is wrong with the line."""
    where = line.where
    if line.error is not None:
        return None, [f"{where}: {line.error}"]
    record = line.value
    if not isinstance(record, dict):
        return None, [f"{where}: expected a JSON object"]
    if "completion" not in record:
        return None, [f"{where}: field completion: missing"]
    prompt = record.get("prompt", record.get("messages"))
    if prompt is None:
        return None, [f"{where}: field prompt: missing (give `prompt` or `messages`)"]
    expect_raw = record.get("expect", {})
    if isinstance(expect_raw, int | float) and not isinstance(expect_raw, bool):
        expect_raw = {"total": expect_raw}
    if not isinstance(expect_raw, dict):
        return None, [f"{where}: field expect: a number or an object of reward name -> number or [low, high]"]
    expect, problems = _expectations(expect_raw, where, known)
    row = {k: v for k, v in record.items() if k not in ("completion", "expect", "prompt")}
    return _Case(line.number, prompt, _as_trained(prompt, record["completion"]), row, expect), problems


def _expectations(
    expect_raw: dict[str, Any], where: str, known: set[str]
) -> tuple[dict[str, float | tuple[float, float]], list[str]]:
    """A line's `expect` object: reward name (or `total`) -> a number or an inclusive range."""
    expect: dict[str, float | tuple[float, float]] = {}
    problems: list[str] = []
    for name, value in expect_raw.items():
        if name not in known:
            problems.append(f"{where}: field expect.{name}: no such reward (have {sorted(known)})")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            expect[name] = float(value)
        elif isinstance(value, list) and len(value) == 2 and all(isinstance(v, int | float) for v in value):
            expect[name] = (float(value[0]), float(value[1]))
        else:
            problems.append(f"{where}: field expect.{name}: a number or [low, high], got {value!r}")
    return expect, problems


def _as_trained(prompt: Any, completion: Any) -> Any:
    """The completion as the trainer hands it to rewards (`rft.trajectories.decode_completions`): after a
    chat prompt (a list of messages), TRL's `[{"role": "assistant", "content": text}]`; chat-style
    rewards index it so."""
    if isinstance(prompt, list) and isinstance(completion, str):
        return [{"role": "assistant", "content": completion}]
    return completion


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
    scorer.state = RewardState(max_steps=config.training.steps)  # as before the first step
    cases = read_cases(path, scorer.names)
    output = scorer.score(
        [c.prompt for c in cases], [c.completion for c in cases], [[] for _ in cases], [c.row for c in cases]
    )
    lines, failures = _case_lines(cases, output, scorer.names)
    lines.extend(f"reward call failed: {error}" for error in output.errors)
    regrouped, group_sizes = _regrouped(cases, output)
    report = summarize_scores(regrouped, group_sizes, reward_range or recipe_reward_range(scorer))
    text = "\n".join([*lines, "", format_report(report)])
    if any(case.expect for case in cases):
        text += f"\n{'All expectations met.' if not failures else f'{failures} expectation(s) FAILED.'}"
    return text, report, failures


def _case_lines(cases: Sequence[_Case], output: ScoreOutput, names: Sequence[str]) -> tuple[list[str], int]:
    """One printed line per case (its values, and PASS or FAIL against its expectations), and the failures."""
    lines = []
    failures = 0
    for index, case in enumerate(cases):
        values = {name: output.per_function[name][index] for name in names}
        values["total"] = output.total[index]
        shown = "  ".join(f"{name}={format_value(value)}" for name, value in values.items())
        verdicts = []
        for name, expectation in case.expect.items():
            if _meets(values[name], expectation):
                continue
            failures += 1
            wanted = (f"[{expectation[0]:g}, {expectation[1]:g}]" if isinstance(expectation, tuple)
                      else f"{expectation:g}")
            verdicts.append(f"{name} expected {wanted}")
        status = "" if not case.expect else ("  PASS" if not verdicts else "  FAIL: " + "; ".join(verdicts))
        lines.append(f"line {case.line}: {shown}{status}")
    return lines, failures


def _regrouped(cases: Sequence[_Case], output: ScoreOutput) -> tuple[ScoreOutput, list[int]]:
    """The scores with the completions of one prompt side by side (a file may spread them); group sizes."""
    group_index: dict[str, int] = {}
    group_sizes: list[int] = []
    keys = [json.dumps(case.prompt, sort_keys=True, default=str) for case in cases]
    for key in keys:
        if key not in group_index:
            group_index[key] = len(group_sizes)
            group_sizes.append(0)
        group_sizes[group_index[key]] += 1
    order = sorted(range(len(cases)), key=lambda i: group_index[keys[i]])
    regrouped = ScoreOutput(
        total=[output.total[i] for i in order],
        per_function={name: [values[i] for i in order] for name, values in output.per_function.items()},
        failed=[output.failed[i] for i in order],
    )
    return regrouped, group_sizes


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML whose `rewards:` (and `scoring:`) are checked")
    parser.add_argument(
        "--completions", type=Path,
        help="JSONL of hand-written completions to score instead of sampling the base model"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. --set rewards.0.weight=2")
    parser.add_argument("--reward-range", nargs=2, type=float, metavar=("LOW", "HIGH"),
                        help="range of the total reward, for the 'already aces it' and 'unreachable' "
                        "warnings (default: from the rewards' declared ranges)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    parser.add_argument("--prompts", type=int, default=16,
                        help="sampling mode: training prompts to sample (default 16)")
    parser.add_argument(
        "--group-size", type=int, default=None,
        help="sampling mode: completions per prompt (default rollout.group_size)"
    )


def sample_and_score(
    config: RecipeConfig, scorer: RewardScorer, prompts: int, group_size: int,
    reward_range: tuple[float, float] | None,
) -> CheckReport:
    """Sample `group_size` completions from the base model for `prompts` training prompts, score and
    summarise them."""
    # Heavy imports (torch, the model and engine code): only sampling needs them, not a completions file.
    import torch

    from rft.agents.loading import load_agent, sampler_for
    from rft.data import PromptSampler, load_splits
    from rft.models import load_policy
    from rft.rollout import make_engine

    # Bad rows, columns the rewards need but the rows lack, and agent parts fail before the model loads.
    agent = load_agent(config)
    train, held_out = load_splits(config.data, None, config.training.seed)
    scorer.check_splits(config.data, train, held_out)
    base = config.base_model()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_policy(base, device)
    train, _ = load_splits(config.data, tokenizer, config.training.seed)
    examples = PromptSampler(train, config.training.seed, config.data.shuffle).take(min(prompts, len(train)))
    engine = make_engine(base, model, tokenizer, [e.prompt_ids for e in examples])
    sampler = sampler_for(config, tokenizer, agent)
    try:
        rollout = sampler.sample(engine, examples, group_size, config.rollout.sampling())
    finally:
        engine.close()
        sampler.close()
    scored = score_groups(scorer, examples, rollout, group_size)
    prompt_texts = [e.prompt for e in scored.rows]
    return summarize_scores(
        scored.scores, [group_size] * len(examples), reward_range,
        truncated_share=sum(rollout.truncated) / len(scored.completions),
        samples=pick_samples(prompt_texts, scored.completions, rollout.truncated, scored.scores),
    )


def run(args: argparse.Namespace) -> int:
    """`rft reward check`: sample the base model and report, or (--completions) score a file of
    hand-written completions; returns the exit code (1: an expectation failed)."""
    if args.reward_range is not None and args.reward_range[0] >= args.reward_range[1]:
        low, high = args.reward_range
        raise ConfigError(f"--reward-range: LOW {low} must be below HIGH {high}")
    config = load_config(args.recipe, args.overrides)
    if args.completions is None:
        scorer = RewardScorer(config.rewards, config.scoring)
        scorer.state = RewardState(max_steps=config.training.steps)  # as before the first step
        reward_range = tuple(args.reward_range) if args.reward_range else recipe_reward_range(scorer)
        group_size = args.group_size or config.rollout.group_size
        report = sample_and_score(config, scorer, args.prompts, group_size, reward_range)
        print(format_report(report))
        if args.json is not None:
            args.json.write_text(json.dumps(report.to_dict(), indent=2))
        return 0
    try:
        given_range = tuple(args.reward_range) if args.reward_range else None
        text, report, failures = check_file(config, args.completions, given_range)
    except RewardError as exc:
        raise ConfigError(str(exc)) from exc
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_dict(), indent=2))
    return 1 if failures else 0
