#!/usr/bin/env bash
# Every measurement of issue #15 in one command (33 minutes on 2 quiet cores, 2026-12-07):
#   bash benchmarks/all.sh [OUT_DIR]
# Writes JSON (and the engines' markdown table) into OUT_DIR (default /tmp/tf_autoclip_bench).
# The tensorflow-privacy comparison needs its own venv: bash benchmarks/setup_tfp.sh (once).
set -euo pipefail
OUT=${1:-/tmp/tf_autoclip_bench}
PY=${PYTHON:-.venv/bin/python}
TFP=${TFP_PYTHON:-/tmp/tfp-venv/bin/python}
mkdir -p "$OUT"
tfp_flag=()
[ -x "$TFP" ] && tfp_flag=(--tfp_python="$TFP")

# W1, W2, W3 against Keras (speed, peak memory), then tensorflow-privacy back to back.
"$PY" -m benchmarks.engines --workloads=w1,w2,w3 --configs=keras,keras_xla,bk,bk_xla,bk_lowmem \
    --memory --memory_workloads=w1,w2,w3 "${tfp_flag[@]}" \
    --output_json="$OUT/engines.json" --output_md="$OUT/engines.md"
# The least the DP step must spend (FLOP model, noise draw against Keras' step), and on W1
# with TensorFlow's own per-example convolution kernels.
"$PY" -m benchmarks.scaling --bound=w1,w2 --kernel_bound=w1 --windows=7 \
    --output_json="$OUT/bound.json"
# Scaling curves: batch size, sequence length, parameter count (1M to 50M).
"$PY" -m benchmarks.scaling --axes=batch,seq,params --memory_axes=params --windows=3 \
    --output_json="$OUT/scaling.json"
# KerasHub BERT: full fine-tuning and LoRA, DP against the fastest non-DP configuration.
"$PY" -m benchmarks.kerashub --windows=9 --steps=10 \
    --kh_configs=keras,keras_xla,keras_noise,dp,keras_lora,keras_lora_noise,dp_lora \
    --output_json="$OUT/kerashub.json"
# Peak memory on >= 10M-parameter KerasHub models (GPT-2 vocabulary; BERT-small).
"$PY" -m benchmarks.kerashub_memory --model=gpt2 --seq=256 --batch=8 \
    --mem_configs=keras,dp,dp_onehot --memory_steps=2 --output_json="$OUT/gpt2_memory.json"
"$PY" -m benchmarks.kerashub_memory --model=bert_small --seq=128 --batch=16 \
    --mem_configs=keras,dp,dp_lowmem,keras_lora,dp_lora --output_json="$OUT/bert_small_memory.json"
# What is alive at the step's memory peak (BFC allocator profile), and peak RSS, with and
# without low_memory: W3, and W2 at batch 256.
for args in "--mem_workload=w3" "--mem_workload=w2 --mem_batch=256"; do
    name=$(echo "$args" | tr -cd 'a-z0-9')
    "$PY" -m benchmarks.memory_profile $args --mem_configs=keras,bk,bk_lowmem \
        --output_json="$OUT/memory_profile_$name.json"
    "$PY" -m benchmarks.memory_profile $args --mem_configs=keras,bk,bk_lowmem --rss \
        --output_json="$OUT/rss_$name.json"
done
# W3's extra DP memory by variant (frozen embedding, no momentum, one norm form).
"$PY" -m benchmarks.w3_memory_variants | tee "$OUT/w3_memory_variants.jsonl"
echo "Results in $OUT"
