"""The training loop: collect -> update -> sync weights -> log -> checkpoint -> evaluate.

Read `Trainer.train` and `Trainer._step` top to bottom. The parts: `rft.batch` (sampling, scoring,
advantages), `rft.update` (the micro-batch loop and the optimizer step), `rft.algorithms` (the
maths, `objective` above all), `rft.runlog` (every file of the run folder), `rft.checkpoint`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from rft import distributed, run_dir
from rft.agents.loading import load_agent, sampler_for
from rft.batch import Batch, Collector
from rft.checkpoint import (
    TrainerState,
    checkpoint_path,
    load_policy_weights,
    restore_training_state,
    save_checkpoint,
    save_policy,
)
from rft.config import ConfigError, RecipeConfig, eval_interval, recipe_warnings, runs_evaluation
from rft.data import Example, PromptSampler, load_splits
from rft.early_stopping import EarlyStopping
from rft.eval_results import EvalResult
from rft.evaluation import Evaluator
from rft.interrupt import StopOnSignal, TrainingInterrupted, signal_name
from rft.manifest import read_manifest, record_evaluation
from rft.metrics import (
    COMPLETION_TOKENS,
    LENGTH_MEAN,
    PEAK_MEMORY_MB,
    REWARD_MEAN,
    TIME_STEP,
    TIME_UPDATE,
    TIME_WEIGHT_SYNC,
    TOKENS_PER_S,
    UPDATE_SKIPPED,
)
from rft.model_card import record_base_model, write_model_card
from rft.models import load_policy, load_tokenizer, resolve_model_path
from rft.report import write_report
from rft.reward_context import RewardState
from rft.rollout import check_tensor_parallel, choose_engine, make_engine, require_vllm
from rft.rollout.base import check_weights
from rft.runlog import RunLog
from rft.scoring import RewardScorer
from rft.stats import compare, overall_change
from rft.timing import marked_timer, peak_memory_mb
from rft.tracking import check_trackers
from rft.update import Updater, logprob_model

logger = logging.getLogger(__name__)

__all__ = ["Batch", "Trainer"]


class Trainer:
    """One run of a recipe: `train()` runs it to the end; `collect_batch` and `update` are a step's halves."""

    def __init__(
        self, config: RecipeConfig, resume: bool | str = False, *, allow_recipe_change: bool = False,
        overwrite: bool = False,
    ):
        """`resume`: True for the run folder's latest checkpoint of its own run, or a checkpoint's path.

        `allow_recipe_change`: resume even when the recipe changes what the run computes (recorded);
        `overwrite`: start a new run in a folder that holds one, deleting it.
        """
        self.config, self.run_dir = config, config.run_dir
        if config.rollout.engine == "vllm":
            require_vllm()  # a missing extra fails in one line, before any model loads
        check_trackers(config.output.trackers)
        self.accelerator = distributed.make_accelerator(
            log_with=config.output.trackers or None, project_dir=str(config.run_dir / "trackers"),
            mixed_precision=config.model.mixed_precision,
        )
        # The processes of one tensor-parallel vLLM engine sample the same prompts.
        samplers = self.accelerator.num_processes
        if choose_engine(config.rollout.engine) == "vllm":
            check_tensor_parallel(config.rollout.vllm_tensor_parallel_size, self.accelerator.num_processes)
            samplers //= config.rollout.vllm_tensor_parallel_size
        if config.training.prompts_per_step < samplers:
            raise ConfigError(
                f"training.prompts_per_step ({config.training.prompts_per_step}) is below the number of "
                f"engines sampling ({samplers}): every engine generates at least one group"
            )
        if config.training.threads:
            torch.set_num_threads(config.training.threads)
        set_seed(config.training.seed)
        # Rewards and data are checked before the model loads: bad input fails in seconds.
        self.scorer = RewardScorer(config.rewards, config.scoring)
        self.agent = load_agent(config)
        self.train_examples, self.eval_examples = self._load_data()
        # The main process writes the run folder, and holds it for the run's life.
        self.run_lock = run_dir.RunLock(self.run_dir) if self.accelerator.is_main_process else None
        self.run_start = self._checkpoint_to_resume(resume, allow_recipe_change, overwrite)
        self.sampler = PromptSampler(self.train_examples, config.training.seed, config.data.shuffle)
        self._load_models(self.run_start.checkpoint)
        self.runlog = RunLog(config, self.accelerator, self.scorer.names)
        self.collector = Collector(config, self.accelerator, self.model, self.tokenizer, self.scorer,
                                   self.sampler, self.rollout, self._log_completions)
        self.updater = Updater(config, self.accelerator, self.model, self.policy, self.reference,
                               self.optimizer, self.scheduler, self.tokenizer.pad_token_id)
        self.sampling = self.collector.sampling  # what the engine samples with (tests sample with it too)
        self.start_step = self.step = 0
        if self.run_start.checkpoint is not None:
            self._resume(self.run_start.checkpoint)

    def _load_data(self) -> tuple[list[Example], list[Example]]:
        """The train and held-out splits, checked against the rewards' columns and the tokenizer."""
        config = self.config
        train, held_out = load_splits(config.data, None, config.training.seed)
        self.scorer.check_splits(config.data, train, held_out)
        # One process per machine converts or downloads the model; the others then read it from the cache.
        with self.accelerator.local_main_process_first():
            model_path = resolve_model_path(config.model.name_or_path)
        # Prompt lengths need only the tokenizer: a split they empty fails before the model loads.
        tokenizer = load_tokenizer(model_path, config.model.trust_remote_code)
        train, held_out = load_splits(config.data, tokenizer, config.training.seed)
        if self.accelerator.is_main_process:
            for warning in recipe_warnings(config, len(train)):
                logger.warning(warning)
            if not held_out:
                logger.warning(
                    "no held-out rows (data.eval, data.eval_size): this run trains without evaluation"
                )
        return train, held_out

    def _load_models(self, checkpoint: Path | None) -> None:
        """The policy (restored weights), the reference, the engine, the optimizer and its schedule."""
        config, accelerator = self.config, self.accelerator
        with accelerator.local_main_process_first(), distributed.whole_weights_loading(accelerator):
            policy, self.tokenizer = load_policy(config, accelerator.device)
        if checkpoint is not None:
            # Before `prepare`: FSDP2 / ZeRO-3 then shard the restored weights, DDP broadcasts them.
            load_policy_weights(checkpoint, policy)
        self.reference = None
        if config.algorithm.beta > 0 and not config.lora.enabled:
            with distributed.whole_weights_loading(accelerator):
                reference, _ = load_policy(config.base_model(), accelerator.device)
            self.reference = logprob_model(reference.eval().requires_grad_(False), config)
        # After the restored weights: the engine serves the model as it is now.
        prompts = [e.prompt_ids for e in [*self.train_examples, *self.eval_examples]]
        evaluates = bool(self.eval_examples) and runs_evaluation(config)
        self.engine = make_engine(config, policy, self.tokenizer, prompts, evaluates=evaluates)
        self.rollout = sampler_for(config, self.tokenizer, self.agent)
        training = config.training
        optimizer = torch.optim.AdamW(
            [p for p in policy.parameters() if p.requires_grad], lr=training.learning_rate,
            betas=training.adam_betas, weight_decay=training.weight_decay,
        )
        self.scheduler = get_scheduler(
            training.lr_scheduler, optimizer, num_warmup_steps=training.warmup_steps,
            num_training_steps=training.steps * config.algorithm.num_iterations * training.mini_batches,
        )
        distributed.configure_strategy(accelerator, training.micro_batch_size, training.max_grad_norm)
        # What gets prepared is the log-prob computation around the policy, so that DDP / FSDP2 / ZeRO-3
        # see every forward of the update (see `LogProbModel`); the engine keeps the bare policy.
        self.model, self.optimizer = accelerator.prepare(logprob_model(policy, config), optimizer)
        self.policy = accelerator.unwrap_model(self.model).policy
        if accelerator.num_processes > 1:
            # Same seed above for identical initialisation everywhere; now one sampling stream per process.
            set_seed(training.seed + accelerator.process_index)
        # `from_pretrained` returns the model in eval mode, in which transformers skips gradient
        # checkpointing and dropout; engines that switch to eval to sample switch back.
        self.model.train()

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        config = self.config
        self._set_up_evaluation()
        replayed = self.runlog.start(
            self.train_examples, self.eval_examples, self.engine.name, run_id=self.run_start.run_id,
            recipe_changes=self.run_start.recipe_changes, start_step=self.start_step,
            main_mode=self.evaluator.main_mode,
        )
        if self.early_stopping is not None:
            # The plateau count goes on from the checkpoint, as it would have without the interruption.
            for row in replayed:
                self.early_stopping.observe(row["step"], row)
        self._set_reward_state(completed=self.start_step)
        results: dict[str, Any] = {"engine": self.engine.name}
        if config.eval.before_training and self.eval_examples and self.start_step == 0:
            results["before"] = self._evaluate("base", step=0).summary()
            if self.early_stopping is not None:
                self.early_stopping.observe(0, results["before"])
        stop = StopOnSignal(self.accelerator)
        started = time.perf_counter()
        self._steps(stop, results)
        results["steps_s"] = time.perf_counter() - started
        if stop.stopped_by is not None:
            self._stop(stop.stopped_by, self.step)
        if "early_stopped" in results and not self._saves_at(self.step):
            self._save(self.step)
        self._save_final()
        if config.eval.after_training and self.eval_examples:
            results["after"] = self._evaluate("trained", step=self.step).summary()
        if "before" in results and "after" in results:
            # The headline `rft train` prints last: before -> after with the noise rule's verdict.
            results["held_out_change"] = overall_change(results["before"], results["after"],
                                                        config.eval.noise_sigmas)
        self._finish(results)
        self._close()
        return results

    def _steps(self, stop: StopOnSignal, results: dict[str, Any]) -> None:
        """The steps from the start (or the checkpoint) to the last, an early stop or a signal."""
        config, interval = self.config, eval_interval(self.config)
        progress = tqdm(
            range(self.start_step + 1, config.training.steps + 1), initial=self.start_step,
            total=config.training.steps, desc="rft train", disable=not self.accelerator.is_main_process,
            dynamic_ncols=True,
        )
        for step in stop.steps(progress):
            self.step = step
            self._set_reward_state(completed=step - 1)
            metrics = self._step()
            self.runlog.step(step, metrics)
            progress.set_postfix(
                reward=f"{metrics.get(REWARD_MEAN, float('nan')):.3f}",
                len=f"{metrics.get(LENGTH_MEAN, 0):.0f}",
                tok_s=f"{metrics[TOKENS_PER_S]:.0f}",
            )
            if self._saves_at(step):
                self._save(step)
            self._set_reward_state(completed=step)
            if interval and step % interval == 0 and self.eval_examples:
                summary = self._evaluate(f"step-{step}", step=step).summary()
                if self._plateaued(step, summary):
                    results["early_stopped"] = {"step": step, "of": config.training.steps}
                    break
        progress.close()

    def _step(self) -> dict[str, float]:
        """One step's phases, each named and timed; its metrics row."""
        timings: dict[str, float] = {}
        with marked_timer(TIME_STEP, timings):
            check_weights(self.engine, self.step)  # never sample from stale weights
            batch = self.collect_batch()
            with marked_timer(TIME_UPDATE, timings):
                update_metrics = self.update(batch) if len(batch) else {UPDATE_SKIPPED: 1.0}
            with marked_timer(TIME_WEIGHT_SYNC, timings):
                self.engine.sync_weights(self.policy, step=self.step)
        return {
            **batch.metrics, **update_metrics,
            TIME_UPDATE: timings[TIME_UPDATE], TIME_WEIGHT_SYNC: timings[TIME_WEIGHT_SYNC],
            TIME_STEP: timings[TIME_STEP],
            TOKENS_PER_S: batch.metrics.get(COMPLETION_TOKENS.name, 0.0) / timings[TIME_STEP],
            PEAK_MEMORY_MB: peak_memory_mb(),
        }

    def collect_batch(self) -> Batch:
        """Sample groups, score them, and (DAPO dynamic sampling) keep only groups that teach something."""
        return self.collector.collect(self.engine)

    def update(self, batch: Batch) -> dict[str, float]:
        """The update on `batch` (`rft.update.Updater`); its metrics."""
        return self.updater.update(batch)

    def _plateaued(self, step: int, summary: dict[str, Any]) -> bool:
        """Early stopping's decision, the main process's on every process: all leave the loop together."""
        reason = self.early_stopping.observe(step, summary) if self.early_stopping is not None else None
        reason = distributed.gather_from_processes(self.accelerator, reason)[0]
        if reason is not None and self.accelerator.is_main_process:
            tqdm.write(reason)
        return reason is not None

    def _stop(self, signum: int, step: int) -> None:
        """After a signal: checkpoint the last completed step (unless just saved), close, raise."""
        if not self._saves_at(step):
            self._save(step)
        self._close()
        raise TrainingInterrupted(
            signum, f"{signal_name(signum)}: stopped after step {step} of {self.config.training.steps}; "
            f"checkpoint {checkpoint_path(self.run_dir, step)}; continue with --resume",
        )

    def _finish(self, results: dict[str, Any]) -> None:
        """The run's results, model card, before/after comparison and report (main process)."""
        if not self.accelerator.is_main_process:
            return
        self.runlog.results(results)
        write_model_card(self.run_dir / "final", self.config, read_manifest(self.run_dir), results)
        self._compare_before_after(results)
        if self.config.output.report:
            tqdm.write(f"report: {write_report(self.run_dir)}")

    def _close(self) -> None:
        self.engine.close()
        self.rollout.close()
        self.scorer.close()
        if self.evaluator.metric_scorer is not None:
            self.evaluator.metric_scorer.close()
        self.accelerator.end_training()
        if self.run_lock is not None:
            self.run_lock.release()

    def _log_completions(
        self, rows: list[Example], completions: list[Any], rewards: torch.Tensor, extras: dict[str, list[Any]]
    ) -> None:
        self.runlog.completions(self.step, rows, completions, rewards, extras)

    def _set_reward_state(self, completed: int) -> None:
        """What rewards see as `trainer_state` (rft.reward_context) from now on: `completed` steps done."""
        state = RewardState(global_step=completed, max_steps=self.config.training.steps,
                            epoch=self.sampler.position / len(self.train_examples))
        for scorer in (self.scorer, self.evaluator.metric_scorer):
            if scorer is not None:
                scorer.state = state

    # ------------------------------------------------------------------ evaluation
    def _set_up_evaluation(self) -> None:
        """Evaluation inputs are resolved (and bad ones rejected) before the first rollout."""
        config = self.config
        self.evaluator = Evaluator.from_recipe(
            config, self.engine, self.rollout, self.eval_examples, self.scorer
        )
        self._last_evaluation: tuple[int, list[EvalResult]] | None = None
        self.early_stopping = (EarlyStopping(config.eval.patience, config.eval.noise_sigmas)
                               if config.eval.early_stopping else None)

    def _evaluate(self, label: str, step: int) -> EvalResult:
        """Every configured pass (greedy / sampled) on the held-out split; the base model's from the cache."""
        if self._last_evaluation is not None and self._last_evaluation[0] == step and label == "trained":
            # The weights have not moved since this step's periodic evaluation: same scores, no second pass.
            results = self._last_evaluation[1]
            self.runlog.record_evaluation(label, results)
            return results[0]
        with distributed.sampling_weights(self.accelerator, self.model, self.engine.reads_policy):
            results = self.evaluator.baseline(self.config) if label == "base" else self.evaluator.run(label)
        self._last_evaluation = (step, results)
        self.runlog.evaluation(step, label, results)
        return results[0]

    def _compare_before_after(self, results: dict[str, Any]) -> None:
        if "before" in results and "after" in results:
            rows = compare(results["before"], results["after"], self.config.eval.noise_sigmas)
            record_evaluation(self.run_dir, "before_after", [row.to_dict() for row in rows])

    # ------------------------------------------------------------------ checkpoints
    def _saves_at(self, step: int) -> bool:
        return bool(self.config.output.save_every and step % self.config.output.save_every == 0)

    def _save(self, step: int) -> None:
        # Every process takes part in gathering sharded weights; only the main one writes.
        state_dict = distributed.full_state_dict(self.accelerator, self.model, prefix="policy.")
        optimizer_state = distributed.optimizer_state(self.accelerator, self.model, self.optimizer)
        if self.accelerator.is_main_process:
            info = {"run_id": self.run_start.run_id, "recipe": self.config.model_dump(mode="json"),
                    "recipe_changes": self.run_start.recipe_changes}
            state = TrainerState(step=step, data_position=self.sampler.position, engine_name=self.engine.name)
            save_checkpoint(
                self.run_dir, state, info, self.policy, self.tokenizer, self.optimizer, self.scheduler,
                keep=self.config.output.keep_checkpoints, state_dict=state_dict,
                optimizer_state=optimizer_state,
            )
        # Nobody moves on (or resumes, or exits) before the checkpoint is complete.
        self.accelerator.wait_for_everyone()

    def _save_final(self) -> None:
        state_dict = distributed.full_state_dict(self.accelerator, self.model, prefix="policy.")
        if self.accelerator.is_main_process:
            save_policy(self.policy, self.tokenizer, self.run_dir / "final", state_dict=state_dict)
            record_base_model(self.run_dir / "final", self.config)
        self.accelerator.wait_for_everyone()

    def _checkpoint_to_resume(
        self, resume: bool | str, allow_recipe_change: bool, overwrite: bool
    ) -> run_dir.RunStart:
        accelerator = self.accelerator
        return run_dir.decide_start(
            self.config, resume, allow_recipe_change=allow_recipe_change, overwrite=overwrite,
            main=accelerator.is_main_process, lock=self.run_lock,
            gather=lambda value: distributed.gather_from_processes(accelerator, value),
        )

    def _resume(self, checkpoint: Path) -> None:
        """Everything but the weights (loaded before `prepare`); every process reads the same checkpoint."""
        state = restore_training_state(
            checkpoint, self.accelerator, self.model, self.optimizer, self.scheduler, self.config.training,
            recipe_changed=bool(self.run_start.new_changes),
        )
        self.start_step, self.sampler.position = state.step, state.data_position
        # The engine started from the checkpoint's weights (loaded before it was built).
        self.engine.weights_step = state.step
        if self.accelerator.num_processes > 1:
            # The checkpoint holds the main process's random state; give each process its own stream again.
            set_seed(self.config.training.seed + self.accelerator.process_index + 1_000_003 * state.step)
        logger.info("resumed from %s at step %d", checkpoint, state.step)
