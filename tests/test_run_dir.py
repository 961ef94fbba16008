"""A run folder belongs to one run: refusal of a used folder, own checkpoints only, locks, recipe changes on
resume, torn log lines, bad --resume paths, and a clean stop on SIGTERM / SIGINT."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import rft.trainer
from rft.config import ConfigError, load_config
from rft.manifest import read_manifest
from rft.trainer import Trainer
from tests.conftest import REPO, tiny_recipe
from tests.test_trainer import TIMING_KEYS

ADAPTER = "adapter_model.safetensors"


def _train(recipe: dict, **options: object) -> Trainer:
    trainer = Trainer(load_config(raw=recipe), **options)
    trainer.train()
    return trainer


def _rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def _no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_model(*_: object, **__: object) -> None:
        raise AssertionError("the model was loaded before the run folder was checked")

    monkeypatch.setattr(rft.trainer, "load_policy", no_model)


def _same_adapter(first: Path, second: Path) -> bool:
    a, b = load_file(str(first / ADAPTER)), load_file(str(second / ADAPTER))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- item 2
def test_a_new_run_into_a_used_folder_is_refused_and_the_old_run_kept(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "reuse"
    _train(tiny_recipe(tiny_model_dir, folder, output={"save_every": 1}))
    before = {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    other_seed = tiny_recipe(tiny_model_dir, folder, training={"seed": 5}, output={"save_every": 1})

    with monkeypatch.context() as patch:
        _no_model(patch)
        with pytest.raises(ConfigError) as refused:
            Trainer(load_config(raw=other_seed))
    message = str(refused.value)
    assert "\n" not in message and str(folder) in message
    assert "--resume" in message and "output.name" in message and "--overwrite" in message
    after = {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    assert {k: v for k, v in after.items() if k.name != ".lock"} == {
        k: v for k, v in before.items() if k.name != ".lock"
    }

    # --overwrite: a new run, with its own id, and nothing of the old one left.
    old_id = read_manifest(folder)["run_id"]
    _train(other_seed, overwrite=True)
    assert read_manifest(folder)["run_id"] != old_id
    assert [row["step"] for row in _rows(folder)] == [1, 2]
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


def test_resume_loads_only_its_own_runs_checkpoints(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    other, mine = tmp_path / "other", tmp_path / "mine"
    _train(tiny_recipe(tiny_model_dir, other, training={"steps": 6}, output={"save_every": 3}))
    _train(
        tiny_recipe(
            tiny_model_dir, mine, training={"seed": 5}, output={"save_every": 2, "keep_checkpoints": 1}
        )
    )
    # Another run's checkpoints land in this folder, newer by step than this run's step-000002.
    for name in ("step-000003", "step-000006"):
        shutil.copytree(other / "checkpoints" / name, mine / "checkpoints" / name)

    longer = tiny_recipe(
        tiny_model_dir, mine, training={"seed": 5, "steps": 4},
        output={"save_every": 2, "keep_checkpoints": 1},
    )
    with monkeypatch.context() as patch:
        _no_model(patch)
        with pytest.raises(ConfigError, match=r"a checkpoint of run .*, not of the run in"):
            Trainer(load_config(raw=longer), resume=str(mine / "checkpoints" / "step-000006"))
    with caplog.at_level("INFO"):
        _train(longer, resume=True)
    assert "step-000002 at step 2" in caplog.text
    assert [row["step"] for row in _rows(mine)] == [1, 2, 3, 4]
    # Rotation keeps this run's newest checkpoint by step and leaves the other run's alone.
    assert sorted(p.name for p in (mine / "checkpoints").iterdir()) == [
        "step-000003", "step-000004", "step-000006"
    ]
    assert _same_adapter(
        mine / "checkpoints" / "step-000006" / "policy", other / "checkpoints" / "step-000006" / "policy"
    )
    assert _same_adapter(mine / "final", mine / "checkpoints" / "step-000004" / "policy")
    assert not _same_adapter(mine / "final", other / "final")


# ---------------------------------------------------------------------------------------------- item 13
def test_resume_from_a_path_that_is_no_checkpoint_fails_in_one_line_before_loading(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from rft.cli import main

    _no_model(monkeypatch)
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run")
    for path in (tmp_path / "no-such-folder", REPO / "tests"):
        with pytest.raises(ConfigError, match="not a checkpoint"):
            Trainer(load_config(raw=recipe), resume=str(path))
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(recipe_file), "--resume", str(tmp_path / "no-such-folder")]) == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr and "no-such-folder" in errors[0]


# ---------------------------------------------------------------------------------------------- item 3
def test_resume_refuses_a_recipe_change_unless_forced_and_then_applies_and_records_it(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = tmp_path / "first"
    _train(tiny_recipe(tiny_model_dir, first, output={"save_every": 2}))
    same, changed = tmp_path / "same", tmp_path / "changed"
    shutil.copytree(first, same)
    shutil.copytree(first, changed)

    def recipe(run_dir: Path, **training: object) -> dict:
        return tiny_recipe(
            tiny_model_dir, run_dir, training={"steps": 4, **training}, output={"save_every": 2}
        )

    meaning = recipe(changed, learning_rate=0.05)
    meaning["rewards"][1]["weight"] = 1.0
    meaning["rollout"]["group_size"] = 8
    with monkeypatch.context() as patch:
        _no_model(patch)
        with pytest.raises(ConfigError) as refused:
            Trainer(load_config(raw=meaning), resume=True)
    message = str(refused.value)
    assert "\n" not in message and "--allow-recipe-change" in message
    for change in (
        "training.learning_rate 0.01 -> 0.05", "rewards.1.weight 0.5 -> 1.0", "rollout.group_size 4 -> 8"
    ):
        assert change in message
    assert "training.steps" not in message  # extending a run changes nothing it computed

    # Allowed without force, and recorded (the copied folder's new place too).
    _train(recipe(same), resume=True)
    assert read_manifest(same)["recipe_changes"] == [
        {"step": 2, "field": "output.run_dir", "old": str(first), "new": str(same)},
        {"step": 2, "field": "training.steps", "old": 2, "new": 4},
    ]

    forced = Trainer(
        load_config(raw=recipe(changed, learning_rate=0.05)), resume=True, allow_recipe_change=True
    )
    assert [group["lr"] for group in forced.optimizer.param_groups] == [0.05]
    assert forced.scheduler.base_lrs == [0.05]
    forced.train()
    assert [row["learning_rate"] for row in _rows(changed)] == [0.01, 0.01, 0.05, 0.05]
    manifest = read_manifest(changed)
    assert manifest["recipe_changes"] == [
        {"step": 2, "field": "output.run_dir", "old": str(first), "new": str(changed)},
        {"step": 2, "field": "training.learning_rate", "old": 0.01, "new": 0.05},
        {"step": 2, "field": "training.steps", "old": 2, "new": 4},
    ]
    assert manifest["config"]["training"]["learning_rate"] == 0.05
    assert yaml.safe_load((changed / "config.yaml").read_text())["training"]["learning_rate"] == 0.05
    assert not _same_adapter(changed / "final", same / "final")
    # The run's history travels with its checkpoints: a later resume keeps it.
    info = json.loads((changed / "checkpoints" / "step-000004" / "checkpoint.json").read_text())
    assert (
        info["recipe_changes"] == manifest["recipe_changes"]
        and info["recipe"]["training"]["learning_rate"] == 0.05
    )


# ---------------------------------------------------------------------------------------------- item 12
def test_resume_drops_a_torn_last_line_and_refuses_a_broken_one_elsewhere(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "run"
    _train(tiny_recipe(tiny_model_dir, folder, output={"save_every": 2}))
    for name in ("metrics.jsonl", "completions.jsonl"):
        with (folder / name).open("a") as handle:
            handle.write('{"step": 3, "reward/me')  # killed mid-write
    longer = tiny_recipe(tiny_model_dir, folder, training={"steps": 3}, output={"save_every": 2})
    with caplog.at_level("WARNING"):
        _train(longer, resume=True)
    assert caplog.text.count("dropped a torn last line") == 2
    assert [row["step"] for row in _rows(folder)] == [1, 2, 3]
    assert sorted({row["step"] for row in _rows(folder, "completions.jsonl")}) == [1, 2, 3]

    lines = (folder / "metrics.jsonl").read_text().splitlines()
    (folder / "metrics.jsonl").write_text("\n".join([lines[0], lines[1][:20], lines[2]]) + "\n")
    _no_model(monkeypatch)
    with pytest.raises(ConfigError, match=r"metrics.jsonl:2: not a JSON line"):
        Trainer(load_config(raw=longer), resume=True)


# ---------------------------------------------------------------------------------------------- item 5
BLOCKING_REWARD = """
import os, time
from pathlib import Path

