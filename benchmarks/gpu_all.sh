#!/usr/bin/env bash
# Everything a session lent a GPU runs, in ONE device call of about 8 minutes (H200 or H100), in this order:
#
#   smi     nvidia-smi: the card, its memory, the driver
#   sample  .device/gpu_baseline.py --only sample              (stock: HF generate, naive diffusion sampling)
#   ar      .device/ar_generate_baseline.py                    (stock: HF generate, static cache + torch.compile)
#   gen     benchmarks/gpu_generation.py                       (dlm's samplers, eager then reduce-overhead)
#   report  benchmarks/gpu_generation.py --report $OUT         (dlm's figures beside the stock ones of THIS call)
#   ardec   benchmarks/ar_decoding.py (not in the default PARTS) dlm's AR decoding vs HF generate (plain; static
#           cache + compile) on the same weights in ONE process, reduce-overhead: ~3-4 min (two compilations)
#   tests   python3 -m pytest -m gpu -q                        (the repo's gpu-marked tests)
#   check   benchmarks/gpu_check.sh $OUT/chk                   (CLI runs: bf16, ZeRO-2/3/offload, moe30b 2 layers)
#
# The order is priority: the comparison the issue asks for (dlm's generation against the stock baselines,
# rerun in the same call) first, then the gpu tests, then the ZeRO check with what is left. Each part runs
# under `timeout` with min(its limit, budget left), so one hang cannot eat the rest; a part with under 15 s
# left is skipped (and says so). gen gets at most GEN_LIMIT (200) s and starts no new run in its last 50 s.
#
# Prepare on this machine (../shared does not travel to the GPU machine):
#   ../shared/device/make_wheels.sh                 # from the repo root: .whl/ (hydra, omegaconf, wandb, ...)
#   bash benchmarks/copy_device_baselines.sh        # .device/: the stock gpu_baseline.py, ar_generate_baseline.py
# Device call (run tool): carry [".whl", ".device"], timeout_s 540, command:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD WANDB_MODE=offline || exit; \
#   bash benchmarks/gpu_all.sh "$OUT"
#
# Expected time (H200; estimated from the stock figures, nothing here has run on a GPU yet): sample ~105 s,
# ar ~150 s (two torch.compile runs), gen 200 s (eager ~100 s for 6 variants x 2 batches, then compilation:
# the full forward first and the naive rows, then the KV-cache variants until its budget stops new runs),
# report 5 s, tests ~60 s if time is left: 8 min with BUDGET=480. The check alone needs ~5-9 min: run it in a
# later call with PARTS="smi check" (or PARTS="smi tests check"). Environment: BUDGET (s, default 480), PARTS
# (default "smi sample ar gen report tests check"; add ardec, e.g. PARTS="smi ardec"), GEN_LIMIT, ARDEC_ARGS,
# GEN_ARGS (extra gpu_generation.py arguments,
# e.g. "--kv-eager", "--compile reduce-overhead --variants bd3lm_b32,ar_kvcache" or "--compile eager,cudagraphs"),
# PY (default python3), DEVICE=cpu (a CPU dry run: tiny geometries, eager only, to test this script).
#
# Reading the output: stdout holds one "== part: rc=... Ns (limit ...)" line per part with its summary (the
# stock SUMMARY lines, gen's run counts and errors, the report's tables, the tests' tail, the check's line per
# run); every part's full log is $OUT/<part>.log, the JSONs are $OUT/gpu_generation.json, gpu_baseline.json and
# ar_baseline.json. The report's columns: tok/s = B x 256 / seconds of one generate call; ms/call = seconds per
# network call; "x naive256" = against dlm's eager naive sampler (256 steps) in the same process; "stock" and
# "x stock" = the same-call rerun of the comparable stock row (naive_* -> gpu_baseline's naive sampler,
# ar_kvcache -> HF static cache + compile); "x AR target" = tok/s over HF generate with static cache + compile
# at that batch (268 / 3,953 tok/s in the README: the figure to beat). A second table repeats the ratios
# against the README's H200 figures.
set -u
OUT=${1:-${OUT:-gpu_check_out/all}}
DEVICE=${DEVICE:-gpu}
PY=${PY:-python3}
BUDGET=${BUDGET:-480}
PARTS=${PARTS:-smi sample ar gen report tests check}
GEN_ARGS=${GEN_ARGS:-}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true PYTHONUNBUFFERED=1
export OUT
START=$SECONDS
TINY=""
[ "$DEVICE" = cpu ] && TINY="--tiny"

