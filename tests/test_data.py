from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rft.config import DataConfig
from rft.data import DataError, PromptSampler, load_splits, prepare_examples, read_rows

GSM8K = Path(__file__).resolve().parent / "data" / "gsm8k" / "test.jsonl"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_bedrock_rows_keep_metadata_and_drop_trailing_assistant(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "b.jsonl", [{
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                     {"role": "assistant", "content": "4"}],
        "reference_answer": {"value": 4}, "domain": "maths",
    }])
    [example] = prepare_examples(read_rows(str(path), "train"), DataConfig(train=str(path)), None, "t")
    assert example.prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert example.row["reference_answer"] == {"value": 4} and example.row["domain"] == "maths"


def test_bad_json_names_file_and_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a"}, "{not json"])
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON"):
        read_rows(str(path), "train")


def test_bad_message_names_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"messages": [{"role": "robot", "content": "hi"}]}])
    with pytest.raises(DataError, match=rf"{path}:1: field 'messages\[0\]\.role' is 'robot'"):
        prepare_examples(read_rows(str(path), "train"), DataConfig(train=str(path)), None, "t")


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: not UTF-8 \(byte 0xe9 at column 16\)"):
        read_rows(str(path), "train")


def test_malformed_json_file_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('[{"prompt": "a"},\n {"prompt": }]')
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON \(Expecting value at column 13\)"):
        read_rows(str(path), "train")
    path.write_text('[{"prompt": "a"}, 3]')
    with pytest.raises(DataError, match=rf"{path}\[1\]: expected a JSON object, got int"):
        read_rows(str(path), "train")


@pytest.mark.parametrize(("content", "message"), [
    (None, "is null; a message's content is text"),
    (7, "is int; a message's content is text"),
    ([{"type": "image_url", "image_url": {"url": "x"}}], r"holds parts \['image_url'\]; only text parts"),
])
def test_message_content_that_is_not_text_names_the_field(tmp_path: Path, content, message) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"messages": [{"role": "user", "content": content}]}])
    with pytest.raises(DataError, match=rf"{path}:1: field 'messages\[0\]\.content' {message}"):
        prepare_examples(read_rows(str(path), "train"), DataConfig(train=str(path)), None, "t")


def test_text_content_parts_become_the_message_text(tmp_path: Path) -> None:
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]
    path = write_jsonl(tmp_path / "x.jsonl", [{"messages": [{"role": "user", "content": parts}]}])
    [example] = prepare_examples(read_rows(str(path), "train"), DataConfig(train=str(path)), None, "t")
    assert example.prompt == [{"role": "user", "content": "What is 2+2?"}]
    assert example.row["messages"][0]["content"] == parts  # the row reaches rewards as the file holds it


def test_empty_train_file_is_an_error_before_any_tokenizer(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match=rf"{path}: data.train holds no rows"):
        load_splits(DataConfig(train=str(path)), None, 0)


def test_missing_prompt_suggests_mapping(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q"}])
    with pytest.raises(DataError, match="column_map"):
        prepare_examples(read_rows(str(path), "train"), DataConfig(train=str(path)), None, "t")


def test_gsm8k_with_column_map_and_template(embedded_model_dir: Path) -> None:
    from rft.models import load_tokenizer

    config = DataConfig(
        train=str(GSM8K), column_map={"answer": "reference_answer"},
        prompt_template="{question}\nEnd with '#### n'.",
        system_prompt="You are a careful maths tutor.", eval_size=5, max_train_rows=20,
    )
    train, held_out = load_splits(config, load_tokenizer(str(embedded_model_dir)), seed=0)
    assert len(train) == 20 and len(held_out) == 5
    assert train[0].prompt[0]["role"] == "system" and "####" in train[0].row["reference_answer"]
    assert train[0].prompt_ids[-3:] != []  # tokenized through the chat template


def test_long_prompts_are_dropped_not_truncated(tmp_path: Path, embedded_model_dir: Path, caplog) -> None:
    from rft.models import load_tokenizer

    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "short"}, {"prompt": "long " * 400}])
    config = DataConfig(train=str(path), max_prompt_length=64)
    train, _ = load_splits(config, load_tokenizer(str(embedded_model_dir)), seed=0)
    assert [e.row["prompt"] for e in train] == ["short"]
    assert "dropped 1 of 2 prompts" in caplog.text


def test_eval_file_without_rows_is_an_error_naming_it(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a"}])
    empty = tmp_path / "eval.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(empty))}: data.eval holds no rows"):
        load_splits(DataConfig(train=str(train), eval=str(empty)), None, seed=0)


def test_eval_split_emptied_by_prompt_length_is_an_error_naming_it(
    tmp_path: Path, embedded_model_dir: Path
) -> None:
    from rft.models import load_tokenizer

    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "short"}])
    long = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "long " * 100}, {"prompt": "longer " * 100}])
    config = DataConfig(train=str(train), eval=str(long), max_prompt_length=64)
    expected = (
        rf"held-out \({re.escape(str(long))}\): no usable prompts "
        r"\(all 2 longer than data.max_prompt_length=64 tokens\)"
    )
    with pytest.raises(DataError, match=expected):
        load_splits(config, load_tokenizer(str(embedded_model_dir)), seed=0)


def test_no_eval_data_configured_is_no_held_out_split(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    assert load_splits(DataConfig(train=str(train)), None, seed=0)[1] == []


def test_sampler_is_seeded_and_resumable() -> None:
    from rft.data import Example

    examples = [Example(prompt=str(i), prompt_ids=[i]) for i in range(5)]
    first = PromptSampler(examples, seed=3, shuffle=True)
    sequence = [e.prompt for e in first.take(12)]
    assert sorted(sequence[:5]) == [str(i) for i in range(5)]  # each epoch is a permutation
    resumed = PromptSampler(examples, seed=3, shuffle=True)
    resumed.position = 7
    assert [e.prompt for e in resumed.take(5)] == sequence[7:12]
