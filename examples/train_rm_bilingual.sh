#!/usr/bin/env bash
# The main job: SmolLM2-135M-Instruct + LoRA reward model on real English and Chinese preference pairs,
# 2 processes (DDP on gloo here, nccl on GPUs), held-out evaluation per language, HF export to out/rm-bilingual.
# The settings are the recipe examples/rm_bilingual.yaml.
# 254 optimizer steps; the time depends on the processor (docs/setup.md: 30 to 50 min on 2-core AMD EPYCs, about
# 75 min on a 2-core Intel Xeon, all with AVX512-BF16). Extra flags are passed on (the last one given wins).
# `python -m coati.launch` is torchrun with the same arguments that exits 130/143 without a traceback on Ctrl-C or
# SIGTERM (each rank finishes its step first; add --save_every N to be able to --resume auto).
set -euo pipefail
cd "$(dirname "$0")/.."
export COATI_DATA_DIR="${COATI_DATA_DIR:-$(cd .. && pwd)/shared/data}"
export HF_HUB_OFFLINE=1
scripts/python -m coati.launch --standalone --nproc_per_node 2 train_reward_model.py \
    --config examples/rm_bilingual.yaml --save_path "${SAVE_PATH:-out/rm-bilingual}" "$@"