def reward(completions, **_):
    started, release = os.environ.get("RFT_TEST_STARTED"), os.environ.get("RFT_TEST_RELEASE")
    if started:
        Path(started).touch()
        deadline = time.monotonic() + 240
        while not Path(release).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return [float(len(c[0]["content"]) % 3) for c in completions]
"""


def _environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def test_a_second_run_into_a_folder_in_use_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    reward_file = tmp_path / "blocking_reward.py"
    reward_file.write_text(BLOCKING_REWARD)
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", output={"save_every": 1})
    recipe["rewards"] = [{"fn": f"{reward_file}:reward"}]
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    command = [sys.executable, "-m", "rft", "train", str(recipe_file)]
    started, release = tmp_path / "started", tmp_path / "release"
    first = subprocess.Popen(command,
                             env=_environment(RFT_TEST_STARTED=str(started), RFT_TEST_RELEASE=str(release)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not started.exists():
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first run never reached its reward"
            time.sleep(0.05)
        for extra in ([], ["--resume"]):
            second = subprocess.run(
                command + extra, env=_environment(), capture_output=True, text=True, timeout=300
            )
            assert second.returncode == 2, second.stderr[-3000:]
            errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
            assert (
                len(errors) == 1 and "in use by another run" in errors[0]
                and str(tmp_path / "run") in errors[0]
            )
    finally:
        release.touch()
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert [row["step"] for row in _rows(tmp_path / "run")] == [1, 2]


# ---------------------------------------------------------------------------------------------- item 11
SIGNALLING_REWARD = """
import os, signal
from pathlib import Path

