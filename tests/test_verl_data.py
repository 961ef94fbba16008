"""verl / SageMaker RLVR rows in Parquet files: read as they
are, trained on, and refused clearly when malformed."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from rft.cli import main
from rft.config import load_config
from rft.data import DataError, load_splits
from rft.trainer import Trainer
from tests.conftest import ADDITION_HELDOUT, ADDITION_TRAIN, REPO, TINY_REWARD, tiny_recipe

GROUND_TRUTH_SEEN = f"{REPO / 'tests' / 'plateau_rewards.py'}:ground_truth_seen"


def verl_rows(source: Path) -> list[dict]:
    """The addition rows as verl's data preprocessing scripts
    write them (e.g. examples/data_preprocess/gsm8k.py)."""
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    return [
        {
            "data_source": f"addition/{row['phrasing']}",
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(row["answer"])},
            "extra_info": {"split": source.stem, "index": index},
        }
        for index, row in enumerate(rows)
    ]


def write_parquet(rows: list[dict], path: Path) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_a_verl_parquet_file_trains(tiny_model_dir: Path, tmp_path: Path) -> None:
    train = write_parquet(verl_rows(ADDITION_TRAIN), tmp_path / "train.parquet")
    held_out = write_parquet(verl_rows(ADDITION_HELDOUT), tmp_path / "test.parquet")
    recipe = tiny_recipe(
        tiny_model_dir, tmp_path / "run", data={"train": str(train), "eval": str(held_out)},
        output={"report": False}, eval={"after_training": True},
    )
    recipe["rewards"] = [{"fn": TINY_REWARD}, {"fn": GROUND_TRUTH_SEEN}]
    trainer = Trainer(load_config(raw=recipe))
    first = trainer.train_examples[0]
    assert first.is_chat and first.row["ability"] == "math" and "index" in first.row["extra_info"]
    assert first.row["reference_answer"] == first.row["reward_model"]["ground_truth"]
    results = trainer.train()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # The reward saw ground_truth both as reference_answer and nested, on every completion.
    assert [m["reward/ground_truth_seen/mean"] for m in metrics] == [1.0, 1.0]
    assert set(results["after"]["slices"]["data_source"]) == {
        "addition/what_is", "addition/compute", "addition/sum_of"
    }


def test_a_row_with_its_own_reference_answer_keeps_it(tmp_path: Path) -> None:
    rows = verl_rows(ADDITION_TRAIN)[:2]
    rows[0]["reference_answer"] = "own"
    rows[1]["reference_answer"] = None
    config = load_config(
        raw={"data": {"train": str(write_parquet(rows, tmp_path / "x.parquet"))}, "rewards": [{"fn": "m:f"}]}
    )
    train, _ = load_splits(config.data, None, seed=0)
    assert [e.row["reference_answer"] for e in train] == ["own", None]


def _run(tmp_path: Path, train: Path) -> int:
    recipe = tmp_path / "recipe.yaml"
    # A model that does not exist: the data error must come first.
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tmp_path / "no-model")}, "data": {"train": str(train)},
        "rewards": [{"fn": TINY_REWARD}], "output": {"run_dir": str(tmp_path / "run")},
    }))
    return main(["train", str(recipe)])


def test_a_file_that_is_not_parquet_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = tmp_path / "train.parquet"
    train.write_bytes(b"\xff\xfe not parquet at all \x00\x01")
    assert _run(tmp_path, train) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {train}: not a readable Parquet file (")


def test_a_row_without_a_prompt_names_file_row_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = verl_rows(ADDITION_TRAIN)[:6]
    rows[3]["prompt"] = None
    train = write_parquet(rows, tmp_path / "train.parquet")
    assert _run(tmp_path, train) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {train}[3]: field 'prompt' is empty (null); each row needs a prompt (text or messages)"
    ]
    bad_messages = verl_rows(ADDITION_TRAIN)[:4]
    bad_messages[2]["prompt"] = [{"role": "robot", "content": "hi"}]
    with pytest.raises(DataError, match=r"bad\.parquet\[2\]: field 'prompt\[0\]\.role' is 'robot'"):
        load_splits(load_config(raw={"data": {
            "train": str(write_parquet(bad_messages, tmp_path / "bad.parquet"))
        },
                                     "rewards": [{"fn": "m:f"}]}).data, None, seed=0)
