"""`data.chat_template_kwargs` (and Bedrock's reasoningEffort)
reach training, evaluation and the exports alike."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest
import yaml
from transformers import AutoTokenizer

from rft.cli import main
from rft.config import load_config
from rft.data import load_splits, template_with_defaults
from rft.trainer import Trainer
from tests.conftest import build_tiny_model, tiny_recipe

# Qwen3's switch, in Qwen3's own words: thinking is on unless a caller says `enable_thinking=False`.
QWEN3_STYLE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + "
    "'\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is "
    "false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
NO_THINKING = "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def thinking_model_dir(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> Path:
    directory = build_tiny_model(tmp_path_factory.mktemp("tiny-thinking"), embedded_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = QWEN3_STYLE
    tokenizer.save_pretrained(directory)
    return directory


def _render(tokenizer_dir: Path, **kwargs: object) -> str:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = [{"role": "user", "content": "What is 1 + 2?"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)


def test_defaults_in_the_template_yield_to_the_caller() -> None:
    defaults = {"enable_thinking": False, "note": [1, "a \"q\"", None, {"k": True}]}
    template = jinja2.Environment().from_string(template_with_defaults("{{ note | tojson }}", defaults))
    assert json.loads(template.render()) == defaults["note"]
    assert json.loads(template.render(note=[2])) == [2]
    assert template_with_defaults(QWEN3_STYLE, {}) == QWEN3_STYLE
    assert template_with_defaults(None, {"enable_thinking": False}) is None


def test_training_evaluation_and_export_see_the_kwargs(
    thinking_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(thinking_model_dir, run_dir, training={"steps": 1}, output={"report": False},
                         data={"chat_template_kwargs": {"enable_thinking": False}})
    trainer = Trainer(load_config(raw=recipe))
    tokenizer = AutoTokenizer.from_pretrained(thinking_model_dir)
    for example in (trainer.train_examples[0], trainer.eval_examples[0]):
        text = tokenizer.decode(example.prompt_ids)
        assert text.endswith(f"<|im_start|>assistant\n{NO_THINKING}")
        expected = tokenizer.apply_chat_template(example.prompt, add_generation_prompt=True,
                                                 enable_thinking=False,
                                                 tokenize=True, return_dict=False)
        assert example.prompt_ids == list(expected)
    trainer.train()
    # The saved policy and the Bedrock export prompt the model
    # as it was trained, unless a request says otherwise.
    assert main(["export", "bedrock", str(run_dir), "--out", str(tmp_path / "export")]) == 0
    assert main(["export", "sagemaker", str(run_dir), "--out", str(tmp_path / "lmi"), "--merged"]) == 0
    for folder in (run_dir / "final", tmp_path / "export", tmp_path / "lmi"):
        assert _render(folder).endswith(NO_THINKING)
        assert not _render(folder, enable_thinking=True).endswith(NO_THINKING)
    # An adapter deployment serves the base model's template: the export says so, and what to send.
    capsys.readouterr()
    assert main([
        "export", "sagemaker", str(run_dir), "--out", str(tmp_path / "lmi-adapter"), "--base-model-id", "o/m"
    ]) == 0
    assert "data.chat_template_kwargs {'enable_thinking': False}" in capsys.readouterr().out
    # Without the kwargs the base template thinks: the difference above is the recipe's.
    assert not _render(thinking_model_dir).endswith(NO_THINKING)


def test_reasoning_effort_low_turns_thinking_off(thinking_model_dir: Path, tmp_path: Path) -> None:
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(tiny_recipe(thinking_model_dir, tmp_path / "run")))
    (tmp_path / "job.json").write_text('{"hyperParameters": {"reasoningEffort": "low"}}')
    config = load_config(recipe_path, bedrock_hyperparameters=str(tmp_path / "job.json"))
    tokenizer = AutoTokenizer.from_pretrained(thinking_model_dir)
    train, held_out = load_splits(config.data, tokenizer, seed=0)
    for example in (train[0], held_out[0]):
        assert tokenizer.decode(example.prompt_ids).endswith(NO_THINKING)
