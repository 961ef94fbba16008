"""The base model's held-out scores, cached in $RFT_CACHE/baselines.

The key holds the model weights' fingerprint, the held-out data's fingerprint, the reward and metric
sources' hashes, the engine and every evaluation setting: a rerun with any of them changed evaluates
again. A reward whose source cannot be found (a built-in, a lambda) is never cached: its code could
change without the key noticing.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rft.config import RecipeConfig
from rft.data import Example
from rft.eval_plans import EvalPlan
from rft.eval_results import EvalResult
from rft.manifest import data_fingerprint, model_fingerprint, reward_fingerprints, sha256_json

logger = logging.getLogger(__name__)

BASELINE_VERSION = 2  # bump when the cached result format or the meaning of a score changes


def baseline_key(
    config: RecipeConfig, examples: Sequence[Example], plans: Sequence[EvalPlan], slices: Sequence[str],
    engine: str,
) -> tuple[str, dict[str, Any]]:
    """(cache key, what it was made of): model weights, held-out data, reward and metric sources, settings."""
    parts = {
        "version": BASELINE_VERSION,
        "model": {**model_fingerprint(config.model.name_or_path), "dtype": config.model.dtype},
        "data": data_fingerprint(examples),
        "rewards": reward_fingerprints(config.rewards),
        "metrics": reward_fingerprints(config.eval.metrics),
        "plans": [plan.settings() for plan in plans],
        "slices": list(slices),
        "engine": engine,
    }
    for group in ("rewards", "metrics"):
        # The source file's location does not change what it computes; its hash does.
        for fingerprint in parts[group]:
            fingerprint.pop("source_file")
            if fingerprint["source_sha256"] is None:
                fingerprint["uncacheable"] = True
    return sha256_json(parts), parts


def baseline_path(key: str) -> Path:
    # rft.models imports transformers (seconds): `rft` builds every command's parser without it.
    from rft.models import cache_dir

    return cache_dir() / "baselines" / f"{key}.json"


def load_baseline(key: str) -> list[EvalResult] | None:
    path = baseline_path(key)
    try:
        payload = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    results = [EvalResult.from_dict(data) for data in payload["results"]]
    for result in results:
        result.cached = True
    return results


def store_baseline(key: str, parts: dict[str, Any], results: Sequence[EvalResult]) -> None:
    path = baseline_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Every process of a multi-process run evaluates; each writes its own partial file, the rename is atomic.
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps({"key": parts, "results": [r.to_dict() for r in results]}, default=str))
    partial.replace(path)


def cached_baseline(
    config: RecipeConfig, examples: Sequence[Example], plans: Sequence[EvalPlan], slices: Sequence[str],
    engine: str, evaluate: Callable[[], list[EvalResult]],
) -> list[EvalResult]:
    """The cached results when nothing they depend on changed, else `evaluate()`'s (then cached)."""
    if not config.eval.baseline_cache or config.is_agent:
        # An agent's scores also depend on its environment and tools, code this key does not cover.
        return evaluate()
    key, parts = baseline_key(config, examples, plans, slices, engine)
    cacheable = not any(f.get("uncacheable") for group in ("rewards", "metrics") for f in parts[group])
    cached = load_baseline(key) if cacheable else None
    if cached is not None:
        logger.info("base model scores from the baseline cache (%s)", baseline_path(key))
        return cached
    results = evaluate()
    if cacheable:
        store_baseline(key, parts, results)
    return results
