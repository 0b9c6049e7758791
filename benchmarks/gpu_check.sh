#!/usr/bin/env bash
# GPU check of the trainer configs, run in one device call: the native tiny model under trainer=gpu, and the
# HF Qwen3-MoE tiny model under DeepSpeed ZeRO-2, ZeRO-3 and ZeRO-3 offload, each for a few bf16 steps
# through the real CLI, then a Qwen3-30B-A3B-shaped model cut to 2 layers (model=moe30b geometry, random init:
# 128 experts top-8, d=2048, vocab 151936; 1.87B parameters, ~28 GiB of weights+grads+Adam) under ZeRO-3.
# Then method=grpo (issue 15's scale path) on the same tiny MoE: ZeRO-2, ZeRO-3 (collective generation), ZeRO-2 with
# LoRA adapters, and QLoRA (4-bit base, plain GPU) where bitsandbytes is installed (the GPU image lacks it and its
# wheel does not fit the 64 MiB carry beside the others).
# Prints status, loss, NLL bound, tokens/s and peak memory per run (a GRPO run: its last rl/reward_mean too).
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
keys = ["train/loss", "rl/reward_mean", "rl/kl", "val/nll_bound", "train/tokens_per_s", "train/tflops", "train/mfu",
        "train/peak_mem_gib", "sample/valid_frac"]
fig = "  ".join(f"{k.split('/')[1]}={r[k]:.4g}" for k in keys if k in r)
print(f"{name:28s} rc={rc} {secs}s  {r['status']} step={r['global_step']}  {fig}")
PY
  [ "$rc" = 0 ] || tail -n 25 "$OUT/$name.log"
}

# GRPO: 2 prompts x 8 rollouts of the bracket grammar, mu = 2, a KL to the frozen reference, 6 optimizer steps
GRPO="method=grpo method.num_generations=8 method.prompts_per_step=2 method.num_iterations=2
      method.beta=0.05 trainer.max_steps=6 trainer.val_check_interval=6 trainer.limit_val_batches=2 data.batch_size=8"
if [ "$DEVICE" = cpu ]; then
  run cpu_tiny 120 trainer=cpu trainer.max_steps=20 trainer.val_check_interval=10
  run cpu_grpo_moe_tiny 300 trainer=cpu model=moe_tiny $GRPO
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
run grpo_zero2_moe_tiny 120 trainer=deepspeed_zero2 trainer.devices=1 model=moe_tiny $GRPO
run grpo_zero3_moe_tiny 120 trainer=deepspeed trainer.devices=1 model=moe_tiny $GRPO
run grpo_zero2_lora_moe_tiny 120 trainer=deepspeed_zero2 trainer.devices=1 model=moe_tiny $GRPO model.lora.r=8
if $PY -c "import bitsandbytes" 2>/dev/null; then
  run grpo_qlora_llama_tiny 120 trainer=gpu model=llama_tiny $GRPO model.lora.r=8 model.lora.quantize=4bit
else
  echo "grpo_qlora_llama_tiny        skipped: bitsandbytes is not installed (pip install dlm[qlora])"
fi