def reward(completions, **_):
    counter = Path(os.environ["RFT_TEST_COUNTER"])
    calls = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(calls))
    if calls == int(os.environ.get("RFT_TEST_SIGNAL_AT", "0")):
        os.kill(os.getpid(), int(os.environ["RFT_TEST_SIGNAL"]))
    return [float(len(c[0]["content"]) % 3) for c in completions]
"""


def _signal_recipe(tmp_path: Path, model_dir: Path, name: str) -> Path:
    reward_file = tmp_path / "signalling_reward.py"
    reward_file.write_text(SIGNALLING_REWARD)
    recipe = tiny_recipe(model_dir, tmp_path / name, training={"steps": 4})
    recipe["rewards"] = [{"fn": f"{reward_file}:reward"}]
    # One call per group, in order: call 5 is step 3's first. In the trainer's threads, so that the reward's
    # signal reaches the trainer (a reward worker process would take it itself).
    recipe["scoring"] = {"concurrency": 1, "isolation": "thread"}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _rft_train(
    recipe: Path, counter: Path, *extra: str, signal_at: int = 0, signum: int = 0
) -> subprocess.CompletedProcess:
    environment = _environment(
        RFT_TEST_COUNTER=str(counter), RFT_TEST_SIGNAL_AT=str(signal_at), RFT_TEST_SIGNAL=str(signum)
    )
    return subprocess.run([sys.executable, "-m", "rft", "train", str(recipe), *extra], env=environment,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    result = _rft_train(_signal_recipe(tmp_path, tiny_model_dir, "straight"), tmp_path / "counter")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / "straight"


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_a_checkpoint_and_resume_ends_as_an_uninterrupted_run(
    signum: int, code: int, uninterrupted: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    recipe = _signal_recipe(tmp_path, tiny_model_dir, "stopped")
    stopped = _rft_train(recipe, tmp_path / "c1", signal_at=5, signum=signum)  # inside step 3's scoring
    assert stopped.returncode == code, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    last = stopped.stderr.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    assert (
        last.startswith(f"rft train: {name}: stopped after step 3 of 4; checkpoint ") and "--resume" in last
    )
    run_dir = tmp_path / "stopped"
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-000003"]
    assert not (run_dir / "final").exists()

    resumed = _rft_train(recipe, tmp_path / "c2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def comparable(folder: Path) -> list[dict]:
        return [{k: v for k, v in row.items() if not k.startswith(TIMING_KEYS)} for row in _rows(folder)]

    assert comparable(run_dir) == comparable(uninterrupted)
    assert _same_adapter(run_dir / "final", uninterrupted / "final")


RANK_SIGNALLING_REWARD = """
import os, signal
from pathlib import Path

