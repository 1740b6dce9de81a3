#!/usr/bin/env bash
# GPU check: the GPU-relevant tests and the DenseFlow-74-10 64x64 training-step benchmark on one
# GPU, in under 8 minutes, as one JSON (issue 12, "Ready for GPUs").
#
#   bash benchmarks/gpu_check.sh                        # on a machine with one GPU
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh    # anywhere: tiny settings on CPU
#
# Writes $GPU_CHECK_OUT (default runs/gpu_check)/gpu_check.json: per run, the median training
# step time, img/s, peak GPU memory and the implied ImageNet64 epoch time (1,281,167 images /
# img/s), plus the tests' exit status; each run's bench JSON and log sit beside it.
#
# Runs (`python -m tf_denseflow.bench --preset=denseflow_74_10 --image_size=64 --batch_size=32
# --phases=train`): fp32 and bf16, each with and without --jit_compile (library kernels, the
# default on a GPU), then fp32 with --conv_kernels=cpu (the CPU kernels on the GPU: the measurement
# that decides tf_denseflow.kernels' 'auto'). All bench processes start at once and trace their
# step in parallel on the CPU cores; `--timing_lock` lets one at a time run on the GPU (first call,
# warm-up and timed steps), so timings and memory peaks are each run's own. The tests hold the same
# lock. Every command has a `timeout` ending by the deadline (GPU_CHECK_DEADLINE_S, 450 s after the
# start; 900 s in a dry run); a run that does not finish by then is reported as such in the JSON.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${GPU_CHECK_OUT:-runs/gpu_check}
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
DEADLINE_S=${GPU_CHECK_DEADLINE_S:-}
TESTS_TIMEOUT_S=${GPU_CHECK_TESTS_TIMEOUT_S:-}

if [[ "$DRY_RUN" == 1 ]]; then
  # Tiny and on the CPU: checks the script, the flags and the JSON, measures nothing.
  BENCH=(--preset=tiny --image_size=16 --batch_size=2 --steps=2 --warmup=1)
  TESTS=(tests/kernels_test.py)
  export CUDA_VISIBLE_DEVICES=''
  DEADLINE_S=${DEADLINE_S:-900} # five parallel traces on a small CPU machine
  TESTS_TIMEOUT_S=${TESTS_TIMEOUT_S:-600}
else
  BENCH=(--preset=denseflow_74_10 --image_size=64 --batch_size=32 --steps=10 --warmup=2)
  TESTS=(
    tests/kernels_test.py
    tests/precision_test.py
    tests/nn_test.py
    tests/parity_test.py
    tests/bijectors_test.py
  )
  if ! "$PYTHON" -c "import tensorflow as tf, sys; sys.exit(not tf.config.list_physical_devices('GPU'))" 2>/dev/null; then
    echo "gpu_check: TensorFlow sees no GPU (set GPU_CHECK_DRY_RUN=1 for a CPU dry run)." >&2
    exit 1
  fi
fi
DEADLINE_S=${DEADLINE_S:-450}
TESTS_TIMEOUT_S=${TESTS_TIMEOUT_S:-180}

# Several processes share the GPU: each allocates what it uses, not the whole device.
export TF_FORCE_GPU_ALLOW_GROWTH=true
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
mkdir -p "$OUT"
LOCK="$OUT/device.lock"
: >"$LOCK"
START=$(date +%s)
remaining() { echo $((START + DEADLINE_S - $(date +%s))); }

# name and extra bench flags, in order of importance (launched in this order).
RUNS=(
  'fp32|--precision=float32'
  'bf16|--precision=bfloat16'
  'fp32_jit|--precision=float32 --jit_compile'
  'bf16_jit|--precision=bfloat16 --jit_compile'
  'fp32_cpu_kernels|--precision=float32 --conv_kernels=cpu'
)

# The tests take the device first (the bench processes spend their first minutes tracing).
flock "$LOCK" timeout "$TESTS_TIMEOUT_S" "$PYTHON" -m pytest -q -p no:cacheprovider "${TESTS[@]}" \
  >"$OUT/tests.log" 2>&1 &
TESTS_PID=$!
sleep 2

PIDS=()
for run in "${RUNS[@]}"; do
  name=${run%%|*}
  read -r -a extra <<<"${run#*|}"
  rm -f "$OUT/$name.json"
  timeout "$(remaining)" "$PYTHON" -m tf_denseflow.bench "${BENCH[@]}" "${extra[@]}" \
    --phases=train --nocount_flops --timing_lock="$LOCK" --json="$OUT/$name.json" \
    >"$OUT/$name.log" 2>&1 &
  PIDS+=("$!")
  sleep 1
done

TESTS_RC=0
wait "$TESTS_PID" || TESTS_RC=$?
BENCH_RCS=()
for pid in "${PIDS[@]}"; do
  rc=0
  wait "$pid" || rc=$?
  BENCH_RCS+=("$rc")
done

names=()
for run in "${RUNS[@]}"; do names+=("${run%%|*}"); done
"$PYTHON" benchmarks/gpu_check_summary.py --out="$OUT" --tests_rc="$TESTS_RC" \
  --elapsed_s="$(($(date +%s) - START))" --dry_run="$DRY_RUN" \
  --runs="$(
    IFS=,
    echo "${names[*]}"
  )" \
  --rcs="$(
    IFS=,
    echo "${BENCH_RCS[*]}"
  )"
