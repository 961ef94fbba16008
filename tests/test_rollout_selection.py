"""Choosing the rollout engine: vLLM is an optional extra, and its absence fails a run in one line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from rft.config import load_config
from rft.rollout import EngineStartError, require_vllm, vllm_available
from tests.conftest import tiny_recipe


@pytest.fixture
def vllm_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Python sees without vLLM installed: `import vllm` raises, `find_spec` finds nothing."""
    monkeypatch.setitem(sys.modules, "vllm", None)


def test_vllm_available_says_whether_it_can_be_imported(vllm_missing: None) -> None:
    assert vllm_available() is False
    with pytest.raises(
        EngineStartError, match=r"rollout.engine: vllm needs vLLM.*pip install 'rft-trainer\[vllm"
    ):
        require_vllm()


def test_trainer_fails_before_loading_the_model(
    vllm_missing: None, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import rft.trainer

    def no_model(*_: object, **__: object) -> None:
        raise AssertionError("the model was loaded before the missing vLLM was reported")

    monkeypatch.setattr(rft.trainer, "load_policy", no_model)
    config = load_config(raw=tiny_recipe(tiny_model_dir, tmp_path, rollout={"engine": "vllm"}))
    with pytest.raises(EngineStartError, match="pip install"):
        rft.trainer.Trainer(config)


def test_cli_reports_missing_vllm_in_one_line(
    vllm_missing: None, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rft.cli import main

    recipe = tmp_path / "recipe.yaml"
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run", rollout={"engine": "vllm"})
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["train", str(recipe)]) == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr
    assert "rollout.engine: vllm needs vLLM" in errors[0]


def test_transformers_engine_needs_no_vllm(vllm_missing: None, tiny_model_dir: Path, tmp_path: Path) -> None:
    from rft.trainer import Trainer

    config = load_config(raw=tiny_recipe(tiny_model_dir, tmp_path, training={"steps": 1}))
    assert Trainer(config).engine.name == "transformers"


def test_tensor_parallel_size_that_does_not_divide_the_processes_fails_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked before any model or engine loads (here vLLM need not even be installed)."""
    import rft.rollout
    import rft.trainer
    from rft.cli import main

    monkeypatch.setattr(rft.rollout, "vllm_available", lambda: True)
    monkeypatch.setattr(rft.trainer, "load_policy", lambda *_, **__: pytest.fail("the model was loaded"))
    recipe = tmp_path / "recipe.yaml"
    raw = tiny_recipe(
        tiny_model_dir, tmp_path / "run", rollout={"engine": "auto", "vllm_tensor_parallel_size": 2}
    )
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["train", str(recipe)]) == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr
    assert errors[0] == (
        "error: rollout.vllm_tensor_parallel_size (2) must divide the number of processes (1)"
    )


def test_auto_picks_vllm_wherever_it_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    import rft.rollout

    monkeypatch.setattr(rft.rollout, "vllm_available", lambda: True)
    assert rft.rollout.choose_engine("auto") == "vllm"
    monkeypatch.setattr(rft.rollout, "vllm_available", lambda: False)
    assert rft.rollout.choose_engine("auto") == "transformers"
    rft.rollout.check_tensor_parallel(2, 4)
