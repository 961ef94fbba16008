"""The Python API beside the CLI: `rft.train(recipe)` does what `rft train recipe.yaml` does.

    import rft

    results = rft.train("recipe.yaml", overrides=["training.steps=10"])
    config = rft.load_config("recipe.yaml")          # a validated rft.RecipeConfig
    trainer = rft.Trainer(config)                     # for finer control: trainer.train()
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rft.config import RecipeConfig, load_config


def train(
    recipe: str | Path | dict[str, Any] | RecipeConfig, overrides: list[str] | None = None, *,
    resume: bool | str = False, allow_recipe_change: bool = False, overwrite: bool = False,
) -> dict[str, Any]:
    """Train one recipe and return its results (`results.json`: the engine, and with evaluation the held-out
    summaries `before` / `after`); the run folder is `config.run_dir`.

    `recipe`: a YAML path, a recipe dict or a `RecipeConfig`; `overrides`: `a.b=value` strings as `--set`
    takes (not with a `RecipeConfig`: change the object instead). `resume`, `allow_recipe_change`,
    `overwrite`: as `rft.Trainer` (and `rft train --resume / --allow-recipe-change / --overwrite`).
    A signal ends training with `rft.interrupt.TrainingInterrupted` after a checkpoint.
    """
    from rft.trainer import Trainer

    if isinstance(recipe, RecipeConfig):
        if overrides:
            raise ValueError("overrides apply to a recipe file or dict; change the RecipeConfig itself "
                             "instead")
        config = recipe
    elif isinstance(recipe, dict):
        config = load_config(overrides=overrides, raw=recipe)
    else:
        config = load_config(recipe, overrides)
    trainer = Trainer(config, resume=resume, allow_recipe_change=allow_recipe_change, overwrite=overwrite)
    return trainer.train()
