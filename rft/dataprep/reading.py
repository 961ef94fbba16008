"""Reading `rft data prep`'s inputs: files and directories of JSON Lines or JSON, optionally gzipped.

A file holding one JSON value gives an array's items, a CloudWatch Logs export's `events[].message`
records, or the one object; anything else is JSON Lines, read through `rft.jsonl`.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from rft.config import ConfigError
from rft.dataprep.records import Malformed
from rft.jsonl import json_lines


def input_files(paths: Sequence[Path]) -> list[Path]:
    """The data files named, directories searched recursively; a missing path or no file is an error."""
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
    stripped = _read_text(path).lstrip()
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
    for line in json_lines(path, invalid_json="not JSON"):
        yield line.number, Malformed(line.error) if line.error is not None else line.value


def _read_text(path: Path) -> str:
    """The whole file as text (to tell one JSON value from JSON Lines); unreadable is an error."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc


def _whole_file_records(value: Any) -> Iterator[tuple[int, Any | Malformed]]:
    if isinstance(value, list):
        yield from enumerate(value, start=1)
    elif isinstance(value, Mapping) and isinstance(value.get("events"), list) and "messages" not in value:
        # `aws logs filter-log-events` / `get-log-events`: each event's message is one log record as text.
        for number, event in enumerate(value["events"], start=1):
            message = event.get("message") if isinstance(event, Mapping) else None
            if not isinstance(message, str):
                yield number, Malformed("event without a message")
                continue
            try:
                yield number, json.loads(message)
            except json.JSONDecodeError as exc:
                yield number, Malformed(f"events[{number - 1}].message is not JSON ({exc.msg})")
    else:
        yield 1, value


