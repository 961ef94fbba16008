"""Rollouts with transformers `generate`, sampling from the training policy itself (no weight sync)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rft.rollout.base import RolloutOutput, SamplingSettings, eos_token_ids


def sampled_logprobs(step_scores: Sequence[torch.Tensor], new_tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of each generated token under its step's processed scores, shape (batch, steps).

    The same values as `compute_transition_scores(..., normalize_logits=True)` without beams, one
    step at a time: that function stacks every step's full-vocabulary scores and log-softmaxes the
    stack, two more (steps x batch x vocabulary) float32 copies beside the scores `generate` keeps
    (0.8 GB for 4 completions of 512 tokens over a 49k vocabulary).
    """
    columns = [
        torch.log_softmax(scores.float(), dim=-1).gather(1, new_tokens[:, step, None]).squeeze(1)
        for step, scores in enumerate(step_scores)
    ]
    return torch.stack(columns, dim=1)


def cut_at_eos(row: Sequence[int], eos_ids: set[int]) -> tuple[int, bool]:
    """The completion's length (through its first end-of-sequence token) and whether it ended."""
    for position, token in enumerate(row):
        if token in eos_ids:
            return position + 1, True
    return len(row), False


class TransformersEngine:
    """Samples with `model.generate` on left-padded prompt batches.

    The engine holds the trainer's own model, so `sync_weights` has nothing to do. Log-probs are
    those of the sampling distribution (after temperature / top-p / top-k), from
    `compute_transition_scores`.
    """

    name = "transformers"
    reads_policy = True
    tensor_parallel_size = 1

    def __init__(self, model: torch.nn.Module, tokenizer: Any, batch_size: int = 64):
        self.model = model
        self.weights_step = 0
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @torch.no_grad()
    def generate(
        self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingSettings
    ) -> RolloutOutput:
        expanded = [list(ids) for ids in prompt_ids for _ in range(n)]
        completions: list[list[int]] = []
        logprobs: list[list[float]] = []
        truncated: list[bool] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(expanded), self.batch_size):
                chunk = self._generate_chunk(expanded[start : start + self.batch_size], sampling)
                completions += chunk[0]
                logprobs += chunk[1]
                truncated += chunk[2]
        finally:
            self.model.train(was_training)
        return RolloutOutput(completion_ids=completions, logprobs=logprobs, truncated=truncated)

    def _generate_chunk(
        self, rows: list[list[int]], sampling: SamplingSettings
    ) -> tuple[list[list[int]], list[list[float]], list[bool]]:
        """One completion per row: its tokens, their log-probs, and whether it hit `max_new_tokens`."""
        eos_ids = eos_token_ids(self.model, self.tokenizer)
        ids, mask = self._left_pad(rows)
        generated = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not sampling.greedy,
            temperature=None if sampling.greedy else sampling.temperature,
            top_p=None if sampling.greedy else sampling.top_p,
            top_k=None if sampling.greedy else (sampling.top_k or 0),
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=eos_ids,
            return_dict_in_generate=True,
            output_scores=True,
        )
        new_tokens = generated.sequences[:, ids.shape[1] :]
        scores = sampled_logprobs(generated.scores, new_tokens)
        completions, logprobs, truncated = [], [], []
        for row, row_scores in zip(new_tokens.tolist(), scores.tolist(), strict=True):
            length, ended = cut_at_eos(row, set(eos_ids))
            completions.append(row[:length])
            logprobs.append(row_scores[:length])
            truncated.append(not ended)
        return completions, logprobs, truncated

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(row) for row in rows)
        pad = self.tokenizer.pad_token_id
        device = next(self.model.parameters()).device
        ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows], device=device)
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)
        return ids, mask

    def sync_weights(self, policy: torch.nn.Module, step: int | None = None) -> None:
        """Nothing to move: the engine samples from the policy object itself; the step is recorded."""
        if step is not None:
            self.weights_step = step

    def close(self) -> None:
        """Nothing to release."""
