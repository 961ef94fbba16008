"""The source directory a SageMaker job runs (`sourcedir.tar.gz` on S3, unpacked to /opt/ml/code).

It holds the `rft` and `rewards` packages, the recipe with every setting resolved (`recipe.yaml`),
the reward files and other files it names (`recipe_files/`), `requirements.txt` (installed by the
container before the entry point runs) and `rft_sagemaker_entry.py` (see `rft.sagemaker.entry`).
Local data files and a local model directory become input channels `train`, `eval`, `model`.
Nothing leaves this machine here.
"""

from __future__ import annotations

import copy
import re
import shutil
import tarfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

from rft.config import EMBEDDED_MODEL, RecipeConfig, dump_config, load_config
from rft.sagemaker.entry import ENTRY_SCRIPT
from rft.sagemaker.vllm_pins import vllm_for_image

PROJECT = "rft-trainer"
PACKAGES = ("rft", "rewards", "environments")
ENTRY_SHIM = '''"""SageMaker runs this file (hyperparameter sagemaker_program); the work is in
rft/sagemaker/entry.py."""

import sys

from rft.sagemaker.entry import main

if __name__ == "__main__":
    sys.exit(main())
'''


class LaunchError(ValueError):
    """The job cannot be launched as asked (one line, naming the option)."""


@dataclass
class SourcePackage:
    """A staged source directory and the local data / model to upload as channels."""

    directory: Path
    channels: dict[str, Path]
    config: RecipeConfig


def project_root() -> Path:
    return Path(__file__).resolve().parents[2]


def gpu_instance(instance_type: str) -> bool:
    """Whether a SageMaker instance type has NVIDIA GPUs (the ml.g* and ml.p* families)."""
    return re.match(r"ml\.[gp]\d", instance_type) is not None


def requirements(config: RecipeConfig, image: str, gpu: bool = True) -> list[str]:
    """This project's dependencies for the container on `image`: without torch (the container's CUDA
    build stays), with the `vllm` extra when the recipe samples with vLLM on a GPU instance
    (`rollout.engine` vllm, or auto).

    vLLM itself is pinned to the release built for the image's torch, with that torch beside it
    (`rft.sagemaker.vllm_pins`); LaunchError, before anything uploads, when the image has none.
    """
    engine = config.rollout.engine
    if engine == "vllm" and not gpu:
        raise LaunchError(
            "rollout.engine: vllm needs a GPU instance (ml.g*, ml.p*); on CPU instances use "
            "rollout.engine: transformers (or auto)"
        )
    try:
        declared = [Requirement(line) for line in metadata.requires(PROJECT) or []]
    except metadata.PackageNotFoundError:
        raise LaunchError(f"{PROJECT} is not installed (pip install -e . in the project): its dependencies "
                          "are unknown") from None
    # Markers other than `extra` stay, for pip to read in the container.
    lines = [str(requirement) for requirement in declared
             if _extra(requirement) is None and requirement.name != "torch"]
    if not (gpu and engine in ("vllm", "auto")):
        return lines
    extra = [requirement for requirement in declared if _extra(requirement) == "vllm"]
    supported = next(requirement.specifier for requirement in extra if requirement.name == "vllm")
    try:
        release, torch_version = vllm_for_image(image, supported)
    except ValueError as exc:
        raise LaunchError(
            f"rollout.engine: {engine} on a GPU instance samples with vLLM, but the {exc}"
        ) from None
    lines += [_without_marker(requirement) for requirement in extra if requirement.name != "vllm"]
    return [*lines, f"vllm=={release}", f"torch=={torch_version}"]


def _without_marker(requirement: Requirement) -> str:
    unmarked = copy.copy(requirement)
    unmarked.marker = None
    return str(unmarked)


def _extra(requirement: Requirement) -> str | None:
    """The extra a declared requirement belongs to (None: a dependency of every install)."""
    match = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", str(requirement.marker or ""))
    return match.group(1) if match else None


def _carry_file(source: Path, directory: Path, carried: dict[Path, str]) -> str:
    """Copy a local file the recipe names into recipe_files/; its path relative to the source directory."""
    if source not in carried:
        target = Path("recipe_files") / f"{len(carried)}_{source.name}"
        (directory / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, directory / target)
        carried[source] = str(target)
    return carried[source]