want() { case " $PARTS " in *" $1 "*) return 0 ;; esac; echo "== $1: not in PARTS"; return 1; }

# part NAME LIMIT SUMMARY_CMD -- CMD...: CMD under timeout, output in $OUT/NAME.log; SUMMARY_CMD reads the log
# (on failure the log's tail is shown as well). LIMIT 0: no budget check (cheap parts).
part() {
  local name=$1 limit=$2 summary=$3; shift 4
  want "$name" || return 0
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$limit" -gt 0 ]; then
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 15 ]; then echo "== $name: skipped, ${left}s of the ${BUDGET}s budget left"; return 0; fi
  else
    limit=30
  fi
  local t=$SECONDS
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc $((SECONDS - t))s (limit ${limit}s$([ $rc = 124 ] && echo ', TIMED OUT'))"
  eval "$summary" < "$OUT/$name.log"
  if [ "$rc" != 0 ]; then echo "-- tail of $name.log:"; tail -n 15 "$OUT/$name.log"; fi
  return 0
}

if want smi; then
  if [ "$DEVICE" = cpu ]; then echo "== smi: cpu dry run"; else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
fi
if [ ! -f .device/gpu_baseline.py ]; then
  echo "== .device/ is missing: run bash benchmarks/copy_device_baselines.sh here and carry .device"
fi
part sample 130 "grep -E '^== sample'" -- $PY .device/gpu_baseline.py $TINY --only sample --out "$OUT"
part ar 180 "grep -E '^(SUMMARY|hf_static_compiled|FAIL)'" -- $PY .device/ar_generate_baseline.py $TINY
gen_summary() {  # counts of the per-run lines (the table comes with the report), the errors in full
  awk '$1 ~ /^[a-z-]+\/[a-z0-9_]+\/B[0-9]+$/ { if ($0 ~ /tok_per_s/) ok++; else if ($0 ~ /skipped/) sk++;
       else { err++; print substr($0, 1, 240) } }
       END { printf "runs: %d timed, %d errors, %d skipped (budget)\n", ok, err, sk }'
}
# gen stops starting new runs 50 s before its limit (a compilation in flight may need them)
GEN_LIMIT=${GEN_LIMIT:-200}
LEFT=$((BUDGET - (SECONDS - START)))
[ "$GEN_LIMIT" -gt "$LEFT" ] && GEN_LIMIT=$LEFT
part gen $GEN_LIMIT gen_summary -- \
  $PY benchmarks/gpu_generation.py $TINY --out "$OUT/gpu_generation.json" --budget-s $((GEN_LIMIT > 80 ? GEN_LIMIT - 50 : 30)) $GEN_ARGS
part report 0 "cat" -- $PY benchmarks/gpu_generation.py --report "$OUT"
if [ "$DEVICE" = cpu ]; then ARDEC_ARGS=${ARDEC_ARGS:---tiny --batches 1 --prompt 8 --gen 8 --repeats 1}
else ARDEC_ARGS=${ARDEC_ARGS:---device cuda --qwen06b --dtype bfloat16 --batches 1,16 --prompt 64 --gen 256 --mode reduce-overhead --repeats 2}; fi
part ardec 240 "grep -A 8 '^AR decoding'" -- $PY benchmarks/ar_decoding.py $ARDEC_ARGS --out "$OUT/ar_decoding.json"
part tests 90 "tail -n 3" -- $PY -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors
if [ "$DEVICE" = cpu ]; then CHK_LIMIT=150; else CHK_LIMIT=600; fi
part check $CHK_LIMIT "cat" -- env DEVICE="$DEVICE" PY="$PY" bash benchmarks/gpu_check.sh "$OUT/chk"
echo "== total $((SECONDS - START))s of ${BUDGET}s; logs and JSONs in $OUT"
