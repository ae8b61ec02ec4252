#!/usr/bin/env bash
# One GPU check: the CUDA tests, the streaming (as stored and in the stream formats), dequantization and LoRA
# benchmarks, the steady-state checks and auto placement's peak VRAM against the card it planned for, in one run
# that fits in 8 minutes on one GPU (each step has a time limit, 7 min 50 s in all), with every table written to one
# folder.
#
#   bash bench/gpu_check.sh              # on a machine with a CUDA GPU
#   bash bench/gpu_check.sh --dry-run    # anywhere: the same steps on the CPU at toy sizes (CI runs this)
#
# Tables go to $OUT when it is set (a device run brings that folder back), else to
# bench/results/gpu_check-<date>. Files: summary.md (one PASS/FAIL line per step; read this first), env.txt,
# cuda_tests.txt, stream.md, dequant.md, steady_state.md, lora.md, auto_budget.md, stream_formats.md. Exit status 0
# only when every step passed.
# PYTHON picks the interpreter (default python3). A machine without the `gguf` package (pure Python) gets
# it from wheels in .whl/ when there are any: `pip download --no-deps gguf -d .whl` beside the repo.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY="${PYTHON:-python3}"
DEST="${OUT:-bench/results/gpu_check-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$DEST"
SUMMARY="$DEST/summary.md"
export PYTHONUNBUFFERED=1
START=$(date +%s)

if ! "$PY" -c "import gguf" 2>/dev/null && ls .whl/gguf-*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/distorch-site .whl/*.whl && export PYTHONPATH=/tmp/distorch-site
fi

if [ $DRY = 1 ]; then
  DEVICE=cpu
  LIMITS=(300 300 300 300 300 300 300)  # a shared CI machine: the budget that matters is the GPU run's
  STREAM_ARGS=(--device cpu --models tiny --depth 4 --tokens 64 --dtypes fp32 --shares 0 50 --repeats 1 --h2d-mib 8)
  DEQUANT_ARGS=(--device cpu --elems 16384 --types Q8_0 Q4_K --repeat 1 --no-numpy)
  STEADY_ARGS=(--device cpu --dim 64 --heads 2 --ffn 128 --depth 4 --tokens 16 --passes 2)
  LORA_ARGS=(--device cpu --dim 128 --ffn 256 --heads 2 --depth 2 --tokens 16 --ranks 16 --loras 0 1 --repeats 1)
  AUTO_ARGS=(--device cpu --dim 64 --heads 2 --ffn 128 --depth 6 --tokens 16 32 --resident 2)
  FORMAT_ARGS=(--device cpu --models tiny --depth 4 --tokens 64 --dtypes fp32 --shares 0 100
               --stream-formats stored q8_0 fp8_e4m3fn --repeats 1 --h2d-mib 8)
else
  DEVICE=cuda
  LIMITS=(120 140 40 40 40 45 45)  # 7 min 50 s in all, the GPU run's budget
  # Wan 2.1 14B and Flux widths at 12 blocks (~5.9 GB / ~4.5 GB bf16): every ratio of the full models, in minutes.
  STREAM_ARGS=(--device cuda:0 --models wan flux --depth 12 --tokens 4096 32768 --dtypes bf16
               --shares 0 50 100 --prefetch 2 --repeats 3)
  DEQUANT_ARGS=(--device cuda --repeat 5 --no-numpy)
  STEADY_ARGS=(--device cuda:0)
  # Wan 2.1 14B widths, 4 blocks all streamed: LoRA side path vs core's per-forward merge, bf16 and Q8_0.
  LORA_ARGS=(--device cuda:0 --dim 5120 --ffn 13824 --heads 40 --depth 4 --tokens 8192 --ranks 16 32 64
             --loras 0 1 2 4 --repeats 2)
  # Wan 2.1 14B width at 12 blocks (~5.9 GB bf16), at its 480p and 720p x 81-frame token counts.
  AUTO_ARGS=(--device cuda:0)
  # Flux widths, 12 blocks (~2.7 GB bf16) all streamed at 4096 tokens, where the copy is the bound: step / bound as
  # stored, Q8_0 and fp8 (their bound is their own, smaller, bytes over H2D).
  FORMAT_ARGS=(--device cuda:0 --models flux --depth 12 --tokens 4096 --dtypes bf16 --shares 0 100
               --stream-formats stored q8_0 fp8_e4m3fn --prefetch 2 --repeats 2)
fi

{
  echo "# gpu_check $( [ $DRY = 1 ] && echo '(dry run, CPU)' ) $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
  echo
  echo "| step | result | seconds |"
  echo "|---|---|---|"
} > "$SUMMARY"
FAILED=0

# step NAME LIMIT_SECONDS OUTPUT_FILE COMMAND...: runs one step under a time limit, output into its file.
step() {
  local name=$1 limit=$2 file=$3; shift 3
  local began=$(date +%s) status
  timeout "$limit" "$@" > "$DEST/$file" 2>&1
  status=$?
  local result=PASS
  if [ $status = 124 ]; then result="FAIL (over ${limit} s)"; elif [ $status != 0 ]; then result="FAIL (exit $status)"; fi
  [ "$result" = PASS ] || FAILED=1
  echo "| $name | $result | $(( $(date +%s) - began )) |" >> "$SUMMARY"
  echo "gpu_check: $name: $result"
}

{
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name} {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
EOF
  [ $DRY = 1 ] || nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
} > "$DEST/env.txt" 2>&1
if [ $DRY = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "| CUDA available | FAIL (no CUDA device; use --dry-run on a CPU) | 0 |" >> "$SUMMARY"
  cat "$SUMMARY"
  exit 1
fi

# On a CPU the CUDA tests are collected and skipped: the dry run checks that they import and select.
step "CUDA tests (pytest -m cuda)" "${LIMITS[0]}" cuda_tests.txt "$PY" -m pytest -q -m cuda -p no:cacheprovider tests
step "bench/stream.py" "${LIMITS[1]}" stream.md "$PY" bench/stream.py "${STREAM_ARGS[@]}"
step "bench/dequant.py --device $DEVICE" "${LIMITS[2]}" dequant.md "$PY" bench/dequant.py "${DEQUANT_ARGS[@]}"
step "steady state (bench/steady_state.py)" "${LIMITS[3]}" steady_state.md "$PY" bench/steady_state.py "${STEADY_ARGS[@]}"
step "bench/lora.py" "${LIMITS[4]}" lora.md "$PY" bench/lora.py "${LORA_ARGS[@]}"
step "auto placement (bench/auto_budget.py)" "${LIMITS[5]}" auto_budget.md "$PY" bench/auto_budget.py "${AUTO_ARGS[@]}"
step "stream formats (bench/stream.py)" "${LIMITS[6]}" stream_formats.md "$PY" bench/stream.py "${FORMAT_ARGS[@]}"

echo "| total | $( [ $FAILED = 0 ] && echo PASS || echo FAIL ) | $(( $(date +%s) - START )) |" >> "$SUMMARY"
cat "$SUMMARY"
exit $FAILED
