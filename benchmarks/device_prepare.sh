#!/usr/bin/env bash
# Prepares .gpu/ (ignored by git) for benchmarks/device_serve.sh, here, on the CPU machine with the package index
# (versions as installed here, where the test suite passes):
#   wheels/    the packages the GPU machine lacks or holds in other versions (its Python is 3.12, it has no network)
#   data/      the real preference data the benchmark's requests are drawn from (a copy of $COATI_DATA_DIR)
#   skeleton/  a SmolLM2-135M reward-model export without its weights (the weights are too large to carry; the
#              benchmark writes random ones of the same shape there)
# Then, with the device tool: run(command="bash benchmarks/device_serve.sh", carry=[".gpu"], timeout_s=540).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu
mkdir -p .gpu/wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/wheels -c constraints.txt \
    transformers tokenizers huggingface_hub peft fastapi starlette uvicorn \
    httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 idna==3.20 click==8.5.1 opentelemetry-api==1.45.2 \
    annotated-doc==0.0.7 pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
cp -r "${COATI_DATA_DIR:-../shared/data}" .gpu/data
python3 benchmarks/bench_serve.py --make_skeleton "${1:-new}" .gpu/skeleton
du -sh .gpu