def reward(completions, **_):
    counter = Path(os.environ["RFT_TEST_COUNTER"] + "-" + os.environ["RANK"])
    calls = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(calls))
    if os.environ["RANK"] == "1" and calls == int(os.environ.get("RFT_TEST_SIGNAL_AT", "0")):
        os.kill(os.getpid(), signal.SIGTERM)
    return [float(len(c[0]["content"]) % 3) for c in completions]
"""


def test_a_sigterm_on_one_of_two_processes_stops_both_after_the_same_step(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    reward_file = tmp_path / "rank_reward.py"
    reward_file.write_text(RANK_SIGNALLING_REWARD)
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", training={"steps": 3})
    recipe["rewards"] = [{"fn": f"{reward_file}:reward"}]
    # Each process scores one group a step: call 2 is step
    # 2's; in its threads, so the signal reaches the process.
    recipe["scoring"] = {"concurrency": 1, "isolation": "thread"}
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "rft", "train", str(recipe_file)]

    def torchrun(counter: str, signal_at: int, *extra: str) -> subprocess.CompletedProcess:
        environment = _environment(RFT_TEST_COUNTER=str(tmp_path / counter),
                                   RFT_TEST_SIGNAL_AT=str(signal_at),
                                   TOKENIZERS_PARALLELISM="false")
        return subprocess.run(
            command + list(extra), env=environment, capture_output=True, text=True, timeout=300, cwd=REPO
        )

    stopped = torchrun("c1", 2)
    output = stopped.stdout + stopped.stderr
    # Process 0 got no signal: it stops because process 1 did, after the same step, and says so too.
    assert output.count("rft train: SIGTERM: stopped after step 2 of 3") == 2, output[-4000:]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000002"]
    assert not (tmp_path / "run" / "final").exists()
    resumed = torchrun("c2", 0, "--resume")
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert [row["step"] for row in _rows(tmp_path / "run")] == [1, 2, 3]
    assert (tmp_path / "run" / "final" / ADAPTER).exists()


def test_rft_train_prints_the_training_time_and_the_whole_commands(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rft.cli import main

    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", training={"steps": 2})
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    started = time.perf_counter()
    assert main(["train", str(recipe_file)]) == 0
    elapsed = time.perf_counter() - started
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("time: ")]
    training, whole = (_seconds(part) for part in line.removeprefix("time: ").split(", "))
    # The steps' time is part of the command's, and the command's is what the caller saw (rounded).
    assert training <= whole <= round(elapsed) and line.endswith("in all (start-up and evaluations included)")
    step_seconds = sum(row["time/step"] for row in _rows(tmp_path / "run"))
    assert abs(training - step_seconds) <= 1


def _seconds(printed: str) -> int:
    """`2 min 5 s training` -> 125."""
    match = re.match(r"(?:(\d+) min )?(\d+) s", printed)
    assert match, printed
    return int(match[1] or 0) * 60 + int(match[2])
