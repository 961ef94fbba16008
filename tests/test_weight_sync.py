"""What weight sync pushes to a rollout engine: merged LoRA weights and whole fused layers (no vLLM)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from rft.rollout.weight_sync import checkpoint_tensors, sync_plan
from tests.conftest import build_tiny_model

# vLLM's `packed_modules_mapping` for Llama and Qwen2 (q/k/v and gate/up load into fused layers).
PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> Path:
    # Qwen2 has q/k/v biases: a fused layer's parts include them.
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), embedded_model_dir, architecture="qwen2")


def lora_model(model_dir: Path, targets: list[str] | str) -> torch.nn.Module:
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # init_lora_weights=False: B is random, so the adapter changes the weights from the start.
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM"
    )
    return get_peft_model(base, config)


def test_merged_lora_weights_are_peft_merge_and_leave_the_policy_alone(tiny_model_dir: Path) -> None:
    policy = lora_model(tiny_model_dir, "all-linear")
    ids = torch.tensor([[1, 2, 3, 4]])
    before = policy(ids).logits.detach()
    sources, _ = checkpoint_tensors(policy)
    merged = copy.deepcopy(policy).merge_and_unload().state_dict()
    assert set(sources) <= set(merged)
    for name, source in sources.items():
        torch.testing.assert_close(source(), merged[name], atol=1e-6, rtol=0, msg=name)
    assert torch.equal(policy(ids).logits.detach(), before)
    assert not any(getattr(module, "merged", False) for module in policy.modules())


def test_lora_changes_only_the_adapted_weights(tiny_model_dir: Path) -> None:
    policy = lora_model(tiny_model_dir, ["q_proj", "down_proj"])
    sources, changing = checkpoint_tensors(policy)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert list(sources) == [name for name, _ in plain.named_parameters()]
    layers = plain.config.num_hidden_layers
    adapted = ("self_attn.q_proj", "mlp.down_proj")
    assert changing == {f"model.layers.{i}.{m}.weight" for i in range(layers) for m in adapted}


def test_full_finetuning_changes_the_trainable_parameters(tiny_model_dir: Path) -> None:
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    policy.get_input_embeddings().requires_grad_(False)
    sources, changing = checkpoint_tensors(policy)
    assert "model.embed_tokens.weight" in sources and "model.embed_tokens.weight" not in changing
    assert changing == {name for name, p in policy.named_parameters() if p.requires_grad}


def test_a_changed_part_brings_its_whole_fused_layer(qwen2_dir: Path) -> None:
    policy = lora_model(qwen2_dir, ["q_proj"])
    sources, changing = checkpoint_tensors(policy)
    plan = sync_plan(list(sources), changing, PACKED)
    layers = policy.config.num_hidden_layers
    assert plan == [
        f"model.layers.{i}.self_attn.{part}.{leaf}"
        for i in range(layers) for part in ("q_proj", "k_proj", "v_proj") for leaf in ("weight", "bias")
    ]
    # A model without fused layers needs only the changed modules' own tensors.
    assert sync_plan(list(sources), changing, {}) == [
        f"model.layers.{i}.self_attn.q_proj.{leaf}" for i in range(layers) for leaf in ("weight", "bias")
    ]


def test_full_finetuning_plan_is_every_tensor(qwen2_dir: Path) -> None:
    policy = AutoModelForCausalLM.from_pretrained(qwen2_dir, dtype=torch.float32)
    sources, changing = checkpoint_tensors(policy)
    assert sync_plan(list(sources), changing, PACKED) == list(sources)
