"""rft.algorithms against values worked out by hand or recomputed independently in float64.

The float64 references use plain Python (math, statistics, loops), not the code under test.
"""

from __future__ import annotations

import ast
import math
import random
import statistics
import sys
from pathlib import Path

import pytest
import torch

import rft.algorithms as algorithms
from rft.algorithms import (
    aggregate_loss,
    compute_advantages,
    kl_penalty,
    loss_normalizer,
    policy_loss,
    rollout_mismatch,
    soft_overlong_punishment,
    truncated_importance_weights,
    truncation_mask,
    zero_variance_groups,
)

F64 = torch.float64
VALID_ADVANTAGES = [
    ("grpo", "group"),
    ("grpo", "batch"),
    ("grpo", "none"),
    ("rloo", "group"),
    ("rloo", "batch"),
    ("rloo", "none"),
    ("dr_grpo", "none"),
]
AGGREGATIONS = ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]
LEVELS = ["token", "sequence"]


def tensor(values: object) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def close(actual: torch.Tensor, expected: object) -> None:
    torch.testing.assert_close(actual, expected if isinstance(expected, torch.Tensor) else tensor(expected))


def lengths_mask(lengths: list[int], width: int) -> torch.Tensor:
    return tensor([[1.0 if t < n else 0.0 for t in range(width)] for n in lengths])


# ---------------------------------------------------------------- package hygiene


def test_package_imports_only_torch_and_stdlib() -> None:
    allowed = set(sys.stdlib_module_names) | {"torch"}
    for path in Path(algorithms.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert set(roots) <= allowed, f"{path.name} imports {roots}"


def test_all_names_exported() -> None:
    for name in algorithms.__all__:
        assert hasattr(algorithms, name)


# ---------------------------------------------------------------- advantages


def test_grpo_group_by_hand() -> None:
    # mean 2, Bessel std 1
    close(
        compute_advantages(tensor([[1.0, 2.0, 3.0]]), estimator="grpo", scale="group"),
        [[-1 / 1.0001, 0.0, 1 / 1.0001]],
    )


def test_std_is_bessel_corrected() -> None:
    values = [1.0, 0.0, 0.0, 1.0, 1.0]
    advantages = compute_advantages(tensor([values]), estimator="grpo", scale="group", eps=0.0)
    mean = statistics.fmean(values)
    close(advantages, [[(v - mean) / statistics.stdev(values) for v in values]])
    population = tensor([[(v - mean) / statistics.pstdev(values) for v in values]])
    assert not torch.allclose(advantages, population)
    assert statistics.stdev(values) == pytest.approx(math.sqrt(0.3))  # 1.2 / (5 - 1)


def test_rloo_by_hand() -> None:
    rewards = tensor([[1.0, 2.0, 3.0, 6.0]])
    # baselines: 11/3, 10/3, 3, 2
    close(compute_advantages(rewards, estimator="rloo", scale="none"), [[-8 / 3, -4 / 3, 0.0, 4.0]])
    std = math.sqrt(14 / 3)  # deviations -2, -1, 0, 3 from the mean 3
    close(
        compute_advantages(rewards, estimator="rloo", scale="group"),
        [[a / (std + 1e-4) for a in (-8 / 3, -4 / 3, 0.0, 4.0)]],
    )


def test_batch_scale_by_hand() -> None:
    std = math.sqrt(5 / 3)  # rewards 0, 2, 1, 3: mean 1.5, squared deviations sum to 5
    assert statistics.stdev([0.0, 2.0, 1.0, 3.0]) == pytest.approx(std)
    a = 1 / (std + 1e-4)
    close(
        compute_advantages(tensor([[0.0, 2.0], [1.0, 3.0]]), estimator="grpo", scale="batch"),
        [[-a, a], [-a, a]],
    )
    # The zero-variance group still counts in the batch std (0, 2, 5, 5: variance 18 / 3) and gets 0 itself.
    b = 1 / (math.sqrt(6.0) + 1e-4)
    close(
        compute_advantages(tensor([[0.0, 2.0], [5.0, 5.0]]), estimator="grpo", scale="batch"),
        [[-b, b], [0.0, 0.0]],
    )


def test_dr_grpo_centres_without_dividing() -> None:
    close(
        compute_advantages(tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 4.0]]), estimator="dr_grpo", scale="none"),
        [[-1.0, 0.0, 1.0], [-4 / 3, -4 / 3, 8 / 3]],
    )
    for scale in ("group", "batch"):
        with pytest.raises(ValueError, match="dr_grpo"):
            compute_advantages(tensor([[1.0, 2.0]]), estimator="dr_grpo", scale=scale)


