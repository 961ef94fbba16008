"""CISPO, SAPO, the rollout corrections (TIS, MIS, sequence and geometric, IcePop), top-entropy masking and
the entropy bonus, against values worked out by hand in float64 (plain `math`, not the code under test)."""

from __future__ import annotations

import math

import pytest
import torch

from rft.algorithms import (
    SurrogateSettings,
    aggregate_loss,
    policy_loss,
    rollout_correction,
    top_entropy_mask,
    top_entropy_threshold,
)
from rft.config import AlgorithmConfig, ConfigError, load_config
from rft.objective import MicroInputs, Normalizers, micro_batch_loss
from rft.step_metrics import Accumulator

F64 = torch.float64


def tensor(values: object) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def close(actual: torch.Tensor, expected: object) -> None:
    torch.testing.assert_close(actual, expected if isinstance(expected, torch.Tensor) else tensor(expected))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# Row 0: three counted tokens with ratios 1, 6, 0.5 (A = +1). Row 1: one token, ratio 0.2 (A = -2), then
# padding holding inf. Row 2: nothing counted (a fully masked row), inf everywhere.
LOGP = [[-1.0, -2.0, -0.7], [-0.5, math.inf], [math.inf, math.inf]]
RATIOS = [[1.0, 6.0, 0.5], [0.2, 1.0], [1.0, 1.0]]
MASK = [[1.0, 1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]
ADV = [1.0, -2.0, 0.5]


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    logp = tensor([row + [math.inf] * (3 - len(row)) for row in LOGP])
    ratios = [row + [1.0] * (3 - len(row)) for row in RATIOS]
    old = torch.where(torch.isinf(logp), logp, logp - tensor([[math.log(r) for r in row] for row in ratios]))
    mask = tensor([row + [0.0] * (3 - len(row)) for row in MASK])
    return logp.requires_grad_(), old, tensor(ADV), mask


def test_cispo_by_hand() -> None:
    logp, old, adv, mask = batch()
    per_token, stats = policy_loss(
        logp, old, adv, mask, eps_low=0.2, eps_high=0.28, loss="cispo",
        settings=SurrogateSettings(cispo_eps_high=4.0)
    )
    # l = -sg[min(r, 5)] A log pi; no floor by default (MiniMax-M1).
    close(per_token, [[1.0 * 1 * 1.0, 5.0 * 1 * 2.0, 0.5 * 1 * 0.7], [-(0.2 * 2 * 0.5), 0, 0], [0, 0, 0]])
    (grad,) = torch.autograd.grad(per_token.sum(), logp)
    # Every counted token keeps a gradient, -w A: the ratio-6 token too (PPO's clip would zero it).
    close(grad, [[-1.0, -5.0, -0.5], [0.4, 0.0, 0.0], [0.0, 0.0, 0.0]])
    close(stats["clip_high_tokens"], 1.0)
    close(stats["clip_low_tokens"], 0.0)
    # A floor at 1 - 0.6: the ratio-0.2 token's weight becomes 0.4, whatever the sign of its advantage.
    per_token, stats = policy_loss(
        logp, old, adv, mask, eps_low=0.2, eps_high=0.2, loss="cispo",
        settings=SurrogateSettings(cispo_eps_low=0.6, cispo_eps_high=None),
    )
    close(per_token[1, 0], -(0.4 * 2 * 0.5))
    close(per_token[0, 1], 6.0 * 2.0)
    close(stats["clip_low_tokens"], 1.0)
    close(stats["clip_region_tokens"], 1.0)


def test_sapo_by_hand() -> None:
    logp, old, adv, mask = batch()
    per_token, stats = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.2, loss="sapo")
    (grad,) = torch.autograd.grad(per_token.sum(), logp)
    expected_loss, expected_grad = [[0.0] * 3 for _ in range(3)], [[0.0] * 3 for _ in range(3)]
    for i, row in enumerate(RATIOS):
        tau = 1.0 if ADV[i] > 0 else 1.05
        for t, r in enumerate(row):
            if MASK[i][t]:
                gate = sigmoid(tau * (r - 1))
                expected_loss[i][t] = -gate * 4 / tau * ADV[i]
                # d/dlogp of -f(r) A with r = exp(logp - old): -4 gate (1 - gate) r A.
                expected_grad[i][t] = -4 * gate * (1 - gate) * r * ADV[i]
    close(per_token, expected_loss)
    close(grad, expected_grad)
    close(grad[0, 0], -1.0)  # at r = 1 the plain policy gradient, -A
    assert stats["clip_region_tokens"].item() == 0.0


