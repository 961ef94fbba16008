"""`rft data prep`'s parts on their own: reading lines (gzipped too), the options, the files written."""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from rft.dataprep import Malformed, PrepOptions, PrepReport, configure_parser, read_records
from rft.dataprep.command import options_from_args, write_outputs


def test_gzipped_json_lines_are_numbered_as_their_text(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write('{"a": 1}\n\n{not json\n{"b": 2}\n')
    records = list(read_records(path))
    assert [number for number, _ in records] == [1, 3, 4]
    assert records[0][1] == {"a": 1} and records[2][1] == {"b": 2}
    assert isinstance(records[1][1], Malformed) and str(records[1][1]).startswith("not JSON (")


def test_options_from_the_command_line() -> None:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(["in.jsonl", "--out", "out", "--no-dedup", "--pii-entities",
                              "EMAIL_ADDRESS, PERSON", "--tag", "domain=support",
                              "--tag-keys", "domain, ,intent", "--stratify-by", ""])
    options = options_from_args(args)
    assert options.dedup_threshold is None and options.stratify_by is None
    assert options.pii_entities == ["EMAIL_ADDRESS", "PERSON"]
    assert options.tag_keys == ["domain", "intent"] and options.tag_defaults == {"domain": "support"}
    defaults = options_from_args(parser.parse_args(["in.jsonl", "--out", "o"]))
    assert defaults.dedup_threshold == PrepOptions().dedup_threshold


def test_outputs_keep_text_unescaped(tmp_path: Path) -> None:
    row = {"messages": [{"role": "user", "content": "Grüße"}]}
    write_outputs(tmp_path / "out", [row], [], PrepReport(read=1, train=1))
    written = (tmp_path / "out" / "train.jsonl").read_text(encoding="utf-8")
    assert written == json.dumps(row, ensure_ascii=False) + "\n"
    assert (tmp_path / "out" / "heldout.jsonl").read_text() == ""
    assert json.loads((tmp_path / "out" / "prep_report.json").read_text())["train"] == 1
