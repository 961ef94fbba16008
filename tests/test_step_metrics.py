"""A step's metrics equal their definitions over the whole step, whatever the split into micro-batches,
dynamic-sampling rounds and processes; and the loss counts only the rows that have a counted token."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from rft import algorithms
from rft.batch import Batch
from rft.config import load_config
from rft.metrics import CLIP_REGION, COMPLETION_TOKENS, RATIO_MAX, Metric, Reduction
from rft.step_metrics import Accumulator, add_policy_stats, merged
from rft.trainer import Trainer
from tests.conftest import tiny_recipe

F64 = torch.float64

# ---------------------------------------------------------------- the accumulator, by hand


def test_clip_share_and_ratio_max_over_micro_batches_by_hand() -> None:
    # Micro-batch 1: one token, ratio 1.5 with A > 0: clipped. Micro-batch 2: three tokens, ratios
    # 1, 1.1, 0.9, none clipped. Over the step: 1 of 4 tokens clipped, max ratio 1.5. Averaging the
    # micro-batches' values instead would give 0.5 and 1.3.
    parts = [([[math.log(1.5)]], [1.0]), ([[0.0, math.log(1.1), math.log(0.9)]], [1.0])]
    sums = Accumulator()
    for log_ratio, advantages in parts:
        old = torch.zeros(1, len(log_ratio[0]), dtype=F64)
        logp = old + torch.tensor(log_ratio, dtype=F64)
        _, stats = algorithms.policy_loss(
            logp, old, torch.tensor(advantages, dtype=F64), torch.ones_like(old), eps_low=0.2, eps_high=0.2
        )
        add_policy_stats(sums, stats)
    result = sums.result()
    assert result[CLIP_REGION.name] == pytest.approx(1 / 4)
    assert result["clip/clip_high"] == pytest.approx(1 / 4)
    assert result["clip/clip_low"] == 0.0
    assert result[RATIO_MAX.name] == pytest.approx(1.5)
    assert result["policy/ratio_mean"] == pytest.approx((1.5 + 1 + 1.1 + 0.9) / 4)


def test_parts_combine_to_the_whole() -> None:
    values = [0.5, 2.0, -1.0, 3.5, 3.5, 0.0, 7.25]
    whole = Accumulator()
    whole.describe("x", values)
    parts = [Accumulator() for _ in range(3)]
    for part, chunk in zip(parts, [values[:1], values[1:5], values[5:]], strict=True):
        part.describe("x", chunk)
    empty = Accumulator()
    empty.describe("x", [])  # a part without values changes nothing
    combined = merged([*parts, empty]).result()
    assert combined == pytest.approx(whole.result(), rel=1e-12)
    # One convention: Bessel-corrected, as statistics.stdev.
    assert combined == pytest.approx(
        {"x/mean": statistics.fmean(values), "x/std": statistics.stdev(values), "x/min": -1.0, "x/max": 7.25}
    )


def test_counts_add_and_nothing_counted_is_left_out() -> None:
    errors = Metric("reward/r/errors", Reduction.SUM)
    share = Metric("clip/clip_low", Reduction.MEAN)
    low = Metric("x/min", Reduction.MIN)
    sums = Accumulator()
    sums.add(errors, 2)
    sums.add(errors, torch.tensor(3.0))
    sums.add(share, torch.tensor(0.0), torch.tensor(0.0))  # a micro-batch with no counted token
    sums.add(RATIO_MAX, torch.tensor(0.0), torch.tensor(0.0))
    sums.add(low, 4.0, 0)
    sums.add(COMPLETION_TOKENS, 5)
    assert sums.result() == {"reward/r/errors": 5.0, "completion/tokens": 5.0}
    sums.add(share, torch.tensor(1.0), torch.tensor(4.0))
    sums.add(low, -2.0, 3)
    sums.add(low, 1.0)
    assert sums.result()["clip/clip_low"] == 0.25 and sums.result()["x/min"] == -2.0
    with pytest.raises(ValueError, match="count"):
        sums.add(share, 1.0)
    with pytest.raises(ValueError, match="declared as sum and mean"):
        sums.add(Metric("reward/r/errors", Reduction.MEAN), 1.0, 1.0)


# ---------------------------------------------------------------- the update, on a fixed batch

LENGTHS = [5, 3, 6, 1, 4, 6, 2, 6, 5]  # max_new_tokens 6: three completions are truncated
MAX_NEW_TOKENS = 6
COMPARED_TOLERANCE = {"rel": 1e-4, "abs": 1e-6}


def fixed_batch(trainer: Trainer, keep: list[int]) -> Batch:
    gen = torch.Generator().manual_seed(0)
    prompts = [
        trainer.tokenizer(text)["input_ids"] for text in ("What is 2 + 3?", "Add 40 and 2.", "9 - 4 =")
    ]
    completion_ids, rollout_logprobs = [], []
    for length in LENGTHS:
        completion_ids.append(torch.randint(100, 20000, (length,), generator=gen).tolist())
        # About the random model's log-prob of a random token (-ln 49152), so that the rollout ratio varies.
        rollout_logprobs.append((-10.8 + 0.4 * torch.randn(length, generator=gen)).tolist())
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.5, 0.75, 1.0, -2.0, 0.5, 1.25])
    return Batch(
        prompt_ids=[prompts[i % 3] for i in keep], completion_ids=[completion_ids[i] for i in keep],
        rollout_logprobs=[rollout_logprobs[i] for i in keep],
        truncated=[LENGTHS[i] == MAX_NEW_TOKENS for i in keep], rewards=torch.zeros(len(keep)),
        advantages=advantages[keep],
    )


def update_once(
    model_dir: Path, run_dir: Path, micro_batch_size: int, keep: list[int], options: dict | None = None,
    training: dict | None = None,
) -> tuple[dict, list]:
    """The update's metrics and the gradient of its first optimizer update (before clipping)."""
    # Two updates on the batch: the second sees ratios away from 1, so the clip and ratio metrics move.
    algorithm = {"mask_truncated": True, "loss_agg": "seq-mean-token-mean", "num_iterations": 2, "beta": 0.04,
                 "tis_cap": 1.2, "eps_low": 0.2, "eps_high": 0.2, **(options or {})}
    if "rollout_correction" in algorithm:
        del algorithm["tis_cap"]
    recipe = tiny_recipe(
        model_dir, run_dir, algorithm=algorithm,
        rollout={"group_size": 3, "max_new_tokens": MAX_NEW_TOKENS},
        training={
            "micro_batch_size": micro_batch_size, "learning_rate": 0.05, "threads": 1, **(training or {})
        },
    )
    trainer = Trainer(load_config(raw=recipe))
    batch = fixed_batch(trainer, keep)
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    gradient: list[torch.Tensor] = []
    calls, last_of_first_update = 0, math.ceil(len(keep) / micro_batch_size) * len(trainable)

    def snapshot(_: torch.Tensor) -> None:
        # Each backward pass accumulates into every trainable parameter once: after the last one of the
        # first update's last micro-batch, its gradient is complete (clipping and the step come later).
        nonlocal calls
        calls += 1
        if calls == last_of_first_update:
            gradient.extend(p.grad.detach().clone() for p in trainable)

    handles = [p.register_post_accumulate_grad_hook(snapshot) for p in trainable]
    metrics = trainer.update(batch)
    for handle in handles:
        handle.remove()
    trainer.engine.close()
    return metrics, gradient