@pytest.mark.parametrize("loss", ["ppo_clip", "cispo", "sapo"])
def test_an_all_equal_group_and_a_masked_row_give_nothing(loss: str) -> None:
    logp, old, _, mask = batch()
    per_token, stats = policy_loss(
        logp, old, torch.zeros(3, dtype=F64), mask, eps_low=0.2, eps_high=0.2, loss=loss
    )
    total = aggregate_loss(per_token, mask, loss_agg="seq-mean-token-mean", max_completion_length=3)
    (grad,) = torch.autograd.grad(total, logp)
    assert total.item() == 0.0 and (grad == 0).all()
    assert stats["tokens"].item() == 4.0
    # The fully masked row, alone: no NaN from its inf log-probs, no gradient, no counted token.
    per_token, stats = policy_loss(
        logp[2:], old[2:], tensor([1.0]), mask[2:], eps_low=0.2, eps_high=0.2, loss=loss
    )
    assert (per_token == 0).all() and stats["tokens"].item() == 0.0


def test_unknown_loss_and_delta_outside_ppo_clip_are_refused(tmp_path) -> None:
    logp, old, adv, mask = batch()
    with pytest.raises(ValueError, match="loss 'reinforce'"):
        policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.2, loss="reinforce")  # type: ignore[arg-type]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name_or_path: x}\ndata: {train: x.jsonl}\nrewards: [{fn: a:b}]\n"
                      "algorithm: {loss: sapo, delta: 4}\n")
    with pytest.raises(ConfigError, match="delta"):
        load_config(recipe)


# ---------------------------------------------------------------- rollout corrections

# Row 0: token log-ratios 0.1, -0.8, 1.5 and padding; row 1: one token, log 4; row 2: fully masked, inf.
DIFFS = [[0.1, -0.8, 1.5], [math.log(4.0)], []]


