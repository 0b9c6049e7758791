#!/usr/bin/env bash
# GPU check of the trainer configs, run in one device call: the native tiny model under trainer=gpu, and the
# HF Qwen3-MoE tiny model under DeepSpeed ZeRO-2, ZeRO-3 and ZeRO-3 offload, each for a few bf16 steps
# through the real CLI, then a Qwen3-30B-A3B-shaped model cut to 2 layers (model=moe30b geometry, random init:
# 128 experts top-8, d=2048, vocab 151936; 1.87B parameters, ~28 GiB of weights+grads+Adam) under ZeRO-3.
# Prints status, loss, NLL bound, tokens/s and peak memory per run.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]      (DEVICE=cpu runs the same script on CPU, for testing it)
# ONLY_ZERO3=1 skips the plain-GPU and ZeRO-2 runs; SKIP_MOE30B=1 skips the moe30b-shaped one.
set -u
OUT=${1:-gpu_check_out}
DEVICE=${DEVICE:-gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1 DLM_OUTPUT_ROOT="$OUT/runs" DLM_CACHE_DIR="$OUT/cache"
SMALL_SAMPLES="samples.num_unconditional=8 samples.num_prompted=8 samples.num_infill=8"

run() {
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" $PY -m dlm.train logger=none name="$name" hydra.run.dir="$OUT/runs/$name" $SMALL_SAMPLES "$@" \
    > "$OUT/$name.log" 2>&1
  local rc=$?
  $PY - "$OUT/runs/$name/results.json" "$name" "$rc" "$((SECONDS - start))" <<'PY'
import json, sys
path, name, rc, secs = sys.argv[1:]
try:
    r = json.load(open(path))
except FileNotFoundError:
    print(f"{name:28s} rc={rc} {secs}s  no results.json"); sys.exit()
keys = ["train/loss", "val/nll_bound", "train/tokens_per_s", "train/tflops", "train/mfu", "train/peak_mem_gib",
        "sample/valid_frac"]
fig = "  ".join(f"{k.split('/')[1]}={r[k]:.4g}" for k in keys if k in r)
print(f"{name:28s} rc={rc} {secs}s  {r['status']} step={r['global_step']}  {fig}")
PY
  [ "$rc" = 0 ] || tail -n 25 "$OUT/$name.log"
}

if [ "$DEVICE" = cpu ]; then
  run cpu_tiny 120 trainer=cpu trainer.max_steps=20 trainer.val_check_interval=10
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -n "${ONLY_ZERO3:-}" ] || run gpu_tiny_bf16 90 trainer=gpu trainer.max_steps=600 trainer.val_check_interval=300
MOE="model=moe_tiny trainer.devices=1 trainer.max_steps=40 trainer.val_check_interval=20 data.batch_size=32"
[ -n "${ONLY_ZERO3:-}" ] || run zero2_moe_tiny 80 trainer=deepspeed_zero2 $MOE
run zero3_moe_tiny 80 trainer=deepspeed $MOE
run zero3_offload_moe_tiny 120 trainer=deepspeed_zero3_offload $MOE
# model=moe30b without its checkpoint: model.load_weights=false builds its geometry (known offline) with random
# weights, here cut from 48 layers to 2. Plans on CPU with dry_run=true (1,868,573,184 parameters).
[ -n "${SKIP_MOE30B:-}" ] || run zero3_moe30b_2layers 180 trainer=deepspeed model=moe30b model.load_weights=false \
  "model.config={num_hidden_layers:2}" trainer.devices=1 trainer.max_steps=10 trainer.val_check_interval=10 \
  trainer.limit_val_batches=2 data.batch_size=16
