"""How a run is watched: held-out evaluation (`eval`) and the training monitors (`monitors`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rft.config.sections import RewardConfig, Section

# Automatic evaluation interval (eval.every unset): about 10 evaluations a run, within these bounds, so
# short runs are not slowed by evaluations and long ones still watch the held-out reward.
AUTO_EVAL_EVALUATIONS = 10
AUTO_EVAL_MIN_INTERVAL = 5
AUTO_EVAL_MAX_INTERVAL = 50


class EvalConfig(Section):
    """Held-out evaluation: when, how it decodes, what it reports."""

    before_training: bool = Field(
        True, description="Score the base model on the held-out split before training (cached per model, "
        "data, rewards).",
    )
    after_training: bool = Field(
        True, description="Score the trained policy on the held-out split at the end.",
    )
    every: int | None = Field(
        None, ge=0, description="Evaluate every N steps during training (0: off). None: automatic, about 10 "
        f"evaluations a run, every {AUTO_EVAL_MIN_INTERVAL} to {AUTO_EVAL_MAX_INTERVAL} steps "
        "(`eval_interval`)."
    )
    early_stopping: bool = Field(
        True, description="Stop when the held-out reward has not improved beyond noise (noise_sigmas) on "
        "`patience` evaluations in a row, as Bedrock RFT does; the run then ends as a finished one "
        "(checkpoint, final/, report).",
    )
    patience: int = Field(
        3, ge=1, description="Periodic evaluations without an improvement beyond noise before early stopping."
    )
    greedy: bool = Field(
        True, description="Greedy decoding for evaluation; False samples with the rollout settings.",
    )
    sampled: bool = Field(
        False, description="With greedy: true, also run a sampled pass (rollout temperature / top_p / top_k),"
        " reported as mode `sampled` beside `greedy`.",
    )
    samples_per_prompt: int = Field(
        1, ge=1, description="Completions per prompt in the sampled pass; each prompt's score is their mean."
    )
    pass_k: list[int] = Field(
        default_factory=list, description="pass@k values to report from the sampled pass (unbiased estimator "
        "over samples_per_prompt samples), e.g. [1, 4]. Needs a sampled pass and samples_per_prompt >= max "
        "k.",
    )
    pass_threshold: float = Field(
        1.0, description="A completion passes (for pass@k) when its total reward >= this.",
    )
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
        "auto", description="Row metadata fields to report per value (e.g. [domain, difficulty_level]). auto:"
        " every string/integer/boolean field with 2 to 20 values, each value on 2+ rows on average (answer "
        "fields excluded).",
    )
    noise_sigmas: float = Field(
        2.0, gt=0, description="A change counts as larger than its noise when |change| > noise_sigmas x its "
        "two-sample standard error (monitors use the same rule)."
    )
    baseline_cache: bool = Field(
        True, description="Reuse the base model's scores from $RFT_CACHE/baselines when model weights, held-"
        "out data, reward sources and evaluation settings are unchanged.",
    )
    keep_samples: int = Field(4, ge=0, description="Completions kept per evaluation for the report.")
    max_new_tokens: int | None = Field(None, ge=1, description="Default rollout.max_new_tokens.")
    batch_size: int = Field(64, ge=1, description="Prompts per generate call during evaluation.")

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if self.sampled and not self.greedy:
            raise ValueError("eval.sampled adds a sampled pass to the greedy one; with greedy: false every "
                             "pass samples")
        if self.pass_k:
            if self.greedy and not self.sampled:
                raise ValueError("eval.pass_k needs sampled completions: set eval.sampled: true (or greedy: "
                                 "false)")
            if min(self.pass_k) < 1 or max(self.pass_k) > self.samples_per_prompt:
                raise ValueError(
                    f"eval.pass_k {self.pass_k}: each k must be between 1 and eval.samples_per_prompt "
                    f"({self.samples_per_prompt})"
                )
        return self


class MonitorConfig(Section):
    """Warnings while training: plateaus, overfitting, reward hacking, runs that cannot learn."""

    enabled: bool = Field(
        True, description="Watch training for plateaus, overfitting and reward hacking signals.",
    )
    every: int | None = Field(
        None, ge=2, description="Steps per monitoring window; default eval.every (at least 2), else 10. Noise"
        " is the spread of step values within a window.",
    )
    window: int = Field(
        3, ge=1, description="K: trends compare the latest window (or evaluation) with the one K before.",
    )
    length_limit_fraction: float = Field(
        0.9, gt=0, le=1, description="Warn when mean completion length climbs to this fraction of the "
        "maximum.",
    )
    truncation_jump: float = Field(
        0.2, gt=0, le=1, description="Warn when the truncated share rises by more than this from one window "
        "to the next.",
    )
    entropy_collapse_fraction: float = Field(
        0.1, gt=0, lt=1, description="Warn when entropy falls below this fraction of the first window's."
    )
    early_steps: int = Field(
        2, ge=1, description="Steps in a row after which a run that cannot learn is reported: every "
        "completion truncated, every group's rewards equal. Checked every step, from the first, not per "
        "window.",
    )
    truncated_share_limit: float = Field(
        0.9, gt=0, le=1, description="Warn when this share of completions is truncated for `early_steps` "
        "steps in a row.",
    )
    judge_rewards: list[str] | None = Field(
        None, description="Reward names that are judges (compared with the rule rewards); default: names "
        "containing 'judge'.",
    )


