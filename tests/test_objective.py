"""The objective (`rft.algorithms.objective`) against values worked out by hand, in float64, with no model."""

from __future__ import annotations

import math

import pytest
import torch

from rft.algorithms.objective import MicroInputs, Normalizers, ObjectiveSettings, objective, rollout_weights
from rft.config import AlgorithmConfig
from rft.objective import objective_settings

F64 = torch.float64


def tensor(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def close(actual: torch.Tensor | float, expected: float | list) -> None:
    torch.testing.assert_close(torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64),
                               rtol=1e-12, atol=1e-12)


# Row 0: ratios 1.5 (A = 1, clipped high at 1.2) and 1; row 1: ratio 1 (A = -1), then a padding token.
OLD = [[-1.0, -1.0], [-2.0, -2.0]]
MASK = [[1.0, 1.0], [1.0, 0.0]]


def ppo_inputs(ref: bool = True) -> tuple[MicroInputs, torch.Tensor]:
    logp = tensor([[-1.0 + math.log(1.5), -1.0], [-2.0, -2.0 + math.log(0.5)]]).requires_grad_()
    mask = tensor(MASK)
    inputs = MicroInputs(
        mask=mask, loss_mask=mask.bool(), advantages=tensor([1.0, -1.0]), logp=logp,
        entropy=tensor([[1.0, 2.0], [3.0, 9.0]]), old_logp=tensor(OLD), rollout_logp=None,
        ref_logp=tensor(OLD) if ref else None,
    )
    return inputs, logp


def test_clip_kl_and_a_global_token_mean_by_hand() -> None:
    settings = ObjectiveSettings(max_completion_length=2, beta=0.1, kl_estimator="k3", loss_agg="token-mean")
    inputs, logp = ppo_inputs()
    # The mini-batch holds 6 counted tokens in all: this micro-batch's 3 are divided by 6, not 3.
    result = objective(settings, inputs, Normalizers(policy=tensor(6.0), tokens=tensor(6.0)))
    # Surrogates: -min(1.5, 1.2) = -1.2, -1, +1. k3 of x = -ln 1.5 on the first token: 1/1.5 + ln 1.5 - 1.
    kl = 1 / 1.5 + math.log(1.5) - 1
    close(result.loss, (-1.2 - 1.0 + 1.0 + 0.1 * kl) / 6)
    (grad,) = torch.autograd.grad(result.loss, logp)
    # Clipped token: only the KL's gradient, beta * (1 - pi_ref / pi_theta); the others: -r A; padding: 0.
    close(grad, [[0.1 * (1 - 1 / 1.5) / 6, -1 / 6], [1 / 6, 0.0]])
    metrics = result.metrics
    close(metrics.policy["tokens"], 3.0)
    close(metrics.policy["clip_high_tokens"], 1.0)
    close(metrics.policy["clip_low_tokens"], 0.0)
    close(metrics.policy["ratio_sum"], 3.5)
    close(metrics.policy["ratio_max"], 1.5)
    close(metrics.tokens, 3.0)
    close(metrics.entropy_sum, 6.0)  # the padding token's 9 is not counted
    close(metrics.kl_ref_sum, kl)  # type: ignore[arg-type]
    close(metrics.kl_old_sum, kl)  # old = ref here
    assert metrics.mismatch is None and metrics.entropy_kept is None


def test_dr_grpo_divides_by_the_longest_completion_and_the_rows() -> None:
    settings = ObjectiveSettings(max_completion_length=4, loss_agg="seq-mean-token-sum-norm")
    inputs, _ = ppo_inputs(ref=False)
    result = objective(settings, inputs, Normalizers(policy=tensor(2.0), tokens=tensor(3.0)))
    # Per row: sum of the surrogates / 4; over the 2 rows of the batch.
    close(result.loss, ((-1.2 - 1.0) / 4 + 1.0 / 4) / 2)
    assert result.metrics.kl_ref_sum is None


