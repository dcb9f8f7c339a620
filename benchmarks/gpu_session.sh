#!/usr/bin/env bash
# Everything that needs a GPU, in one script: the CUDA tests, the compile report and the benchmarks.
#
#   bash benchmarks/gpu_session.sh [STEP ...]      # default: every step, in the order below
#
# Steps: tests kernels e2e attention attention_fp8 (aot, the compile report, runs on the CPU beside
# `tests`). Each writes $OUT/<step>.txt (OUT defaults to ./gpu_session; the device tool sets it) and a
# failing step does not stop the next one. The whole run ends by DEADLINE seconds (default 570, so it
# fits one 10-minute device call): each step is capped at its own budget below and at what is left;
# a step that would get under 20 s is skipped and says so. The e2e step uses reduced sizes (3 layers,
# batches 1/8/32; its plot stays in /tmp: at most 8 files come back) to fit; run bench_e2e.py alone for the full sweep.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_session}
export PYTHONUNBUFFERED=1   # a step cut off at its budget still leaves what it printed
DEADLINE=${DEADLINE:-570}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null

run() {   # run NAME BUDGET_SECONDS COMMAND...
    local name=$1 budget=$2 start=$SECONDS rc left
    shift 2
    left=$((DEADLINE - SECONDS))
    ((budget > left)) && budget=$left
    if ((budget < 20)); then
        echo "== $name: skipped, ${left} s left of DEADLINE=$DEADLINE" | tee "$OUT/$name.txt"
        return
    fi
    echo "== $name (at most $budget s): $*"
    timeout "$budget" "$@" >"$OUT/$name.txt" 2>&1
    rc=$?
    echo "   exit $rc after $((SECONDS - start)) s"
}

step() {
    case $1 in
        tests)         # the compile report needs no GPU time: it runs on the CPU while the tests run
                       timeout 150 python3 -m kimi_engine.kernels.aot >"$OUT/aot.txt" 2>&1 &
                       # some suites import the server's packages, absent on a bare GPU image: they
                       # fail to collect, the CUDA tests still run
                       run tests 160 python3 -m pytest -q -m cuda --continue-on-collection-errors tests
                       wait ;;
        kernels)       run kernels 120 python3 benchmarks/bench_kernels.py --plot "$OUT/roofline.png" ;;
        e2e)           run e2e 200 python3 benchmarks/bench_e2e.py --layers 3 --workdir /dev/shm --batches 1,8,32 \
                           --prompts 1024,8192 --hf-steps 4 --plot /tmp/e2e.png ;;
        attention)     run attention 90 python3 benchmarks/bench_attention.py ;;
        attention_fp8) run attention_fp8 60 python3 benchmarks/bench_attention.py --dtype float8_e4m3fn \
                           --contexts 8192 131072 ;;
        *)             echo "unknown step $1 (tests kernels e2e attention attention_fp8)" >&2; exit 2 ;;
    esac
}

{
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} >"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
for s in "${@:-tests kernels e2e attention attention_fp8}"; do
    for one in $s; do
        step "$one"
    done
done
# the tables last: the device tool returns the end of the output
for f in "$OUT"/*.txt; do
    [[ $f == */gpu.txt ]] && continue
    echo; echo "######## $(basename "$f")"
    case $f in
        */tests.txt) tail -n 30 "$f" ;;
        */aot.txt)   tail -n 12 "$f" ;;
        *)           tail -n 45 "$f" ;;
    esac
done
