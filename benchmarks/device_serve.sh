#!/usr/bin/env bash
# The GPU checks of the reward server, as one run on a lent GPU machine (no network; .gpu/ carried, made by
# benchmarks/device_prepare.sh). Writes under $OUT: gpu.txt, tests.txt, results_serve_gpu.json (coati against the
# baseline, 1 to 64 clients) and results_serve_gpu_pergroup.json (coati at 16 clients with the per-group attention
# calls instead of the single variable-length call, COATI_VARLEN_ATTENTION=0).
set -uo pipefail
OUT=${OUT:-/tmp/coati-device-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD COATI_DATA_DIR=$PWD/.gpu/data COATI_TEST_TOKENIZER=$PWD/.gpu/skeleton \
    HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  nproc; } 2>&1 | tee "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/data/test_packing.py -k "varlen or packed_equals_padded" 2>&1 \
    | tee "$OUT/tests.txt" | tail -5
timeout 420 python3 benchmarks/bench_serve.py --device cuda --skeleton .gpu/skeleton --requests 64 \
    --json "$OUT/results_serve_gpu.json" 2>&1 | grep -v -e "Loading weights" -e "Writing model"
COATI_VARLEN_ATTENTION=0 timeout 120 python3 benchmarks/bench_serve.py --device cuda --skeleton .gpu/skeleton \
    --servers coati --requests 64 --clients 16 --json "$OUT/results_serve_gpu_pergroup.json" 2>&1 \
    | grep -v -e "Loading weights" -e "Writing model"
