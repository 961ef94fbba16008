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
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from rft import algorithms
from rft.checkpoint import TrainerState, list_checkpoints, load_checkpoint, save_checkpoint, save_policy
from rft.config import RecipeConfig, dump_config
from rft.data import Example, PromptSampler, load_splits
from rft.evaluation import EvalResult, decode_completions, evaluate
from rft.models import completion_logprobs, load_policy, reference_policy
from rft.rollout import make_engine, require_vllm
from rft.rollout.base import SamplingSettings
from rft.scoring import RewardScorer

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


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Trainer:
    def __init__(self, config: RecipeConfig, resume: bool | str = False):
        self.config = config
        if config.rollout.engine == "vllm":
            require_vllm()  # a missing extra fails in one line, before any model loads
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        if config.training.threads:
            torch.set_num_threads(config.training.threads)
        set_seed(config.training.seed)
        self.run_dir = config.run_dir
        # Rewards and data are checked before the model loads: bad input fails in seconds.
        self.scorer = RewardScorer(config.rewards)
        load_splits(config.data, None, config.training.seed)
        self.model, self.tokenizer = load_policy(config, self.accelerator.device)
        self.reference = None
        if config.algorithm.beta > 0 and not config.lora.enabled:
            self.reference, _ = load_policy(config.model_copy(update={"lora": config.lora.model_copy(update={"enabled": False})}), self.accelerator.device)
            self.reference.eval().requires_grad_(False)
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
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.policy = self.accelerator.unwrap_model(self.model)
        # `from_pretrained` returns the model in eval mode, in which transformers skips gradient
        # checkpointing (model.gradient_checkpointing) and dropout; engines that switch to eval to
        # sample switch back.
        self.model.train()
        self.sampling = SamplingSettings(
            max_new_tokens=config.rollout.max_new_tokens, temperature=config.rollout.temperature,
            top_p=config.rollout.top_p, top_k=config.rollout.top_k,
        )
        self.start_step = self.step = 0
        if resume:
            self._resume(resume)

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
        (self.run_dir / "results.json").write_text(json.dumps(results, indent=2))
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
        for _ in range(rounds):
            rounds_used += 1
            examples = self.sampler.take(wanted)
            start = time.perf_counter()
            rollout = self.engine.generate([e.prompt_ids for e in examples], group_size, self.sampling)
            metrics["time/generation"] += time.perf_counter() - start
            start = time.perf_counter()
            groups, round_metrics = self._score(examples, rollout.completion_ids, rollout.logprobs, rollout.truncated)
            metrics["time/reward"] += time.perf_counter() - start
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

    def _score(
        self, examples: list[Example], completion_ids: list[list[int]], logprobs: list[list[float]] | None,
        truncated: list[bool],
    ) -> tuple[list[dict[str, Any]], dict[str, float]]:
        config, group_size = self.config, self.config.rollout.group_size
        completions = decode_completions(self.tokenizer, examples, completion_ids, group_size)
        rows = [examples[i // group_size] for i in range(len(completion_ids))]
        scores = self.scorer.score([e.prompt for e in rows], completions, completion_ids, [e.row for e in rows])
        rewards = torch.tensor(scores.total, dtype=torch.float64)
        metrics = dict(scores.metrics)
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

    def _logprobs(self, model: torch.nn.Module, micro: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return completion_logprobs(
            model, micro.input_ids, micro.attention_mask, micro.completion_start, micro.completion_lengths,
            temperature=self.config.rollout.temperature, chunk_size=self.config.training.logprob_chunk_size,
        )

    def _partition(self, size: int) -> list[list[list[int]]]:
        """Mini-batches (one optimizer update each) of micro-batches (one forward/backward each)."""
        training = self.config.training
        per_mini = math.ceil(size / training.mini_batches)
        minis = [list(range(s, min(s + per_mini, size))) for s in range(0, size, per_mini)]
        return [[mini[s : s + training.micro_batch_size] for s in range(0, len(mini), training.micro_batch_size)] for mini in minis]

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
                        ref_logps[i] = self._logprobs(reference, micro)[0]
        metrics: dict[str, float] = {"time/logprobs": time.perf_counter() - start}
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}

        def record(key: str, value: float) -> None:
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1

        processes = self.accelerator.num_processes
        micro_index = 0
        for _ in range(algorithm.num_iterations):
            micro_index = 0
            for mini in partition:
                minis = micro_batches[micro_index : micro_index + len(mini)]
                update_loss = 0.0
                # Global normalisers over the whole mini-batch (all micro-batches, all processes):
                # this is what makes token-mean independent of how the batch is split.
                totals = torch.tensor(
                    [float(sum(m.mask.shape[0] for m in minis)), float(sum(m.mask.sum().item() for m in minis))],
                    device=self.accelerator.device,
                )
                num_sequences, num_tokens = self.accelerator.reduce(totals, reduction="sum").tolist()
                for micro in minis:
                    logp, entropy = self._logprobs(self.model, micro)
                    old_logp = logp.detach() if reuse_current else old_logps[micro_index]
                    is_weights = None
                    if micro.rollout_logp is not None:
                        mismatch = algorithms.rollout_mismatch(old_logp, micro.rollout_logp, micro.mask)
                        for key, value in mismatch.items():
                            record(f"rollout/{key}", value.item())
                        if algorithm.tis_cap is not None:
                            is_weights, tis_stats = algorithms.truncated_importance_weights(
                                old_logp, micro.rollout_logp, micro.mask, algorithm.tis_cap
                            )
                            record("rollout/tis_capped_share", tis_stats["tis_capped_share"].item())
                    per_token, stats = algorithms.policy_loss(
                        logp, old_logp, micro.advantages, micro.mask,
                        eps_low=algorithm.eps_low, eps_high=algorithm.eps_high, delta=algorithm.delta,
                        importance_sampling_level=algorithm.importance_sampling_level, is_weights=is_weights,
                    )
                    if ref_logps[micro_index] is not None:
                        kl = algorithms.kl_penalty(logp, ref_logps[micro_index], algorithm.kl_estimator)
                        per_token = per_token + algorithm.beta * kl * micro.mask
                        record("kl/ref", ((kl * micro.mask).sum() / micro.mask.sum().clamp(min=1)).item())
                    loss = algorithms.aggregate_loss(
                        per_token, micro.mask, loss_agg=algorithm.loss_agg, num_sequences=num_sequences,
                        num_tokens=max(num_tokens, 1.0), max_completion_length=config.rollout.max_new_tokens,
                    )
                    # DDP averages gradients over processes; the loss is already a global sum.
                    self.accelerator.backward(loss * processes)
                    token_count = micro.mask.sum().clamp(min=1)
                    update_loss += loss.item()
                    record("entropy", ((entropy * micro.mask).sum() / token_count).item())
                    kl_old = algorithms.kl_penalty(logp.detach(), old_logp, "k3")
                    record("kl/old", ((kl_old * micro.mask).sum() / token_count).item())
                    for key, value in stats.items():
                        record(f"clip/{key}" if key.startswith("clip") else f"policy/{key}", value.item())
                    micro_index += 1
                if config.training.max_grad_norm is not None:
                    grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), config.training.max_grad_norm)
                else:
                    grad_norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in self.model.parameters() if p.grad is not None))
                record("loss", update_loss)
                record("grad_norm", float(grad_norm))
                record("learning_rate", self.scheduler.get_last_lr()[0])
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        metrics.update({key: total / counts[key] for key, total in sums.items()})
        return metrics

    # ------------------------------------------------------------------ evaluation, logging, checkpoints
    def _evaluate(self, label: str, step: int) -> EvalResult:
        eval_config = self.config.eval
        sampling = SamplingSettings(
            max_new_tokens=eval_config.max_new_tokens or self.config.rollout.max_new_tokens,
            temperature=self.config.rollout.temperature, top_p=self.config.rollout.top_p,
            top_k=self.config.rollout.top_k, greedy=eval_config.greedy,
        )
        result = evaluate(label, self.engine, self.tokenizer, self.eval_examples, self.scorer, sampling, eval_config.batch_size)
        if self.accelerator.is_main_process:
            record = {"step": step, **result.summary(), "samples": result.samples}
            with (self.run_dir / "evaluations.jsonl").open("a") as handle:
                handle.write(json.dumps(record, default=str) + "\n")
            tqdm.write(f"held-out [{label}] mean reward {result.mean:.3f} ± {result.stderr:.3f} (n={result.count})")
        return result

    def _prepare_run_dir(self) -> None:
        if not self.accelerator.is_main_process:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(self.config))
        if self.start_step == 0:
            for name in ("metrics.jsonl", "evaluations.jsonl", "completions.jsonl"):
                (self.run_dir / name).unlink(missing_ok=True)

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        if self.accelerator.is_main_process:
            with (self.run_dir / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps({"step": step, **metrics}) + "\n")

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
        if self.accelerator.is_main_process:
            save_checkpoint(
                self.run_dir, self._state(step), self.policy, self.tokenizer, self.optimizer, self.scheduler,
                keep=self.config.output.keep_checkpoints,
            )
        self.accelerator.wait_for_everyone()

    def _save_final(self) -> None:
        if self.accelerator.is_main_process:
            save_policy(self.policy, self.tokenizer, self.run_dir / "final")

    def _resume(self, resume: bool | str) -> None:
        checkpoints = list_checkpoints(self.run_dir)
        checkpoint = Path(resume) if isinstance(resume, str) else (checkpoints[-1] if checkpoints else None)
        if checkpoint is None:
            logger.warning("--resume: no checkpoint in %s; starting from scratch", self.run_dir / "checkpoints")
            return
        state = load_checkpoint(checkpoint, self.policy, self.optimizer, self.scheduler)
        self.start_step = state.step
        self.sampler.position = state.data_position
        self.engine.sync_weights(self.policy)
        # Metrics written after the checkpoint belong to the lost part of the killed run.
        metrics_path = self.run_dir / "metrics.jsonl"
        if metrics_path.exists():
            kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= state.step]
            metrics_path.write_text("".join(line + "\n" for line in kept))
        logger.info("resumed from %s at step %d", checkpoint, state.step)
