"""The transformers engine's per-token log-probs: transformers' own transition scores, in less memory."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rft.rollout.base import SamplingSettings, eos_token_ids
from rft.rollout.hf import TransformersEngine, cut_at_eos, sampled_logprobs


def test_sampled_logprobs_equal_transition_scores(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    torch.manual_seed(0)
    prompt = torch.tensor([[1, 5, 9, 13], [1, 7, 7, 2]])
    output = model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, min_new_tokens=12,
        do_sample=True, temperature=0.7, top_k=50, top_p=0.9, return_dict_in_generate=True,
        output_scores=True,
    )
    expected = model.compute_transition_scores(output.sequences, output.scores, normalize_logits=True)
    actual = sampled_logprobs(output.scores, output.sequences[:, prompt.shape[1] :])
    assert actual.shape == expected.shape == (2, 12)
    # The same log-softmax over other tensor shapes: kernels may round it differently (measured: up to
    # 2.4e-7, an ulp or two at these magnitudes), so about 2 ulps at any magnitude.
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def test_engine_logprobs_are_those_of_the_sampled_tokens(tiny_model_dir: Path) -> None:
    """At temperature 1 without truncation, the engine's log-probs are the model's teacher-forced ones."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = TransformersEngine(model, tokenizer, batch_size=4)
    prompt = [1, 5, 9, 13]
    torch.manual_seed(0)
    rollout = engine.generate([prompt], 3, SamplingSettings(max_new_tokens=10))
    assert rollout.logprobs is not None
    for completion, logprobs in zip(rollout.completion_ids, rollout.logprobs, strict=True):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
            log_probs = torch.log_softmax(logits.float(), dim=-1)
        teacher_forced = log_probs.gather(1, torch.tensor(completion)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(logprobs), teacher_forced, rtol=0, atol=1e-4)


def test_a_completion_ends_at_its_first_end_of_sequence_token() -> None:
    assert cut_at_eos([5, 2, 7, 2], {2}) == (2, True)
    assert cut_at_eos([5, 6, 7], {2, 3}) == (3, False)
    assert cut_at_eos([], {2}) == (0, False)


def test_end_of_sequence_ids_join_generation_config_and_tokenizer() -> None:
    tokenizer = SimpleNamespace(eos_token_id=2)
    with_list = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, 2]))
    assert eos_token_ids(with_list, tokenizer) == [2, 7]
    without = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None))
    assert eos_token_ids(without, tokenizer) == [2]
    assert eos_token_ids(SimpleNamespace(), SimpleNamespace(eos_token_id=None)) == []
