"""The `rft` command: parse arguments, call library functions, print results. No logic lives here."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import time
from typing import Any

from rft.config import EMBEDDED_MODEL, ConfigError, format_schema, load_config, schema_fields
from rft.data import DataError
from rft.scoring import RewardError


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set algorithm.eps_high=0.28 (repeatable)",
    )


class _HelpConfig(argparse.Action):
    """`rft train --help-config`: print the recipe reference and exit, as `--help` does (no recipe needed)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(format_schema(schema_fields()), end="")
        parser.exit()


def _config(args: argparse.Namespace) -> int:
    print(format_schema(schema_fields(), sections=args.sections), end="")
    return 0


def resume_target(resume: str | None) -> str | bool | None:
    """`--resume` as the trainer takes it: True for the latest checkpoint, a path, or None (a new run)."""
    return True if resume == "latest" else resume


def _train(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    # Imported here: they load torch and transformers, which no other command needs.
    from rft.interrupt import TrainingInterrupted, raise_on_sigterm
    from rft.trainer import Trainer

    config = load_config(args.recipe, args.overrides, bedrock_hyperparameters=args.bedrock_hyperparameters)
    # Outside the training steps (which stop after the current one) SIGTERM stops at once, in one line.
    previous = signal.signal(signal.SIGTERM, raise_on_sigterm)
    try:
        trainer = Trainer(config, resume=resume_target(args.resume),
                          allow_recipe_change=args.allow_recipe_change, overwrite=args.overwrite)
        results = trainer.train()
    except TrainingInterrupted as exc:
        print(f"rft train: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("rft train: SIGINT outside the training steps: stopped at once; --resume continues from the "
              "last checkpoint", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"run directory: {config.run_dir}  (rollout engine: {results['engine']})")
    print(f"time: {_minutes(results['steps_s'])} training, {_minutes(time.perf_counter() - started)} in all "
          "(start-up and evaluations included)")
    if "held_out_change" in results:
        print(f"held-out mean reward, base -> trained: {results['held_out_change']}")
    return 0


def _minutes(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def _prepare_model(args: argparse.Namespace) -> int:
    from rft.models import resolve_model_path  # heavy import (torch, transformers): this command only

    print(resolve_model_path(args.model))
    return 0


def _add_module_command(
    commands: argparse._SubParsersAction,
    groups: dict[str, argparse._SubParsersAction],
    group: str,
    name: str | None,
    module: str,
    help_text: str,
) -> None:
    """`rft GROUP [NAME]` backed by a module's `configure_parser(parser)` and `run(args) -> int`."""
    target = importlib.import_module(module)
    if name is None:
        parser = commands.add_parser(group, help=help_text)
    else:
        if group not in groups:
            groups[group] = commands.add_parser(group, help=f"{group} commands").add_subparsers(
                dest=f"{group}_command", required=True
            )
        parser = groups[group].add_parser(name, help=help_text)
    target.configure_parser(parser)
    parser.set_defaults(handler=target.run)


def _add_train_command(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train a policy from a recipe")
    _add_recipe_arguments(train)
    train.add_argument(
        "--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
        help="continue the run in the run directory from its latest checkpoint (or the one given)",
    )
    train.add_argument(
        "--allow-recipe-change", action="store_true",
        help="with --resume: apply recipe changes that alter what the run computes (learning rate, rewards, "
        "group size, seed, ...) from the checkpoint's step; they are recorded in the manifest",
    )
    train.add_argument(
        "--bedrock-hyperparameters", metavar="JOB_JSON",
        help="a Bedrock RFT job's hyperParameters (JSON, as CreateModelCustomizationJob takes them), applied "
        "over the recipe; the README's table gives the field each one sets",
    )
    train.add_argument(
        "--overwrite", action="store_true",
        help="start a new run in a run directory that holds one, deleting it first",
    )
    train.add_argument("--help-config", action=_HelpConfig,
                       help="print every recipe field (section, type, default, description) and exit")
    train.set_defaults(handler=_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rft",
                                     description="Reinforcement fine-tuning (GRPO / DAPO / GSPO).")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train_command(commands)
    config = commands.add_parser("config", help="the recipe reference: every field by section, documented")
    config.add_argument("sections", nargs="*", metavar="SECTION", help="only these sections (e.g. algorithm)")
    config.set_defaults(handler=_config)

    groups: dict[str, argparse._SubParsersAction] = {}
    _add_module_command(commands, groups, "eval", None, "rft.eval_command",
                        "held-out evaluation of the base model or a checkpoint, with per-slice results")
    _add_module_command(commands, groups, "report", None, "rft.report",
                        "an HTML report with plots of a run")
    _add_module_command(commands, groups, "reward", "check", "rft.reward_check",
                        "score base-model samples (or a file of completions) with the recipe's rewards")
    _add_module_command(commands, groups, "data", "prep", "rft.dataprep",
                        "invocation logs / chat JSONL -> training JSONL (PII redaction, dedup, tags, split)")

    _add_module_command(commands, groups, "export", "bedrock", "rft.export.bedrock",
                        "merged model for Amazon Bedrock Custom Model Import (optionally upload and import)")
    _add_module_command(commands, groups, "export", "sagemaker", "rft.export.sagemaker",
                        "LMI (DJL, vLLM) deployment for a SageMaker endpoint: adapter or merged model")

    _add_module_command(commands, groups, "sagemaker", "launch", "rft.sagemaker.launcher",
                        "run the recipe as a SageMaker Training job (--dry-run prints the request)")

    prepare = commands.add_parser(
        "prepare-model", help="convert the embedded SmolLM2 (or resolve a model id) and print its local path",
    )
    prepare.add_argument("model", nargs="?", default=EMBEDDED_MODEL)
    prepare.set_defaults(handler=_prepare_model)
    return parser


# Libraries that log every request or lock at INFO; their warnings and errors still show. The
# openai client (an LLM judge) sends through httpx2, one "HTTP Request" line per judged completion.
CHATTY_LOGGERS = ("httpx", "httpx2", "urllib3", "filelock")


def configure_logging() -> None:
    """INFO for the project's own messages; WARNING and above for the chatty libraries."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in CHATTY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, DataError, RewardError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
