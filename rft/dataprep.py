"""`rft data prep`: chat histories or Bedrock invocation logs in, training JSONL out.

Inputs (files or directories of them; `.jsonl`, `.json`, optionally `.gz`; a `.json` file may hold
one array of records):

- chat records: `{"messages": [...], ...}` (Bedrock RFT / OpenAI style) or `{"prompt": ..., ...}`;
- Amazon Bedrock model invocation-log records (`"schemaType": "ModelInvocationLog"`, as delivered
  to S3, or as the `events[].message` strings of a CloudWatch Logs `filter-log-events` /
  `get-log-events` JSON export): Converse / ConverseStream bodies, and InvokeModel bodies of the
  messages-style (Anthropic, Nova, OpenAI-compatible), Llama/Mistral `prompt` and Titan
  `inputText` families. A `prompt` rendered in a chat format (Llama's `<|start_header_id|>`...) is
  turned back into messages (rft/rendered_chat.py), so training does not template it twice; one
  in a format rft does not read is malformed. `requestMetadata` key-values (set by the calling
  application) are read as tags. Failed invocations (`errorCode`, e.g. ThrottlingException) hold
  no reply and are skipped and counted by error code.

What happens, in order, each step counted in the printed report:

1. Parse. A malformed line (not JSON, no messages, an unsupported body) is reported with its file
   and line number; `--skip-malformed` skips it, otherwise the command stops after listing every
   malformed line (nothing is silently lost either way). When no row is left, the command fails.
2. Prompt and reply. The prompt is the conversation up to its last user message; a trailing
   assistant reply (the logged model output) becomes `reference_answer`, a `logged_response`
   field, or is dropped (`--assistant reference|metadata|drop`).
3. PII redaction (rft/pii.py: Presidio's validated pattern recognizers, offline) of every message
   and the reply: emails, phone and card numbers, IBANs, IP addresses, US SSN... become `<ENTITY>`;
   `--pii-entities ...,PERSON,LOCATION` adds names, places and street addresses (a spaCy NER
   pipeline; refused at once when none is installed). The report names what was looked for.
4. Near-duplicate removal: MinHash (datasketch) of the prompt's character 5-grams, LSH lookup, and the
   first occurrence kept when the estimated Jaccard similarity reaches `--dedup-threshold`.
5. Tags: `domain`, `intent`, `difficulty` (or `--tag-keys`) from the record's own fields, its
   `metadata` object, the log's `requestMetadata`, then `--tag key=value` defaults; written as
   top-level fields, which the trainer passes to rewards and uses as evaluation slices.
6. Split: a reproducible train / held-out split stratified by `--stratify-by` (default `domain`):
   within each stratum, rows are ordered by a seeded hash of their content and the first
   `round(held_out * n)` are held out, so the split depends on the seed and the data only.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rft.config import ConfigError
from rft.rendered_chat import unrender

if TYPE_CHECKING:
    from rft.pii import PIIDetector

DEFAULT_TAG_KEYS = ("domain", "intent", "difficulty")
_WORD = re.compile(r"\w+")


class Malformed(ValueError):
    """A record that cannot become a training row; the message says why."""


class FailedInvocation(Exception):
    """A logged call that failed (throttled, invalid, timed out): no reply, nothing to learn from."""

    def __init__(self, error_code: str):
        super().__init__(error_code)
        self.error_code = error_code


@dataclass
class Row:
    messages: list[dict[str, str]]
    reply: str | None
    fields: dict[str, Any]
    source: str  # file:line


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


# -- reading ----------------------------------------------------------------------------------------


def _files(paths: Sequence[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and _is_data_file(p)))
        elif path.is_file():
            found.append(path)
        else:
            raise ConfigError(f"{path}: no such file or directory")
    if not found:
        raise ConfigError(f"no .jsonl / .json files under {', '.join(map(str, paths))}")
    return found


def _is_data_file(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    return name.endswith((".jsonl", ".json"))


def read_records(path: Path) -> Iterator[tuple[int, Any | Malformed]]:
    """(line number, record or Malformed) for every non-blank line of a JSONL file. A file holding one
    JSON value yields: an array's items, a CloudWatch Logs export's `events[].message` records, or
    the one object, numbered from 1."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        try:
            whole = json.loads(stripped)
        except json.JSONDecodeError as exc:
            if stripped.startswith("["):
                yield exc.lineno, Malformed(f"not a JSON array: {exc.msg}")
                return
            whole = None  # JSON Lines: the second object is "extra data"
        if whole is not None:
            yield from _whole_file_records(whole)
            return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, Malformed(f"not JSON ({exc.msg} at column {exc.colno})")


