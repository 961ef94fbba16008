"""The policy trains in train mode, so `model.gradient_checkpointing` really recomputes activations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from rft.config import load_config
from rft.models import causal_lm
from tests.conftest import tiny_recipe


@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_gradient_checkpointing_recomputes_each_layer(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lora: bool, checkpointing: bool
) -> None:
    from rft.trainer import Trainer

    # Prompts not shared: a shared prompt runs each layer twice per micro-batch (prompt, then completions).
    recipe = tiny_recipe(
        tiny_model_dir, tmp_path, model={"gradient_checkpointing": checkpointing}, lora={"enabled": lora},
        training={"share_prompts": False},
    )
    trainer = Trainer(load_config(raw=recipe))
    batch = trainer.collect_batch()  # the transformers engine samples in eval mode, then restores train mode
    layer = causal_lm(trainer.policy).model.layers[0]
    assert layer.training
    calls: list[int] = []
    forward = layer.forward

    def counting_forward(*args: Any, **kwargs: Any) -> Any:
        # Counted in `forward` itself: the checkpoint's recomputation skips module hooks.
        calls.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(layer, "forward", counting_forward)
    trainer.update(batch)
    micro_batches = sum(len(mini) for mini in trainer.updater.partition(batch))
    # One forward per micro-batch; with checkpointing the backward runs the layer once more.
    assert len(calls) == micro_batches * (2 if checkpointing else 1)


# bf16 first: a later trainer in the same process must not inherit its precision.
@pytest.mark.parametrize("mixed_precision", ["bf16", "no", None])
def test_mixed_precision_runs_the_update_under_autocast_and_sampling_in_float32(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mixed_precision: str | None
) -> None:
    from rft.trainer import Trainer

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    recipe = tiny_recipe(tiny_model_dir, tmp_path, model={"mixed_precision": mixed_precision})
    trainer = Trainer(load_config(raw=recipe))
    projection = causal_lm(trainer.policy).model.layers[0].mlp.down_proj
    output_dtypes: list[Any] = []
    projection.register_forward_hook(lambda module, args, output: output_dtypes.append(output.dtype))
    batch = trainer.collect_batch()
    sampled = set(output_dtypes)
    output_dtypes.clear()
    metrics = trainer.update(batch)
    assert sampled == {torch.float32}  # the sampler's forwards are not under autocast
    expected = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    assert set(output_dtypes) == {expected}
    assert all(p.dtype == torch.float32 for p in trainer.policy.parameters())
    # The sampler's (float32) log-probs against the update's: bf16 matmuls move them, beyond float32 noise.
    mismatch = metrics["rollout/mismatch_abs_mean"]
    assert (mismatch > 1e-4) if mixed_precision == "bf16" else (mismatch < 1e-5)
