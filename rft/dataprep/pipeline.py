"""`rft data prep`'s steps in order (see the package docstring), and the report that counts each one."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rft.config import ConfigError
from rft.dataprep.reading import input_files, read_records
from rft.dataprep.records import FailedInvocation, Malformed, Row, parse_record
from rft.dataprep.redaction import detector_for, redact
from rft.dataprep.selection import remove_near_duplicates, split_rows

DEFAULT_TAG_KEYS = ("domain", "intent", "difficulty")


@dataclass
class PrepReport:
    read: int = 0
    malformed: list[str] = field(default_factory=list)
    failed: Counter = field(default_factory=Counter)  # failed invocations by error code
    duplicates: list[str] = field(default_factory=list)
    pii: Counter = field(default_factory=Counter)
    pii_searched: list[str] = field(default_factory=list)  # the entities looked for; empty: no redaction
    ner_pipeline: str | None = None
    redacted_rows: int = 0
    train: int = 0
    held_out: int = 0
    strata: dict[str, tuple[int, int]] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"read {self.read} records"]
        if self.failed:
            codes = ", ".join(f"{code} {count}" for code, count in sorted(self.failed.items()))
            out.append(f"skipped {self.failed.total()} failed invocations: {codes}")
        if self.malformed:
            out.append(f"skipped {len(self.malformed)} malformed:")
            out.extend(f"  {problem}" for problem in self.malformed[:50])
            if len(self.malformed) > 50:
                out.append(f"  ... and {len(self.malformed) - 50} more (see the report JSON)")
        if self.duplicates:
            out.append(f"dropped {len(self.duplicates)} near-duplicates:")
            out.extend(f"  {line}" for line in self.duplicates[:20])
            if len(self.duplicates) > 20:
                out.append(f"  ... and {len(self.duplicates) - 20} more (see the report JSON)")
        if self.pii_searched:
            with_ner = f" (names and places: spaCy {self.ner_pipeline})" if self.ner_pipeline else ""
            out.append(f"looked for PII: {', '.join(self.pii_searched)}{with_ner}")
            found = ", ".join(f"{entity} {count}" for entity, count in sorted(self.pii.items()))
            out.append(f"redacted PII in {self.redacted_rows} rows: {found}" if found else "found no PII")
        else:
            out.append("PII not redacted (--no-redact)")
        out.append(f"wrote {self.train} train and {self.held_out} held-out rows")
        for stratum, (train, held) in sorted(self.strata.items()):
            out.append(f"  {stratum}: {train} train, {held} held-out")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "read": self.read, "malformed": self.malformed, "failed_invocations": dict(self.failed),
            "near_duplicates": self.duplicates, "pii": dict(self.pii), "redacted_rows": self.redacted_rows,
            "pii_searched": self.pii_searched, "ner_pipeline": self.ner_pipeline,
            "train": self.train, "held_out": self.held_out,
            "strata": {k: {"train": v[0], "held_out": v[1]} for k, v in self.strata.items()},
        }


@dataclass
class PrepOptions:
    assistant: str = "reference"  # reference | metadata | drop
    redact: bool = True
    pii_entities: Sequence[str] | None = None
    dedup_threshold: float | None = 0.85
    tag_keys: Sequence[str] = DEFAULT_TAG_KEYS
    tag_defaults: Mapping[str, str] = field(default_factory=dict)
    held_out: float = 0.1
    stratify_by: str | None = "domain"
    seed: int = 0
    skip_malformed: bool = False


TrainingRows = list[dict[str, Any]]


def prepare(inputs: Sequence[Path], options: PrepOptions) -> tuple[TrainingRows, TrainingRows, PrepReport]:
    """Run every step; returns (train rows, held-out rows, report). Raises ConfigError listing
    malformed lines unless `skip_malformed`, and when no row is left to write."""
    _check_options(options)
    detector = detector_for(options.pii_entities) if options.redact else None
    report = PrepReport()
    rows = _read_rows(inputs, report)
    if report.malformed and not options.skip_malformed:
        listed = "\n".join(report.malformed[:50])
        more = f"\n... and {len(report.malformed) - 50} more" if len(report.malformed) > 50 else ""
        raise ConfigError(f"{len(report.malformed)} malformed record(s); fix them or pass "
                          f"--skip-malformed:\n{listed}{more}")
    if not rows:
        raise ConfigError(
            f"nothing to write: {report.read} records read from {', '.join(map(str, inputs))}, "
            f"{len(report.malformed)} malformed, {report.failed.total()} failed invocations"
        )
    if detector is not None:
        redact(rows, detector, report)
    if options.dedup_threshold is not None:
        rows, report.duplicates = remove_near_duplicates(rows, options.dedup_threshold)
    output = [_training_row(row, options) for row in rows]
    stratify_by = options.stratify_by
    if stratify_by and stratify_by not in options.tag_keys and not any(stratify_by in r for r in output):
        raise ConfigError(f"--stratify-by {stratify_by}: no row has that field "
                          f"(tags: {list(options.tag_keys)})")
    train, held, report.strata = split_rows(output, options.held_out, stratify_by, options.seed)
    report.train, report.held_out = len(train), len(held)
    return train, held, report


def _check_options(options: PrepOptions) -> None:
    if options.assistant not in ("reference", "metadata", "drop"):
        raise ConfigError(f"--assistant {options.assistant!r}: use reference, metadata or drop")
    if not 0 <= options.held_out < 1:
        raise ConfigError(f"--held-out {options.held_out}: a fraction in [0, 1)")
    if options.dedup_threshold is not None and not 0 < options.dedup_threshold <= 1:
        raise ConfigError(f"--dedup-threshold {options.dedup_threshold}: in (0, 1]")


def _read_rows(inputs: Sequence[Path], report: PrepReport) -> list[Row]:
    rows: list[Row] = []
    for path in input_files(inputs):
        for number, record in read_records(path):
            report.read += 1
            where = f"{path}:{number}"
            try:
                if isinstance(record, Malformed):
                    raise record
                messages, reply, fields = parse_record(record)
            except Malformed as exc:
                report.malformed.append(f"{where}: {exc}")
                continue
            except FailedInvocation as exc:
                report.failed[exc.error_code] += 1
                continue
            rows.append(Row(messages, reply, fields, where))
    return rows


def _training_row(row: Row, options: PrepOptions) -> dict[str, Any]:
    fields = dict(row.fields)
    found_tags = fields.pop("_tags", {})
    metadata = fields.get("metadata") if isinstance(fields.get("metadata"), Mapping) else {}
    out: dict[str, Any] = {"messages": row.messages}
    if row.reply is not None and options.assistant == "reference" and "reference_answer" not in fields:
        out["reference_answer"] = row.reply
    elif row.reply is not None and options.assistant != "drop":
        out["logged_response"] = row.reply
    for key, value in fields.items():
        if value is not None:
            out[key] = value
    for key in options.tag_keys:
        value = fields.get(key, metadata.get(key, found_tags.get(key, options.tag_defaults.get(key))))
        if value is not None:
            out[key] = value
    out["source"] = row.source
    return out


