"""The training loop: rollout -> score -> advantages -> update -> log -> checkpoint.

Read `Trainer.train` top to bottom; the maths lives in `rft.algorithms`, sampling in
`rft.rollout`, rewards in `rft.scoring`.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from rft import algorithms, distributed, objective, run_dir
from rft.bedrock_job import BEDROCK_HYPERPARAMETERS_NAME
from rft.checkpoint import (
    TrainerState,
    apply_optimizer_settings,
    checkpoint_path,
    load_policy_weights,
    load_training_state,
    save_checkpoint,
    save_policy,
)
from rft.config import ConfigError, RecipeConfig, dump_config, eval_interval, recipe_warnings
from rft.data import Example, PromptSampler, load_splits
from rft.early_stopping import EarlyStopping
from rft.evaluation import (
    EvalResult,
    baseline_results,
    check_held_out,
    compare,
    decode_completions,
    eval_plans,
    run_plans,
)
from rft.interrupt import StopOnSignal, TrainingInterrupted, signal_name
from rft.log_lines import held_out_line, step_line
from rft.manifest import build_manifest, read_manifest, record_evaluation, write_manifest
from rft.metrics import (
    COMPLETION_TOKENS,
    GRAD_NORM,
    LEARNING_RATE,
    LOSS,
    TRUNCATED_SHARE,
    Accumulator,
    Metric,
    Reduction,
)
from rft.model_card import record_base_model, write_model_card
from rft.models import LogProbModel, load_policy, load_tokenizer, reference_policy, resolve_model_path
from rft.monitors import ALERTS_NAME, Monitors
from rft.report import write_report
from rft.reward_context import RewardState
from rft.rollout import make_engine, require_vllm
from rft.scoring import RewardScorer, ScoreMetrics
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


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Trainer:
    def __init__(
        self, config: RecipeConfig, resume: bool | str = False, *, allow_recipe_change: bool = False,
        overwrite: bool = False,
    ):
        """`resume`: True for the run folder's latest checkpoint of its own run, or a checkpoint's path.

        `allow_recipe_change`: resume even when the recipe changes what the run computes (recorded);
        `overwrite`: start a new run in a folder that holds one, deleting it.
        """
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
        train, held_out = load_splits(config.data, None, config.training.seed)
        self.scorer.check_columns({f"data.train ({config.data.train})": [e.row for e in train],
                                   f"the held-out rows ({config.data.eval or config.data.train})": [e.row for e in held_out]})
        # One process per machine converts or downloads the model; the others then read it from the cache.
        with self.accelerator.local_main_process_first():
            model_path = resolve_model_path(config.model.name_or_path)
        # Prompt lengths need only the tokenizer: a split they empty fails before the model loads.
        tokenizer = load_tokenizer(model_path, config.model.trust_remote_code)
        self.train_examples, self.eval_examples = load_splits(config.data, tokenizer, config.training.seed)
        if self.accelerator.is_main_process:
            for warning in recipe_warnings(config, len(self.train_examples)):
                logger.warning(warning)
            if not self.eval_examples:
                logger.warning("no held-out rows (data.eval, data.eval_size): this run trains without evaluation")
        # The main process writes the run folder, and holds it for the run's life.
        self.run_lock = run_dir.RunLock(self.run_dir) if self.accelerator.is_main_process else None
        self.run_start = self._checkpoint_to_resume(resume, allow_recipe_change, overwrite)
        checkpoint = self.run_start.checkpoint
        with self.accelerator.local_main_process_first():
            self.model, self.tokenizer = load_policy(config, self.accelerator.device)
        if checkpoint is not None:
            # Before `prepare`: FSDP2 / ZeRO-3 then shard the restored weights, DDP broadcasts them.
            load_policy_weights(checkpoint, self.model)
        self.reference = None
        if config.algorithm.beta > 0 and not config.lora.enabled:
            self.reference, _ = load_policy(config.base_model(), self.accelerator.device)
            self.reference.eval().requires_grad_(False)
            self.reference = self._logprob_model(self.reference)
        self.sampler = PromptSampler(self.train_examples, config.training.seed, config.data.shuffle)
        # After the restored weights: the engine serves the model as it is now.
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
        self.sampling = config.rollout.sampling()
        self.start_step = self.step = 0
        if checkpoint is not None:
            self._resume(checkpoint)

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        config = self.config
        self._prepare_run_dir()
        self._set_reward_state(completed=self.start_step)
        results: dict[str, Any] = {"engine": self.engine.name}
        if config.eval.before_training and self.eval_examples and self.start_step == 0:
            results["before"] = self._evaluate("base", step=0).summary()
            if self.early_stopping is not None:
                self.early_stopping.observe(0, results["before"])
        interval = eval_interval(config)
        progress = tqdm(
            range(self.start_step + 1, config.training.steps + 1), initial=self.start_step, total=config.training.steps,
            desc="rft train", disable=not self.accelerator.is_main_process, dynamic_ncols=True,
        )
        stop = StopOnSignal(self.accelerator)
        for step in stop.steps(progress):
            self.step = step
            self._set_reward_state(completed=step - 1)
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
            self._set_reward_state(completed=step)
            if interval and step % interval == 0 and self.eval_examples:
                summary = self._evaluate(f"step-{step}", step=step).summary()
                if self._plateaued(step, summary):
                    results["early_stopped"] = {"step": step, "of": config.training.steps}
                    break
        progress.close()
        if stop.stopped_by is not None:
            self._stop(stop.stopped_by, self.step)
        if "early_stopped" in results and not (config.output.save_every and self.step % config.output.save_every == 0):
            self._save(self.step)
        self._save_final()
        if config.eval.after_training and self.eval_examples:
            results["after"] = self._evaluate("trained", step=self.step).summary()
        if self.accelerator.is_main_process:
            (self.run_dir / "results.json").write_text(json.dumps(results, indent=2))
            write_model_card(self.run_dir / "final", config, read_manifest(self.run_dir), results)
            if "before" in results and "after" in results:
                comparison = compare(results["before"], results["after"], config.eval.noise_sigmas)
                record_evaluation(self.run_dir, "before_after", comparison)
            if config.output.report:
                tqdm.write(f"report: {write_report(self.run_dir)}")
        self._close()
        return results

    def _plateaued(self, step: int, summary: dict[str, Any]) -> bool:
        """Early stopping's decision, the main process's on every process so that all leave the loop together."""
        reason = self.early_stopping.observe(step, summary) if self.early_stopping is not None else None
        reason = distributed.gather_from_processes(self.accelerator, reason)[0]
        if reason is not None and self.accelerator.is_main_process:
            tqdm.write(reason)
        return reason is not None

    def _stop(self, signum: int, step: int) -> None:
        """After a signal: checkpoint the last completed step (unless just saved), close, raise `TrainingInterrupted`."""
        if not (self.config.output.save_every and step % self.config.output.save_every == 0):
            self._save(step)
        self._close()
        raise TrainingInterrupted(
            signum, f"{signal_name(signum)}: stopped after step {step} of {self.config.training.steps}; checkpoint "
            f"{checkpoint_path(self.run_dir, step)}; continue with --resume",
        )

    def _close(self) -> None:
        self.engine.close()
        self.scorer.close()
        if self.eval_metric_scorer is not None:
            self.eval_metric_scorer.close()
        self.accelerator.end_training()
        if self.run_lock is not None:
            self.run_lock.release()

    # ------------------------------------------------------------------ rollout and scoring
    def collect_batch(self) -> Batch:
        """Sample groups, score them, and (DAPO dynamic sampling) keep only groups that teach something."""
        config, group_size = self.config, self.config.rollout.group_size
        wanted = config.training.prompts_per_step
        rounds = 1 if not config.algorithm.dynamic_sampling else config.algorithm.max_gen_batches
        kept: list[dict[str, Any]] = []
        metrics: dict[str, float] = {"time/generation": 0.0, "time/reward": 0.0}
        generated_groups = zero_variance_groups = rounds_used = 0
        # Every round's scores count: sums add over rounds (and over processes in `_gather_groups`).
        score_metrics = ScoreMetrics()
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
            groups, round_metrics = self._gather_groups(groups, round_metrics)
            score_metrics = score_metrics.then(round_metrics)
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
        metrics.update(score_metrics.result())
        metrics["groups/zero_variance_share"] = zero_variance_groups / max(1, generated_groups)
        return self._assemble(kept, metrics)

    def _gather_groups(
        self, groups: list[dict[str, Any]], metrics: ScoreMetrics
    ) -> tuple[list[dict[str, Any]], ScoreMetrics]:
        """All processes' scored groups in process order, and their reward metrics combined."""
        if self.accelerator.num_processes == 1:
            return groups, metrics
        gathered = distributed.gather_from_processes(self.accelerator, (groups, metrics))
        return [g for part, _ in gathered for g in part], ScoreMetrics.of_processes([part for _, part in gathered])

    def _score(
        self, examples: list[Example], completion_ids: list[list[int]], logprobs: list[list[float]] | None,
        truncated: list[bool],
    ) -> tuple[list[dict[str, Any]], ScoreMetrics]:
        config, group_size = self.config, self.config.rollout.group_size
        completions = decode_completions(self.tokenizer, examples, completion_ids, group_size)
        rows = [examples[i // group_size] for i in range(len(completion_ids))]
        scores = self.scorer.score(
            [e.prompt for e in rows], completions, completion_ids, [e.row for e in rows], group_size=group_size
        )
        for error in scores.errors:
            logger.warning("reward: %s", error)
        rewards = torch.tensor(scores.total, dtype=torch.float64)
        sums = scores.stats.sums
        failed = scores.failed or [False] * len(completion_ids)
        if config.algorithm.soft_overlong:
            max_length, cache_length = config.overlong_lengths
            lengths = torch.tensor([len(c) for c in completion_ids], dtype=torch.float64)
            penalty = algorithms.soft_overlong_punishment(lengths, max_length=max_length, cache_length=cache_length)
            rewards = rewards + penalty
            sums.add(Metric("reward/overlong/mean", Reduction.MEAN), penalty.sum(), penalty.numel())
        sums.describe("reward", rewards)
        grouped = rewards.view(-1, group_size)
        zero_variance = algorithms.zero_variance_groups(grouped)
        self._log_completions(rows, completions, rewards, scores.extras)
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
        return groups, scores.stats

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
        lengths = torch.tensor([len(c) for c in completion_ids], dtype=torch.float64)
        sums = Accumulator()
        sums.describe("advantage", advantages)
        sums.describe("completion/length", lengths)
        sums.add(TRUNCATED_SHARE, sum(truncated), len(truncated))
        sums.add(COMPLETION_TOKENS, lengths.sum())
        metrics.update(sums.result())
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
            policy, temperature=self.config.rollout.temperature, chunk_size=self.config.training.logprob_chunk_size,
            entropy_grad=self.config.algorithm.entropy_coef != 0,
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
        # (Unless the loss's mask depends on the sampling policy: see `objective.loss_masks`.)
        reuse_current = (algorithm.num_iterations == 1 and len(partition) == 1
                         and not objective.needs_sampling_policy_pass(algorithm))
        start = time.perf_counter()
        old_logps: list[torch.Tensor | None] = [None] * len(micro_batches)
        old_entropies: list[torch.Tensor | None] = [None] * len(micro_batches)
        ref_logps: list[torch.Tensor | None] = [None] * len(micro_batches)
        with torch.no_grad():
            for i, micro in enumerate(micro_batches):
                if not reuse_current:
                    old_logps[i], old_entropies[i] = self._logprobs(self.model, micro)
                if algorithm.beta > 0:
                    with reference_policy(self.policy, self.reference) as reference:
                        # With LoRA the reference is the policy itself, adapter off: run it through the
                        # prepared module like every other forward.
                        ref_logps[i] = self._logprobs(self.model if reference is self.policy else reference, micro)[0]
        metrics: dict[str, float] = {"time/logprobs": time.perf_counter() - start}
        accelerator = self.accelerator
        loss_masks = objective.loss_masks(
            algorithm, accelerator, [m.mask for m in micro_batches], [m.rollout_logp for m in micro_batches],
            old_logps, [None if m.padding else e for m, e in zip(micro_batches, old_entropies, strict=True)],
        )
        # Parts of the step's metrics, kept as tensors and reduced once at the end (see `rft.metrics`).
        sums = Accumulator()
        micro_index = 0
        for _ in range(algorithm.num_iterations):
            micro_index = 0
            for mini in partition:
                minis = micro_batches[micro_index : micro_index + len(mini)]
                update_loss = torch.zeros((), device=accelerator.device)
                # The global normalisers of the whole mini-batch (all micro-batches, all processes): this
                # is what makes the loss independent of how the batch is split.
                mini_masks = loss_masks[micro_index : micro_index + len(minis)]
                norm = objective.normalizers(
                    algorithm, accelerator, [m for m, micro in zip(mini_masks, minis, strict=True) if not micro.padding]
                )
                for position, micro in enumerate(minis):
                    with distributed.accumulate_gradients(accelerator, self.model, sync=position == len(minis) - 1):
                        logp, entropy = self._logprobs(self.model, micro)
                        inputs = objective.MicroInputs(
                            mask=micro.mask, loss_mask=loss_masks[micro_index], advantages=micro.advantages,
                            logp=logp, entropy=entropy,
                            old_logp=logp.detach() if reuse_current else old_logps[micro_index],
                            rollout_logp=micro.rollout_logp, ref_logp=ref_logps[micro_index],
                        )
                        # Padding micro-batches too (with nothing counted): every process adds the same metrics.
                        loss = objective.micro_batch_loss(algorithm, inputs, norm, config.rollout.max_new_tokens, sums)
                        # The loss is this micro-batch's share of the global loss, and DDP / FSDP2 / ZeRO-3
                        # average gradients over processes: scaling by their number makes the result the
                        # gradient of the global loss.
                        accelerator.backward(loss * accelerator.num_processes)
                    micro_index += 1
                    update_loss += loss.detach()
                if config.training.max_grad_norm is not None:
                    grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), config.training.max_grad_norm)
                else:
                    grad_norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in self.model.parameters() if p.grad is not None))
                # Each process holds its share of this update's loss: the shares add up to one update.
                sums.add(LOSS, update_loss, 1 / accelerator.num_processes)
                # Global and the same in every process (the mean over processes is the value). DeepSpeed
                # clips inside its engine and may report no norm.
                sums.add(GRAD_NORM, grad_norm if grad_norm is not None else math.nan, 1)
                sums.add(LEARNING_RATE, self.scheduler.get_last_lr()[0], 1)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        metrics.update(sums.reduce(accelerator))
        return metrics

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
        self.early_stopping = EarlyStopping(config.eval.patience, config.eval.noise_sigmas) if config.eval.early_stopping else None
        start_trackers(self.accelerator, config)
        if not self.accelerator.is_main_process:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(config))
        if config.bedrock_hyperparameters:
            shutil.copyfile(config.bedrock_hyperparameters, self.run_dir / BEDROCK_HYPERPARAMETERS_NAME)
        # The logs were trimmed to the checkpoint's step (or emptied) before the model loaded: `run_dir.apply_start`.
        previous = read_manifest(self.run_dir) if self.start_step > 0 else None
        manifest = build_manifest(config, self.train_examples, self.eval_examples, self.engine.name)
        manifest.update(run_id=self.run_start.run_id, recipe_changes=self.run_start.recipe_changes)
        if previous is not None:
            manifest["evaluation"] = previous.get("evaluation", {})
            manifest["resumed_at_step"] = self.start_step
        write_manifest(self.run_dir, manifest)
        self.monitors = Monitors.from_recipe(config, self.scorer.names, self.run_dir / ALERTS_NAME)
        if self.start_step > 0:
            main_mode = self.eval_plans[0].mode
            rows = {name: run_dir.read_log(self.run_dir / name) for name in ("metrics.jsonl", "evaluations.jsonl")}
            evaluations = [r for r in rows["evaluations.jsonl"] if r.get("mode", "greedy") == main_mode]
            self.monitors.replay(rows["metrics.jsonl"], evaluations)
            if self.early_stopping is not None:
                # The plateau count goes on from the checkpoint, as it would have without the interruption.
                for row in evaluations:
                    self.early_stopping.observe(row["step"], row)

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        if self.accelerator.is_main_process:
            with (self.run_dir / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps({"step": step, **metrics}) + "\n")
            self.accelerator.log(metrics, step=step)
            if self.config.output.log_every and step % self.config.output.log_every == 0:
                tqdm.write(step_line(step, self.config.training.steps, metrics, self.scorer.names))
            if self.monitors is not None:
                self.monitors.observe_step(step, metrics)

    def _log_completions(
        self, rows: list[Example], completions: list[Any], rewards: torch.Tensor, extras: dict[str, list[Any]]
    ) -> None:
        keep = self.config.output.log_completions
        if not keep or not self.accelerator.is_main_process:
            return
        with (self.run_dir / "completions.jsonl").open("a") as handle:
            for i, (row, completion, reward) in enumerate(zip(rows, completions, rewards.tolist(), strict=True)):
                if i == keep:
                    break
                record = {"step": self.step, "prompt": row.prompt, "completion": completion, "reward": reward}
                if extras:  # what rewards logged through log_extra (TRL's completions table columns)
                    record["extra"] = {column: values[i] for column, values in extras.items()}
                handle.write(json.dumps(record, default=str) + "\n")

    def _set_reward_state(self, completed: int) -> None:
        """What rewards see as `trainer_state` (rft.reward_context) from now on: `completed` steps done."""
        state = RewardState(global_step=completed, max_steps=self.config.training.steps,
                            epoch=self.sampler.position / len(self.train_examples))
        for scorer in (self.scorer, self.eval_metric_scorer):
            if scorer is not None:
                scorer.state = state

    def _state(self, step: int) -> TrainerState:
        return TrainerState(step=step, data_position=self.sampler.position, engine_name=self.engine.name)

    def _save(self, step: int) -> None:
        # Every process takes part in gathering sharded weights; only the main one writes.
        state_dict = distributed.full_state_dict(self.accelerator, self.model, prefix="policy.")
        optimizer_state = distributed.optimizer_state(self.accelerator, self.model, self.optimizer)
        if self.accelerator.is_main_process:
            info = {"run_id": self.run_start.run_id, "recipe": self.config.model_dump(mode="json"),
                    "recipe_changes": self.run_start.recipe_changes}
            save_checkpoint(
                self.run_dir, self._state(step), info, self.policy, self.tokenizer, self.optimizer, self.scheduler,
                keep=self.config.output.keep_checkpoints, state_dict=state_dict, optimizer_state=optimizer_state,
            )
        # Nobody moves on (or resumes, or exits) before the checkpoint is complete.
        self.accelerator.wait_for_everyone()

    def _save_final(self) -> None:
        state_dict = distributed.full_state_dict(self.accelerator, self.model, prefix="policy.")
        if self.accelerator.is_main_process:
            save_policy(self.policy, self.tokenizer, self.run_dir / "final", state_dict=state_dict)
            record_base_model(self.run_dir / "final", self.config)
        self.accelerator.wait_for_everyone()

    def _checkpoint_to_resume(self, resume: bool | str, allow_recipe_change: bool, overwrite: bool) -> run_dir.RunStart:
        """Decide (before any model loads) the run id and checkpoint; every process reaches the same decision."""
        accelerator = self.accelerator
        try:
            local: run_dir.RunStart | str = run_dir.plan_start(
                self.config, resume, allow_recipe_change=allow_recipe_change, overwrite=overwrite,
                main=accelerator.is_main_process,
            )
        except run_dir.RunDirError as exc:
            local = str(exc)
        plans = distributed.gather_from_processes(accelerator, local)
        seen = [plan.checkpoint.name if plan.checkpoint else None for plan in plans if not isinstance(plan, str)]
        errors = [plan for plan in plans if isinstance(plan, str)]
        if (errors or len(set(seen)) > 1) and self.run_lock is not None:
            self.run_lock.release()  # this start ends here; the folder is free for the next
        # A refusal anywhere stops every process, or the others would wait for it in the next collective.
        if errors:
            raise run_dir.RunDirError(errors[0])
        # Each machine reads its own copy of the run directory; a process that saw another checkpoint (or
        # none) would train from a different step and leave the others waiting in a collective.
        if len(set(seen)) > 1:
            raise RuntimeError(
                f"--resume: the processes see different checkpoints in {self.run_dir / 'checkpoints'} "
                f"(by process: {seen}); every machine needs the same run directory (shared, or synced as "
                "SageMaker does with /opt/ml/checkpoints)"
            )
        assert not isinstance(local, str)
        # The main process's run id is the run's: only it writes the manifest and checkpoints.
        local.run_id = plans[0].run_id
        if accelerator.is_main_process:
            for note in run_dir.apply_start(self.run_dir, local):
                logger.warning(note)
        return local

    def _resume(self, checkpoint: Path) -> None:
        """Everything but the weights (already loaded before `prepare`); every process reads the same checkpoint."""
        payload = load_training_state(checkpoint)
        if not distributed.load_optimizer_state(self.accelerator, self.model, self.optimizer, payload["optimizer"]):
            logger.warning("%s holds no optimizer state (DeepSpeed ZeRO-3): the optimizer moments restart", checkpoint)
        self.scheduler.load_state_dict(payload["scheduler"])
        if self.run_start.new_changes:
            # The checkpoint's optimizer and scheduler carry the old settings; a changed recipe must reach them.
            apply_optimizer_settings(self.optimizer, self.scheduler, self.config.training)
        state = TrainerState(**payload["state"])
        self.start_step = state.step
        self.sampler.position = state.data_position
        if self.accelerator.num_processes > 1:
            # The checkpoint holds the main process's random state; give each process its own stream again.
            set_seed(self.config.training.seed + self.accelerator.process_index + 1_000_003 * state.step)
        logger.info("resumed from %s at step %d", checkpoint, state.step)
