"""The whole recipe (`RecipeConfig`), its cross-section checks, and what is derived from it."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, model_validator

from rft.config.algorithm import AlgorithmConfig
from rft.config.monitoring import (
    AUTO_EVAL_EVALUATIONS,
    AUTO_EVAL_MAX_INTERVAL,
    AUTO_EVAL_MIN_INTERVAL,
    EvalConfig,
    MonitorConfig,
)
from rft.config.sections import (
    DataConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    RewardConfig,
    RolloutConfig,
    ScoringConfig,
    Section,
    TrainingConfig,
)


class RecipeConfig(Section):
    """A whole run: every section, checked together."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig
    rewards: list[RewardConfig] = Field(
        default_factory=list, description="Reward functions, weighted and summed; at least one unless an "
        "`environment` gives the rewards.",
    )
    environment: str | None = Field(
        None, description="Agents: `path/to/env.py:Factory` (or `package.module:Factory`), built per "
        "trajectory from the row; see rft/environment.py. Episodes run up to rollout.max_turns turns.",
    )
    tools: list[str] = Field(
        default_factory=list, description="Agents: tool functions `path.py:function` offered to the model "
        "(chat template `tools=`); its calls run in worker processes and their results answer it.",
    )
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    monitors: MonitorConfig = Field(default_factory=MonitorConfig)
    bedrock_hyperparameters: str | None = Field(
        None, description="A Bedrock RFT job's hyperparameters (JSON, as CreateModelCustomizationJob takes "
        "them), applied over the recipe (`rft train --bedrock-hyperparameters`; mapping in "
        "rft/bedrock_job.py); the file is copied into the run directory.",
    )

    @property
    def run_dir(self) -> Path:
        return Path(self.output.run_dir.format(name=self.output.name))

    def base_model(self) -> RecipeConfig:
        """This recipe with LoRA off: the base model alone (reference policy, baselines, reward check)."""
        return self.model_copy(update={"lora": self.lora.model_copy(update={"enabled": False})})

    @property
    def overlong_lengths(self) -> tuple[int, int]:
        """(L_max, L_cache) for the soft overlong punishment."""
        longest = self.rollout.trajectory_tokens if self.is_agent else self.rollout.max_new_tokens
        max_length = self.algorithm.overlong_max_length or longest
        cache_length = self.algorithm.overlong_cache_length or max(1, max_length // 4)
        return max_length, cache_length

    @property
    def is_agent(self) -> bool:
        """Episodes with an environment or tools, rather than one completion per prompt."""
        return self.environment is not None or bool(self.tools)

    @model_validator(mode="after")
    def _check(self) -> RecipeConfig:
        if not self.rewards and self.environment is None:
            raise ValueError("rewards: at least one reward function (or an environment that gives rewards)")
        max_length, cache_length = self.overlong_lengths
        if self.algorithm.soft_overlong and cache_length >= max_length:
            raise ValueError(f"algorithm.overlong_cache_length ({cache_length}) must be below L_max "
                             f"({max_length})")
        if self.algorithm.dynamic_sampling and self.rollout.group_size < 2:
            raise ValueError("algorithm.dynamic_sampling needs rollout.group_size >= 2")
        return self


def eval_interval(config: RecipeConfig) -> int:
    """Steps between periodic evaluations (0: none): `eval.every`, or the automatic interval when unset."""
    if config.eval.every is not None:
        return config.eval.every
    interval = round(config.training.steps / AUTO_EVAL_EVALUATIONS)
    return min(max(interval, AUTO_EVAL_MIN_INTERVAL), AUTO_EVAL_MAX_INTERVAL)


def runs_evaluation(config: RecipeConfig) -> bool:
    """Whether a training run evaluates at all: before, after or during training."""
    return config.eval.before_training or config.eval.after_training or eval_interval(config) > 0


def recipe_warnings(config: RecipeConfig, train_rows: int) -> list[str]:
    """What a valid recipe does that its author is unlikely to mean; the trainer logs each once, at start."""
    warnings = []
    if config.rollout.group_size == 1:
        warnings.append(
            f"rollout.group_size is 1: the {config.algorithm.advantage} advantage of a group of one is 0, so "
            "no completion is ever reinforced and nothing is learned; use group_size >= 2 (the papers use 8 "
            "to 64)"
        )
    prompts = config.training.prompts_per_step
    if 0 < train_rows < prompts:
        warnings.append(
            f"training.prompts_per_step ({prompts}) exceeds the {train_rows} training prompts: each prompt "
            f"is drawn about {prompts / train_rows:.0f} times a step, as duplicate groups; lower "
            "prompts_per_step or raise rollout.group_size"
        )
    return warnings


def dump_config(config: RecipeConfig) -> str:
    """The resolved recipe as YAML (presets expanded), as written into the run directory."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