def compare_splits(model_dir: Path, tmp_path: Path, options: dict | None = None) -> dict:
    """Each split's metrics and first gradient against the whole batch's in one micro-batch; returns those."""
    everything = list(range(len(LENGTHS)))
    untruncated = [i for i, n in enumerate(LENGTHS) if n < MAX_NEW_TOKENS]
    runs = {
        "micro 1": update_once(model_dir, tmp_path / "a", 1, everything, options),
        "micro 4 (4 + 4 + 1)": update_once(model_dir, tmp_path / "b", 4, everything, options),
        # Overlong filtering removes the truncated samples: the same as never having them.
        "whole batch, truncated rows removed": update_once(
            model_dir, tmp_path / "d", 9, untruncated, options
        ),
    }
    reference, reference_gradient = update_once(model_dir, tmp_path / "c", 9, everything, options)
    compared = {key for key in reference if not key.startswith("time/")}
    scale = max(g.abs().max().item() for g in reference_gradient)
    assert scale > 0
    for label, (metrics, gradient) in runs.items():
        assert {key for key in metrics if not key.startswith("time/")} == compared, label
        for key in sorted(compared):
            assert metrics[key] == pytest.approx(reference[key], **COMPARED_TOLERANCE), f"{label}: {key}"
        assert len(gradient) == len(reference_gradient)
        for got, expected in zip(gradient, reference_gradient, strict=True):
            # Relative to the gradient's scale: summation order differs between the splits.
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale, msg=label)
    return reference


def test_update_metrics_and_gradient_do_not_depend_on_the_split(tiny_model_dir: Path, tmp_path: Path) -> None:
    reference = compare_splits(tiny_model_dir, tmp_path)
    # The example exercises what it tests: clipping, ratios and the rollout mismatch off 1.
    assert 0 < reference["clip/clip_region"] < 1
    assert reference["policy/ratio_max"] > 1.2 and reference["rollout/mismatch_ratio_max"] > 1.2
    assert 0 < reference["rollout/tis_capped_share"] < 1
    assert {"loss", "grad_norm", "entropy", "kl/old", "kl/ref", "policy/ratio_mean", "clip/clip_low",
            "rollout/kl"} <= set(reference)


