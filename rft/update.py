"""The update on one step's batch: partition, collate, fixed log-probs, the micro-batch loop, the step.

1. `partition`: the batch cut into mini-batches (one optimizer update each), each into this process's
   micro-batches (one forward/backward each); `collate` pads one micro-batch into tensors. Both pure.
2. Fixed log-probs: the old policy's (before this step's updates) and the reference's, no gradient.
3. The loss masks of the whole step (`rft.objective.loss_masks`).
4. For each iteration and mini-batch: its global normalisers, then per micro-batch the objective
   (computed once, `rft.objective.micro_batch_loss`) and its backward; then the grad norm and the
   optimizer step.

The step's metrics are kept as tensors and reduced once at the end (`rft.step_metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch.distributed.tensor import DTensor

from rft import algorithms, distributed, objective
from rft.batch import Batch
from rft.config import RecipeConfig
from rft.metrics import GRAD_NORM, LEARNING_RATE, LOSS, TIME_LOGPROBS
from rft.models import LogProbModel, reference_policy
from rft.step_metrics import Accumulator
from rft.timing import marked_timer

# This process's micro-batches (lists of sequence indices) of each mini-batch.
Partition = list[list[list[int]]]


@dataclass
class MicroBatch:
    """One forward/backward's padded tensors: b sequences, S the padded prompt + completion length,
    T the padded completion length."""

    input_ids: torch.Tensor  # [b, S] long
    attention_mask: torch.Tensor  # [b, S] long
    completion_start: torch.Tensor  # [b] where each completion starts in its row
    completion_lengths: torch.Tensor  # [b]
    mask: torch.Tensor  # [b, T] float, 1 on the completion tokens that count
    advantages: torch.Tensor  # [b]
    rollout_logp: torch.Tensor | None  # [b, T] the sampler's log-probs, 0 on padding
    # A stand-in with nothing to learn from, run so that this process joins every collective of the update.
    padding: bool = False
    # [b] the first row whose prompt equals each row's: each distinct prompt then runs once in the
    # forward (`rft.models.completion_logprobs`); None: every row runs its own prompt.
    prompt_rows: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> MicroBatch:
        moved = {name: value.to(device) if isinstance(value, torch.Tensor) else value
                 for name, value in vars(self).items()}
        return MicroBatch(**moved)


# The tokens a micro-batch of these sequence indices computes, padding included.
TokenCost = Callable[[list[int]], int]


def _micro_batches(
    share: list[int], micro_batch_size: int, max_tokens: int | None, cost: TokenCost | None
) -> list[list[int]]:
    """`share` cut in order into micro-batches of at most `micro_batch_size` sequences and, with a token
    budget, at most `max_tokens` tokens by `cost` (a sequence over the budget alone gets its own)."""
    micros: list[list[int]] = []
    for index in share:
        if micros and len(micros[-1]) < micro_batch_size and (
            max_tokens is None or cost is None or cost([*micros[-1], index]) <= max_tokens
        ):
            micros[-1].append(index)
        else:
            micros.append([index])
    return micros


def partition(
    size: int, *, mini_batches: int, micro_batch_size: int, process_index: int, processes: int,
    max_tokens: int | None = None, cost: TokenCost | None = None,
) -> Partition:
    """This process's micro-batches (one forward/backward each) of each mini-batch (one optimizer update).

    Mini-batches are cut from the global batch the same way in every process; each process takes
    its share of every mini-batch, of about equal tokens by `cost` (`balanced_shares`; of equal
    sequence counts without it). A micro-batch holds at most `micro_batch_size` sequences and, with
    `max_tokens`, at most that many tokens by `cost`, so that long and short sequences cost what they
    hold. Shares may hold different numbers of sequences (or, under dynamic sampling, none), so a
    process short of micro-batches gets padding ones (an empty index list): every
    process must run as many forward/backward passes as the others, since each pass holds
    collectives (DDP's gradient all-reduce and buffer broadcast, FSDP2 / ZeRO-3 parameter gathers).
    """
    per_mini = math.ceil(size / mini_batches)
    result = []
    for start in range(0, size, per_mini):
        mini = list(range(start, min(start + per_mini, size)))
        shares = (
            balanced_shares(mini, processes, cost) if cost is not None
            else [mini[distributed.process_share(len(mini), rank, processes)] for rank in range(processes)]
        )
        # Every process holds the global batch: each computes every process's count of passes.
        micros_of = [_micro_batches(share, micro_batch_size, max_tokens, cost) for share in shares]
        passes = max(len(micros) for micros in micros_of)
        micros = micros_of[process_index]
        result.append(micros + [[]] * (passes - len(micros)))
    return result


def balanced_shares(indices: list[int], processes: int, cost: TokenCost) -> list[list[int]]:
    """`indices` cut in order into `processes` shares of about equal tokens, each sequence counted alone
    by `cost`: a process given the long completions would keep the others waiting at every collective.

    Each cut falls where its share's tokens come closest to an equal split of what remains (a tie goes
    to the larger share): equal sequences split into counts that differ by at most one. The shares
    stay contiguous so that a group's sequences stay together and share their prompt.
    """
    sizes = [cost([index]) for index in indices]
    shares, start = [], 0
    for part in range(processes):
        remaining_parts, remaining = processes - part, sum(sizes[start:])
        end, total = start, 0
        # Take the next sequence while that brings the share closer to remaining / remaining_parts
        # (in integers: 2 * total + size <= 2 * remaining / remaining_parts); the last share takes the rest.
        while end < len(sizes) and (
            remaining_parts == 1 or (2 * total + sizes[end]) * remaining_parts <= 2 * remaining
        ):
            total += sizes[end]
            end += 1
        shares.append(indices[start:end])
        start = end
    return shares


def padded_tokens(batch: Batch, share_prompts: bool) -> TokenCost:
    """The tokens `collate` gives the forward of a micro-batch: each distinct prompt once (padded to the
    longest) and each completion (padded to the longest) when prompts are shared, else each row padded
    to the longest prompt + completion."""

    def cost(indices: list[int]) -> int:
        if not share_prompts:
            return len(indices) * max(len(batch.prompt_ids[i] + batch.completion_ids[i]) for i in indices)
        prompts = {tuple(batch.prompt_ids[i]) for i in indices}
        return (len(prompts) * max(len(p) for p in prompts)
                + len(indices) * max(len(batch.completion_ids[i]) for i in indices))

    return cost


def _pad(rows: list[list[float]], width: int, value: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=dtype)


def first_rows_with_same_prompt(prompts: list[list[int]]) -> torch.Tensor:
    """For each prompt, the position of the first equal one (a group's G rows point at its first)."""
    first: dict[tuple[int, ...], int] = {}
    return torch.tensor([first.setdefault(tuple(prompt), row) for row, prompt in enumerate(prompts)])


def collate(
    batch: Batch, indices: list[int], *, pad_token_id: int, mask_truncated: bool, share_prompts: bool = False
) -> MicroBatch:
    """The sequences `indices` of `batch` as one padded micro-batch (on the CPU); none: a padding one.

    `share_prompts`: mark the rows that share a prompt (`MicroBatch.prompt_rows`)."""
    if not indices:
        return padding_micro_batch(pad_token_id, with_rollout_logp=batch.rollout_logprobs is not None)
    sequences = [batch.prompt_ids[i] + batch.completion_ids[i] for i in indices]
    width = max(len(s) for s in sequences)
    lengths = [len(batch.completion_ids[i]) for i in indices]
    completion_width = max(lengths)
    # The model's tokens count; an agent environment's tokens (mask 0) are context only.
    model_tokens = ([[float(t) for t in batch.completion_masks[i]] for i in indices]
                    if batch.completion_masks is not None else [[1.0] * n for n in lengths])
    mask = _pad(model_tokens, completion_width, 0.0, torch.float32)
    if mask_truncated:
        mask = algorithms.truncation_mask(torch.tensor([batch.truncated[i] for i in indices]), mask)
    rollout_logp = None
    if batch.rollout_logprobs is not None:
        rows = [batch.rollout_logprobs[i] for i in indices]
        rollout_logp = _pad(rows, completion_width, 0.0, torch.float32)
    return MicroBatch(
        input_ids=_pad(sequences, width, pad_token_id, torch.long),
        attention_mask=_pad([[1] * len(s) for s in sequences], width, 0, torch.long),
        completion_start=torch.tensor([len(batch.prompt_ids[i]) for i in indices]),
        completion_lengths=torch.tensor(lengths),
        mask=mask, advantages=batch.advantages[indices], rollout_logp=rollout_logp,
        prompt_rows=first_rows_with_same_prompt([batch.prompt_ids[i] for i in indices]) if share_prompts
        else None,
    )


def padding_micro_batch(pad_token_id: int, *, with_rollout_logp: bool) -> MicroBatch:
    """One fully masked token: a forward/backward with zero loss and zero gradient."""
    zeros = torch.zeros((1, 1))
    return MicroBatch(
        input_ids=torch.full((1, 2), pad_token_id, dtype=torch.long),
        attention_mask=torch.ones((1, 2), dtype=torch.long),
        completion_start=torch.ones(1, dtype=torch.long),
        completion_lengths=torch.ones(1, dtype=torch.long),
        mask=zeros, advantages=torch.zeros(1), rollout_logp=zeros if with_rollout_logp else None,
        padding=True,
    )


def logprob_model(policy: torch.nn.Module, config: RecipeConfig) -> LogProbModel:
    """The log-prob computation around `policy` that the update runs (and `Accelerator.prepare` wraps)."""
    return LogProbModel(
        policy, temperature=config.rollout.temperature, chunk_size=config.training.logprob_chunk_size,
        entropy_grad=config.algorithm.entropy_coef != 0,
    )


def _logprobs(model: torch.nn.Module, micro: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    return model(
        micro.input_ids, micro.attention_mask, micro.completion_start, micro.completion_lengths,
        micro.prompt_rows,
    )


@dataclass
class FixedLogprobs:
    """Per micro-batch, computed once before the update (None where not needed)."""

    old: list[torch.Tensor | None]  # [b, T] the policy before this step's updates
    old_entropy: list[torch.Tensor | None]  # [b, T]
    reference: list[torch.Tensor | None]  # [b, T] the KL reference policy's


class Updater:
    """Runs the update of a step on the prepared model, its optimizer and scheduler (`update`)."""

    def __init__(
        self, config: RecipeConfig, accelerator: Accelerator, model: torch.nn.Module, policy: torch.nn.Module,
        reference: torch.nn.Module | None, optimizer: Any, scheduler: Any, pad_token_id: int,
    ):
        self.config, self.accelerator, self.model, self.policy = config, accelerator, model, policy
        self.reference, self.optimizer, self.scheduler = reference, optimizer, scheduler
        self.pad_token_id = pad_token_id
        # Each distinct prompt of a micro-batch computed once. Not under FSDP / ZeRO-3, whose
        # per-block parameter gathers expect one forward of each block per backward.
        self.share_prompts = config.training.share_prompts and not distributed.shards_parameters(accelerator)

    def partition(self, batch: Batch) -> Partition:
        """This process's micro-batches of each mini-batch of `batch`."""
        training, accelerator = self.config.training, self.accelerator
        return partition(
            len(batch), mini_batches=training.mini_batches, micro_batch_size=training.micro_batch_size,
            process_index=accelerator.process_index, processes=accelerator.num_processes,
            max_tokens=training.max_tokens_per_micro_batch, cost=padded_tokens(batch, self.share_prompts),
        )

    def update(self, batch: Batch) -> dict[str, float]:
        """`num_iterations` passes over the batch, one optimizer update per mini-batch; the step's metrics."""
        algorithm, accelerator = self.config.algorithm, self.accelerator
        # 1. partition and collate
        minis = self.partition(batch)
        micro_batches = [
            collate(
                batch, indices, pad_token_id=self.pad_token_id, mask_truncated=algorithm.mask_truncated,
                share_prompts=self.share_prompts,
            ).to(accelerator.device)
            for mini in minis for indices in mini
        ]
        # With one update per batch the policy that sampled is the one being updated: old log-probs
        # equal the current ones detached, so the extra forward pass is skipped.
        # (Unless the loss's mask depends on the sampling policy: see `objective.loss_masks`.)
        reuse_current = (algorithm.num_iterations == 1 and len(minis) == 1
                         and not objective.needs_sampling_policy_pass(algorithm))
        # 2. fixed log-probs
        timings: dict[str, float] = {}
        with marked_timer(TIME_LOGPROBS, timings):
            fixed = self._fixed_logprobs(micro_batches, reuse_current)
        # 3. the step's loss masks
        masks = objective.loss_masks(
            algorithm, accelerator, [m.mask for m in micro_batches], [m.rollout_logp for m in micro_batches],
            fixed.old,
            [None if m.padding else e for m, e in zip(micro_batches, fixed.old_entropy, strict=True)],
        )
        # 4. the updates. Parts of the step's metrics, kept as tensors and reduced once at the end.
        sums = Accumulator()
        for _ in range(algorithm.num_iterations):
            first = 0
            for mini in minis:
                positions = range(first, first + len(mini))
                self._mini_batch([micro_batches[i] for i in positions], [masks[i] for i in positions],
                                 positions, fixed, reuse_current, sums)
                first += len(mini)
        return {**timings, **sums.reduce(accelerator)}

    def _fixed_logprobs(self, micro_batches: list[MicroBatch], reuse_current: bool) -> FixedLogprobs:
        count = len(micro_batches)
        fixed = FixedLogprobs(old=[None] * count, old_entropy=[None] * count, reference=[None] * count)
        with torch.no_grad():
            for i, micro in enumerate(micro_batches):
                if not reuse_current:
                    fixed.old[i], fixed.old_entropy[i] = _logprobs(self.model, micro)
                if self.config.algorithm.beta <= 0:
                    continue
                with reference_policy(self.policy, self.reference) as reference:
                    # With LoRA the reference is the policy itself, adapter off: run it through the
                    # prepared module like every other forward.
                    model = self.model if reference is self.policy else reference
                    fixed.reference[i] = _logprobs(model, micro)[0]
        return fixed

    def _mini_batch(
        self, micros: list[MicroBatch], masks: list[torch.Tensor], positions: range, fixed: FixedLogprobs,
        reuse_current: bool, sums: Accumulator,
    ) -> None:
        """One optimizer update: every micro-batch's forward and backward, then the step."""
        accelerator = self.accelerator
        # The global normalisers of the whole mini-batch (all micro-batches, all processes): this
        # is what makes the loss independent of how the batch is split.
        norm = objective.normalizers(
            self.config.algorithm, accelerator,
            [mask for mask, micro in zip(masks, micros, strict=True) if not micro.padding],
        )
        update_loss = torch.zeros((), device=accelerator.device)
        for position, (micro, mask, index) in enumerate(zip(micros, masks, positions, strict=True)):
            with distributed.accumulate_gradients(accelerator, self.model, sync=position == len(micros) - 1):
                logp, entropy = _logprobs(self.model, micro)
                inputs = objective.MicroInputs(
                    mask=micro.mask, loss_mask=mask, advantages=micro.advantages, logp=logp, entropy=entropy,
                    old_logp=logp.detach() if reuse_current else fixed.old[index],  # type: ignore[arg-type]
                    rollout_logp=micro.rollout_logp, ref_logp=fixed.reference[index],
                )
                # Padding micro-batches too (with nothing counted): every process adds the same metrics.
                loss = objective.micro_batch_loss(
                    self.config.algorithm, inputs, norm, self.config.rollout.max_new_tokens, sums
                )
                # The loss is this micro-batch's share of the global loss, and DDP / FSDP2 / ZeRO-3
                # average gradients over processes: scaling by their number makes the result the
                # gradient of the global loss.
                accelerator.backward(loss * accelerator.num_processes)
            update_loss += loss.detach()
        self._step(update_loss, sums)

    def _step(self, update_loss: torch.Tensor, sums: Accumulator) -> None:
        """The grad norm (clipped when configured) and the optimizer and scheduler steps."""
        accelerator, max_grad_norm = self.accelerator, self.config.training.max_grad_norm
        if max_grad_norm is not None:
            grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), max_grad_norm)
        else:
            grad_norm = torch.sqrt(
                sum((p.grad.float() ** 2).sum() for p in self.model.parameters() if p.grad is not None)
            )
        if isinstance(grad_norm, DTensor):
            # FSDP2: the norm of sharded gradients is a DTensor, which the metrics' gather cannot send.
            grad_norm = grad_norm.full_tensor()
        # Each process holds its share of this update's loss: the shares add up to one update.
        sums.add(LOSS, update_loss, 1 / accelerator.num_processes)
        # Global and the same in every process (the mean over processes is the value). DeepSpeed
        # clips inside its engine and may report no norm.
        sums.add(GRAD_NORM, grad_norm if grad_norm is not None else math.nan, 1)
        sums.add(LEARNING_RATE, self.scheduler.get_last_lr()[0], 1)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
