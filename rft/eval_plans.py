"""What a held-out evaluation computes: its passes (`EvalPlan`) and the metadata fields it slices by.

A recipe asks for a `greedy` pass, a `sampled` one, or both (`eval_plans`); the first is the main
one, which feeds before / after, the monitors and the report. Slices are metadata fields whose values
tag prompts (`eval.slices`, or `auto`: fields that look like tags, not answers or free text). Both
are checked against the held-out rows before any model loads (`check_held_out`). Torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rft.config import EvalConfig, RecipeConfig
from rft.data import Example
from rft.sampling import SamplingSettings

# Auto slices: fields that look like tags, not answers or free text.
AUTO_SLICE_MAX_VALUES = 20
NOT_SLICE_FIELDS = frozenset(
    {"prompt", "messages", "reference_answer", "answer", "solution", "completion", "id"}
)


class EvalError(ValueError):
    """Bad evaluation input (a slice field on no row, a checkpoint folder without weights)."""


@dataclass(frozen=True)
class EvalPlan:
    """One evaluation pass: how to decode and what to compute."""

    mode: str  # "greedy" or "sampled"
    sampling: SamplingSettings
    samples_per_prompt: int
    pass_k: tuple[int, ...]
    pass_threshold: float
    exact_match: str | None
    seed: int
    batch_size: int
    keep_samples: int

    def settings(self) -> dict[str, Any]:
        """Everything that changes the scores (part of the baseline cache key and of every summary)."""
        settings = {
            "mode": self.mode, "sampling": self.sampling.__dict__,
            "samples_per_prompt": self.samples_per_prompt, "pass_k": list(self.pass_k),
            "pass_threshold": self.pass_threshold, "exact_match": self.exact_match,
            "keep_samples": self.keep_samples,
        }
        # Greedy decoding draws no random numbers: runs with other seeds score (and cache) the same.
        return settings if self.sampling.greedy else {**settings, "seed": self.seed}


def eval_plans(config: RecipeConfig) -> list[EvalPlan]:
    """The passes a recipe asks for, main one first (it feeds before/after, monitors and the report)."""
    evaluation, rollout = config.eval, config.rollout
    max_new_tokens = evaluation.max_new_tokens or rollout.max_new_tokens
    common: dict[str, Any] = dict(
        pass_threshold=evaluation.pass_threshold, exact_match=evaluation.exact_match,
        seed=config.training.seed, batch_size=evaluation.batch_size, keep_samples=evaluation.keep_samples,
    )
    sampled = EvalPlan(
        mode="sampled",
        sampling=rollout.sampling(max_new_tokens=max_new_tokens),
        samples_per_prompt=evaluation.samples_per_prompt, pass_k=tuple(evaluation.pass_k), **common,
    )
    if not evaluation.greedy:
        return [sampled]
    # Greedy decoding is deterministic: one completion per prompt says all there is.
    greedy = EvalPlan(
        mode="greedy", sampling=rollout.sampling(max_new_tokens=max_new_tokens, greedy=True),
        samples_per_prompt=1, pass_k=(), **common,
    )
    return [greedy, sampled] if evaluation.sampled else [greedy]


def tag_value(value: Any) -> str | None:
    """A metadata value as the slice key it files a prompt under (None: the prompt is in no slice)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return json.dumps(value, sort_keys=True, default=str)


def _looks_like_a_tag(examples: Sequence[Example], name: str) -> bool:
    values = [example.row.get(name) for example in examples]
    # Floats are measurements, not tags; lists and dicts are content.
    if not all(v is None or isinstance(v, str | int | bool) for v in values):
        return False
    distinct = {tag_value(v) for v in values if v is not None}
    return 2 <= len(distinct) <= AUTO_SLICE_MAX_VALUES and len(distinct) * 2 <= len(examples)


def resolve_slices(examples: Sequence[Example], slices: list[str] | str) -> list[str]:
    """The metadata fields to slice by: explicit ones must exist on some row; `auto` picks tag-like ones."""
    fields = sorted({key for example in examples for key in example.row})
    if slices != "auto":
        missing = [name for name in slices if name not in fields]
        if missing:
            raise EvalError(f"eval.slices: {missing} on no held-out row (rows have {fields})")
        return list(slices)
    return [name for name in fields if name not in NOT_SLICE_FIELDS and _looks_like_a_tag(examples, name)]


def check_held_out(examples: Sequence[Example], config: EvalConfig) -> list[str]:
    """Reject settings the held-out rows cannot serve (before any model loads); the slices to use."""
    if config.exact_match is not None:
        lacking = [example.source for example in examples if config.exact_match not in example.row]
        if lacking:
            raise EvalError(
                f"eval.exact_match: field {config.exact_match!r} missing on {len(lacking)} held-out row(s), "
                f"e.g. {lacking[0]}"
            )
    return resolve_slices(examples, config.slices)
