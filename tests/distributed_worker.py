"""One training run, under `torchrun`, with rollouts that depend only on the prompt and the weights.

`python tests/distributed_worker.py RECIPE.yaml [--resume] [--run-dir-per-process]` (via torchrun).
`--run-dir-per-process` gives each process its own run directory (`<run_dir>-<rank>`), as machines
that do not share one would have. Sampling randomness normally differs
between processes, so a run on two processes and one on a single process would train on different
completions. Seeding each prompt's sampling with the prompt itself makes a group's completions the
same whichever process generates it, so the two runs can be compared weight for weight.
"""

from __future__ import annotations

import os
import sys
import zlib
from collections.abc import Sequence

import torch

from rft.config import load_config
from rft.rollout.base import RolloutEngine, RolloutOutput, SamplingSettings
from rft.trainer import Trainer


class PromptSeededEngine:
    """Wraps a real engine; generates prompt by prompt, each with a seed drawn from its token ids."""

    def __init__(self, engine: RolloutEngine):
        self.engine = engine
        self.name = engine.name

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingSettings) -> RolloutOutput:
        merged = RolloutOutput(completion_ids=[], logprobs=[], truncated=[])
        for ids in prompt_ids:
            torch.manual_seed(zlib.crc32(repr(list(ids)).encode()))
            output = self.engine.generate([ids], n, sampling)
            merged.completion_ids.extend(output.completion_ids)
            merged.logprobs.extend(output.logprobs or [])
            merged.truncated.extend(output.truncated)
        return merged

    def sync_weights(self, policy: torch.nn.Module) -> None:
        self.engine.sync_weights(policy)

    def close(self) -> None:
        self.engine.close()


def main(recipe: str, resume: bool, run_dir_per_process: bool) -> None:
    config = load_config(recipe)
    if run_dir_per_process:
        config.output.run_dir = f"{config.output.run_dir}-{os.environ['RANK']}"
    trainer = Trainer(config, resume=resume)
    trainer.engine = PromptSeededEngine(trainer.engine)
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1], resume="--resume" in sys.argv[2:], run_dir_per_process="--run-dir-per-process" in sys.argv[2:])