@pytest.mark.parametrize(("estimator", "scale"), VALID_ADVANTAGES)
@pytest.mark.parametrize("eps", [1e-4, 0.0])
def test_all_equal_group_gives_exact_zero(estimator: str, scale: str, eps: float) -> None:
    # 0.1 * 3 / 3 != 0.1 in floating point: the zeros must be set, not computed.
    rewards = tensor([[0.1, 0.1, 0.1], [0.7, 0.7, 0.7], [1.0, 0.0, 1.0]])
    advantages = compute_advantages(rewards, estimator=estimator, scale=scale, eps=eps)
    assert torch.isfinite(advantages).all()
    assert (advantages[:2] == 0).all()
    assert (advantages[2] != 0).all()
    everything_equal = compute_advantages(
        torch.ones(2, 4, dtype=F64), estimator=estimator, scale=scale, eps=eps
    )
    assert (everything_equal == 0).all()


@pytest.mark.parametrize(("estimator", "scale"), VALID_ADVANTAGES)
def test_group_size_one_gives_zero(estimator: str, scale: str) -> None:
    rewards = tensor([[3.0], [5.0], [-1.0]])
    advantages = compute_advantages(rewards, estimator=estimator, scale=scale)
    assert advantages.shape == (3, 1)
    assert (advantages == 0).all()
    assert zero_variance_groups(rewards).all()


@pytest.mark.parametrize(("estimator", "scale"), VALID_ADVANTAGES)
def test_advantages_match_float64_loops(estimator: str, scale: str) -> None:
    rng = random.Random(0)
    groups = [[rng.choice([0.0, 0.5, 1.0, 2.0]) + rng.random() for _ in range(5)] for _ in range(3)]
    groups.append([0.3] * 5)
    eps = 1e-4
    everything = [r for group in groups for r in group]
    expected = []
    for group in groups:
        size = len(group)
        row = []
        for reward in group:
            if len(set(group)) == 1:
                row.append(0.0)
                continue
            baseline = (
                (math.fsum(group) - reward) / (size - 1) if estimator == "rloo" else statistics.fmean(group)
            )
            divisor = {
                "group": statistics.stdev(group) + eps,
                "batch": statistics.stdev(everything) + eps,
                "none": 1.0,
            }
            row.append((reward - baseline) / divisor[scale])
        expected.append(row)
    close(compute_advantages(tensor(groups), estimator=estimator, scale=scale, eps=eps), expected)


def test_integer_rewards_and_bad_arguments() -> None:
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    advantages = compute_advantages(torch.tensor([[1, 0]]), estimator="grpo", scale="group")
    assert advantages.is_floating_point()
    torch.testing.assert_close(advantages, torch.tensor([[a, -a]]))
    with pytest.raises(ValueError, match="estimator"):
        compute_advantages(tensor([[1.0, 0.0]]), estimator="ppo", scale="group")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale"):
        compute_advantages(tensor([[1.0, 0.0]]), estimator="grpo", scale="token")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        compute_advantages(tensor([1.0, 0.0]), estimator="grpo", scale="group")


def test_zero_variance_groups() -> None:
    rewards = tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [2.0, 2.0, 2.0], [0.0, 0.0, 1e-9]])
    assert zero_variance_groups(rewards).tolist() == [True, False, True, False]


# ---------------------------------------------------------------- policy loss, worked by hand