def _carry_spec(spec: str, directory: Path, carried: dict[Path, str]) -> str:
    """A `file.py:name` spec pointed at the file's copy; a `package.module:name` spec as it is."""
    target, _, name = spec.rpartition(":")
    if target.endswith(".py"):
        return f"{_carry_file(Path(target).resolve(), directory, carried)}:{name}"
    return spec


def _carry_reward_files(config: RecipeConfig, directory: Path) -> None:
    """Point reward, environment and tool specs and file-valued kwargs at copies inside the source
    directory."""
    carried: dict[Path, str] = {}
    if config.environment is not None:
        config.environment = _carry_spec(config.environment, directory, carried)
    config.tools = [_carry_spec(spec, directory, carried) for spec in config.tools]
    for reward in config.rewards:
        reward.fn = _carry_spec(reward.fn, directory, carried)
        reward.kwargs = _carry_values(reward.kwargs, directory, carried)
        if reward.build is not None:  # a factory's arguments may name files too
            reward.build = _carry_values(reward.build, directory, carried)


def _carry_values(values: dict[str, Any], directory: Path, carried: dict[Path, str]) -> dict[str, Any]:
    return {
        key: _carry_file(Path(value).resolve(), directory, carried)
        if isinstance(value, str) and Path(value).is_file() else value
        for key, value in values.items()
    }


def stage(recipe: Path, overrides: list[str], directory: Path, *,
          image: str, accelerate_config: Path | None = None, gpu: bool = True) -> SourcePackage:
    """Validate the recipe and lay out the source directory; nothing leaves this machine here.

    `gpu`: the job's instances have GPUs; `image`: the training image (both for `requirements`)."""
    config = load_config(recipe, overrides)
    needed = requirements(config, image, gpu)
    packaged = copy.deepcopy(config)
    root = project_root()
    for package in PACKAGES:
        shutil.copytree(root / package, directory / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _carry_reward_files(packaged, directory)
    channels = local_channels(config, recipe)
    _point_at_channels(packaged, channels)
    # The console's curves come from the job's log lines (`metric_definitions`).
    packaged.output.log_every = packaged.output.log_every or 1
    (directory / "recipe.yaml").write_text(
        f"# {recipe.name} as launched, every setting resolved (rft sagemaker launch)\n"
        + dump_config(packaged)
    )
    (directory / "requirements.txt").write_text("\n".join(needed) + "\n")
    (directory / ENTRY_SCRIPT).write_text(ENTRY_SHIM)
    if accelerate_config is not None:
        if not accelerate_config.is_file():
            raise LaunchError(f"--accelerate-config {accelerate_config}: file not found")
        shutil.copy2(accelerate_config, directory / "accelerate_config.yaml")
    return SourcePackage(directory=directory, channels=channels, config=config)


def local_channels(config: RecipeConfig, recipe: Path) -> dict[str, Path]:
    """The local data files and model folder that go up as input channels (hub ones are fetched in the
    job)."""
    channels: dict[str, Path] = {}
    for channel, source in (("train", config.data.train), ("eval", config.data.eval)):
        if source and not source.startswith("hf:"):
            path = Path(source)
            if not path.exists():
                raise LaunchError(f"{recipe}: data.{channel}: {source} not found")
            channels[channel] = path
    if config.model.name_or_path == EMBEDDED_MODEL or Path(config.model.name_or_path).is_dir():
        # Imported here: it loads torch and transformers, which only a local model needs.
        from rft.models import resolve_model_path

        channels["model"] = Path(resolve_model_path(config.model.name_or_path))
    return channels


def _point_at_channels(packaged: RecipeConfig, channels: dict[str, Path]) -> None:
    # The entry point replaces these with the channel paths; the names say what the channels hold.
    if "train" in channels:
        packaged.data.train = f"channel:train/{channels['train'].name}"
    if "eval" in channels:
        packaged.data.eval = f"channel:eval/{channels['eval'].name}"
    if "model" in channels:
        packaged.model.name_or_path = "channel:model"


def pack(directory: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(directory)))
    return archive