def test_truncated_rollout_weights_multiply_the_surrogate() -> None:
    settings = ObjectiveSettings(
        max_completion_length=2, loss_agg="token-mean", rollout_correction="token_truncate", rollout_high=1.5
    )
    inputs, _ = ppo_inputs(ref=False)
    # The sampler's log-probs: trainer / rollout ratios 2 (capped at 1.5), 1 and 0.5 on the counted tokens.
    inputs.rollout_logp = tensor([[-1.0 - math.log(2.0), -1.0], [-2.0 + math.log(2.0), 5.0]])
    result = objective(settings, inputs, Normalizers(policy=tensor(3.0), tokens=tensor(3.0)))
    close(result.loss, (-1.2 * 1.5 - 1.0 * 1.0 + 1.0 * 0.5) / 3)
    mismatch = result.metrics.mismatch
    assert mismatch is not None
    close(mismatch["tis_capped_tokens"], 1.0)
    close(mismatch["mismatch_abs_sum"], 2 * math.log(2.0))
    close(mismatch["mismatch_ratio_max"], 2.0)


def test_icepop_masks_tokens_out_of_its_bounds() -> None:
    settings = ObjectiveSettings(max_completion_length=2, rollout_correction="icepop")
    old = tensor([[0.0, 0.0, 0.0]])
    # Ratios 1, 0.25 (below 0.5) and 8 (above 5).
    rollout = tensor([[0.0, math.log(4.0), -math.log(8.0)]])
    weights, kept, stats = rollout_weights(settings, old, rollout, torch.ones(1, 3, dtype=F64))
    assert kept.tolist() == [[True, False, False]]
    close(weights, [[1.0, 0.0, 0.0]])
    close(stats["masked_tokens"], 2.0)


def test_no_rollout_log_probs_no_correction_and_no_mismatch() -> None:
    settings = ObjectiveSettings(
        max_completion_length=2, rollout_correction="token_truncate", rollout_high=2.0
    )
    mask = tensor([[1.0, 0.0]])
    weights, kept, stats = rollout_weights(settings, tensor([[0.0, 0.0]]), None, mask)
    assert weights is None and stats is None and kept.tolist() == [[True, False]]


def test_objective_settings_from_the_recipe() -> None:
    algorithm = AlgorithmConfig(
        loss="cispo", cispo_eps_high=0.1, rollout_correction="sequence_mask", rollout_ratio_max=1.5,
        beta=0.04, top_entropy_quantile=0.5, entropy_coef=0.01, loss_agg="token-mean",
    )
    settings = objective_settings(algorithm, max_completion_length=64)
    assert settings.loss == "cispo" and settings.surrogate.cispo_eps_high == 0.1
    assert settings.rollout_correction == "sequence_mask"
    assert settings.rollout_high == 1.5 and settings.beta == 0.04 and settings.top_entropy
    assert settings.max_completion_length == 64 and settings.loss_agg == "token-mean"
    assert objective_settings(AlgorithmConfig(), 8).rollout_correction is None


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_the_shares_of_a_split_add_up_to_the_whole(loss_agg: str) -> None:
    settings = ObjectiveSettings(
        max_completion_length=2, beta=0.1, loss_agg=loss_agg, entropy_coef=0.05  # type: ignore[arg-type]
    )
    whole, _ = ppo_inputs()
    norm = Normalizers(
        policy={"token-mean": tensor(3.0), "seq-mean-token-mean": tensor(2.0),
                "seq-mean-token-sum-norm": tensor(2.0)}[loss_agg],
        tokens=tensor(3.0),
    )
    total = objective(settings, whole, norm).loss
    parts = []
    for row in (0, 1):
        part = MicroInputs(**{name: value[row : row + 1] if isinstance(value, torch.Tensor) else value
                              for name, value in vars(whole).items()})
        parts.append(objective(settings, part, norm).loss)
    close(sum(parts), total.item())
