"""JSON Lines, read in one place: training rows, completions files, invocation logs, run logs.

`json_lines` yields every non-blank line parsed or with the reason it could not be, naming the
file and line; each reader decides what a bad line means (stop, list them all, skip and count).
`read_log` is the run-folder reader: a missing file is empty and a torn last line (a kill while
appending) is left out. Torch-free, so that reports and monitors stay light.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class JSONLError(ValueError):
    """A line that is not what the file promises, as `path:line: reason`."""


@dataclass(frozen=True)
class JSONLine:
    """One non-blank line: its parsed `value`, or `error` saying why it has none."""

    path: Path
    number: int
    value: Any = None
    error: str | None = None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.number}"


def json_lines(path: Path, *, invalid_json: str = "not valid JSON") -> Iterator[JSONLine]:
    """Every non-blank line of `path` (gzipped when it ends in .gz), in order; invalid UTF-8 and invalid JSON
    come back as errors, the latter as `invalid_json (reason at column N)`: each command keeps its wording."""
    # Bedrock delivers invocation logs gzipped; line numbers are those of the decompressed text.
    with (gzip.open(path, "rb") if Path(path).suffix == ".gz" else Path(path).open("rb")) as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                reason = f"not UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1})"
                yield JSONLine(Path(path), number, error=reason)
                continue
            if not line.strip():
                continue
            try:
                yield JSONLine(Path(path), number, value=json.loads(line))
            except json.JSONDecodeError as exc:
                yield JSONLine(Path(path), number, error=f"{invalid_json} ({exc.msg} at column {exc.colno})")


def read_objects(path: Path) -> list[JSONLine]:
    """Every line of a file of JSON objects; the first bad line raises `JSONLError` naming it."""
    lines = []
    for line in json_lines(path):
        if line.error is None and not isinstance(line.value, dict):
            line = JSONLine(
                line.path, line.number, error=f"expected a JSON object, got {type(line.value).__name__}"
            )
        if line.error is not None:
            raise JSONLError(f"{line.where}: {line.error}")
        lines.append(line)
    return lines


def read_log(path: Path, *, torn_tail_ok: bool = True) -> tuple[list[dict[str, Any]], bool]:
    """A run log's rows (none if it does not exist), and whether its last line was torn and left out.

    Only the last line can be torn by a kill (rows are appended whole); a broken line elsewhere
    means the file was damaged some other way: `JSONLError` naming the file and the line.
    """
    if not Path(path).exists():
        return [], False
    lines = list(json_lines(path, invalid_json="not a JSON line"))
    rows = []
    for index, line in enumerate(lines):
        if line.error is None:
            rows.append(line.value)
        elif torn_tail_ok and index == len(lines) - 1:
            return rows, True
        else:
            raise JSONLError(f"{line.where}: {line.error}; repair or delete that line")
    return rows, False


def append_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append whole rows (one write per row keeps a kill from tearing more than the last one)."""
    with Path(path).open("a") as handle:
        for row in rows:
            handle.write(json.dumps(row, default=str) + "\n")