def _whole_file_records(value: Any) -> Iterator[tuple[int, Any | Malformed]]:
    if isinstance(value, list):
        yield from enumerate(value, start=1)
    elif isinstance(value, Mapping) and isinstance(value.get("events"), list) and "messages" not in value:
        # `aws logs filter-log-events` / `get-log-events`: each event's message is one log record as text.
        for number, event in enumerate(value["events"], start=1):
            message = event.get("message") if isinstance(event, Mapping) else None
            try:
                yield number, json.loads(message) if isinstance(message, str) else Malformed("event without "
                                                                                             "a message")
            except json.JSONDecodeError as exc:
                yield number, Malformed(f"events[{number - 1}].message is not JSON ({exc.msg})")
    else:
        yield 1, value


def _text(content: Any) -> str:
    """Text of a content value: a string, or parts `{"text"}` / `{"type": "text", "text"}`; other
    parts (images, documents, tool use) make the record unsupported."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = (part.get("type") or next(iter(part), "?")) if isinstance(part, Mapping) and part else type(part).__name__
                raise Malformed(f"unsupported non-text content part ({kind})")
        return "".join(texts)
    raise Malformed(f"message content is {type(content).__name__}, expected text")


def _messages(raw: Any, system: Any = None) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise Malformed("messages: expected a non-empty list")
    messages = []
    if system:
        system_text = system if isinstance(system, str) else _text(system)
        if system_text.strip():
            messages.append({"role": "system", "content": system_text})
    for index, message in enumerate(raw):
        if not isinstance(message, Mapping) or "role" not in message:
            raise Malformed(f"messages[{index}]: expected an object with role and content")
        role = str(message["role"])
        if role not in ("system", "user", "assistant"):
            raise Malformed(f"messages[{index}].role: {role!r} (tool turns are not supported)")
        messages.append({"role": role, "content": _text(message.get("content", ""))})
    return messages


def _prompt_messages(prompt: str, model_id: Any = None) -> list[dict[str, str]]:
    """A text prompt as messages: a rendered chat prompt unwrapped, plain text as one user turn."""
    try:
        turns = unrender(prompt, model_id if isinstance(model_id, str) else None)
    except ValueError as exc:
        raise Malformed(str(exc)) from None
    return [{"role": "user", "content": prompt}] if turns is None else _messages(turns)


def _invocation_output(body: Any) -> str | None:
    """The model's reply text in an invocation-log output body, for the body shapes Bedrock logs."""
    if not isinstance(body, Mapping):
        return None
    message = body.get("output", {}).get("message") if isinstance(body.get("output"), Mapping) else None
    if isinstance(message, Mapping):  # Converse, Nova
        return _text(message.get("content", []))
    if isinstance(body.get("content"), list):  # Anthropic messages
        return _text([part for part in body["content"] if isinstance(part, Mapping) and part.get("type", "text") == "text"])
    if isinstance(body.get("generation"), str):  # Llama
        return body["generation"]
    if isinstance(body.get("completion"), str):  # Anthropic text completions (Claude 2)
        return body["completion"].strip()
    if isinstance(body.get("outputs"), list) and body["outputs"]:  # Mistral
        return str(body["outputs"][0].get("text", ""))
    if isinstance(body.get("results"), list) and body["results"]:  # Titan
        return str(body["results"][0].get("outputText", ""))
    if isinstance(body.get("choices"), list) and body["choices"]:  # OpenAI-compatible
        return _text(body["choices"][0].get("message", {}).get("content", ""))
    return None


