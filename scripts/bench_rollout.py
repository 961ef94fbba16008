"""Rollout throughput and the step time split, transformers and vLLM engines (a benchmark, not a test).

Trains the quickstart recipe (embedded SmolLM2, its LoRA and sampling settings) for a few steps
with each engine and prints one row per engine: rollout tokens per second (completion tokens /
generation seconds) and the mean seconds of a step spent in generation, reward, log-probs (the
separate old / reference pass; 0 when one update per batch reuses the update's own forward),
update, and weight sync. The first step is left out as warm-up; engine start-up is shown apart.

    RFT_CACHE=/path/to/cache PYTHONPATH=. python scripts/bench_rollout.py
    ... --steps 6 --engines vllm --set lora.enabled=false     # full fine-tuning, vLLM only
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from statistics import mean
from typing import Any

QUICKSTART = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"
COLUMNS = ("generation", "reward", "logprobs", "update", "weight_sync", "step")


def engine_config(engine: str, recipe: Path, steps: int, overrides: list[str], run_dir: Path) -> Any:
    from rft.config import load_config

    return load_config(recipe, [
        *overrides, f"rollout.engine={engine}", f"training.steps={steps}", f"output.run_dir={run_dir}",
        "output.save_every=0", "eval.before_training=false", "eval.after_training=false",
    ])


def bench_engine(config: Any) -> dict[str, Any]:
    """Train with `config`; mean per-step metrics over all steps but the first."""
    from rft.trainer import Trainer

    start = time.perf_counter()
    trainer = Trainer(config)
    startup = time.perf_counter() - start
    trainer.train()
    trainer.engine.close()
    records = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    tokens = sum(r["completion/tokens"] for r in records)
    generation = sum(r["time/generation"] for r in records)
    row = {
        "engine": config.rollout.engine, "startup": startup, "tokens_per_step": tokens / len(records),
        "tokens_per_s": tokens / generation,
        "generation": mean(r["time/generation"] for r in records),
        "reward": mean(r["time/reward"] for r in records),
        "logprobs": mean(r["time/logprobs"] for r in records),
        # time/update spans the whole `Trainer.update`, which includes the log-prob pass.
        "update": mean(r["time/update"] - r["time/logprobs"] for r in records),
        "weight_sync": mean(r["time/weight_sync"] for r in records),
        "step": mean(r["time/step"] for r in records),
    }
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| engine | start-up s | tokens/step | rollout tokens/s | " + " | ".join(f"{c} s" for c in COLUMNS)
        + " |"
    )
    lines = [header, "|" + "---|" * (4 + len(COLUMNS))]
    for row in rows:
        cells = [
            row["engine"], f"{row['startup']:.1f}", f"{row['tokens_per_step']:.0f}",
            f"{row['tokens_per_s']:.1f}",
        ]
        cells += [f"{row[c]:.2f}" for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=QUICKSTART)
    parser.add_argument(
        "--steps", type=int, default=4, help="training steps per engine (the first is warm-up)"
    )
    parser.add_argument(
        "--engines", nargs="+", default=["transformers", "vllm"], choices=["transformers", "vllm"]
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is warm-up)")
    from rft.config import ConfigError
    from rft.rollout import EngineStartError, require_vllm

    with tempfile.TemporaryDirectory(prefix="rft-bench-") as scratch:
        # Every engine's recipe is checked before the first one trains: a bad --set fails in seconds.
        try:
            configs = [
                engine_config(e, args.recipe, args.steps, args.overrides, Path(scratch) / e)
                for e in args.engines
            ]
            if "vllm" in args.engines:
                require_vllm()
        except (ConfigError, EngineStartError) as error:
            parser.error(str(error))
        rows = [bench_engine(config) for config in configs]
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
