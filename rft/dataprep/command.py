"""`rft data prep` arguments, and the files it writes: train.jsonl, heldout.jsonl, prep_report.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rft.dataprep.pipeline import DEFAULT_TAG_KEYS, PrepOptions, PrepReport, TrainingRows, prepare


def _tag(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--tag {text!r}: expected key=value, e.g. domain=support")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=Path,
                        help="JSONL / JSON files (or .gz) or directories of them")
    parser.add_argument("--out", type=Path, required=True,
                        help="output directory: train.jsonl, heldout.jsonl, prep_report.json")
    parser.add_argument("--assistant", choices=("reference", "metadata", "drop"), default="reference",
                        help="a logged reply becomes reference_answer (default), a logged_response field, or "
                             "is dropped")
    parser.add_argument("--no-redact", dest="redact", action="store_false", help="keep PII (default: redact)")
    parser.add_argument("--pii-entities", help="comma-separated Presidio entities to redact (default: "
                                               "rewards.pii.DEFAULT_ENTITIES)")
    parser.add_argument("--dedup-threshold", type=float, default=0.85,
                        help="MinHash Jaccard similarity at which prompts are near-duplicates (default 0.85)")
    parser.add_argument("--no-dedup", action="store_true", help="keep near-duplicates")
    parser.add_argument("--tag-keys", default=",".join(DEFAULT_TAG_KEYS),
                        help="tag fields carried as metadata")
    parser.add_argument("--tag", action="append", type=_tag, default=[], metavar="KEY=VALUE",
                        help="default tag for records that carry none, e.g. --tag domain=support")
    parser.add_argument("--held-out", type=float, default=0.1, help="share of rows held out (default 0.1)")
    parser.add_argument("--stratify-by", default="domain",
                        help="tag the split is stratified by ('' for none)")
    parser.add_argument("--seed", type=int, default=0, help="split seed")
    parser.add_argument("--skip-malformed", action="store_true",
                        help="skip malformed lines instead of stopping")


def options_from_args(args: argparse.Namespace) -> PrepOptions:
    """The prep settings the command line asks for."""
    return PrepOptions(
        assistant=args.assistant,
        redact=args.redact,
        pii_entities=[e.strip() for e in args.pii_entities.split(",")] if args.pii_entities else None,
        dedup_threshold=None if args.no_dedup else args.dedup_threshold,
        tag_keys=[k.strip() for k in args.tag_keys.split(",") if k.strip()],
        tag_defaults=dict(args.tag),
        held_out=args.held_out,
        stratify_by=args.stratify_by or None,
        seed=args.seed,
        skip_malformed=args.skip_malformed,
    )


def write_outputs(out: Path, train: TrainingRows, held: TrainingRows, report: PrepReport) -> None:
    """train.jsonl and heldout.jsonl (UTF-8 as written, not escaped), and prep_report.json, into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", held)):
        with open(out / name, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / "prep_report.json").write_text(json.dumps(report.to_dict(), indent=2))


def run(args: argparse.Namespace) -> int:
    train, held, report = prepare(args.inputs, options_from_args(args))
    write_outputs(args.out, train, held, report)
    print("\n".join(report.lines()))
    print(f"output: {args.out / 'train.jsonl'}, {args.out / 'heldout.jsonl'}")
    return 0
