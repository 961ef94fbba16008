"""One training run, under `torchrun`, with rollouts that depend only on the prompt and the weights.

`python tests/distributed_worker.py RECIPE.yaml [--resume] [--run-dir-per-process] [--sgd]
[--record-gradients DIR] [--break-gradient-sync]` (via torchrun).

`--run-dir-per-process` gives each process its own run directory (`<run_dir>-<rank>`), as machines
that do not share one would have. Sampling randomness normally differs
between processes, so a run on two processes and one on a single process would train on different
completions. Seeding each prompt's sampling with the prompt itself makes a group's completions the
same whichever process generates it, so the two runs can be compared weight for weight.

Test-only hooks (not recipe options: no user should train this way):
- `--sgd`: the trainer's AdamW is replaced by SGD with momentum (`adam_betas[0]`), same learning rate
  and weight decay. AdamW divides each gradient by its own running magnitude, so on an element whose
  gradient nearly cancels it turns float summation-order noise (which depends on the CPU's kernels
  and on how the batch is split) into an update of about the learning rate. SGD's update is linear
  in the gradients: one and two processes then agree up to rounding, weight for weight, on any CPU.
  The momentum buffer is optimizer state that a resume has to restore.
- `--record-gradients DIR`: each process writes every update's gradients, as the optimizer receives
  them (after the sync across processes and clipping), to `DIR/update-<n>-rank-<r>.safetensors`.
- `--break-gradient-sync`: no backward pass reduces gradients across processes (the negative
  control: a missing sync must be caught by the comparison).
"""

from __future__ import annotations

import argparse
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from unittest import mock

import torch
from safetensors.torch import save_file

from rft import distributed
from rft.config import load_config
from rft.rollout.base import RolloutEngine, RolloutOutput, SamplingSettings
from rft.trainer import Trainer


class PromptSeededEngine:
    """Wraps a real engine; generates prompt by prompt, each with a seed drawn from its token ids."""

    def __init__(self, engine: RolloutEngine):
        self.engine = engine
        self.name = engine.name
        self.reads_policy = engine.reads_policy
        self.tensor_parallel_size = engine.tensor_parallel_size

    @property
    def weights_step(self) -> int:
        return self.engine.weights_step

    def generate(
        self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingSettings
    ) -> RolloutOutput:
        merged = RolloutOutput(completion_ids=[], logprobs=[], truncated=[])
        for ids in prompt_ids:
            torch.manual_seed(zlib.crc32(repr(list(ids)).encode()))
            output = self.engine.generate([ids], n, sampling)
            merged.completion_ids.extend(output.completion_ids)
            merged.logprobs.extend(output.logprobs or [])
            merged.truncated.extend(output.truncated)
        return merged

    def sync_weights(self, policy: torch.nn.Module, step: int | None = None) -> None:
        self.engine.sync_weights(policy, step)

    def close(self) -> None:
        self.engine.close()


class _SGD(torch.optim.SGD):
    """Built where the trainer builds its AdamW, with AdamW's arguments.

    A class, not a function: accelerate imports DeepSpeed (where installed) while the trainer is built,
    and DeepSpeed subclasses `torch.optim.AdamW` as it is imported.
    """

    def __init__(
        self, params: Iterable[torch.nn.Parameter], *, lr: float, betas: tuple[float, float],
        weight_decay: float,
    ) -> None:
        super().__init__(params, lr=lr, momentum=betas[0], weight_decay=weight_decay)


def _optimizer(sgd: bool) -> AbstractContextManager:
    return mock.patch.object(torch.optim, "AdamW", _SGD) if sgd else nullcontext()


def _record_gradients(trainer: Trainer, directory: Path) -> None:
    """Wraps the optimizer's `step` so that it first writes the gradients it is about to apply."""
    directory.mkdir(parents=True, exist_ok=True)
    step, model = trainer.optimizer.step, trainer.accelerator.unwrap_model(trainer.model)
    rank, updates = trainer.accelerator.process_index, 0

    def recording_step(*args: object, **kwargs: object) -> object:
        nonlocal updates
        updates += 1
        gradients = {
            name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None
        }
        save_file(gradients, str(directory / f"update-{updates}-rank-{rank}.safetensors"))
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step


@contextmanager
def _unsynced_gradients() -> Iterator[None]:
    original = distributed.accumulate_gradients

    def never_sync(accelerator: object, model: torch.nn.Module, sync: bool) -> AbstractContextManager:
        return original(accelerator, model, sync=False)

    with mock.patch.object(distributed, "accumulate_gradients", never_sync):
        yield


def main(arguments: argparse.Namespace) -> None:
    config = load_config(arguments.recipe)
    if arguments.run_dir_per_process:
        config.output.run_dir = f"{config.output.run_dir}-{os.environ['RANK']}"
    with _optimizer(arguments.sgd):
        trainer = Trainer(config, resume=arguments.resume)
    trainer.engine = PromptSeededEngine(trainer.engine)
    if arguments.record_gradients:
        _record_gradients(trainer, Path(arguments.record_gradients))
    if arguments.break_gradient_sync:
        with _unsynced_gradients():
            trainer.train()
    else:
        trainer.train()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--run-dir-per-process", action="store_true")
    parser.add_argument("--sgd", action="store_true")
    parser.add_argument("--record-gradients", metavar="DIR")
    parser.add_argument("--break-gradient-sync", action="store_true")
    main(parser.parse_args())
