"""The recipe schema: one typed, documented, validated configuration for a run.

A recipe is YAML. Every field is documented in place (the `description` of each `Field`), so
`rft config` (or `rft train --help-config`) and these files are the reference. Unknown or ill-typed
fields are rejected with the field's dotted name and, for choices, the allowed values, before any
model loads. Torch-free.

- `sections.py`: model, lora, data, rewards, scoring, rollout, training, output;
- `algorithm.py`: the algorithm section and the papers' presets;
- `monitoring.py`: held-out evaluation and the training monitors;
- `recipe.py`: `RecipeConfig` (the sections together, cross-section checks) and what derives from it;
- `loading.py`: `load_config`: YAML, `--set` overrides, errors naming file and field, relative paths;
- `schema.py`: the reference printed from the declarations.
"""

from rft.config.algorithm import PRESETS, AlgorithmConfig, Preset
from rft.config.loading import apply_overrides, format_errors, load_config
from rft.config.monitoring import (
    AUTO_EVAL_EVALUATIONS,
    AUTO_EVAL_MAX_INTERVAL,
    AUTO_EVAL_MIN_INTERVAL,
    EvalConfig,
    MonitorConfig,
)
from rft.config.recipe import RecipeConfig, dump_config, eval_interval, recipe_warnings, runs_evaluation
from rft.config.schema import FieldDoc, format_schema, schema_fields
from rft.config.sections import (
    EMBEDDED_MODEL,
    ConfigError,
    DataConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    RewardConfig,
    RolloutConfig,
    ScoringConfig,
    TrainingConfig,
)

__all__ = [
    "AUTO_EVAL_EVALUATIONS",
    "AUTO_EVAL_MAX_INTERVAL",
    "AUTO_EVAL_MIN_INTERVAL",
    "EMBEDDED_MODEL",
    "PRESETS",
    "AlgorithmConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "FieldDoc",
    "LoraConfig",
    "ModelConfig",
    "MonitorConfig",
    "OutputConfig",
    "Preset",
    "RecipeConfig",
    "RewardConfig",
    "RolloutConfig",
    "ScoringConfig",
    "TrainingConfig",
    "apply_overrides",
    "dump_config",
    "eval_interval",
    "format_errors",
    "format_schema",
    "load_config",
    "recipe_warnings",
    "runs_evaluation",
    "schema_fields",
]
