#!/usr/bin/env bash
# Install ColossalAI 0.5.0 (for --strategy colossalai_ddp / colossalai_zero2 / colossalai_gemini) next to the installed
# torch and transformers without letting pip replace them.
#
# ColossalAI 0.5.0 declares torch<=2.5.1, transformers==4.51.3 and peft<=0.13.2, so it is installed with --no-deps and
# only what `import colossalai.booster` needs is added:
#   einops        (shardformer attention)               pure Python, no dependencies
#   galore-torch  (colossalai.nn.optimizer imports it)   --no-deps: it requires torch and transformers
#   bitsandbytes  (galore_torch imports it)              --no-deps: it requires torch
#   ninja         (JIT build of ColossalAI's Adam kernels on first use; HybridAdam needs them, and also nvcc /
#                  CUDA_HOME: colossalai_gemini and colossalai_zero2 with CPU offload use HybridAdam)
# Side effect: with bitsandbytes installed, `import peft` imports it too (about 1.5 s more per process; on a CPU-only
# torch it prints one "Failed to load CPU gemm_4bit_forward ..." line). Use a separate environment if that matters.
# Every install also runs under a constraints file pinning the installed torch and transformers, and the script
# fails if either version changed.
#
# Usage: pip install -e .[colossalai] && bash scripts/install_colossalai.sh   (PYTHON=... to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(scripts/python -c "import sys; print(sys.executable)")}
# --no-warn-conflicts: pip would otherwise list colossalai's declared pins (torch<=2.5.1, transformers==4.51.3,
# peft<=0.13.2, ray, fastapi, ...) as conflicts; none of them is needed to import and use the booster and plugins.
PIP=("$PY" -m pip install -q --disable-pip-version-check --no-warn-conflicts)

versions() { "$PY" -c "import torch, transformers; print(torch.__version__, transformers.__version__)"; }
before=$(versions)
read -r torch_v tf_v <<<"$before"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
printf 'torch==%s\ntransformers==%s\n' "$torch_v" "$tf_v" >"$constraints"

# BUILD_EXT=0: no ahead-of-time CUDA kernels (they would be built against the declared torch); kernels are compiled
# on first use instead.
BUILD_EXT=0 "${PIP[@]}" -c "$constraints" --no-deps "colossalai==0.5.0"
"${PIP[@]}" -c "$constraints" --no-deps "galore-torch==1.0" "bitsandbytes==0.50.2"
"${PIP[@]}" -c "$constraints" "einops>=0.8" "ninja>=1.11"

after=$(versions)
if [[ "$before" != "$after" ]]; then
    echo "error: torch/transformers changed from '$before' to '$after'; reinstall them (scripts/setup.sh)" >&2
    exit 1
fi
"$PY" -W ignore -c "import colossalai
from colossalai.booster import Booster
from colossalai.booster.plugin import GeminiPlugin, LowLevelZeroPlugin, TorchDDPPlugin
print('colossalai', colossalai.__version__, 'imports fine; torch/transformers unchanged:', '$after')"
