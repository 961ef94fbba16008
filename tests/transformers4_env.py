"""A separate virtual environment with transformers 4.51.3 (the version Bedrock documents).

Created once under $RFT_CACHE (or ~/.cache/rft) and reused; the project's own environment is
never touched. torch is pinned to 2.13.0, the CPU wheel on this machine's disk. Built in a
`.partial` folder and renamed when its imports work, so an interrupted install is never reused.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.export_fixtures import CHAT_PROMPTS, cache_dir

TRANSFORMERS4_REQUIREMENTS = ("torch==2.13.0", "transformers==4.51.3", "numpy")
PROBE_SCRIPT = Path(__file__).with_name("transformers4_probe.py")
# pip's messages when the package index cannot be reached at all: the one case where the
# tests skip instead of failing.
_UNREACHABLE_MARKERS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ConnectTimeoutError",
    "ProxyError",
)


def transformers4_python() -> Path:
    """The venv's python, creating the venv on first use (about 40 s)."""
    venv = cache_dir() / "venv-transformers-4.51.3"
    python = venv / "bin" / "python"
    if python.exists():
        return python
    partial = venv.with_name(venv.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(partial)], check=True)
    install = subprocess.run(
        [str(partial / "bin" / "python"), "-m", "pip", "install", "--quiet", *TRANSFORMERS4_REQUIREMENTS],
        capture_output=True,
        text=True,
    )
    if install.returncode != 0:
        output = install.stdout + install.stderr
        shutil.rmtree(partial, ignore_errors=True)
        if any(marker in output for marker in _UNREACHABLE_MARKERS):
            pytest.skip(
                f"pip cannot reach the package index to install transformers 4.51.3:\n{output[-2000:]}"
            )
        raise RuntimeError(f"installing {' '.join(TRANSFORMERS4_REQUIREMENTS)} failed:\n{output[-4000:]}")
    check = subprocess.run(
        [
            str(partial / "bin" / "python"), "-c",
            "import torch, transformers; print(transformers.__version__)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert check.stdout.strip() == "4.51.3", check.stdout
    # The venv's scripts name their own folder; renaming keeps `bin/python` (a symlink) working,
    # and the probe is always run as `python script`, never through an entry-point script.
    partial.rename(venv)
    return python


def probe_with_transformers4(
    exports: dict[str, Path], token_ids: list[list[int]], work_dir: Path
) -> dict[str, tuple[dict, object]]:
    """Load each export under transformers 4.51.3; returns {name: (report, logits ndarray or None)}.

    `token_ids` are CHAT_PROMPTS as the policy's tokenizer encodes them; logits are computed on them.
    """
    import numpy

    python = transformers4_python()
    work_dir.mkdir(parents=True, exist_ok=True)
    request = work_dir / "probe_request.json"
    request.write_text(
        json.dumps({
            "exports": {k: str(v) for k, v in exports.items()}, "chats": list(CHAT_PROMPTS),
            "token_ids": token_ids,
        })
    )
    out_dir = work_dir / "probe_out"
    result = subprocess.run(
        [str(python), str(PROBE_SCRIPT), str(request), str(out_dir)], capture_output=True, text=True,
        timeout=600
    )
    if result.returncode != 0:
        raise AssertionError(f"transformers 4.51.3 could not read the export:\n{result.stderr[-6000:]}")
    results = {}
    for name in exports:
        logits_file = out_dir / f"{name}.npy"
        logits = numpy.load(logits_file) if logits_file.exists() else None
        results[name] = (json.loads((out_dir / f"{name}.json").read_text()), logits)
    return results
