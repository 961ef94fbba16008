"""The update's shared-prompt forward gives the log-probs and gradients of one forward per sequence.

Each distinct prompt of a micro-batch runs once and its completions attend to its keys and values
(`rft.models._shared_prompt_hidden`); the gradients of every completion flow back into the prompt's
activations. Checked on the tiny random model, full fine-tuning and LoRA, against the path that runs
prompt + completion for every row.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rft.batch import Batch
from rft.models import completion_logprobs
from rft.update import collate
from tests.test_step_metrics import COMPARED_TOLERANCE, LENGTHS, update_once

# Float32 rounding only: the two paths multiply the same numbers in differently shaped matmuls.
# Measured 0 (log-probs) and up to 3.8e-7 (gradients, by norm) on an Intel Xeon, 1 and 2 threads; a
# completion attending to another row's prompt moves the log-probs by 0.14.
LOGPROB_ATOL = 1e-5
GRADIENT_RTOL = 1e-4


def shared_batch() -> Batch:
    """Two prompts of different lengths, three completions each (lengths 1 to 5), interleaved rows."""
    long_prompt, short_prompt = [1, 5, 9, 13, 17], [1, 7]
    completions = [[20, 21, 22], [30], [40, 41, 42, 43, 44], [50, 51], [60], [70, 71, 72, 73]]
    prompts = [long_prompt, short_prompt, long_prompt, short_prompt, long_prompt, short_prompt]
    return Batch(
        prompt_ids=[list(p) for p in prompts], completion_ids=completions, rollout_logprobs=None,
        truncated=[False] * 6, rewards=torch.zeros(6, dtype=torch.float64), advantages=torch.zeros(6),
    )


def logprobs_and_gradients(
    model: torch.nn.Module, share: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    micro = collate(shared_batch(), list(range(6)), pad_token_id=0, mask_truncated=False, share_prompts=share)
    assert (micro.prompt_rows is not None) == share
    model.zero_grad()
    logp, entropy = completion_logprobs(
        model, micro.input_ids, micro.attention_mask, micro.completion_start, micro.completion_lengths,
        temperature=0.7, chunk_size=4, entropy_grad=True, prompt_rows=micro.prompt_rows,
    )
    # Weighted so that every position's gradient differs; the entropy term reaches the whole vocabulary.
    weights = torch.linspace(0.5, 1.5, logp.numel()).reshape(logp.shape)
    ((logp * weights).sum() + 0.1 * entropy.sum()).backward()
    return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_shared_prompts_give_the_logprobs_and_gradients_of_full_sequences(
    tiny_model_dir: Path, lora: bool
) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        # B = 0 at initialisation would leave the adapter's A gradients zero on both paths.
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.05)
    model.train()
    full_logp, full_gradients = logprobs_and_gradients(model, share=False)
    shared_logp, shared_gradients = logprobs_and_gradients(model, share=True)
    assert (full_logp != 0).sum() == 3 + 1 + 5 + 2 + 1 + 4
    assert (full_logp - shared_logp).abs().max().item() < LOGPROB_ATOL
    assert full_gradients.keys() == shared_gradients.keys() and len(full_gradients) > 0
    assert all("lora_" in name for name in full_gradients) == lora
    # By norm, relative to the tensor's own (see tests/test_models.py for why not element by element).
    for name, expected in full_gradients.items():
        difference = ((shared_gradients[name] - expected).norm() / expected.norm()).item()
        assert difference < GRADIENT_RTOL, f"{name}: {difference:.3g}"


def test_collate_marks_each_rows_first_row_with_the_same_prompt() -> None:
    micro = collate(shared_batch(), [1, 2, 3, 0], pad_token_id=0, mask_truncated=False, share_prompts=True)
    assert micro.prompt_rows is not None and micro.prompt_rows.tolist() == [0, 1, 0, 1]


def test_the_update_is_the_same_with_shared_prompts_and_under_a_token_budget(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The trainer's update (two iterations, clipping, KL to the reference, rollout correction) on a
    batch whose three prompts alternate: its metrics and first gradient with prompts shared (the
    default) equal those without; under a token budget (several micro-batches) its metrics."""
    everything = list(range(len(LENGTHS)))
    shared, shared_gradient = update_once(tiny_model_dir, tmp_path / "shared", 9, everything)
    unshared, unshared_gradient = update_once(
        tiny_model_dir, tmp_path / "unshared", 9, everything, training={"share_prompts": False}
    )
    budget, _ = update_once(
        tiny_model_dir, tmp_path / "budget", 9, everything, training={"max_tokens_per_micro_batch": 40}
    )
    compared = {key for key in shared if not key.startswith("time/")}
    assert compared == {key for key in unshared if not key.startswith("time/")} and "grad_norm" in compared
    for key in sorted(compared):
        assert unshared[key] == pytest.approx(shared[key], **COMPARED_TOLERANCE), key
        assert budget[key] == pytest.approx(shared[key], **COMPARED_TOLERANCE), f"budget: {key}"
    # The adapter's B starts at zero (A's gradients are zero): relative to the largest gradient entry.
    scale = max(g.abs().max().item() for g in unshared_gradient)
    assert scale > 0 and len(shared_gradient) == len(unshared_gradient)
    for got, expected in zip(shared_gradient, unshared_gradient, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale)