def _from_invocation_log(record: Mapping[str, Any]) -> tuple[list[dict[str, str]], str | None, dict[str, Any]]:
    if record.get("errorCode"):
        raise FailedInvocation(str(record["errorCode"]))
    model_input = record.get("input") or {}
    body = model_input.get("inputBodyJson")
    if body is None:
        if model_input.get("inputBodyS3Path"):
            raise Malformed("input body stored in S3 (inputBodyS3Path): download it next to the log first")
        raise Malformed("invocation log without input.inputBodyJson")
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except json.JSONDecodeError as exc:
            raise Malformed(f"input.inputBodyJson is not JSON: {exc.msg}") from None
    if "messages" in body:
        messages = _messages(body["messages"], body.get("system"))
    elif isinstance(body.get("prompt"), str):
        messages = _prompt_messages(body["prompt"], record.get("modelId"))
    elif isinstance(body.get("inputText"), str):
        messages = [{"role": "user", "content": body["inputText"]}]
    else:
        raise Malformed(f"unsupported input body for {record.get('modelId', 'an unknown model')} (keys "
                        f"{sorted(body)[:6]})")
    output = (record.get("output") or {}).get("outputBodyJson")
    reply = _invocation_output(output) if output is not None else None
    fields = {
        "id": record.get("requestId"),
        "source_model": record.get("modelId"),
        "timestamp": record.get("timestamp"),
    }
    metadata = record.get("requestMetadata")
    if isinstance(metadata, Mapping):
        fields["_tags"] = dict(metadata)
    return messages, reply, fields


def parse_record(record: Any) -> tuple[list[dict[str, str]], str | None, dict[str, Any]]:
    """(messages, trailing reply or None, other fields) of one input record; raises Malformed."""
    if not isinstance(record, Mapping):
        raise Malformed(f"expected a JSON object, got {type(record).__name__}")
    if record.get("schemaType") == "ModelInvocationLog" or ("modelId" in record and "input" in record):
        messages, reply, fields = _from_invocation_log(record)
    elif "messages" in record:
        messages = _messages(record["messages"], record.get("system"))
        reply = None
        fields = {k: v for k, v in record.items() if k not in ("messages", "system")}
    elif "prompt" in record:
        prompt = record["prompt"]
        messages = _prompt_messages(prompt) if isinstance(prompt, str) else _messages(prompt)
        reply = record.get("completion") if isinstance(record.get("completion"), str) else None
        fields = {k: v for k, v in record.items() if k not in ("prompt", "completion")}
    else:
        raise Malformed("no `messages`, `prompt` or invocation-log fields")
    while messages and messages[-1]["role"] == "assistant":
        trailing = messages.pop()
        reply = trailing["content"] if reply is None else reply
    if not any(message["role"] == "user" for message in messages):
        raise Malformed("no user message")
    return messages, reply, fields


# -- the steps --------------------------------------------------------------------------------------


def _prompt_text(messages: Sequence[Mapping[str, str]]) -> str:
    return "\n".join(m["content"] for m in messages if m["role"] != "system")


def _shingles(text: str, size: int = 5) -> set[bytes]:
    """Character 5-grams of the text's words, lower-cased and single-spaced. Characters rather than
    word n-grams because prompts are short: one changed word in a 15-word prompt removes three of
    its 13 word 3-grams (Jaccard 0.69) but few of its character 5-grams (0.88)."""
    normal = " ".join(_WORD.findall(text.lower()))
    if len(normal) <= size:
        return {normal.encode()}
    return {normal[i : i + size].encode() for i in range(len(normal) - size + 1)}


def remove_near_duplicates(rows: list[Row], threshold: float, num_perm: int = 128) -> tuple[list[Row], list[str]]:
    """Keep the first of each group of prompts whose MinHash Jaccard estimate reaches `threshold`."""
    from datasketch import MinHash, MinHashLSH

    # LSH only proposes candidates (it cannot band at threshold 1); the signature comparison decides.
    lsh = MinHashLSH(threshold=min(threshold, 0.9), num_perm=num_perm)
    kept: list[Row] = []
    signatures: dict[str, MinHash] = {}
    dropped: list[str] = []
    for index, row in enumerate(rows):
        signature = MinHash(num_perm=num_perm, seed=1)
        signature.update_batch(list(_shingles(_prompt_text(row.messages))))
        matches = [key for key in lsh.query(signature) if signatures[key].jaccard(signature) >= threshold]
        if matches:
            first = min(matches, key=int)
            dropped.append(f"{row.source}: near-duplicate of {rows[int(first)].source}")
            continue
        key = str(index)
        lsh.insert(key, signature)
        signatures[key] = signature
        kept.append(row)
    return kept, dropped


