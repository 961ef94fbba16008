"""Experiment trackers through `accelerate` (TensorBoard, Weights & Biases, MLflow, Trackio, ...).

Off by default; a recipe names them in `output.trackers`. accelerate silently skips a tracker whose
package is missing, so the check here turns that into one clear error before any model loads.
"""

from __future__ import annotations

from typing import Any

from accelerate import Accelerator

from rft.config import ConfigError, RecipeConfig

# accelerate's tracker name -> the package that makes it available (what to pip install).
TRACKER_PACKAGES = {
    "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio", "aim": "aim",
    "comet_ml": "comet_ml", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
}


def check_trackers(names: list[str]) -> None:
    """Fail in one line when a recipe names a tracker whose package is not installed."""
    from accelerate.tracking import get_available_trackers

    available = {str(tracker) for tracker in get_available_trackers()}
    missing = [name for name in names if name not in available]
    if missing:
        packages = " ".join(TRACKER_PACKAGES[name] for name in missing)
        raise ConfigError(
            f"output.trackers: {missing} not installed (pip install {packages}); "
            f"installed: {sorted(available)}"
        )


def flat_config(value: Any, prefix: str = "") -> dict[str, Any]:
    """The recipe as flat `section.field` scalars: what TensorBoard's hparams and MLflow's params accept."""
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(flat_config(item, f"{prefix}{key}."))
        return flat
    key = prefix.rstrip(".")
    if value is None or isinstance(value, list | tuple):
        return {key: str(value)}
    return {key: value}


def start_trackers(accelerator: Accelerator, config: RecipeConfig) -> None:
    """Open the recipe's trackers (run name = output.name) and record the resolved recipe in them."""
    if config.output.trackers:
        accelerator.init_trackers(config.output.name, config=flat_config(config.model_dump(mode="json")))
