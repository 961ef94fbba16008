"""`rft data prep`: chat histories and Bedrock invocation logs to training JSONL."""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import pytest

from rft.config import ConfigError
from rft.dataprep import PrepOptions, configure_parser, prepare, remove_near_duplicates, run, split_rows

TOPICS = ["refund", "invoice", "password", "shipping", "warranty", "coupon", "upgrade", "address", "login", "receipt"]


def chat(question: str, answer: str | None = None, **fields) -> dict:
    messages = [{"role": "system", "content": "You are a support agent."}, {"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages, **fields}


def converse_log(question: str, reply: str, request_id: str, **metadata) -> dict:
    return {
        "schemaType": "ModelInvocationLog", "schemaVersion": "1.0", "timestamp": "2026-01-02T03:04:05Z",
        "accountId": "123456789012", "region": "us-east-1", "requestId": request_id, "operation": "Converse",
        "modelId": "anthropic.claude-3-haiku-20240307-v1:0",
        "input": {"inputContentType": "application/json", "inputTokenCount": 20,
                  "inputBodyJson": {"messages": [{"role": "user", "content": [{"text": question}]}],
                                    "system": [{"text": "Be brief."}], "inferenceConfig": {"maxTokens": 256}}},
        "output": {"outputContentType": "application/json", "outputTokenCount": 9,
                   "outputBodyJson": {"output": {"message": {"role": "assistant", "content": [{"text": reply}]}},
                                      "stopReason": "end_turn"}},
        **({"requestMetadata": metadata} if metadata else {}),
    }


def write_jsonl(path: Path, records: list, raw_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in records]
    for index, line in sorted((raw_lines or {}).items()):
        lines.insert(index, line)
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def inputs(tmp_path: Path) -> list[Path]:
    chats = [
        chat(f"How do I handle my {topic} request number {i}? Please explain the steps in detail.",
             f"Here is how to handle {topic}.", domain="billing" if i % 2 else "account", intent=topic,
             difficulty="easy")
        for i, topic in enumerate(TOPICS)
    ]
    chats.append(chat("My email is jane.doe@example.com and my card 4111 1111 1111 1111 was charged twice, why?",
                      "Sorry Jane, I emailed jane.doe@example.com.", domain="billing"))
    # A near-duplicate of the first question (one word changed) and an exact duplicate of the second.
    chats.append(chat("How do I handle my refund request number 0? Please explain all the steps in detail.",
                      domain="account"))
    chats.append(chats[1])
    chats.append({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]})
    chat_file = write_jsonl(tmp_path / "chats.jsonl", chats, raw_lines={3: "{not json"})
    logs = [
        converse_log("Where is my parcel? Tracking says delivered but nothing arrived.", "I'll open a claim.",
                     "req-1", domain="shipping", intent="lost_parcel", difficulty="hard"),
        {**converse_log("x", "y", "req-2"), "errorCode": "ThrottlingException"},
        {"schemaType": "ModelInvocationLog", "requestId": "req-3", "modelId": "meta.llama3-8b-instruct-v1:0",
         "operation": "InvokeModel", "input": {"inputBodyJson": {"prompt": "Call me at +1 (415) 555-0132 to cancel."}},
         "output": {"outputBodyJson": {"generation": "Cancelled."}}},
        {"schemaType": "ModelInvocationLog", "requestId": "req-4", "modelId": "anthropic.claude-3-haiku",
         "operation": "InvokeModel",
         "input": {"inputBodyJson": {"anthropic_version": "bedrock-2023-05-31", "system": "Be kind.",
                                     "messages": [{"role": "user", "content": "Can I change my plan mid-month?"}]}},
         "output": {"outputBodyJson": {"content": [{"type": "text", "text": "Yes, prorated."}]}}},
    ]
    log_file = tmp_path / "logs" / "invocations.json.gz"
    log_file.parent.mkdir()
    with gzip.open(log_file, "wt") as handle:
        handle.write("\n".join(json.dumps(r) for r in logs) + "\n")
    return [chat_file, log_file.parent]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return parser.parse_args(argv)


def test_malformed_lines_are_listed_and_fatal_by_default(inputs):
    with pytest.raises(ConfigError) as error:
        prepare(inputs, PrepOptions())
    message = str(error.value)
    assert "3 malformed record(s)" in message
    assert f"{inputs[0]}:4: not JSON" in message
    assert f"{inputs[0]}:15: unsupported non-text content part (image)" in message
    assert "invocations.json.gz:2: failed invocation (ThrottlingException)" in message


def test_full_run_redacts_dedups_tags_and_splits(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [*map(str, inputs), "--out", str(out), "--skip-malformed", "--held-out", "0.25", "--tag", "difficulty=medium",
            "--dedup-threshold", "0.8"]
    assert run(parse(argv)) == 0
    printed = capsys.readouterr().out
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    rows = train + held
    assert "read 19 records" in printed
    assert "skipped 3 malformed:" in printed and ":4: not JSON" in printed
    assert "dropped 2 near-duplicates:" in printed
    assert f"{inputs[0]}:13: near-duplicate of {inputs[0]}:1" in printed  # one word changed
    assert f"{inputs[0]}:14: near-duplicate of {inputs[0]}:2" in printed  # the exact copy
    assert "redacted PII in 2 rows: CREDIT_CARD 1, EMAIL_ADDRESS 2, PHONE_NUMBER 1" in printed
    assert len(rows) == 14

    text = json.dumps(rows)
    assert "jane.doe@example.com" not in text and "4111" not in text and "555-0132" not in text
    pii_row = next(r for r in rows if "charged twice" in r["messages"][-1]["content"])
    assert pii_row["messages"][-1]["content"].startswith("My email is <EMAIL_ADDRESS> and my card <CREDIT_CARD>")
    assert pii_row["reference_answer"] == "Sorry Jane, I emailed <EMAIL_ADDRESS>."
    assert pii_row["difficulty"] == "medium"  # the --tag default fills a missing tag

    parcel = next(r for r in rows if r.get("id") == "req-1")
    assert parcel["messages"] == [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Where is my parcel? Tracking says delivered but nothing arrived."}]
    assert parcel["reference_answer"] == "I'll open a claim."
    assert (parcel["domain"], parcel["intent"], parcel["difficulty"]) == ("shipping", "lost_parcel", "hard")
    assert parcel["source_model"].startswith("anthropic.") and parcel["source"].endswith("invocations.json.gz:1")
    plan = next(r for r in rows if r.get("id") == "req-4")
    assert plan["messages"][0] == {"role": "system", "content": "Be kind."} and plan["reference_answer"] == "Yes, prorated."

    report = json.loads((out / "prep_report.json").read_text())
    assert report["train"] == len(train) and report["held_out"] == len(held)
    assert report["strata"]["billing"] == {"train": 4, "held_out": 2}  # round(0.25 * 6) of billing held out
    assert report["strata"]["account"] == {"train": 4, "held_out": 1}


def test_split_is_reproducible_and_stratified():
    rows = [{"q": f"question {i}", "domain": "a" if i < 30 else "b"} for i in range(40)]
    train, held, counts = split_rows(rows, 0.2, "domain", seed=7)
    assert counts == {"a": (24, 6), "b": (8, 2)}
    again_train, again_held, _ = split_rows(list(reversed(rows)), 0.2, "domain", seed=7)
    assert held == again_held and sorted(map(str, train)) == sorted(map(str, again_train))  # input order is irrelevant
    _, other_held, _ = split_rows(rows, 0.2, "domain", seed=8)
    assert other_held != held


def test_dedup_threshold_is_configurable(inputs):
    options = PrepOptions(skip_malformed=True, dedup_threshold=1.0, redact=False, held_out=0.0)
    _, _, report = prepare(inputs, options)
    assert len(report.duplicates) == 1 and "near-duplicate of" in report.duplicates[0]  # only the exact copy
    _, _, no_dedup = prepare(inputs, PrepOptions(skip_malformed=True, dedup_threshold=None, redact=False))
    assert no_dedup.duplicates == []


def test_assistant_reply_options_and_bad_options(inputs):
    train, _, _ = prepare(inputs, PrepOptions(skip_malformed=True, redact=False, assistant="metadata", held_out=0.0))
    assert sum("logged_response" in row for row in train) == 14  # every kept row that had a reply
    assert not any("reference_answer" in row for row in train)
    dropped, _, _ = prepare(inputs, PrepOptions(skip_malformed=True, redact=False, assistant="drop", held_out=0.0))
    assert not any("logged_response" in row or "reference_answer" in row for row in dropped)
    with pytest.raises(ConfigError, match="--held-out"):
        prepare(inputs, PrepOptions(held_out=1.5))
    with pytest.raises(ConfigError, match="--stratify-by nonexistent"):
        prepare(inputs, PrepOptions(skip_malformed=True, redact=False, stratify_by="nonexistent"))


def test_near_duplicate_detection_on_rows():
    from rft.dataprep import Row

    def row(text: str, source: str) -> Row:
        return Row([{"role": "user", "content": text}], None, {}, source)

    base = "Please tell me how to reset the password on my account when the email link has expired already"
    kept, dropped = remove_near_duplicates(
        [row(base, "a:1"), row(base.replace("already", "yesterday"), "a:2"), row("What are your opening hours?", "a:3")],
        threshold=0.7,
    )
    assert [r.source for r in kept] == ["a:1", "a:3"] and dropped == ["a:2: near-duplicate of a:1"]
