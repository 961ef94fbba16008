"""Bedrock RFT job settings (`RFTHyperParameters`) as a recipe: ranges, mapping, a tiny run from the file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from rft.cli import main
from rft.config import ConfigError, load_config
from tests.conftest import tiny_recipe


def _recipe_file(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _job_file(tmp_path: Path, payload: dict) -> Path:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(payload))
    return path


def test_the_request_maps_to_recipe_fields(tiny_model_dir: Path, tmp_path: Path) -> None:
    recipe = _recipe_file(tmp_path, tiny_recipe(tiny_model_dir, tmp_path / "run"))
    settings = {
        "epochCount": 2, "batchSize": 16, "learningRate": 5e-6, "trainingSamplePerPrompt": 4,
        "evalInterval": 7,
        "inferenceMaxTokens": 96, "maxPromptLength": 300, "reasoningEffort": "low",
    }
    request = {"jobName": "j", "customizationConfig": {"rftConfig": {"hyperParameters": settings}}}
    config = load_config(recipe, bedrock_hyperparameters=str(_job_file(tmp_path, request)))
    # 108 training rows (recipes/data/addition_train.jsonl), two epochs of 16 prompts a step.
    assert config.training.steps == 14
    assert config.training.prompts_per_step == 16
    assert config.rollout.group_size == 4
    assert config.training.learning_rate == 5e-6
    assert config.eval.every == 7
    assert config.rollout.max_new_tokens == 96
    assert config.data.max_prompt_length == 300
    assert config.data.chat_template_kwargs == {"enable_thinking": False, "reasoning_effort": "low"}
    # The bare mapping and {"hyperParameters": ...} mean the same.
    for payload in ({"hyperParameters": settings}, settings):
        assert load_config(recipe, bedrock_hyperparameters=str(_job_file(tmp_path, payload))) == config


@pytest.mark.parametrize(("settings", "expected"), [
    ({"batchSize": 8}, "hyperParameters.batchSize: 8 is outside Bedrock's range 16 to 512"),
    ({"epochCount": 51}, "hyperParameters.epochCount: 51 is outside Bedrock's range 1 to 50"),
    ({"learningRate": 0.01}, "hyperParameters.learningRate: 0.01 is outside Bedrock's range 1e-07 to 0.001"),
    (
        {"trainingSamplePerPrompt": 1},
        "hyperParameters.trainingSamplePerPrompt: 1 is outside Bedrock's range 2 to 16"
    ),
    ({"evalInterval": 0}, "hyperParameters.evalInterval: 0 is outside Bedrock's range 1 to 100"),
    ({"batchSize": 16.5}, "hyperParameters.batchSize: got 16.5; expected an integer"),
    (
        {"reasoningEffort": "max"},
        "hyperParameters.reasoningEffort: got 'max'; Bedrock allows low, medium, high"
    ),
    ({"epochs": 2}, "hyperParameters.epochs: not a Bedrock RFT hyperparameter"),
])
def test_out_of_range_settings_fail_in_one_line(
    settings: dict, expected: str, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe_file(tmp_path, tiny_recipe(tiny_model_dir, tmp_path / "run"))
    job = _job_file(tmp_path, {"hyperParameters": settings})
    with pytest.raises(ConfigError) as error:
        load_config(recipe, bedrock_hyperparameters=str(job))
    assert str(error.value).startswith(f"{job.resolve()}: {expected}")
    assert main(["train", str(recipe), "--bedrock-hyperparameters", str(job)]) == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1 and expected in stderr[0]
    assert not (tmp_path / "run").exists()


def test_a_bedrock_job_file_trains_and_lands_in_the_run(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    recipe = _recipe_file(tmp_path, tiny_recipe(
        tiny_model_dir, run_dir, data={"max_train_rows": 32}, output={"report": False},
        eval={"before_training": False, "after_training": False},
    ))
    settings = {"epochCount": 1, "batchSize": 16, "trainingSamplePerPrompt": 2, "learningRate": 1e-4,
                "inferenceMaxTokens": 4, "maxPromptLength": 64, "evalInterval": 2}
    job = _job_file(tmp_path, {"hyperParameters": settings})
    with caplog.at_level(logging.WARNING, logger="rft.bedrock_job"):
        assert main(["train", str(recipe), "--bedrock-hyperparameters", str(job)]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "rft.bedrock_job"]
    assert len(warnings) == 1 and "32 training rows, outside Bedrock RFT's 100 to 20000" in warnings[0]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # ceil(1 epoch x 32 rows / 16 prompts a step)
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["training"]["prompts_per_step"] == 16 and resolved["rollout"]["group_size"] == 2
    assert resolved["training"]["learning_rate"] == 1e-4 and resolved["rollout"]["max_new_tokens"] == 4
    assert resolved["data"]["max_prompt_length"] == 64 and resolved["eval"]["every"] == 2
    assert resolved["training"]["steps"] == 2
    assert json.loads((run_dir / "bedrock_hyperparameters.json").read_text()) == {"hyperParameters": settings}
    # The resolved recipe alone reproduces the run's settings.
    assert load_config(run_dir / "config.yaml").training.steps == 2
