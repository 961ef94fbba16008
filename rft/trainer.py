"""The training loop: rollout -> score -> advantages -> update -> log -> checkpoint.

Read `Trainer.train` top to bottom; the maths lives in `rft.algorithms`, sampling in
`rft.rollout`, rewards in `rft.scoring`.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from rft import algorithms, distributed
from rft.checkpoint import (
    TrainerState,
    list_checkpoints,
    load_policy_weights,
    load_training_state,
    save_checkpoint,
    save_policy,
)
from rft.config import ConfigError, RecipeConfig, dump_config
from rft.data import Example, PromptSampler, load_splits
from rft.evaluation import (
    EvalResult,
    baseline_results,
    check_held_out,
    compare,
    decode_completions,
    eval_plans,
    run_plans,
)
from rft.log_lines import held_out_line, step_line
from rft.manifest import build_manifest, read_manifest, record_evaluation, write_manifest
from rft.models import LogProbModel, load_policy, reference_policy
from rft.monitors import ALERTS_NAME, Monitors
from rft.report import write_report
from rft.rollout import make_engine, require_vllm
from rft.rollout.base import SamplingSettings
from rft.scoring import RewardScorer
from rft.tracking import check_trackers, start_trackers

logger = logging.getLogger(__name__)


@dataclass
class Batch:
    """A step's training sequences, in group order (G consecutive sequences share a prompt)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    rollout_logprobs: list[list[float]] | None
    truncated: list[bool]
    rewards: torch.Tensor
    advantages: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.completion_ids)


@dataclass
class MicroBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_start: torch.Tensor
    completion_lengths: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    rollout_logp: torch.Tensor | None
    # A stand-in with nothing to learn from, run so that this process joins every collective of the update.
    padding: bool = False


def _pad(rows: list[list[float]], width: int, value: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=dtype)


def _stats(prefix: str, values: torch.Tensor) -> dict[str, float]:
    values = values.float()
    return {
        f"{prefix}/mean": values.mean().item(),
        f"{prefix}/std": values.std().item() if values.numel() > 1 else 0.0,
        f"{prefix}/min": values.min().item(),
        f"{prefix}/max": values.max().item(),
    }