@pytest.mark.parametrize(
    "options",
    [
        # CISPO with a token mask, the top 40% of the step's entropies and an entropy bonus.
        {"loss": "cispo", "cispo_eps_high": 0.1, "rollout_correction": "token_mask", "rollout_ratio_min": 0.7,
         "rollout_ratio_max": 1.3, "top_entropy_quantile": 0.4, "entropy_coef": 0.05},
        # SAPO with a mask on the sequence ratio and a bonus over a DAPO token mean.
        {"loss": "sapo", "rollout_correction": "sequence_mask", "rollout_ratio_max": 1.5,
         "entropy_coef": 0.05,
         "loss_agg": "token-mean"},
        # PPO-clip with a truncated geometric-mean ratio and only the top 20% of the step's entropies.
        {"rollout_correction": "geometric_truncate", "rollout_ratio_min": 0.9, "rollout_ratio_max": 1.05,
         "top_entropy_quantile": 0.2},
        {"rollout_correction": "icepop", "rollout_ratio_min": 0.8, "rollout_ratio_max": 1.25},
    ],
    ids=["cispo-token_mask-entropy", "sapo-sequence_mask-bonus", "geometric_truncate-entropy", "icepop"],
)
def test_new_options_do_not_depend_on_the_split(tiny_model_dir: Path, tmp_path: Path, options: dict) -> None:
    reference = compare_splits(tiny_model_dir, tmp_path, options)
    # The example exercises what it tests: each option acts on part of the batch, not on none or all of it.
    if "mask" in options["rollout_correction"] or options["rollout_correction"] == "icepop":
        assert 0 < reference["rollout/masked_share"] < 1
    else:
        assert 0 < reference["rollout/tis_capped_share"] < 1
    if options.get("top_entropy_quantile", 1.0) < 1:
        assert 0 < reference["entropy/kept_share"] < 1
    if options.get("loss") == "cispo":
        assert 0 < reference["clip/clip_region"] < 1
    assert reference["rollout/kl"] > 0


# ---------------------------------------------------------------- rounds and the std convention, end to end

ROUND_REWARDS = """
class Delayed:
    '''None for every completion of the first round (2 groups), then a reward that varies in a group.'''

    def __init__(self):
        self.calls = 0

    def __call__(self, completions, **_):
        self.calls += 1
        if self.calls <= 2:
            return [None] * len(completions)
        return [float(i) for i in range(len(completions))]


class Flaky:
    '''0 everywhere; raises on its 1st and 3rd calls (one in each round).'''

    def __init__(self):
        self.calls = 0

    def __call__(self, completions, **_):
        self.calls += 1
        if self.calls in (1, 3):
            raise RuntimeError("flaky")
        return [0.0] * len(completions)
"""


def _train(recipe: dict) -> list[dict]:
    trainer = Trainer(load_config(raw=recipe))
    trainer.train()
    return [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dynamic_sampling_rounds_add_counts_and_keep_late_rewards(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    rewards = tmp_path / "round_rewards.py"
    rewards.write_text(ROUND_REWARDS)
    recipe = tiny_recipe(
        tiny_model_dir, tmp_path / "run", algorithm={"dynamic_sampling": True, "max_gen_batches": 3},
        training={"steps": 1}, output={"log_completions": 0},
    )
    recipe["rewards"] = [{"fn": f"{rewards}:Delayed"}, {"fn": f"{rewards}:Flaky"}]
    recipe["scoring"] = {"on_error": "zero", "concurrency": 1}
    (row,) = _train(recipe)
    # Round 1: every total is 0, both groups are dropped; round 2: the delayed reward varies, both kept.
    assert row["dynamic_sampling/rounds"] == 2
    assert row["reward/Flaky/errors"] == 2  # one per round: counts add
    assert row["reward/Flaky/failures_total"] == 2
    # Present only in round 2 (4 + 4 completions of 16): kept, over the completions where it is present.
    assert row["reward/Delayed/none_share"] == 0.5
    assert row["reward/Delayed/mean"] == pytest.approx(1.5)  # 0, 1, 2, 3 in each group
    assert row["reward/Delayed/std"] == pytest.approx(statistics.stdev([0.0, 1, 2, 3] * 2))
    assert row["reward/failed_share"] == 0.0


def test_one_std_convention_in_a_row(tiny_model_dir: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(
        tiny_model_dir, tmp_path / "run", training={"steps": 1}, output={"log_completions": 8}
    )
    # one reward, weight 1: per-function, total and reward are one series
    recipe["rewards"] = recipe["rewards"][:1]
    (row,) = _train(recipe)
    completions = (tmp_path / "run" / "completions.jsonl").read_text().splitlines()
    rewards = [json.loads(line)["reward"] for line in completions]
    assert len(rewards) == 8 and len(set(rewards)) > 1
    expected = statistics.stdev(rewards)  # Bessel-corrected
    for key in ("reward/std", "reward/length_mod_three/std", "reward/total/std"):
        assert row[key] == pytest.approx(expected, rel=1e-9), key