def split_rows(
    rows: list[dict[str, Any]], held_out: float, stratify_by: str | None, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, tuple[int, int]]]:
    """Reproducible stratified split; see the module docstring."""
    strata: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        strata[str(row.get(stratify_by, "(none)")) if stratify_by else "(all)"].append(row)
    train: list[dict[str, Any]] = []
    held: list[dict[str, Any]] = []
    counts: dict[str, tuple[int, int]] = {}
    for name, members in sorted(strata.items()):
        ordered = sorted(
            members,
            key=lambda row: hashlib.sha256(f"{seed}\0{json.dumps(row, sort_keys=True)}".encode()).hexdigest(),
        )
        cut = round(held_out * len(ordered))
        held.extend(ordered[:cut])
        train.extend(ordered[cut:])
        counts[name] = (len(ordered) - cut, cut)
    return train, held, counts


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


def prepare(inputs: Sequence[Path], options: PrepOptions) -> tuple[list[dict[str, Any]], list[dict[str, Any]], PrepReport]:
    """Run every step; returns (train rows, held-out rows, report). Raises ConfigError listing
    malformed lines unless `skip_malformed`, and when no row is left to write."""
    if options.assistant not in ("reference", "metadata", "drop"):
        raise ConfigError(f"--assistant {options.assistant!r}: use reference, metadata or drop")
    if not 0 <= options.held_out < 1:
        raise ConfigError(f"--held-out {options.held_out}: a fraction in [0, 1)")
    if options.dedup_threshold is not None and not 0 < options.dedup_threshold <= 1:
        raise ConfigError(f"--dedup-threshold {options.dedup_threshold}: in (0, 1]")
    detector = _detector(options) if options.redact else None
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
        _redact(rows, detector, report)
    if options.dedup_threshold is not None:
        rows, report.duplicates = remove_near_duplicates(rows, options.dedup_threshold)
    output = [_training_row(row, options) for row in rows]
    if options.stratify_by and options.stratify_by not in options.tag_keys and not any(options.stratify_by in r for r in output):
        raise ConfigError(f"--stratify-by {options.stratify_by}: no row has that field (tags: "
                          f"{list(options.tag_keys)})")
    train, held, report.strata = split_rows(output, options.held_out, options.stratify_by, options.seed)
    report.train, report.held_out = len(train), len(held)
    return train, held, report


def _read_rows(inputs: Sequence[Path], report: PrepReport) -> list[Row]:
    rows: list[Row] = []
    for path in _files(inputs):
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


def _detector(options: PrepOptions) -> PIIDetector:
    """Built before any record is read, so that a request it cannot serve stops the command at once."""
    from rft.pii import PIIDetector

    try:
        return PIIDetector(entities=options.pii_entities)
    except ValueError as exc:
        raise ConfigError(f"--pii-entities: {exc}") from None


def _redact(rows: list[Row], detector: PIIDetector, report: PrepReport) -> None:
    report.pii_searched = sorted(detector.entities)
    report.ner_pipeline = detector.ner_pipeline
    for row in rows:
        found = []
        for message in row.messages:
            message["content"], spans = detector.redact(message["content"])
            found.extend(spans)
        if row.reply is not None:
            row.reply, spans = detector.redact(row.reply)
            found.extend(spans)
        if found:
            report.redacted_rows += 1
            report.pii.update(span.entity for span in found)


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


# -- command line -----------------------------------------------------------------------------------


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
                                               "rft.pii.DEFAULT_ENTITIES)")
    parser.add_argument("--dedup-threshold", type=float, default=0.85,
                        help="MinHash Jaccard similarity at which prompts are near-duplicates (default 0.85)")
    parser.add_argument("--no-dedup", action="store_true", help="keep near-duplicates")
    parser.add_argument("--tag-keys", default=",".join(DEFAULT_TAG_KEYS),
                        help="tag fields carried as metadata")
    parser.add_argument("--tag", action="append", type=_tag, default=[], metavar="KEY=VALUE",
                        help="default tag for records that carry none, e.g. --tag domain=support")
    parser.add_argument("--held-out", type=float, default=0.1, help="share of rows held out (default 0.1)")
    parser.add_argument("--stratify-by", default="domain", help="tag the split is stratified by ('' for none)")
    parser.add_argument("--seed", type=int, default=0, help="split seed")
    parser.add_argument("--skip-malformed", action="store_true",
                        help="skip malformed lines instead of stopping")


def run(args: argparse.Namespace) -> int:
    options = PrepOptions(
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
    train, held, report = prepare(args.inputs, options)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", held)):
        with open(args.out / name, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    (args.out / "prep_report.json").write_text(json.dumps(report.to_dict(), indent=2))
    print("\n".join(report.lines()))
    print(f"output: {args.out / 'train.jsonl'}, {args.out / 'heldout.jsonl'}")
    return 0
