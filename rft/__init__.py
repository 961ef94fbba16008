"""rft: reinforcement fine-tuning for language models (GRPO, DAPO, GSPO).

The Python API (see `rft.api`): `rft.train(recipe)`, `rft.load_config(path)`, `rft.RecipeConfig`,
`rft.Trainer`. Imported on first use, so `import rft` stays light (no torch until a Trainer is needed).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["RecipeConfig", "Trainer", "load_config", "train"]

_LAZY = {
    "train": "rft.api", "RecipeConfig": "rft.config", "load_config": "rft.config", "Trainer": "rft.trainer",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'rft' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