def _pool_metrics(parts: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    """Per-process reward metrics over `n` completions each, combined as if computed on all of them.

    By the scorer's naming: a `.../mean` or `..._share` is weighted by the values it averaged (a
    reward's `none_share` says how many of the `n` were present); a `.../std` (population, as the
    scorer computes it) is pooled from the parts' means and stds; a `time/...` is the slowest
    process's; anything else is a count (errors, timeouts, a reward's counters) and adds up.
    """
    def weight(part: dict[str, float], n: int, key: str) -> float:
        prefix = key.rsplit("/", 1)[0]
        if key.endswith("/none_share") or f"{prefix}/none_share" not in part:
            return float(n)
        return n * (1 - part[f"{prefix}/none_share"])

    pooled: dict[str, float] = {}
    for key in sorted({key for part, _ in parts for key in part}):
        present = [(part, weight(part, n, key)) for part, n in parts if key in part]
        prefix = key.rsplit("/", 1)[0]
        total = sum(w for _, w in present)
        if key.startswith("time/"):
            pooled[key] = max(part[key] for part, _ in present)
        elif not (key.endswith(("/mean", "/std", "_share"))):
            pooled[key] = sum(part[key] for part, _ in present)
        elif total == 0:
            pooled[key] = present[0][0][key]
        elif key.endswith("/std") and all(f"{prefix}/mean" in part for part, _ in present):
            mean = sum(w * part[f"{prefix}/mean"] for part, w in present) / total
            second_moment = sum(w * (part[key] ** 2 + part[f"{prefix}/mean"] ** 2) for part, w in present) / total
            pooled[key] = math.sqrt(max(0.0, second_moment - mean**2))
        else:
            pooled[key] = sum(w * part[key] for part, w in present) / total
    return pooled


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Trainer:
    def __init__(self, config: RecipeConfig, resume: bool | str = False):
        self.config = config
        if config.rollout.engine == "vllm":
            require_vllm()  # a missing extra fails in one line, before any model loads
        check_trackers(config.output.trackers)
        self.accelerator = distributed.make_accelerator(
            log_with=config.output.trackers or None, project_dir=str(config.run_dir / "trackers")
        )
        if config.training.prompts_per_step < self.accelerator.num_processes:
            raise ConfigError(
                f"training.prompts_per_step ({config.training.prompts_per_step}) is below the number of processes "
                f"({self.accelerator.num_processes}): every process generates at least one group"
            )
        if config.training.threads:
            torch.set_num_threads(config.training.threads)
        set_seed(config.training.seed)
        self.run_dir = config.run_dir
        # Rewards and data are checked before the model loads: bad input fails in seconds.
        self.scorer = RewardScorer(config.rewards, config.scoring)
        load_splits(config.data, None, config.training.seed)
        # One process per machine converts or downloads the model; the others then read it from the cache.
        with self.accelerator.local_main_process_first():
            self.model, self.tokenizer = load_policy(config, self.accelerator.device)
        checkpoint = self._checkpoint_to_resume(resume)
        if checkpoint is not None:
            # Before `prepare`: FSDP2 / ZeRO-3 then shard the restored weights, DDP broadcasts them.
            load_policy_weights(checkpoint, self.model)
        self.reference = None
        if config.algorithm.beta > 0 and not config.lora.enabled:
            self.reference, _ = load_policy(config.model_copy(update={"lora": config.lora.model_copy(update={"enabled": False})}), self.accelerator.device)
            self.reference.eval().requires_grad_(False)
            self.reference = self._logprob_model(self.reference)
        self.train_examples, self.eval_examples = load_splits(config.data, self.tokenizer, config.training.seed)
        self.sampler = PromptSampler(self.train_examples, config.training.seed, config.data.shuffle)
        self.engine = make_engine(config, self.model, self.tokenizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=config.training.learning_rate, betas=config.training.adam_betas,
            weight_decay=config.training.weight_decay,
        )
        updates = config.training.steps * config.algorithm.num_iterations * config.training.mini_batches
        self.scheduler = get_scheduler(
            config.training.lr_scheduler, self.optimizer, num_warmup_steps=config.training.warmup_steps,
            num_training_steps=updates,
        )
        distributed.configure_strategy(self.accelerator, config.training.micro_batch_size, config.training.max_grad_norm)
        # What gets prepared is the log-prob computation around the policy, so that DDP / FSDP2 / ZeRO-3
        # see every forward of the update (see `LogProbModel`); the engine keeps the bare policy.
        self.model, self.optimizer = self.accelerator.prepare(self._logprob_model(self.model), self.optimizer)
        self.policy = self.accelerator.unwrap_model(self.model).policy
        if self.accelerator.num_processes > 1:
            # Same seed above for identical initialisation everywhere; now one sampling stream per process.
            set_seed(config.training.seed + self.accelerator.process_index)
        # `from_pretrained` returns the model in eval mode, in which transformers skips gradient
        # checkpointing and dropout; engines that switch to eval to sample switch back.
        self.model.train()
        self.sampling = SamplingSettings(
            max_new_tokens=config.rollout.max_new_tokens, temperature=config.rollout.temperature,
            top_p=config.rollout.top_p, top_k=config.rollout.top_k,
        )
        self.start_step = self.step = 0
        if checkpoint is not None:
            self._resume(checkpoint)

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        config = self.config
        self._prepare_run_dir()
        results: dict[str, Any] = {"engine": self.engine.name}
        if config.eval.before_training and self.eval_examples and self.start_step == 0:
            results["before"] = self._evaluate("base", step=0).summary()
        progress = tqdm(
            range(self.start_step + 1, config.training.steps + 1), initial=self.start_step, total=config.training.steps,
            desc="rft train", disable=not self.accelerator.is_main_process, dynamic_ncols=True,
        )
        for step in progress:
            self.step = step
            step_start = time.perf_counter()
            batch = self.collect_batch()
            update_start = time.perf_counter()
            update_metrics = self.update(batch) if len(batch) else {"update/skipped": 1.0}
            sync_start = time.perf_counter()
            with distributed.full_weights(self.accelerator, self.model):
                self.engine.sync_weights(self.policy)
            now = time.perf_counter()
            metrics = {
                **batch.metrics, **update_metrics,
                "time/update": sync_start - update_start, "time/weight_sync": now - sync_start,
                "time/step": now - step_start,
                "throughput/tokens_per_s": batch.metrics.get("completion/tokens", 0.0) / (now - step_start),
                "memory/peak_mb": peak_memory_mb(),
            }
            self._log(step, metrics)
            progress.set_postfix(
                reward=f"{metrics.get('reward/mean', float('nan')):.3f}",
                len=f"{metrics.get('completion/length/mean', 0):.0f}",
                tok_s=f"{metrics['throughput/tokens_per_s']:.0f}",
            )
            if config.output.save_every and step % config.output.save_every == 0:
                self._save(step)
            if config.eval.every and step % config.eval.every == 0 and self.eval_examples:
                self._evaluate(f"step-{step}", step=step)
        progress.close()
        self._save_final()
        if config.eval.after_training and self.eval_examples:
            results["after"] = self._evaluate("trained", step=config.training.steps).summary()
        if self.accelerator.is_main_process:
            (self.run_dir / "results.json").write_text(json.dumps(results, indent=2))
            if "before" in results and "after" in results:
                comparison = compare(results["before"], results["after"], config.eval.noise_sigmas)
                record_evaluation(self.run_dir, "before_after", comparison)
            if config.output.report:
                tqdm.write(f"report: {write_report(self.run_dir)}")
        self.engine.close()
        for scorer in (self.scorer, self.eval_metric_scorer):
            if scorer is not None:
                scorer.close()
        self.accelerator.end_training()
        return results

    # ------------------------------------------------------------------ rollout and scoring
    def collect_batch(self) -> Batch:
        """Sample groups, score them, and (DAPO dynamic sampling) keep only groups that teach something."""
        config, group_size = self.config, self.config.rollout.group_size
        wanted = config.training.prompts_per_step
        rounds = 1 if not config.algorithm.dynamic_sampling else config.algorithm.max_gen_batches
        kept: list[dict[str, Any]] = []
        metrics: dict[str, float] = {"time/generation": 0.0, "time/reward": 0.0}
        generated_groups = zero_variance_groups = rounds_used = 0
        reward_metrics: list[dict[str, float]] = []
        accelerator = self.accelerator
        for _ in range(rounds):
            rounds_used += 1
            # Every process draws the same global prompts (so the data position is the same everywhere and
            # resume works) and generates and scores whole groups for its own contiguous share.
            examples = self.sampler.take(wanted)[
                distributed.process_share(wanted, accelerator.process_index, accelerator.num_processes)
            ]
            start = time.perf_counter()
            with distributed.full_weights(accelerator, self.model):
                rollout = self.engine.generate([e.prompt_ids for e in examples], group_size, self.sampling)
            metrics["time/generation"] += time.perf_counter() - start
            start = time.perf_counter()
            groups, round_metrics = self._score(examples, rollout.completion_ids, rollout.logprobs, rollout.truncated)
            metrics["time/reward"] += time.perf_counter() - start
            # From here on every process holds the global batch, in global prompt order, and takes the
            # same decisions on it: advantages, dynamic sampling, metrics.
            groups, round_metrics = self._gather_groups(groups, round_metrics, len(examples) * group_size)
            reward_metrics.append(round_metrics)
            generated_groups += len(groups)
            for group in groups:
                if group["zero_variance"]:
                    zero_variance_groups += 1
                    if config.algorithm.dynamic_sampling:
                        continue
                kept.append(group)
            if len(kept) >= wanted:
                break
        kept = kept[:wanted]
        if config.algorithm.dynamic_sampling:
            metrics["dynamic_sampling/rounds"] = rounds_used
            metrics["dynamic_sampling/pass_rate"] = 1 - zero_variance_groups / max(1, generated_groups)
            metrics["dynamic_sampling/groups"] = len(kept)
            if len(kept) < wanted:
                logger.warning(
                    "dynamic sampling: %d of %d groups after %d rounds (algorithm.max_gen_batches); training on those",
                    len(kept), wanted, rounds_used,
                )
        for key in reward_metrics[0]:
            metrics[key] = sum(m[key] for m in reward_metrics) / len(reward_metrics)
        metrics["groups/zero_variance_share"] = zero_variance_groups / max(1, generated_groups)
        return self._assemble(kept, metrics)

    def _gather_groups(
        self, groups: list[dict[str, Any]], metrics: dict[str, float], count: int
    ) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """All processes' scored groups in process order, and their reward metrics weighted by completions."""
        if self.accelerator.num_processes == 1:
            return groups, metrics
        gathered = distributed.gather_from_processes(self.accelerator, (groups, metrics, count))
        combined = _pool_metrics([(part, n) for _, part, n in gathered])
        # Whole-batch statistics are recomputed exactly from the gathered rewards.
        combined.update(_stats("reward", torch.cat([g["rewards"] for part, _, _ in gathered for g in part])))
        return [g for part, _, _ in gathered for g in part], combined

    def _score(
        self, examples: list[Example], completion_ids: list[list[int]], logprobs: list[list[float]] | None,
        truncated: list[bool],
    ) -> tuple[list[dict[str, Any]], dict[str, float]]:
        config, group_size = self.config, self.config.rollout.group_size
        completions = decode_completions(self.tokenizer, examples, completion_ids, group_size)
        rows = [examples[i // group_size] for i in range(len(completion_ids))]
        scores = self.scorer.score(
            [e.prompt for e in rows], completions, completion_ids, [e.row for e in rows], group_size=group_size
        )
        for error in scores.errors:
            logger.warning("reward: %s", error)
        rewards = torch.tensor(scores.total, dtype=torch.float64)
        metrics = dict(scores.metrics)
        failed = scores.failed or [False] * len(completion_ids)
        if config.algorithm.soft_overlong:
            max_length, cache_length = config.overlong_lengths
            lengths = torch.tensor([len(c) for c in completion_ids], dtype=torch.float64)
            penalty = algorithms.soft_overlong_punishment(lengths, max_length=max_length, cache_length=cache_length)
            rewards = rewards + penalty
            metrics["reward/overlong/mean"] = penalty.mean().item()
        metrics.update(_stats("reward", rewards))
        grouped = rewards.view(-1, group_size)
        zero_variance = algorithms.zero_variance_groups(grouped)
        self._log_completions(rows, completions, rewards)
        groups = []
        for g in range(len(examples)):
            members = slice(g * group_size, (g + 1) * group_size)
            if any(failed[members]):
                continue  # scoring.on_error: skip_group drops the whole group
            groups.append({
                "prompt_ids": [rows[g * group_size].prompt_ids] * group_size,
                "completion_ids": completion_ids[members],
                "logprobs": logprobs[members] if logprobs is not None else None,
                "truncated": truncated[members],
                "rewards": grouped[g],
                "zero_variance": bool(zero_variance[g]),
            })
        return groups, metrics

    def _assemble(self, groups: list[dict[str, Any]], metrics: dict[str, float]) -> Batch:
        algorithm = self.config.algorithm
        if not groups:
            empty = torch.zeros(0)
            return Batch([], [], None, [], empty, empty, metrics)
        rewards = torch.stack([g["rewards"] for g in groups])
        advantages = algorithms.compute_advantages(
            rewards, estimator=algorithm.advantage, scale=algorithm.scale, eps=algorithm.advantage_eps
        ).flatten().float()
        completion_ids = [c for g in groups for c in g["completion_ids"]]
        truncated = [t for g in groups for t in g["truncated"]]
        lengths = torch.tensor([len(c) for c in completion_ids], dtype=torch.float32)
        metrics.update(_stats("advantage", advantages))
        metrics.update(_stats("completion/length", lengths))
        metrics["completion/truncated_share"] = sum(truncated) / len(truncated)
        metrics["completion/tokens"] = float(lengths.sum())
        has_logprobs = all(g["logprobs"] is not None for g in groups)
        return Batch(
            prompt_ids=[p for g in groups for p in g["prompt_ids"]],
            completion_ids=completion_ids,
            rollout_logprobs=[lp for g in groups for lp in g["logprobs"]] if has_logprobs else None,
            truncated=truncated,
            rewards=rewards.flatten(),
            advantages=advantages,
            metrics=metrics,
        )

    # ------------------------------------------------------------------ the update
    def _collate(self, batch: Batch, indices: list[int]) -> MicroBatch:
        if not indices:
            return self._padding_micro_batch(batch)
        pad = self.tokenizer.pad_token_id
        sequences = [batch.prompt_ids[i] + batch.completion_ids[i] for i in indices]
        width = max(len(s) for s in sequences)
        lengths = [len(batch.completion_ids[i]) for i in indices]
        completion_width = max(lengths)
        mask = _pad([[1.0] * n for n in lengths], completion_width, 0.0, torch.float32)
        if self.config.algorithm.mask_truncated:
            truncated = torch.tensor([batch.truncated[i] for i in indices])
            mask = algorithms.truncation_mask(truncated, mask)
        rollout_logp = None
        if batch.rollout_logprobs is not None:
            rollout_logp = _pad([batch.rollout_logprobs[i] for i in indices], completion_width, 0.0, torch.float32)
        device = self.accelerator.device
        return MicroBatch(
            input_ids=_pad(sequences, width, pad, torch.long).to(device),
            attention_mask=_pad([[1] * len(s) for s in sequences], width, 0, torch.long).to(device),
            completion_start=torch.tensor([len(batch.prompt_ids[i]) for i in indices], device=device),
            completion_lengths=torch.tensor(lengths, device=device),
            mask=mask.to(device),
            advantages=batch.advantages[indices].to(device),
            rollout_logp=rollout_logp.to(device) if rollout_logp is not None else None,
        )

    def _padding_micro_batch(self, batch: Batch) -> MicroBatch:
        """One fully masked token: a forward/backward with zero loss and zero gradient."""
        device = self.accelerator.device
        pad = self.tokenizer.pad_token_id
        zeros = torch.zeros((1, 1), device=device)
        return MicroBatch(
            input_ids=torch.full((1, 2), pad, dtype=torch.long, device=device),
            attention_mask=torch.ones((1, 2), dtype=torch.long, device=device),
            completion_start=torch.ones(1, dtype=torch.long, device=device),
            completion_lengths=torch.ones(1, dtype=torch.long, device=device),
            mask=zeros, advantages=torch.zeros(1, device=device),
            rollout_logp=zeros if batch.rollout_logprobs is not None else None, padding=True,
        )

    def _logprob_model(self, policy: torch.nn.Module) -> LogProbModel:
        return LogProbModel(
            policy, temperature=self.config.rollout.temperature, chunk_size=self.config.training.logprob_chunk_size
        )

    def _logprobs(self, model: torch.nn.Module, micro: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return model(micro.input_ids, micro.attention_mask, micro.completion_start, micro.completion_lengths)

    def _partition(self, size: int) -> list[list[list[int]]]:
        """This process's micro-batches (one forward/backward each) of each mini-batch (one optimizer update).

        Mini-batches are cut from the global batch the same way in every process; each process takes
        its share of every mini-batch. Shares may differ by a sequence or, under dynamic sampling, be
        empty, so a process short of micro-batches gets padding ones (an empty index list): every
        process must run as many forward/backward passes as the others, since each pass holds
        collectives (DDP's gradient all-reduce and buffer broadcast, FSDP2 / ZeRO-3 parameter gathers).
        """
        training, accelerator = self.config.training, self.accelerator
        processes, per_micro = accelerator.num_processes, training.micro_batch_size
        per_mini = math.ceil(size / training.mini_batches)
        partition = []
        for start in range(0, size, per_mini):
            mini = list(range(start, min(start + per_mini, size)))
            shares = [mini[distributed.process_share(len(mini), rank, processes)] for rank in range(processes)]
            passes = max(math.ceil(len(share) / per_micro) for share in shares)
            own = shares[accelerator.process_index]
            micros = [own[s : s + per_micro] for s in range(0, len(own), per_micro)]
            partition.append(micros + [[]] * (passes - len(micros)))
        return partition

    def update(self, batch: Batch) -> dict[str, float]:
        config, algorithm = self.config, self.config.algorithm
        partition = self._partition(len(batch))
        micro_batches = [self._collate(batch, indices) for mini in partition for indices in mini]
        # With one update per batch the policy that sampled is the one being updated: old log-probs
        # equal the current ones detached, so the extra forward pass is skipped.
        reuse_current = algorithm.num_iterations == 1 and len(partition) == 1
        start = time.perf_counter()
        old_logps: list[torch.Tensor | None] = [None] * len(micro_batches)
        ref_logps: list[torch.Tensor | None] = [None] * len(micro_batches)
        with torch.no_grad():
            for i, micro in enumerate(micro_batches):
                if not reuse_current:
                    old_logps[i] = self._logprobs(self.model, micro)[0]
                if algorithm.beta > 0:
                    with reference_policy(self.policy, self.reference) as reference:
                        # With LoRA the reference is the policy itself, adapter off: run it through the
                        # prepared module like every other forward.
                        ref_logps[i] = self._logprobs(self.model if reference is self.policy else reference, micro)[0]
        metrics: dict[str, float] = {"time/logprobs": time.perf_counter() - start}
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}

        def record(key: str, value: float) -> None:
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1

        accelerator = self.accelerator
        micro_index = 0
        for _ in range(algorithm.num_iterations):
            micro_index = 0
            for mini in partition:
                minis = micro_batches[micro_index : micro_index + len(mini)]
                update_loss = torch.zeros((), device=accelerator.device)
                # Global normalisers over the whole mini-batch (all micro-batches, all processes):
                # this is what makes token-mean independent of how the batch is split.
                real = [m for m in minis if not m.padding]
                totals = torch.tensor(
                    [float(sum(m.mask.shape[0] for m in real)), float(sum(m.mask.sum().item() for m in real))],
                    device=accelerator.device,
                )
                num_sequences, num_tokens = accelerator.reduce(totals, reduction="sum").tolist()
                for position, micro in enumerate(minis):
                    with distributed.accumulate_gradients(accelerator, self.model, sync=position == len(minis) - 1):
                        logp, entropy = self._logprobs(self.model, micro)
                        old_logp = logp.detach() if reuse_current else old_logps[micro_index]
                        is_weights = tis_stats = mismatch = kl = None
                        if micro.rollout_logp is not None:
                            mismatch = algorithms.rollout_mismatch(old_logp, micro.rollout_logp, micro.mask)
                            if algorithm.tis_cap is not None:
                                is_weights, tis_stats = algorithms.truncated_importance_weights(
                                    old_logp, micro.rollout_logp, micro.mask, algorithm.tis_cap
                                )
                        per_token, stats = algorithms.policy_loss(
                            logp, old_logp, micro.advantages, micro.mask,
                            eps_low=algorithm.eps_low, eps_high=algorithm.eps_high, delta=algorithm.delta,
                            importance_sampling_level=algorithm.importance_sampling_level, is_weights=is_weights,
                        )
                        if ref_logps[micro_index] is not None:
                            kl = algorithms.kl_penalty(logp, ref_logps[micro_index], algorithm.kl_estimator)
                            per_token = per_token + algorithm.beta * kl * micro.mask
                        loss = algorithms.aggregate_loss(
                            per_token, micro.mask, loss_agg=algorithm.loss_agg, num_sequences=num_sequences,
                            num_tokens=max(num_tokens, 1.0), max_completion_length=config.rollout.max_new_tokens,
                        )
                        # The loss is this micro-batch's share of the global loss, and DDP / FSDP2 / ZeRO-3
                        # average gradients over processes: scaling by their number makes the result the
                        # gradient of the global loss.
                        accelerator.backward(loss * accelerator.num_processes)
                    micro_index += 1
                    update_loss += loss.detach()
                    if micro.padding:
                        continue
                    token_count = micro.mask.sum().clamp(min=1)
                    for key, value in (mismatch or {}).items():
                        record(f"rollout/{key}", value.item())
                    if tis_stats is not None:
                        record("rollout/tis_capped_share", tis_stats["tis_capped_share"].item())
                    if kl is not None:
                        record("kl/ref", ((kl * micro.mask).sum() / token_count).item())
                    record("entropy", ((entropy * micro.mask).sum() / token_count).item())
                    kl_old = algorithms.kl_penalty(logp.detach(), old_logp, "k3")
                    record("kl/old", ((kl_old * micro.mask).sum() / token_count).item())
                    for key, value in stats.items():
                        record(f"clip/{key}" if key.startswith("clip") else f"policy/{key}", value.item())
                if config.training.max_grad_norm is not None:
                    grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), config.training.max_grad_norm)
                else:
                    grad_norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in self.model.parameters() if p.grad is not None))
                record("loss", accelerator.reduce(update_loss, reduction="sum").item())
                # DeepSpeed clips inside its engine and may report no norm.
                record("grad_norm", float(grad_norm) if grad_norm is not None else math.nan)
                record("learning_rate", self.scheduler.get_last_lr()[0])
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        metrics.update(self._combine_update_metrics(sums, counts))
        return metrics

    def _combine_update_metrics(self, sums: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
        """Per-micro-batch averages over every process's micro-batches (global values are the same everywhere)."""
        if self.accelerator.num_processes == 1:
            return {key: total / counts[key] for key, total in sums.items()}
        total_sums: dict[str, float] = {}
        total_counts: dict[str, int] = {}
        for part_sums, part_counts in distributed.gather_from_processes(self.accelerator, (sums, counts)):
            for key, value in part_sums.items():
                total_sums[key] = total_sums.get(key, 0.0) + value
                total_counts[key] = total_counts.get(key, 0) + part_counts[key]
        for key in ("loss", "grad_norm", "learning_rate"):
            # Already global and identical in every process: counted once, not once per process.
            total_sums[key], total_counts[key] = sums[key], counts[key]
        return {key: total / total_counts[key] for key, total in total_sums.items()}

    # ------------------------------------------------------------------ evaluation, logging, checkpoints
    def _evaluate(self, label: str, step: int) -> EvalResult:
        """Every configured pass (greedy / sampled) on the held-out split; the base model's come from the cache."""
        if self._last_evaluation is not None and self._last_evaluation[0] == step and label == "trained":
            # The weights have not moved since this step's periodic evaluation: same scores, no second pass.
            results = self._last_evaluation[1]
            if self.accelerator.is_main_process:
                record_evaluation(self.run_dir, label, [result.summary() for result in results])
            return results[0]
        args = (self.engine, self.tokenizer, self.eval_examples, self.scorer, self.eval_plans, self.eval_slices,
                self.eval_metric_scorer)
        with distributed.full_weights(self.accelerator, self.model):
            results = baseline_results(self.config, *args) if label == "base" else run_plans(label, *args)
        self._last_evaluation = (step, results)
        if self.accelerator.is_main_process:
            tracked: dict[str, float] = {}
            with (self.run_dir / "evaluations.jsonl").open("a") as handle:
                for result in results:
                    result.label = label
                    handle.write(json.dumps({"step": step, **result.summary(), "samples": result.samples}, default=str) + "\n")
                    tracked.update(result.tracker_metrics())
                    tqdm.write(held_out_line(label, result.mode, result.mean, result.stderr, result.count, result.cached))
            self.accelerator.log(tracked, step=step)
            record_evaluation(self.run_dir, label, [result.summary() for result in results])
            if self.monitors is not None:
                self.monitors.observe_eval(step, results[0].summary())
        return results[0]

    def _prepare_run_dir(self) -> None:
        config = self.config
        # Evaluation inputs are resolved (and bad ones rejected) before the first rollout.
        self.eval_plans = eval_plans(config)
        self.eval_slices = check_held_out(self.eval_examples, config.eval) if self.eval_examples else []
        self.eval_metric_scorer = RewardScorer(config.eval.metrics) if config.eval.metrics else None
        self.monitors: Monitors | None = None
        self._last_evaluation: tuple[int, list[EvalResult]] | None = None
        start_trackers(self.accelerator, config)
        if not self.accelerator.is_main_process:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(config))
        logs = ("metrics.jsonl", "evaluations.jsonl", "completions.jsonl", ALERTS_NAME)
        previous = read_manifest(self.run_dir) if self.start_step > 0 else None
        for name in logs:
            path = self.run_dir / name
            if self.start_step == 0:
                path.unlink(missing_ok=True)
            elif path.exists():
                # A resumed run keeps what happened up to its checkpoint, not what the killed run did after.
                kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= self.start_step]
                path.write_text("".join(line + "\n" for line in kept))
        manifest = build_manifest(config, self.train_examples, self.eval_examples, self.engine.name)
        if previous is not None:
            manifest["evaluation"] = previous.get("evaluation", {})
            manifest["resumed_at_step"] = self.start_step
        write_manifest(self.run_dir, manifest)
        self.monitors = Monitors.from_recipe(config, self.scorer.names, self.run_dir / ALERTS_NAME)
        if self.start_step > 0:
            main_mode = self.eval_plans[0].mode
            rows = {name: [json.loads(line) for line in (self.run_dir / name).read_text().splitlines()]
                    if (self.run_dir / name).exists() else [] for name in ("metrics.jsonl", "evaluations.jsonl")}
            self.monitors.replay(rows["metrics.jsonl"], [r for r in rows["evaluations.jsonl"] if r.get("mode", "greedy") == main_mode])

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        if self.accelerator.is_main_process:
            with (self.run_dir / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps({"step": step, **metrics}) + "\n")
            self.accelerator.log(metrics, step=step)
            if self.config.output.log_every and step % self.config.output.log_every == 0:
                tqdm.write(step_line(step, self.config.training.steps, metrics, self.scorer.names))
            if self.monitors is not None:
                self.monitors.observe_step(step, metrics)

    def _log_completions(self, rows: list[Example], completions: list[Any], rewards: torch.Tensor) -> None:
        keep = self.config.output.log_completions
        if not keep or not self.accelerator.is_main_process:
            return
        with (self.run_dir / "completions.jsonl").open("a") as handle:
            for row, completion, reward in list(zip(rows, completions, rewards.tolist(), strict=True))[:keep]:
                record = {"step": self.step, "prompt": row.prompt, "completion": completion, "reward": reward}
                handle.write(json.dumps(record, default=str) + "\n")

    def _state(self, step: int) -> TrainerState:
        return TrainerState(step=step, data_position=self.sampler.position, engine_name=self.engine.name)

    def _save(self, step: int) -> None:
        # Every process takes part in gathering sharded weights; only the main one writes.
        state_dict = distributed.full_state_dict(self.accelerator, self.model, prefix="policy.")
        optimizer_state = distributed.optimizer_state(self.accelerator, self.model, self.optimizer)
        if self.accelerator.is_main_process:
            save_checkpoint(
                self.run_dir, self._state(step), self.policy, self.tokenizer, self.optimizer, self.scheduler,
                keep=self.config.output.keep_checkpoints, state_dict=state_dict, optimizer_state=optimizer_state,
            )
        # Nobody moves on (or resumes, or exits) before the checkpoint is complete.
        self.accelerator.wait_for_everyone()

    def _save_final(self) -> None:
        state_dict = distributed.full_state_dict(self.accelerator, self.model, prefix="policy.")
        if self.accelerator.is_main_process:
            save_policy(self.policy, self.tokenizer, self.run_dir / "final", state_dict=state_dict)
        self.accelerator.wait_for_everyone()

    def _checkpoint_to_resume(self, resume: bool | str) -> Path | None:
        if not resume:
            return None
        checkpoints = list_checkpoints(self.run_dir)
        checkpoint = Path(resume) if isinstance(resume, str) else (checkpoints[-1] if checkpoints else None)
        # Each machine reads its own copy of the run directory; a process that saw another checkpoint (or
        # none) would train from a different step and leave the others waiting in a collective.
        seen = distributed.gather_from_processes(self.accelerator, checkpoint.name if checkpoint else None)
        if len(set(seen)) > 1:
            raise RuntimeError(
                f"--resume: the processes see different checkpoints in {self.run_dir / 'checkpoints'} "
                f"(by process: {seen}); every machine needs the same run directory (shared, or synced as "
                "SageMaker does with /opt/ml/checkpoints)"
            )
        if checkpoint is None:
            logger.warning("--resume: no checkpoint in %s; starting from scratch", self.run_dir / "checkpoints")
        return checkpoint

    def _resume(self, checkpoint: Path) -> None:
        """Everything but the weights (already loaded before `prepare`); every process reads the same checkpoint."""
        payload = load_training_state(checkpoint)
        if not distributed.load_optimizer_state(self.accelerator, self.model, self.optimizer, payload["optimizer"]):
            logger.warning("%s holds no optimizer state (DeepSpeed ZeRO-3): the optimizer moments restart", checkpoint)
        self.scheduler.load_state_dict(payload["scheduler"])
        state = TrainerState(**payload["state"])
        self.start_step = state.step
        self.sampler.position = state.data_position
        if self.accelerator.num_processes > 1:
            # The checkpoint holds the main process's random state; give each process its own stream again.
            set_seed(self.config.training.seed + self.accelerator.process_index + 1_000_003 * state.step)
        with distributed.full_weights(self.accelerator, self.model):
            self.engine.sync_weights(self.policy)
        # Metrics written after the checkpoint belong to the lost part of the killed run.
        metrics_path = self.run_dir / "metrics.jsonl"
        if metrics_path.exists() and self.accelerator.is_main_process:
            kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= state.step]
            metrics_path.write_text("".join(line + "\n" for line in kept))
        logger.info("resumed from %s at step %d", checkpoint, state.step)