def hand_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ratios [[1, 1.5, 0.5], [0.5, 1.5, padding]], advantages [1, -2]; the padding holds inf."""
    old = tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]])
    log_ratio = tensor([[0.0, math.log(1.5), math.log(0.5)], [math.log(0.5), math.log(1.5), 0.0]])
    logp = old + log_ratio
    logp[1, 2] = math.inf
    return logp.requires_grad_(), old, tensor([1.0, -2.0]), tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_token_loss_gradient_and_stats_by_hand() -> None:
    logp, old, advantages, mask = hand_batch()
    loss, stats = policy_loss(logp, old, advantages, mask, eps_low=0.2, eps_high=0.28)
    # row 0 (A = 1):  r = 1 -> -1;  r = 1.5 clipped to 1.28 -> -1.28;  r = 0.5 (below, A > 0: kept) -> -0.5
    # row 1 (A = -2): r = 0.5 clipped to 0.8 -> 1.6;  r = 1.5 (above, A < 0: kept) -> 3;  padding -> 0
    close(loss, [[-1.0, -1.28, -0.5], [1.6, 3.0, 0.0]])
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    # d/dlogp (-r A) = -A r where the unclipped term is active, 0 where the clip is.
    close(grad, [[-1.0, 0.0, -0.5], [0.0, 3.0, 0.0]])
    close(stats["tokens"], 5.0)
    close(stats["clip_low_tokens"], 1.0)
    close(stats["clip_high_tokens"], 1.0)
    close(stats["clip_region_tokens"], 2.0)
    close(stats["ratio_sum"], 5.0)  # 1 + 1.5 + 0.5 + 0.5 + 1.5
    close(stats["ratio_max"], 1.5)
    for value in stats.values():
        assert value.dim() == 0
        assert not value.requires_grad


def test_is_weights_scale_loss_and_gradient_as_constants() -> None:
    logp, old, advantages, mask = hand_batch()
    weights = tensor([[0.5, 2.0, 1.0], [1.0, 0.25, math.inf]]).requires_grad_()  # padding may hold anything
    loss, _ = policy_loss(logp, old, advantages, mask, eps_low=0.2, eps_high=0.28, is_weights=weights)
    close(loss, [[-0.5, -2.56, -0.5], [1.6, 0.75, 0.0]])
    loss.sum().backward()
    close(logp.grad, [[-0.5, 0.0, -0.5], [0.0, 0.75, 0.0]])
    assert weights.grad is None


@pytest.mark.parametrize("advantage", [-1.0, -2.5])
def test_dual_clip_bounds_negative_advantage_loss(advantage: float) -> None:
    old = tensor([[-12.0]])
    logp = (old + 10.0).requires_grad_()  # ratio e^10
    advantages, mask = tensor([advantage]), tensor([[1.0]])
    unbounded, _ = policy_loss(logp, old, advantages, mask, eps_low=0.2, eps_high=0.2)
    close(unbounded, [[math.exp(10.0) * -advantage]])
    bounded, _ = policy_loss(logp, old, advantages, mask, eps_low=0.2, eps_high=0.2, delta=4.0)
    close(bounded, [[4.0 * -advantage]])
    (grad,) = torch.autograd.grad(bounded.sum(), logp)
    close(grad, [[0.0]])


def test_dual_clip_leaves_other_tokens_alone() -> None:
    old = tensor([[0.0, 0.0]])
    logp = tensor([[10.0, math.log(2.0)]])
    for advantage, expected in ((1.0, [[-1.2, -1.2]]), (-1.0, [[4.0, 2.0]])):
        loss, _ = policy_loss(
            logp, old, tensor([advantage]), tensor([[1.0, 1.0]]), eps_low=0.2, eps_high=0.2, delta=4.0
        )
        close(loss, expected)


@pytest.mark.parametrize("level", LEVELS)
def test_one_token_completions(level: str) -> None:
    old = tensor([[-1.0, 0.0, 0.0], [-2.0, 0.0, 0.0]])
    logp = old.clone()
    logp[:, 0] += tensor([math.log(1.1), math.log(0.7)])
    logp[:, 1:] = -math.inf  # padding
    logp.requires_grad_()
    mask = tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    loss, stats = policy_loss(
        logp, old, tensor([1.0, -1.0]), mask, eps_low=0.2, eps_high=0.2, importance_sampling_level=level
    )
    # 1.1 inside the clip range; 0.7 with A < 0 clipped to 0.8
    close(loss, [[-1.1, 0.0, 0.0], [0.8, 0.0, 0.0]])
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    close(grad, [[-1.1, 0.0, 0.0], [0.0, 0.0, 0.0]])
    close(stats["clip_low_tokens"] / stats["tokens"], 0.5)
    close(stats["ratio_max"], 1.1)


@pytest.mark.parametrize("level", LEVELS)
def test_fully_masked_row_contributes_nothing(level: str) -> None:
    gen = torch.Generator().manual_seed(1)
    old = -torch.rand(3, 4, generator=gen, dtype=F64) - 0.5
    logp = old + 0.2 * torch.randn(3, 4, generator=gen, dtype=F64)
    logp[1] = tensor([math.inf, -math.inf, math.nan, 0.0])
    logp.requires_grad_()
    mask = lengths_mask([4, 0, 2], 4)
    advantages = tensor([0.7, -3.0, -1.2])
    loss, stats = policy_loss(
        logp, old, advantages, mask, eps_low=0.2, eps_high=0.28, importance_sampling_level=level
    )
    assert torch.isfinite(loss).all()
    assert (loss[1] == 0).all()
    kept, kept_stats = policy_loss(
        logp[[0, 2]],
        old[[0, 2]],
        advantages[[0, 2]],
        mask[[0, 2]],
        eps_low=0.2,
        eps_high=0.28,
        importance_sampling_level=level,
    )
    for agg in AGGREGATIONS:
        counts = {"normalizer": loss_normalizer(mask, loss_agg=agg), "max_completion_length": 4}
        total = aggregate_loss(loss, mask, loss_agg=agg, **counts)
        close(total, aggregate_loss(kept, mask[[0, 2]], loss_agg=agg, **counts))
        (grad,) = torch.autograd.grad(total, logp, retain_graph=True)
        assert torch.isfinite(grad).all()
        assert (grad[1] == 0).all()
    for name, value in kept_stats.items():
        close(stats[name], value)


def test_everything_masked_gives_zeros() -> None:
    logp = torch.zeros(2, 3, dtype=F64, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for level in LEVELS:
        loss, stats = policy_loss(
            logp,
            logp.detach() - 1,
            tensor([1.0, -1.0]),
            mask,
            eps_low=0.2,
            eps_high=0.2,
            importance_sampling_level=level,
        )
        assert (loss == 0).all()
        assert all(value.item() == 0 for value in stats.values())
        for agg in AGGREGATIONS:
            total = aggregate_loss(loss, mask, loss_agg=agg, normalizer=0, max_completion_length=3)
            assert total.item() == 0


def test_policy_loss_rejects_bad_shapes_and_level() -> None:
    logp, old, advantages, mask = hand_batch()
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, old, advantages[:, None].expand(2, 3), mask, eps_low=0.2, eps_high=0.2)
    with pytest.raises(ValueError, match="shape"):
        policy_loss(logp, old[:, :2], advantages, mask, eps_low=0.2, eps_high=0.2)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        policy_loss(logp, old, advantages, mask, eps_low=0.2, eps_high=0.2, importance_sampling_level="seq")  # type: ignore[arg-type]


# ---------------------------------------------------------------- policy loss against float64 loops


def random_batch(
    seed: int, lengths: list[int], width: int, spread: float = 0.3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(len(lengths), width, generator=gen, dtype=F64) * 3 - 0.1
    logp = (old + spread * torch.randn(len(lengths), width, generator=gen, dtype=F64)).requires_grad_()
    advantages = torch.randn(len(lengths), generator=gen, dtype=F64)
    return logp, old, advantages, lengths_mask(lengths, width)


def reference_token_loss(
    logp: list[list[float]],
    old: list[list[float]],
    advantages: list[float],
    mask: list[list[float]],
    eps_low: float,
    eps_high: float,
    delta: float | None,
    sequence: bool,
) -> tuple[list[list[float]], list[list[float]]]:
    """Per-token loss and its gradient w.r.t. logp, in plain Python from the formulas."""
    rows, grads = [], []
    for i in range(len(logp)):
        counted = [t for t in range(len(logp[i])) if mask[i][t]]
        a = advantages[i]
        seq_ratio = (
            math.exp(math.fsum(logp[i][t] - old[i][t] for t in counted) / len(counted)) if counted else 1.0
        )
        row, grad_row = [], []
        for t in range(len(logp[i])):
            if t not in counted:
                row.append(0.0)
                grad_row.append(0.0)
                continue
            r = seq_ratio if sequence else math.exp(logp[i][t] - old[i][t])
            unclipped = r if delta is None else min(r, delta)
            row.append(-min(unclipped * a, min(max(r, 1 - eps_low), 1 + eps_high) * a))
            clipped = (
                (r < 1 - eps_low and a < 0)
                or (r > 1 + eps_high and a > 0)
                or (delta is not None and r > delta)
            )
            # GSPO-token: d s_i,t / d logp_t = s_i, the same form as the token ratio's d r / d logp = r.
            grad_row.append(0.0 if clipped else -a * r)
        rows.append(row)
        grads.append(grad_row)
    return rows, grads


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("delta", [None, 1.3])
def test_policy_loss_matches_float64_loops(level: str, delta: float | None) -> None:
    logp, old, advantages, mask = random_batch(2, [5, 3, 1, 0, 4], 5, spread=0.6)
    # Sequence ratios sit closer to 1 than token ratios: a narrower range makes some of them clip.
    eps_low, eps_high = (0.2, 0.28) if level == "token" else (0.05, 0.08)
    loss, stats = policy_loss(
        logp,
        old,
        advantages,
        mask,
        eps_low=eps_low,
        eps_high=eps_high,
        delta=delta,
        importance_sampling_level=level,
    )
    expected, expected_grad = reference_token_loss(
        logp.tolist(),
        old.tolist(),
        advantages.tolist(),
        mask.tolist(),
        eps_low,
        eps_high,
        delta,
        level == "sequence",
    )
    close(loss, expected)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    close(grad, expected_grad)
    # the example does exercise both branches
    assert 0 < stats["clip_region_tokens"].item() < stats["tokens"].item()


# ---------------------------------------------------------------- GSPO


def test_gspo_ratio_is_geometric_mean_and_gradient_matches_gspo() -> None:
    lengths = [3, 2, 4]
    logp, old, _, mask = random_batch(3, lengths, 4, spread=0.1)
    advantages = tensor([0.8, -1.5, 0.4])
    loss, stats = policy_loss(
        logp, old, advantages, mask, eps_low=0.5, eps_high=0.5, importance_sampling_level="sequence"
    )
    geometric = [
        math.prod(math.exp(lp - o) for lp, o in zip(logp[i, :n].tolist(), old[i, :n].tolist(), strict=True))
        ** (1 / n)
        for i, n in enumerate(lengths)
    ]
    # Unclipped, every counted token carries -s_i A_i.
    close(
        loss,
        [
            [-geometric[i] * advantages[i].item() if t < n else 0.0 for t in range(4)]
            for i, n in enumerate(lengths)
        ],
    )
    close(stats["ratio_max"], max(geometric))
    close(stats["ratio_sum"], sum(s * n for s, n in zip(geometric, lengths, strict=True)))

    total = aggregate_loss(loss, mask, loss_agg="seq-mean-token-mean", max_completion_length=4)
    (grad,) = torch.autograd.grad(total, logp)
    # d/dlogp_t of 1/B sum_i -s_i A_i, with d s_i / d logp_t = s_i / |o_i|
    close(
        grad,
        [
            [-advantages[i].item() * geometric[i] / n / 3 if t < n else 0.0 for t in range(4)]
            for i, n in enumerate(lengths)
        ],
    )
    # The same gradient as GSPO's sequence objective written without stop-gradients.
    log_s = ((logp - old) * mask).sum(-1) / mask.sum(-1)
    (direct,) = torch.autograd.grad(-(torch.exp(log_s) * advantages).mean(), logp)
    close(grad, direct)


def test_gspo_clipped_sequences_get_zero_gradient() -> None:
    old = torch.full((4, 3), -1.0, dtype=F64)
    log_ratio = tensor([[0.03, 0.0, 0.0], [-0.01, -0.01, 0.0], [0.01, 0.01, 0.0], [0.02, -0.02, 0.0]])
    logp = (old + log_ratio).requires_grad_()
    mask = lengths_mask([3, 2, 2, 2], 3)
    advantages = tensor([1.0, -1.0, -1.0, 1.0])
    loss, stats = policy_loss(
        logp, old, advantages, mask, eps_low=3e-4, eps_high=4e-4, importance_sampling_level="sequence"
    )
    total = aggregate_loss(loss, mask, loss_agg="seq-mean-token-mean", max_completion_length=3)
    (grad,) = torch.autograd.grad(total, logp)
    # row 0: s = e^0.01 > 1 + 4e-4 with A > 0, clipped; row 1: s = e^-0.01 < 1 - 3e-4 with A < 0, clipped
    close(loss[0], [-(1 + 4e-4)] * 3)
    close(loss[1], [1 - 3e-4, 1 - 3e-4, 0.0])
    assert (grad[:2] == 0).all()
    # row 2: s = e^0.01 with A < 0, unclipped; row 3: s = 1, inside the range
    close(grad[2], [math.exp(0.01) / 2 / 4, math.exp(0.01) / 2 / 4, 0.0])
    close(grad[3], [-1 / 2 / 4, -1 / 2 / 4, 0.0])
    close(stats["tokens"], 9.0)
    close(stats["clip_high_tokens"], 3.0)
    close(stats["clip_low_tokens"], 2.0)
    close(stats["clip_region_tokens"], 5.0)


# ---------------------------------------------------------------- aggregation


def test_aggregations_by_hand() -> None:
    # Masked positions hold junk (a KL term, say) that must be ignored.
    loss = tensor([[1.0, 2.0, 3.0, 100.0], [4.0, math.inf, 0.0, 0.0]])
    mask = tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    counts = {"max_completion_length": 4}
    close(aggregate_loss(loss, mask, loss_agg="seq-mean-token-mean", **counts), (6 / 3 + 4 / 1) / 2)
    close(aggregate_loss(loss, mask, loss_agg="token-mean", **counts), 10 / 4)
    close(aggregate_loss(loss, mask, loss_agg="seq-mean-token-sum-norm", **counts), (6 / 4 + 4 / 4) / 2)
    with pytest.raises(ValueError, match="loss_agg"):
        aggregate_loss(loss, mask, loss_agg="sum", **counts)  # type: ignore[arg-type]


def test_seq_mean_leaves_out_rows_without_a_counted_token_by_hand() -> None:
    # Row 1 is fully masked (overlong filtering): not a sample. Row 0: r = 1, A = 1 -> -1 per token.
    logp = tensor([[-1.0, -2.0], [-1.5, 0.0]]).requires_grad_()
    mask = tensor([[1.0, 1.0], [0.0, 0.0]])
    loss, _ = policy_loss(logp, logp.detach(), tensor([1.0, 0.5]), mask, eps_low=0.2, eps_high=0.2)
    close(loss_normalizer(mask, loss_agg="seq-mean-token-mean"), 1.0)
    total = aggregate_loss(loss, mask, loss_agg="seq-mean-token-mean", max_completion_length=2)
    close(total, -1.0)  # counting the masked row would halve it: -0.5
    (grad,) = torch.autograd.grad(total, logp)
    close(grad, [[-0.5, -0.5], [0.0, 0.0]])
    # The other aggregations: token-mean over the 2 counted tokens, Dr. GRPO over both rows.
    close(loss_normalizer(mask, loss_agg="token-mean"), 2.0)
    close(loss_normalizer(mask, loss_agg="seq-mean-token-sum-norm"), 2.0)
    close(aggregate_loss(loss, mask, loss_agg="seq-mean-token-sum-norm", max_completion_length=2), -0.5)


def test_loss_normalizers_add_over_micro_batches() -> None:
    mask = lengths_mask([3, 0, 2, 0, 1], 3)
    for agg, expected in zip(AGGREGATIONS, [3.0, 6.0, 5.0], strict=True):
        whole = loss_normalizer(mask, loss_agg=agg)
        close(whole, expected)
        assert whole.dtype == F64
        close(sum(loss_normalizer(mask[rows], loss_agg=agg) for rows in torch.arange(5).split(2)), whole)
    with pytest.raises(ValueError, match="loss_agg"):
        loss_normalizer(mask, loss_agg="sum")  # type: ignore[arg-type]


def reference_aggregate(values: list[list[float]], mask: list[list[float]], agg: str, max_len: int) -> float:
    sums = [
        math.fsum(v for v, m in zip(row, mrow, strict=True) if m)
        for row, mrow in zip(values, mask, strict=True)
    ]
    counts = [sum(mrow) for mrow in mask]
    if agg == "token-mean":
        return math.fsum(sums) / sum(counts)
    if agg == "seq-mean-token-mean":  # over the rows with a counted token
        return math.fsum(s / n for s, n in zip(sums, counts, strict=True) if n) / sum(1 for n in counts if n)
    return math.fsum(s / max_len for s in sums) / len(values)


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("level", LEVELS)
def test_micro_batches_sum_to_the_full_batch(agg: str, level: str) -> None:
    lengths, width = [6, 1, 0, 4, 3, 6, 2, 5], 6
    logp, old, advantages, mask = random_batch(4, lengths, width)
    kwargs = {"eps_low": 0.2, "eps_high": 0.28, "importance_sampling_level": level}
    counts = {"normalizer": loss_normalizer(mask, loss_agg=agg), "max_completion_length": width}

    loss, _ = policy_loss(logp, old, advantages, mask, **kwargs)
    full = aggregate_loss(loss, mask, loss_agg=agg, **counts)
    close(full, reference_aggregate(loss.tolist(), mask.tolist(), agg, width))
    (full_grad,) = torch.autograd.grad(full, logp)

    leaf = logp.detach().clone().requires_grad_()
    total, naive = 0.0, 0.0
    for rows in torch.arange(len(lengths)).split(2):
        part, _ = policy_loss(leaf[rows], old[rows], advantages[rows], mask[rows], **kwargs)
        micro = aggregate_loss(part, mask[rows], loss_agg=agg, **counts)
        micro.backward()
        total += micro.item()
        naive += part.sum().item() / mask[rows].sum().item() / 4
    assert total == pytest.approx(full.item(), rel=1e-12, abs=1e-12)
    close(leaf.grad, full_grad)
    if agg == "token-mean":
        # What per-micro-batch counts would give instead: a different loss.
        assert naive != pytest.approx(full.item(), rel=1e-3)


# ---------------------------------------------------------------- KL


def test_kl_estimators_by_hand() -> None:
    logp = tensor([-1.0, -2.0, -0.5])
    ref = tensor([-1.5, -2.0, 0.5])  # ref - logp = -0.5, 0, 1
    close(kl_penalty(logp, ref, "k1"), [0.5, 0.0, -1.0])
    close(kl_penalty(logp, ref, "k2"), [0.125, 0.0, 0.5])
    close(kl_penalty(logp, ref, "k3"), [0.10653065971263342, 0.0, 0.7182818284590451])  # e^-0.5 - 0.5, e - 2
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logp, ref, "k4")  # type: ignore[arg-type]


def test_kl_estimators_match_float64_loops_and_k3_is_nonnegative() -> None:
    gen = torch.Generator().manual_seed(5)
    logp = (-3 * torch.rand(4, 6, generator=gen, dtype=F64)).requires_grad_()
    ref = -3 * torch.rand(4, 6, generator=gen, dtype=F64)
    pairs = list(zip(logp.flatten().tolist(), ref.flatten().tolist(), strict=True))
    references = {
        "k1": [lp - r for lp, r in pairs],
        "k2": [0.5 * (lp - r) ** 2 for lp, r in pairs],
        "k3": [math.exp(r - lp) - (r - lp) - 1 for lp, r in pairs],
    }
    for name, expected in references.items():
        close(kl_penalty(logp, ref, name).flatten(), expected)
    k3 = kl_penalty(logp, ref, "k3")
    assert (k3 >= 0).all()
    assert (kl_penalty(ref, ref, "k3") == 0).all()
    (grad,) = torch.autograd.grad(k3.sum(), logp)
    close(grad.flatten(), [1 - math.exp(r - lp) for lp, r in pairs])  # d/dlogp of e^(r - lp) - (r - lp) - 1


# ---------------------------------------------------------------- overlong


def test_soft_overlong_small_by_hand() -> None:
    # L_max 10, L_cache 4: free up to 6, then -1/4 per token, -1 beyond 10
    close(
        soft_overlong_punishment(tensor([0, 6, 7, 8, 10, 11, 50]), max_length=10, cache_length=4),
        [0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0],
    )


def test_soft_overlong_paper_values() -> None:
    lengths = torch.tensor([[100, 16384, 16385], [18432, 20480, 20481]])
    penalty = soft_overlong_punishment(lengths, max_length=20480, cache_length=4096)
    assert penalty.is_floating_point()
    assert penalty.shape == lengths.shape
    torch.testing.assert_close(penalty, torch.tensor([[0.0, 0.0, -1 / 4096], [-0.5, -1.0, -1.0]]))
    for cache_length in (0, 20481):
        with pytest.raises(ValueError, match="cache_length"):
            soft_overlong_punishment(lengths, max_length=20480, cache_length=cache_length)


@pytest.mark.parametrize("dtype", [F64, torch.bool])
def test_truncation_mask(dtype: torch.dtype) -> None:
    mask = tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]).to(dtype)
    before = mask.clone()
    filtered = truncation_mask(torch.tensor([False, True, False]), mask)
    assert filtered.dtype == dtype
    assert filtered.tolist() == tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]).to(dtype).tolist()
    assert torch.equal(mask, before)
    with pytest.raises(ValueError, match="truncated"):
        truncation_mask(torch.tensor([True]), mask)


def test_truncated_rows_leave_the_loss() -> None:
    logp, old, advantages, mask = random_batch(6, [3, 4, 2], 4)
    filtered = truncation_mask(torch.tensor([False, True, False]), mask)
    loss, _ = policy_loss(logp, old, advantages, filtered, eps_low=0.2, eps_high=0.28)
    total = aggregate_loss(loss, filtered, loss_agg="token-mean", max_completion_length=4)
    kept, _ = policy_loss(
        logp[[0, 2]], old[[0, 2]], advantages[[0, 2]], mask[[0, 2]], eps_low=0.2, eps_high=0.28
    )
    close(total, kept.sum() / 5)
    (grad,) = torch.autograd.grad(total, logp)
    assert (grad[1] == 0).all()


# ---------------------------------------------------------------- off-policy


def test_truncated_importance_weights_by_hand() -> None:
    trainer = tensor([[-1.0, -2.0, -0.5, -3.0], [0.0, 0.0, 0.0, 0.0]]).requires_grad_()
    rollout = trainer.detach() - tensor([[0.1, -0.2, 1.5, 10.0], [0.0, 0.0, 0.0, 0.0]])
    rollout[1] = math.inf
    mask = tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    weights, stats = truncated_importance_weights(trainer, rollout, mask, cap=2.0)
    close(weights, [[math.exp(0.1), math.exp(-0.2), 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert not weights.requires_grad
    close(stats["tokens"], 3.0)
    close(stats["mismatch_abs_sum"], 0.1 + 0.2 + 1.5)
    close(stats["mismatch_ratio_max"], math.exp(1.5))  # before capping; the masked 10 is ignored
    close(stats["tis_capped_tokens"], 1.0)
    mismatch = rollout_mismatch(trainer, rollout, mask)
    assert mismatch.keys() == {"tokens", "mismatch_abs_sum", "mismatch_ratio_max", "rollout_kl_sum"}
    close(stats["rollout_kl_sum"], sum(math.expm1(x) - x for x in (0.1, -0.2, 1.5)))
    for name, value in mismatch.items():
        close(value, stats[name])
    # A ratio equal to the cap is not counted as capped.
    _, on_policy = truncated_importance_weights(trainer, trainer.detach(), mask, cap=1.0)
    close(on_policy["tis_capped_tokens"], 0.0)
    with pytest.raises(ValueError, match="cap"):
        truncated_importance_weights(trainer, rollout, mask, cap=0.0)


def test_mismatch_stats_with_nothing_counted() -> None:
    logp = torch.zeros(2, 3, dtype=F64)
    _, stats = truncated_importance_weights(logp, logp - 1, torch.zeros(2, 3), cap=2.0)
    assert all(value.item() == 0 for value in stats.values())
