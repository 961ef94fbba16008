"""The run manifest: fingerprints that change exactly when
what they describe changes, and a real run's manifest."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from rft.config import DataConfig, RewardConfig, load_config
from rft.data import Example, load_splits, prepare_examples
from rft.manifest import (
    data_fingerprint,
    git_state,
    read_manifest,
    reward_fingerprints,
    weights_fingerprint,
)
from tests.conftest import ADDITION_HELDOUT, REPO, build_tiny_model, tiny_recipe


def test_data_fingerprint_follows_rows_and_prompt_tokens() -> None:
    rows = [{"prompt": "What is 1 + 1?", "answer": 2}, {"prompt": "What is 2 + 2?", "answer": 4}]
    examples = [Example(prompt=r["prompt"], prompt_ids=[1, 2, i], row=dict(r)) for i, r in enumerate(rows)]
    first = data_fingerprint(examples)
    assert first["rows"] == 2
    assert data_fingerprint([Example(e.prompt, list(e.prompt_ids), dict(e.row)) for e in examples]) == first
    examples[1].row["answer"] = 5
    changed_row = data_fingerprint(examples)
    examples[1].row["answer"] = 4
    examples[0].prompt_ids.append(9)  # same row, other tokens (a changed chat template or tokenizer)
    changed_tokens = data_fingerprint(examples)
    assert len({first["sha256"], changed_row["sha256"], changed_tokens["sha256"]}) == 3


def test_reward_fingerprints_hash_the_source_and_keep_the_version_label(tmp_path: Path) -> None:
    source = tmp_path / "my_reward.py"
    source.write_text("def score(completions, **_):\n    return [1.0] * len(completions)\n")
    (by_file, by_module, missing) = reward_fingerprints([
        RewardConfig(fn=f"{source}:score", version="v3", weight=0.5, kwargs={"strict": True}),
        RewardConfig(fn="rewards.arithmetic:final_number_correct"),
        RewardConfig(fn="no_such_package.module:fn"),
    ])
    assert by_file == {
        "name": "score", "fn": f"{source}:score", "version": "v3", "weight": 0.5, "kwargs": {"strict": True},
        "source_file": str(source), "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
    }
    assert Path(by_module["source_file"]).resolve() == (REPO / "rewards" / "arithmetic.py").resolve()
    assert missing["source_sha256"] is None
    source.write_text(source.read_text() + "# tweak\n")
    assert reward_fingerprints([
        RewardConfig(fn=f"{source}:score")
    ])[0]["source_sha256"] != by_file["source_sha256"]


def test_weights_fingerprint_changes_with_the_weights_and_remembers_hashes(
    tmp_path: Path, tiny_model_dir: Path, embedded_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RFT_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    first = weights_fingerprint(model)
    index = json.loads((tmp_path / "cache" / "fingerprints.json").read_text())
    weights = str((model / "model.safetensors").resolve())
    assert index[weights]["sha256"] == hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
    assert weights_fingerprint(model) == first
    assert weights_fingerprint(tiny_model_dir) == first  # a copy holds the same weights
    build_tiny_model(model, embedded_model_dir, seed=1)  # same size, other values
    assert weights_fingerprint(model) != first


def test_git_state(tmp_path: Path) -> None:
    assert git_state(tmp_path) is None
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(tmp_path), *args], check=True, capture_output=True, text=True
        ).stdout.strip()

    git("init", "-q")
    (tmp_path / "recipe.yaml").write_text("a: 1\n")
    git("add", "recipe.yaml")
    git("-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "init")
    state = git_state(tmp_path)
    assert state == {"root": str(tmp_path.resolve()), "commit": git("rev-parse", "HEAD"), "dirty": False}
    (tmp_path / "recipe.yaml").write_text("a: 2\n")
    assert git_state(tmp_path)["dirty"] is True


def test_a_run_writes_a_manifest_and_a_resumed_run_keeps_its_scores(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rft.trainer import Trainer

    monkeypatch.setenv("RFT_CACHE", str(tmp_path / "cache"))
    recipe = tiny_recipe(
        tiny_model_dir, tmp_path / "run", training={"steps": 2, "seed": 7},
        output={"save_every": 1, "report": False},
        eval={"before_training": True, "after_training": True},
    )
    recipe["rewards"][1]["version"] = "exact-int-v1"  # the arithmetic reward
    config = load_config(raw=recipe)
    Trainer(config).train()
    manifest = read_manifest(tmp_path / "run")
    assert manifest is not None
    assert manifest["config"] == config.model_dump(mode="json")
    assert manifest["packages"]["torch"] == importlib.metadata.version("torch")
    assert manifest["packages"]["transformers"] == importlib.metadata.version("transformers")
    assert manifest["seeds"] == {"training": 7, "evaluation": 7}
    assert manifest["git"]["rft"]["commit"]  # this checkout is a git work tree
    from rft.models import load_tokenizer

    train, held_out = load_splits(config.data, load_tokenizer(str(tiny_model_dir)), 7)
    assert manifest["data"] == {"train": data_fingerprint(train), "held_out": data_fingerprint(held_out)}
    assert manifest["data"]["held_out"]["rows"] == 8
    assert manifest["model"]["weights_sha256"] == weights_fingerprint(tiny_model_dir)
    tiny_reward, reward = manifest["rewards"]
    assert tiny_reward["version"] is None
    assert reward["version"] == "exact-int-v1"
    assert reward["source_sha256"] == hashlib.sha256(
        (REPO / "rewards" / "arithmetic.py").read_bytes()
    ).hexdigest()
    assert set(manifest["evaluation"]) == {"base", "trained", "before_after"}
    assert manifest["evaluation"]["base"][0]["count"] == 8
    overall = manifest["evaluation"]["before_after"][0]
    assert (overall["metric"], overall["tag"]) == ("reward", None)

    resumed = load_config(raw={**recipe, "training": {**recipe["training"], "steps": 3}})
    Trainer(resumed, resume=True).train()
    manifest = read_manifest(tmp_path / "run")
    assert manifest["resumed_at_step"] == 2
    assert manifest["evaluation"]["base"][0]["count"] == 8  # the first run's baseline is kept
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "run" / "evaluations.jsonl").read_text().splitlines()
    ]
    assert steps == [0, 2, 3]


def test_held_out_fingerprint_sees_the_chat_template(embedded_model_dir: Path) -> None:
    from rft.data import read_rows
    from rft.models import load_tokenizer

    tokenizer = load_tokenizer(str(embedded_model_dir))
    rows = read_rows(str(ADDITION_HELDOUT), "test")[:4]
    plain = prepare_examples(rows, DataConfig(train="x"), tokenizer, "held-out")
    with_system = prepare_examples(
        rows, DataConfig(train="x", system_prompt="Answer briefly."), tokenizer, "held-out"
    )
    assert data_fingerprint(plain) != data_fingerprint(with_system)
