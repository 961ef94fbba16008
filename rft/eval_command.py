"""`rft eval`: score the base model or a checkpoint on the held-out split, optionally before / after.

`evaluate_recipe` does the work and returns the scores (`EvalOutcome`); `run` prints them and writes
`--output`. Everything that can be wrong with the input (rewards, the checkpoint folder, the held-out
rows and the evaluation settings) is found before a model loads.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rft.config import ConfigError, RecipeConfig, load_config
from rft.data import Example, load_splits
from rft.eval_plans import EvalError, check_held_out, eval_plans
from rft.eval_results import EvalResult, format_result
from rft.evaluation import Evaluator
from rft.scoring import RewardScorer
from rft.stats import Comparison, compare, format_comparison


@dataclass
class EvalOutcome:
    """What `rft eval` computed: the base model's results, the checkpoint's, and before / after per mode."""

    recipe: str
    checkpoint: Path | None
    base: list[EvalResult] | None = None
    checkpoint_results: list[EvalResult] | None = None
    comparisons: dict[str, list[Comparison]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The `--output` JSON: every result in full, each comparison row as plain JSON."""
        checkpoint = str(self.checkpoint) if self.checkpoint else None
        output: dict[str, Any] = {"recipe": self.recipe, "checkpoint": checkpoint}
        if self.base is not None:
            output["base"] = [r.to_dict() for r in self.base]
        if self.checkpoint_results is not None:
            output["checkpoint_results"] = [r.to_dict() for r in self.checkpoint_results]
        if self.comparisons:
            output["comparisons"] = {
                mode: [row.to_dict() for row in rows] for mode, rows in self.comparisons.items()
            }
        return output


def resolve_checkpoint(path: Path) -> Path:
    """The folder with weights: RUN_DIR -> RUN_DIR/final, checkpoints/step-N -> its policy/, or itself."""
    for candidate in (path / "final", path / "policy", path):
        if (candidate / "adapter_config.json").is_file() or (candidate / "config.json").is_file():
            return candidate
    raise EvalError(
        f"--checkpoint {path}: no adapter_config.json or config.json there (expected a run directory, "
        "its final/, or checkpoints/step-N/)"
    )


def held_out_split(config: RecipeConfig, tokenizer_path: str, recipe: str) -> list[Example]:
    """The held-out examples as a model's tokenizer sees them (prompts too long dropped), no model loaded."""
    # rft.models imports transformers (seconds): `rft` builds every command's parser without it.
    from rft.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path, config.model.trust_remote_code)
    _, held_out = load_splits(config.data, tokenizer, config.training.seed)
    if not held_out:
        raise ConfigError(f"{recipe}: no held-out rows: set data.eval or data.eval_size")
    return held_out


def _held_out_splits(
    config: RecipeConfig, recipe: str, checkpoint: Path | None, with_base: bool
) -> tuple[dict[str, list[Example]], list[str]]:
    """Each model's held-out split ("base", "checkpoint") and the slices (the first split's), all checked."""
    from rft.models import resolve_model_path  # see held_out_split

    held_out: dict[str, list[Example]] = {}
    if with_base:
        held_out["base"] = held_out_split(config, resolve_model_path(config.model.name_or_path), recipe)
    if checkpoint is not None:
        held_out["checkpoint"] = held_out_split(config, str(checkpoint), recipe)
    # Each split must serve the evaluation settings; the slices are the first one's.
    slices, *_ = [check_held_out(examples, config.eval) for examples in held_out.values()]
    return held_out, slices


def evaluate_recipe(
    config: RecipeConfig, recipe: str, checkpoint_dir: Path | None = None, compare_with_base: bool = False
) -> EvalOutcome:
    """The base model's scores (cached) without a checkpoint or with `compare_with_base`; the checkpoint's."""
    # Heavy imports (transformers, the engines), paid only when `rft eval` runs: see held_out_split.
    from rft.agents.loading import load_agent, sampler_for
    from rft.models import default_device, load_checkpoint_policy, load_policy
    from rft.rollout import make_engine

    agent = load_agent(config)
    scorer = RewardScorer(config.rewards)
    metric_scorer = RewardScorer(config.eval.metrics) if config.eval.metrics else None
    try:
        checkpoint = resolve_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
        with_base = checkpoint is None or compare_with_base
        held_out, slices = _held_out_splits(config, recipe, checkpoint, with_base)
    except EvalError as exc:
        raise ConfigError(str(exc)) from None
    plans, device = eval_plans(config), default_device()
    outcome = EvalOutcome(recipe, checkpoint)
    if "base" in held_out:
        model, tokenizer = load_policy(config.base_model(), device)
        engine = make_engine(config, model, tokenizer, [e.prompt_ids for e in held_out["base"]])
        rollout = sampler_for(config, tokenizer, agent)
        evaluator = Evaluator(engine, rollout, held_out["base"], scorer, plans, slices, metric_scorer)
        outcome.base = evaluator.baseline(config)
        engine.close()
        rollout.close()
        del model, engine, evaluator
    if checkpoint is not None:
        model, tokenizer = load_checkpoint_policy(config, checkpoint, device)
        # The engine serves `model`, the checkpoint's weights, whatever files it starts from.
        engine = make_engine(config, model, tokenizer, [e.prompt_ids for e in held_out["checkpoint"]])
        rollout = sampler_for(config, tokenizer, agent)
        evaluator = Evaluator(engine, rollout, held_out["checkpoint"], scorer, plans, slices, metric_scorer)
        outcome.checkpoint_results = evaluator.run(str(checkpoint))
        engine.close()
        rollout.close()
    for before, after in zip(outcome.base or [], outcome.checkpoint_results or [], strict=False):
        outcome.comparisons[after.mode] = compare(before.summary(), after.summary(), config.eval.noise_sigmas)
    return outcome


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "recipe", help="recipe YAML file (its held-out split, rewards and eval settings are used)"
    )
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


def run(args: argparse.Namespace) -> int:
    """`rft eval`: score the base model or a checkpoint on the held-out split."""
    overrides = [*args.overrides, *(["eval.baseline_cache=false"] if args.no_cache else [])]
    config = load_config(args.recipe, overrides)
    outcome = evaluate_recipe(config, str(args.recipe), args.checkpoint, args.compare_with_base)
    for result in [*(outcome.base or []), *(outcome.checkpoint_results or [])]:
        print(format_result(result))
    sigmas = config.eval.noise_sigmas
    for mode, rows in outcome.comparisons.items():
        print(f"\nbefore / after ({mode}; larger than noise: |change| > {sigmas:g} two-sample s.e.)")
        print(format_comparison(rows))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(outcome.to_dict(), indent=2, default=str))
    return 0
