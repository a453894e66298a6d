#!/usr/bin/env bash
# Issue 29's measurements, on one machine in one run (each training run uses 2 processes, as the main job):
#  1. the main job's recipe (examples/rm_bilingual.yaml) for $STEPS (30) optimizer steps, without and with
#     --length_head: correlations pooled within each language (the default), over the whole batch, and the former at
#     --length_loss_weight 0.2 (equal steps, so all see the same pairs; LENGTH_RUNS picks some of base odin-batch
#     odin-lang odin-lang02, TIES=0 skips part 2); held-out figures from the trainer's final evaluation of 200
#     held-out pairs (metrics.jsonl / summary.json: acc per language, length_bias), and coati.evaluate on
#     UltraFeedback's held-out file (never trained on) for the length bias with Spearman's correlation;
#  2. UltraFeedback's 1,000 training pairs (111 tied) for 20 steps with --ties drop, rao_kupper and davidson, scored on
#     its held-out file: the trainer's evaluation (acc; tie_nll with ties kept) and coati.evaluate's acc and ECE.
# Usage: COATI_DATA_DIR=../shared/data [STEPS=30] [LENGTH_RUNS="..."] [TIES=0] bash benchmarks/bench_length_ties.sh OUT_DIR
set -u
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench_length_ties.sh OUT_DIR}
mkdir -p "$OUT"
export COATI_DATA_DIR="${COATI_DATA_DIR:-$(cd .. && pwd)/shared/data}" HF_HUB_OFFLINE=1
UF=$COATI_DATA_DIR/en/ultrafeedback_binarized_train_clean.jsonl
UFE=$COATI_DATA_DIR/en/ultrafeedback_binarized_eval_clean.jsonl
lscpu | grep "Model name"
L="--max_steps ${STEPS:-30} --eval_every 0 --max_eval_samples 200 --log_every 10 --disable_tqdm --overwrite_output_dir"
for v in ${LENGTH_RUNS:-base odin-batch odin-lang odin-lang02}; do
  case $v in
    base) extra="" ;;
    odin-batch) extra="--length_head --length_groups batch" ;;
    odin-lang) extra="--length_head --length_groups language" ;;
    odin-lang02) extra="--length_head --length_groups language --length_loss_weight 0.2" ;;
    *) echo "unknown run $v"; exit 2 ;;
  esac
  date; echo "== length $v"
  scripts/python -m coati.launch --standalone --nproc_per_node 2 train_reward_model.py \
     --config examples/rm_bilingual.yaml --save_path "$OUT/len-$v" $L $extra > "$OUT/len-$v.log" 2>&1; echo "rc=$?"
  scripts/python -m coati.evaluate --model_path "$OUT/len-$v" --dataset "$UFE" --output_dir "$OUT/len-$v/eval-uf" \
     --disable_tqdm --device cpu > "$OUT/len-$v-uf.log" 2>&1; echo "uf rc=$?"
done
[ "${TIES:-1}" = 0 ] && { date; exit 0; }
T="--model llama --pretrain smollm2-135m --dataset $UF --eval_dataset $UFE --max_len 256 --batch_size 4 --lora_rank 16
   --lora_alpha 32 --max_steps 20 --eval_every 0 --log_every 10 --disable_tqdm --overwrite_output_dir --seed 0"
for t in drop rao_kupper davidson; do
  date; echo "== ties $t"
  scripts/python -m coati.launch --standalone --nproc_per_node 2 train_reward_model.py $T --ties $t \
     --save_path "$OUT/ties-$t" > "$OUT/ties-$t.log" 2>&1; echo "rc=$?"
  scripts/python -m coati.evaluate --model_path "$OUT/ties-$t" --dataset "$UFE" --output_dir "$OUT/ties-$t/eval-uf" \
     --disable_tqdm --device cpu > "$OUT/ties-$t-uf.log" 2>&1; echo "uf rc=$?"
done
date
