"""Under transformers 4.51.3 (Bedrock's documented version, in its own venv) the Bedrock export
reads exactly as meant: weights, config values, tokenizer with chat template, next-token logits.

One 4.51.3 subprocess probes every export at once (tests/transformers4_probe.py). A plain
transformers 5.x save of the same merged model is probed beside them as a control: 4.51.3 misreads
it (rope_theta falls back to 10000, the tokenizer class is unknown), which shows these checks fail
when the layout is wrong.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rft.config import EMBEDDED_MODEL
from rft.export import bedrock
from rft.export.merge import load_policy, load_tokenizer, locate_policy, merge_policy
from rft.export.transformers4 import TRANSFORMERS4_ARCHITECTURES
from tests.export_fixtures import (
    CHAT_PROMPTS,
    bf16_tolerance,
    build_base_model,
    build_lora_run,
    chat_prompt_ids,
    embedded_model_dir,
    next_token_logits,
)
from tests.transformers4_env import probe_with_transformers4

pytestmark = pytest.mark.slow

ARCHITECTURES = sorted(TRANSFORMERS4_ARCHITECTURES)
SMOLLM2 = "embedded-smollm2"
CONTROL = "plain-5x-save-llama"
# Fields whose 4.51.3 value is checked separately or legitimately differs from the 5.x object.
_NOT_COMPARED = {
    "transformers_version", "torch_dtype", "dtype", "_name_or_path", "rope_scaling", "rope_theta"
}


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value))


def config_mismatches(read_by_4: dict[str, Any], intended: Any) -> list[str]:
    """Fields 4.51.3 reads differently from the model's own (5.x) config, rope included."""
    problems = []
    for key, value in read_by_4.items():
        if key in _NOT_COMPARED or not hasattr(intended, key):
            continue
        meant = getattr(intended, key)
        if key == "head_dim" and meant is None:
            # 5.x leaves head_dim unset where the model derives it; 4.51.3 stores the derived value.
            meant = intended.hidden_size // intended.num_attention_heads
        if _normalise(value) != _normalise(meant):
            problems.append(f"{key}: 4.51.3 reads {value!r}, the model has {meant!r}")
    rope = dict(intended.rope_parameters)
    if read_by_4.get("rope_theta") != rope.pop("rope_theta"):
        problems.append(
            f"rope_theta: 4.51.3 reads {read_by_4.get('rope_theta')!r}, "
            f"the model has {intended.rope_parameters}"
        )
    if (
        rope.get("rope_type", "default") != "default"
        and (read_by_4.get("rope_scaling") or {}).get("rope_type") != rope["rope_type"]
    ):
        problems.append(
            f"rope_scaling: 4.51.3 reads {read_by_4.get('rope_scaling')!r}, "
            f"the model has {intended.rope_parameters}"
        )
    return problems


def export(run_dir: Path, out: Path) -> Path:
    parser = argparse.ArgumentParser()
    bedrock.configure_parser(parser)
    assert bedrock.run(parser.parse_args([str(run_dir), "--out", str(out)])) == 0
    return out