def mismatch_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    trainer = tensor([[-1.0, -2.0, -0.5, -3.0], [-0.3, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    diffs = tensor([row + [10.0] * (4 - len(row)) for row in DIFFS])
    rollout = trainer - diffs
    rollout[2] = math.inf
    mask = tensor([[1.0 if t < len(row) else 0.0 for t in range(4)] for row in DIFFS])
    return trainer, rollout, mask


def expected_weights(level: str) -> list[list[float]]:
    rows = []
    for row in DIFFS:
        if level == "token":
            values = [math.exp(x) for x in row]
        elif level == "sequence":
            values = [math.exp(sum(row))] * len(row)
        else:
            values = [math.exp(sum(row) / len(row))] * len(row) if row else []
        rows.append(values)
    return rows


@pytest.mark.parametrize(
    ("mode", "low", "high"),
    [
        ("token_truncate", None, 2.0), ("token_mask", 0.5, 2.0), ("sequence_truncate", 0.5, 3.0),
        ("sequence_mask", None, 3.0), ("sequence_mask", None, 5.0), ("geometric_truncate", None, 1.5),
        ("geometric_mask", None, 2.0), ("icepop", None, None), ("icepop", 0.3, None),
    ],
)
def test_rollout_corrections_by_hand(mode: str, low: float | None, high: float | None) -> None:
    trainer, rollout, mask = mismatch_batch()
    weights, kept, stats = rollout_correction(trainer, rollout, mask, mode=mode, low=low, high=high)
    level = mode.split("_")[0] if mode != "icepop" else "token"
    lo, hi = (0.5 if low is None else low, 5.0 if high is None else high) if mode == "icepop" else (low, high)
    masks = mode.endswith("_mask") or mode == "icepop"
    want_w, want_kept, outside = [], [], 0
    for row in expected_weights(level):
        w_row, k_row = [], []
        for rho in row:
            out = (lo is not None and rho < lo) or (hi is not None and rho > hi)
            outside += out
            if masks:
                w_row.append(0.0 if out else rho)
                k_row.append(not out)
            else:
                w_row.append(
                    min(max(rho, lo if lo is not None else -math.inf), hi if hi is not None else math.inf)
                )
                k_row.append(True)
        want_w.append(w_row + [0.0] * (4 - len(row)))
        want_kept.append(k_row + [False] * (4 - len(row)))
    close(weights, want_w)
    assert kept.tolist() == want_kept
    assert not weights.requires_grad
    close(stats["masked_tokens" if masks else "tis_capped_tokens"], float(outside))
    assert ("tis_capped_tokens" in stats) != masks
    close(stats["tokens"], 4.0)
    flat = [x for row in DIFFS for x in row]
    close(stats["rollout_kl_sum"], sum(math.expm1(x) - x for x in flat))
    close(stats["mismatch_ratio_max"], math.exp(1.5))


def test_rollout_correction_cases_by_hand() -> None:
    trainer, rollout, mask = mismatch_batch()
    # A sequence mask drops whole completions: row 0 (product e^0.8 = 2.23 > 2) and row 1 (4 > 2).
    _, kept, stats = rollout_correction(trainer, rollout, mask, mode="sequence_mask", low=None, high=2.0)
    assert not kept.any() and stats["masked_tokens"].item() == 4.0
    # The geometric mean of row 0 is e^(0.8 / 3) = 1.31: kept by a geometric mask where the product is not.
    _, kept, _ = rollout_correction(trainer, rollout, mask, mode="geometric_mask", low=None, high=2.0)
    assert kept.tolist()[0] == [True, True, True, False]
    # On policy nothing moves: weights 1 on the counted tokens, KL 0.
    weights, kept, stats = rollout_correction(trainer, trainer, mask, mode="token_mask", low=0.5, high=2.0)
    close(weights, mask)
    assert stats["rollout_kl_sum"].item() == 0.0 and stats["masked_tokens"].item() == 0.0
    for bad in [{"low": None, "high": None}, {"low": 3.0, "high": 2.0}]:
        with pytest.raises(ValueError, match="bound"):
            rollout_correction(trainer, rollout, mask, mode="token_mask", **bad)
    with pytest.raises(ValueError, match="upper bound"):
        rollout_correction(trainer, rollout, mask, mode="sequence_truncate", low=0.5, high=None)
    with pytest.raises(ValueError, match="'token_clip'"):
        rollout_correction(trainer, rollout, mask, mode="token_clip", low=None, high=2.0)  # type: ignore[arg-type]


def test_rollout_correction_config() -> None:
    assert AlgorithmConfig().rollout_settings is None  # off by default: see the field's description
    assert AlgorithmConfig(tis_cap=2.0).rollout_settings == ("token_truncate", None, 2.0)
    assert AlgorithmConfig(rollout_correction="icepop").rollout_settings == ("icepop", None, None)
    with pytest.raises(ValueError, match="needs rollout_ratio_max"):
        AlgorithmConfig(rollout_correction="sequence_mask")
    with pytest.raises(ValueError, match="needs rollout_ratio_max"):
        AlgorithmConfig(rollout_correction="sequence_truncate", rollout_ratio_min=0.5)
    with pytest.raises(ValueError, match="tis_cap and rollout_correction"):
        AlgorithmConfig(rollout_correction="icepop", tis_cap=2.0)


# ---------------------------------------------------------------- entropy


def test_top_entropy_threshold_by_hand() -> None:
    values = tensor([3.0, 0.5, 0.1, 2.0, 0.5])
    # rho = 0.2: the 0.8-quantile, position 0.8 * 4 = 3.2 between 2.0 and 3.0 of the sorted values: 2.2.
    close(top_entropy_threshold(values, 0.2), 2.2)
    close(top_entropy_threshold(values, 0.2), torch.quantile(values, 0.8))
    close(top_entropy_threshold(values, 1.0), 0.1)  # every token stays
    close(top_entropy_threshold(values, 0.0), 3.0)  # only the highest
    close(top_entropy_threshold(tensor([0.7] * 5), 0.2), 0.7)  # all equal: all stay
    close(top_entropy_threshold(tensor([0.7]), 0.2), 0.7)  # one token stays
    assert top_entropy_threshold(tensor([]), 0.2).item() == math.inf
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        top_entropy_threshold(values, 1.5)


def test_top_entropy_mask_keeps_counted_tokens_at_or_above() -> None:
    entropy = tensor([[3.0, 0.5, 2.2, 9.0], [0.1, 2.2, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    mask = tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    kept = top_entropy_mask(entropy, mask, 2.2)
    # >= keeps the ties; padding (9.0) and the fully masked row (5.0) never come back.
    assert kept.tolist() == [[True, False, True, False], [False, True, False, False], [False] * 4]


def test_entropy_bonus_is_a_token_mean_over_the_global_count() -> None:
    # GRPO's per-sequence mean for the policy term; the bonus is a token mean whatever loss_agg says.
    algorithm = AlgorithmConfig(entropy_coef=0.1, loss_agg="seq-mean-token-mean")
    logp = tensor([[-1.0, -2.0, -0.5], [-0.3, 0.0, 0.0]]).requires_grad_()
    entropy = tensor([[1.0, 2.0, 4.0], [3.0, 7.0, 7.0]]).requires_grad_()
    mask = tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    inputs = MicroInputs(mask=mask, loss_mask=mask.bool(), advantages=tensor([1.0, -1.0]), logp=logp,
                         entropy=entropy, old_logp=logp.detach(), rollout_logp=None, ref_logp=None)
    # This micro-batch holds part of a mini-batch of 4 sequences and 10 counted tokens.
    norm = Normalizers(policy=tensor(4.0), tokens=tensor(10.0))
    loss = micro_batch_loss(algorithm, inputs, norm, max_completion_length=3, sums=Accumulator())
    # On policy r = 1: the surrogate is -A per token; per-sequence means -1 and +1, over 4 sequences: 0.
    close(loss, 0.0 - 0.1 * (1.0 + 2.0 + 4.0 + 3.0) / 10.0)
    (grad,) = torch.autograd.grad(loss, entropy)
    close(grad, [[-0.01, -0.01, -0.01], [-0.01, 0.0, 0.0]])
