#!/usr/bin/env bash
# Everything that needs a GPU, in one script: the CUDA tests, the compile report and the benchmarks.
#
#   bash benchmarks/gpu_session.sh [STEP ...]      # default: every step, in the order below
#
# Steps: tests aot kernels attention e2e. Each writes $OUT/<step>.txt (OUT defaults to ./gpu_session;
# the device tool sets it) and prints its last lines; a failing step does not stop the next one.
# Budget on an H100: tests ~3 min, aot ~1, kernels ~3, attention ~3, e2e ~8 (3 layers: the checkpoint
# is written to /dev/shm first). Each step is capped at STEP_SECONDS (default 560), so one device
# call of at most 10 minutes can run any single step.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_session}
STEP_SECONDS=${STEP_SECONDS:-560}
mkdir -p "$OUT"
python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null

run() {
    local name=$1 start=$SECONDS rc
    shift
    echo "== $name: $*"
    timeout "$STEP_SECONDS" "$@" >"$OUT/$name.txt" 2>&1
    rc=$?
    echo "   exit $rc after $((SECONDS - start)) s; last lines of $OUT/$name.txt:"
    tail -n 40 "$OUT/$name.txt" | sed 's/^/   /'
}

step() {
    case $1 in
        tests)     run tests python -m pytest -q -m cuda tests ;;
        aot)       run aot python -m kimi_engine.kernels.aot ;;
        kernels)   run kernels python benchmarks/bench_kernels.py --plot "$OUT/roofline.png" ;;
        attention) run attention python benchmarks/bench_attention.py
                   run attention_fp8 python benchmarks/bench_attention.py --dtype float8_e4m3fn ;;
        e2e)       run e2e python benchmarks/bench_e2e.py --layers 3 --workdir /dev/shm --plot "$OUT/e2e.png" ;;
        *)         echo "unknown step $1 (tests aot kernels attention e2e)" >&2; exit 2 ;;
    esac
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >>"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
for s in "${@:-tests aot kernels attention e2e}"; do
    for one in $s; do
        step "$one"
    done
done
