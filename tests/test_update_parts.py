"""The update's pure parts (partition, collate), the metric kinds, the run log's cut-back and the step timer,
each with no model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rft.batch import Batch
from rft.config import ConfigError
from rft.metrics import Reduction, finish, pool, sample_std
from rft.runlog import LOG_NAMES, METRICS_NAME, check_logs, cut_back
from rft.timing import marked_timer
from rft.update import balanced_shares, collate, padded_tokens, partition


# ---------------------------------------------------------------- partition
def test_partition_one_process() -> None:
    # 9 sequences, 2 mini-batches of at most 5, micro-batches of 2.
    assert partition(9, mini_batches=2, micro_batch_size=2, process_index=0, processes=1) == [
        [[0, 1], [2, 3], [4]], [[5, 6], [7, 8]],
    ]


def test_partition_gives_every_process_as_many_passes() -> None:
    # One mini-batch of 5 over 2 processes: shares of 3 and 2, micro-batches of 2 -> 2 passes each,
    # the second process's last one a padding pass (an empty index list).
    shares = [partition(5, mini_batches=1, micro_batch_size=2, process_index=rank, processes=2)
              for rank in (0, 1)]
    assert shares == [[[[0, 1], [2]]], [[[3, 4], []]]]


def test_partition_pads_a_process_without_sequences() -> None:
    # 1 sequence over 2 processes: the second gets a padding pass (an empty index list).
    assert partition(1, mini_batches=1, micro_batch_size=4, process_index=0, processes=2) == [[[0]]]
    assert partition(1, mini_batches=1, micro_batch_size=4, process_index=1, processes=2) == [[[]]]
    # 5 sequences over 2 processes, micro-batches of 1: 3 passes for the first, 2 + 1 padding for the second.
    assert partition(5, mini_batches=1, micro_batch_size=1, process_index=1, processes=2) == [[[3], [4], []]]


def test_partition_under_a_token_budget() -> None:
    lengths = [4, 4, 4, 12, 2]

    def tokens(indices: list[int]) -> int:
        return sum(lengths[i] for i in indices)

    # At most 10 tokens and 4 rows; a sequence over the budget gets a micro-batch of its own.
    assert partition(5, mini_batches=1, micro_batch_size=4, process_index=0, processes=1, max_tokens=10,
                     cost=tokens) == [[[0, 1], [2], [3], [4]]]
    assert partition(5, mini_batches=1, micro_batch_size=1, process_index=0, processes=1, max_tokens=100,
                     cost=tokens) == [[[0], [1], [2], [3], [4]]]
    # Two processes: shares of equal tokens, [0, 1] and [2, 3, 4] (8 each), one pass each under a budget
    # of 8; equal row counts ([0, 1, 2] and [3, 4]) would have cost 2 passes each.
    lengths[3] = 2
    shares = [partition(5, mini_batches=1, micro_batch_size=4, process_index=rank, processes=2, max_tokens=8,
                        cost=tokens) for rank in (0, 1)]
    assert shares == [[[[0, 1]]], [[[2, 3, 4]]]]


@pytest.mark.parametrize(
    ("lengths", "processes", "expected"),
    [
        # Equal sequences split as equal counts (a tie to the larger share).
        ([3] * 5, 2, [[0, 1, 2], [3, 4]]),
        ([3] * 16, 2, [list(range(8)), list(range(8, 16))]),
        ([3] * 10, 3, [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]),
        # One long completion: its process takes fewer sequences (tokens 100 / 4 + 4 + ...).
        ([100, 1, 1, 1, 1], 2, [[0], [1, 2, 3, 4]]),
        ([1, 1, 1, 1, 100], 2, [[0, 1, 2, 3], [4]]),
        # Long and short groups of 4 over 2 processes: 4 x 10 + 4 x 1 = 44 tokens, 22 each at best.
        ([10, 10, 10, 10, 1, 1, 1, 1], 2, [[0, 1], [2, 3, 4, 5, 6, 7]]),
        # More processes than sequences: the last get nothing (padding passes).
        ([5, 5], 3, [[0], [1], []]),
        ([], 2, [[], []]),
    ],
)
def test_balanced_shares_split_tokens_evenly_in_order(
    lengths: list[int], processes: int, expected: list[list[int]]
) -> None:
    shares = balanced_shares(list(range(len(lengths))), processes, lambda rows: sum(lengths[i] for i in rows))
    assert shares == expected
    assert [index for share in shares for index in share] == list(range(len(lengths)))


def test_padded_tokens_counts_a_shared_prompt_once() -> None:
    batch = Batch(
        prompt_ids=[[1, 2], [1, 2], [7]], completion_ids=[[3, 4, 5], [6], [8, 9]], rollout_logprobs=None,
        truncated=[False] * 3, rewards=torch.zeros(3), advantages=torch.zeros(3),
    )
    assert padded_tokens(batch, share_prompts=False)([0, 1, 2]) == 3 * 5
    # Prompts [1, 2] and [7] padded to 2, three completions padded to 3.
    assert padded_tokens(batch, share_prompts=True)([0, 1, 2]) == 2 * 2 + 3 * 3
    assert padded_tokens(batch, share_prompts=True)([0, 1]) == 2 + 2 * 3


# ---------------------------------------------------------------- collate
def small_batch(rollout: bool = True) -> Batch:
    return Batch(
        prompt_ids=[[1, 2], [1]], completion_ids=[[3, 4, 5], [6]],
        rollout_logprobs=[[-0.1, -0.2, -0.3], [-0.4]] if rollout else None, truncated=[True, False],
        rewards=torch.tensor([1.0, 0.0], dtype=torch.float64), advantages=torch.tensor([0.5, -0.5]),
    )


def test_collate_pads_prompts_completions_and_log_probs() -> None:
    micro = collate(small_batch(), [0, 1], pad_token_id=0, mask_truncated=False)
    assert micro.input_ids.tolist() == [[1, 2, 3, 4, 5], [1, 6, 0, 0, 0]]
    assert micro.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert micro.completion_start.tolist() == [2, 1] and micro.completion_lengths.tolist() == [3, 1]
    assert micro.mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert micro.advantages.tolist() == [0.5, -0.5] and not micro.padding
    assert micro.rollout_logp is not None
    torch.testing.assert_close(micro.rollout_logp, torch.tensor([[-0.1, -0.2, -0.3], [-0.4, 0.0, 0.0]]))


def test_collate_drops_truncated_rows_under_overlong_filtering() -> None:
    micro = collate(small_batch(rollout=False), [1, 0], pad_token_id=9, mask_truncated=True)
    assert micro.mask.tolist() == [[1, 0, 0], [0, 0, 0]]
    assert micro.rollout_logp is None and micro.input_ids[0].tolist() == [1, 6, 9, 9, 9]


def test_collate_of_nothing_is_a_padding_pass() -> None:
    micro = collate(small_batch(), [], pad_token_id=7, mask_truncated=False)
    assert micro.padding and micro.input_ids.tolist() == [[7, 7]] and micro.mask.sum() == 0
    assert micro.rollout_logp is not None and micro.rollout_logp.shape == (1, 1)
    assert collate(small_batch(rollout=False), [], pad_token_id=7, mask_truncated=False).rollout_logp is None


# ---------------------------------------------------------------- the metric kinds
def test_pool_and_finish_each_kind() -> None:
    assert finish(Reduction.SUM, pool(Reduction.SUM, [2.0], [3.0])) == 5.0
    # A token-weighted mean: 1 of 4 tokens, then 3 of 4: 4 / 8.
    assert finish(Reduction.MEAN, pool(Reduction.MEAN, [1.0, 4.0], [3.0, 4.0])) == 0.5
    assert finish(Reduction.MEAN, [0.0, 0.0]) is None  # nothing counted: left out
    # The slowest process's time, the largest ratio:
    assert finish(Reduction.MAX, pool(Reduction.MAX, [2.0], [-math.inf])) == 2.0
    assert finish(Reduction.MIN, pool(Reduction.MIN, [-2.0], [1.0])) == -1.0  # MIN holds -min
    assert finish(Reduction.MAX, [-math.inf]) is None


def test_sample_std_is_bessel_corrected() -> None:
    values = [1.0, 2.0, 4.0]
    mean = sum(values) / 3
    expected = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    assert sample_std(3, sum(values), sum(v * v for v in values)) == pytest.approx(expected, rel=1e-12)
    assert sample_std(1, 5.0, 25.0) == 0.0 and sample_std(0, 0.0, 0.0) is None


# ---------------------------------------------------------------- the run log
def test_cut_back_keeps_the_rows_up_to_the_step_and_drops_a_torn_line(tmp_path: Path) -> None:
    rows = [{"step": step, "loss": step / 10} for step in (1, 2, 3)]
    (tmp_path / METRICS_NAME).write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"step": 4, "lo')
    notes = cut_back(tmp_path, 2)
    assert [json.loads(line) for line in (tmp_path / METRICS_NAME).read_text().splitlines()] == rows[:2]
    assert len(notes) == 1 and "torn last line" in notes[0]
    assert cut_back(tmp_path, 0) == [] and not any((tmp_path / name).exists() for name in LOG_NAMES)


def test_a_broken_line_before_the_last_is_refused(tmp_path: Path) -> None:
    (tmp_path / METRICS_NAME).write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(ConfigError, match=r"metrics.jsonl:2: not a JSON line"):
        check_logs(tmp_path)


# ---------------------------------------------------------------- the timer
def test_marked_timer_adds_up_a_phase_run_twice() -> None:
    timings: dict[str, float] = {}
    for _ in range(2):
        with marked_timer("time/x", timings):
            pass
    assert set(timings) == {"time/x"} and timings["time/x"] >= 0.0
    with pytest.raises(RuntimeError), marked_timer("time/y", timings):
        raise RuntimeError("the phase failed")
    assert "time/y" in timings
