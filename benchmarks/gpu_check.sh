#!/usr/bin/env bash
# Everything a GPU should tell us, in at most about 8 minutes on one GPU: bf16 training steps/s
# and peak memory of both networks at the paper's patch and batch sizes, the loader's patches/s,
# whole-volume inference seconds per case per fold, predict.py seconds per case (5-fold
# ensemble) against its FLOP floor, and the roofline table. Each step runs one of the existing
# benchmark scripts with --json into OUT_DIR (its printed output in OUT_DIR/<step>.log);
# benchmarks/gpu_check_report.py then writes OUT_DIR/gpu_check.md and OUT_DIR/gpu_check.json.
#
#   bash benchmarks/gpu_check.sh OUT_DIR            # on a GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh OUT_DIR --dry-run  # the same steps on the CPU at tiny sizes (seconds)
#
# Python: $PYTHON, else .venv/bin/python, else python3. A step that fails or runs past its time
# limit is listed as missing in the report and makes the exit status non-zero; the others still run.
set -u
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUT_DIR [--dry-run]" >&2
    exit 2
fi
OUT=$1
DRY=0
if [ "${2:-}" = "--dry-run" ]; then DRY=1; elif [ -n "${2:-}" ]; then echo "unknown option: $2" >&2; exit 2; fi
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p "$OUT" || exit 2
rm -f "$OUT"/{train_step,data_pipeline,evaluate_fold,predict,roofline}.json

if [ $DRY = 1 ]; then
    LIMIT=300  # a hang guard: each step takes seconds on an idle CPU
    # ROOF: 48³, as 32³ leaves a 6-stage network (resenc_unet) one bottleneck voxel, which a norm refuses in training
    TRAIN=(--device cpu --size 4 32 2 --steps 1 --warmup 1 --amp-only)
    LOADER=(--cases 2 --shape 40 40 40 --patch-size 16 --patches-per-volume 2 --epochs 1 --workers 0 --skip-compressed)
    PREDICT=(--shape 40 40 40 --window 32 --width 4 --cases 1 --precision auto --matmul 256 --threads 2)
    ROOF=(--width 4 --window 48 --batch 2 --repeats 1 --matmul 256 --devices cpu --threads 2)
else
    LIMIT=95  # 5 steps: at most 8 minutes in all
    TRAIN=(--device cuda --amp-only)
    LOADER=(--epochs 2 --skip-compressed)
    PREDICT=(--device cuda --width 64 --cases 2 --precision auto)
    ROOF=(--repeats 3 --devices cuda)  # the CPU rows are in benchmarks/README.md
fi

STATUS=0
step() {  # step NAME SCRIPT ARGS...: run one benchmark, its output into OUT/NAME.log
    local name=$1 script=$2
    shift 2
    echo "== $name: $script $*"
    if ! timeout "$LIMIT" "$PY" "benchmarks/$script" "$@" >"$OUT/$name.log" 2>&1; then
        echo "   failed or timed out: see $OUT/$name.log"
        STATUS=1
    fi
    tail -n 3 "$OUT/$name.log"
}
step train_step bench_train_step.py "${TRAIN[@]}" --json "$OUT/train_step.json"
step data_pipeline bench_data_pipeline.py "${LOADER[@]}" --json "$OUT/data_pipeline.json"
step evaluate_fold bench_predict.py "${PREDICT[@]}" --folds 1 --json "$OUT/evaluate_fold.json"
step predict bench_predict.py "${PREDICT[@]}" --folds 5 --json "$OUT/predict.json"
step roofline bench_roofline.py "${ROOF[@]}" --json "$OUT/roofline.json"
REPORT=()
[ $DRY = 1 ] && REPORT=(--dry-run)
"$PY" benchmarks/gpu_check_report.py "$OUT" "${REPORT[@]}" || STATUS=1
exit $STATUS