class Case:
    """One exported run and what the trained policy gives on the chat prompts under transformers 5.x."""

    def __init__(self, run_dir: Path, export_dir: Path) -> None:
        self.run_dir = run_dir
        self.export_dir = export_dir
        source = locate_policy(run_dir)
        self.intended_config = AutoConfig.from_pretrained(source.base_model)
        tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "final"))
        self.rendered = [
            tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            for chat in CHAT_PROMPTS
        ]
        self.prompts = chat_prompt_ids(tokenizer)
        self.plain_ids = tokenizer("Hello world, 7 + 5 = 12.")["input_ids"]
        self.policy = next_token_logits(load_policy(source), self.prompts)
        self.tolerance = bf16_tolerance(
            self.policy, next_token_logits(load_policy(source, torch.bfloat16), self.prompts)
        )
        self.base = next_token_logits(
            AutoModelForCausalLM.from_pretrained(source.base_model).eval(), self.prompts
        )
        self.export_read_by_5 = next_token_logits(
            AutoModelForCausalLM.from_pretrained(str(export_dir)).eval(), self.prompts
        )


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("transformers4")
    cases = {}
    for architecture in ARCHITECTURES:
        base = build_base_model(architecture, root / f"{architecture}-base")
        run_dir = build_lora_run(base, root / f"{architecture}-run")
        cases[architecture] = Case(run_dir, export(run_dir, root / f"{architecture}-export"))
    # The case: the embedded SmolLM2 (rope_theta 100000) with a trained adapter.
    run_dir = build_lora_run(
        embedded_model_dir(), root / "smollm2-run", base_model_name=EMBEDDED_MODEL, lora_b_std=0.05
    )
    cases[SMOLLM2] = Case(run_dir, export(run_dir, root / "smollm2-export"))
    # Control: the same merged Llama saved the plain transformers 5.x way.
    source = locate_policy(cases["LlamaForCausalLM"].run_dir)
    control_dir = root / "plain-5x-save"
    merge_policy(source, torch.bfloat16).save_pretrained(control_dir)
    load_tokenizer(source).save_pretrained(control_dir)
    cases[CONTROL] = Case(cases["LlamaForCausalLM"].run_dir, control_dir)
    return cases


@pytest.fixture(scope="module")
def probed(cases: dict[str, Case], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, Any]]:
    # Every case's prompts are the same chats through the same SmolLM2 tokenizer.
    prompts = cases[SMOLLM2].prompts
    assert all(case.prompts == prompts for case in cases.values())
    return probe_with_transformers4(
        {name: case.export_dir for name, case in cases.items()}, prompts, tmp_path_factory.mktemp("probe")
    )


@pytest.mark.parametrize("name", [*ARCHITECTURES, SMOLLM2])
def test_transformers4_reads_the_export_as_meant(
    name: str, cases: dict[str, Case], probed: dict[str, tuple[dict, Any]]
) -> None:
    case = cases[name]
    report, logits = probed[name]
    assert "error" not in report, report.get("error")
    assert report["transformers_version"] == "4.51.3"
    # Weights: every tensor found, none left over, none reshaped, in the exported dtype.
    assert (
        report["missing_keys"] == [] and report["unexpected_keys"] == [] and report["mismatched_keys"] == []
    )
    assert report["model_class"] == case.intended_config.architectures[0]
    assert report["model_dtype"] == "bfloat16"
    assert config_mismatches(report["config"], case.intended_config) == []
    # Tokenizer: a class 4.51.3 knows, the chat template inside, the same token ids.
    assert report["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert report["rendered_chats"] == case.rendered
    assert report["token_ids"] == case.prompts
    assert report["plain_token_ids"] == case.plain_ids
    assert report["special_tokens_map"]["eos_token"] == "<|im_end|>"
    # Logits: the trained policy's, within bf16 tolerance, while the base model's are far off.
    transformers4_logits = torch.from_numpy(logits)
    assert (case.base - case.policy).abs().max() > 2 * case.tolerance
    assert (transformers4_logits - case.policy).abs().max() < case.tolerance
    # Same weights, same dtype: 4.51.3 and 5.x compute (nearly) the same numbers.
    assert (transformers4_logits - case.export_read_by_5).abs().max() < case.tolerance / 4


def test_embedded_smollm2_keeps_rope_theta_100000(probed: dict[str, tuple[dict, Any]]) -> None:
    assert probed[SMOLLM2][0]["config"]["rope_theta"] == 100000.0


def test_control_a_plain_5x_save_is_misread(
    cases: dict[str, Case], probed: dict[str, tuple[dict, Any]]
) -> None:
    case = cases[CONTROL]
    report, logits = probed[CONTROL]
    assert "TokenizersBackend" in report["tokenizer_error"]
    assert any(
        problem.startswith("rope_theta")
        for problem in config_mismatches(report["config"], case.intended_config)
    )
    assert (torch.from_numpy(logits) - case.policy).abs().max() > case.tolerance
