#!/usr/bin/env bash
# VTAB-1k with ViT-B/16 (ImageNet-21k, timm `vit_base_patch16_224.augreg_in21k`, weights from the hub) on one
# CUDA GPU: every method of benchmarks/compare.py at budgets {0.2,0.4,0.6,0.8,1.0}M, the SPT reference recipe
# (AdamW, batch 64, 100 epochs, cosine with 10 warm-up epochs, 224 px direct resize, no augmentation,
# drop-path 0.1, weight decay 1e-4), epoch selected on val200 only, test on the task's test list.
#
# Usage: benchmarks/vtab_vit_b16.sh VTAB_ROOT [TASK ...]
#   VTAB_ROOT/<task>/{train800.txt,val200.txt,test.txt} (+ images) in the VTAB-1k list layout, read by
#   spt_core.data.prepare; TASKs default to every such subdirectory.
# Environment: SEEDS (2), LR_GRID (1e-3,3e-3), LR_GRID_FULL (1e-4,3e-4), EPOCHS (100), OUT (benchmarks/results/
#   vtab_vit_b16), WORK (~/.cache/sensitune-compare/vtab), PYTHON (.venv/bin/python), WEIGHTS (hub; or a local
#   file of the same model, e.g. on an offline cluster), PARALLEL (1: runs at a time; >1 shares the GPU, so s/epoch
#   reads slower), WORKERS (4 DataLoader workers), THREADS (8). For a smoke run of the script itself:
#   BACKBONE, DEVICE, BUDGET, CURVE_BUDGETS, CURVE_METHODS, METHODS, BATCH (tests/test_compare.py does this on CPU).
# Results: $OUT/compare_vit-b16_<task>.{md,json,png}; re-running resumes (finished rows are skipped).
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 VTAB_ROOT [TASK ...]" >&2
  exit 2
fi
if [[ ! -d $1 ]]; then
  echo "error: VTAB_ROOT $1 is not a directory; give the VTAB-1k root (<task>/train800.txt, val200.txt, test.txt)" >&2
  exit 2
fi
VTAB_ROOT=$(cd "$1" && pwd)  # absolute: the script runs from the repo root
shift
# paths the caller gave relative to their own directory
[[ -n ${OUT:-} ]] && OUT=$(realpath -ms "$OUT")
[[ -n ${WORK:-} ]] && WORK=$(realpath -ms "$WORK")
[[ -n ${WEIGHTS:-} && -e $WEIGHTS ]] && WEIGHTS=$(realpath -s "$WEIGHTS")
[[ ${PYTHON:-} == */* ]] && PYTHON=$(realpath -ms "$PYTHON")
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-benchmarks/results/vtab_vit_b16}
WORK=${WORK:-$HOME/.cache/sensitune-compare/vtab}
export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736

DEVICE=${DEVICE:-cuda}
if [[ $DEVICE == cuda* ]]; then
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA device visible')" \
    || exit 2
fi

if [[ $# -gt 0 ]]; then
  TASKS=("$@")
else
  TASKS=()
  for d in "$VTAB_ROOT"/*/; do
    [[ -f "$d/train800.txt" ]] && TASKS+=("$(basename "$d")")
  done
fi
if [[ ${#TASKS[@]} -eq 0 ]]; then
  echo "error: no <task>/train800.txt under $VTAB_ROOT; give the VTAB-1k root in the list layout" >&2
  exit 2
fi

for task in "${TASKS[@]}"; do
  if [[ ! -f $VTAB_ROOT/$task/train800.txt ]]; then
    echo "error: $VTAB_ROOT/$task/train800.txt not found; name a task directory in the VTAB-1k list layout" >&2
    exit 2
  fi
  echo "== $task"
  "$PYTHON" benchmarks/compare.py \
    --backbone "${BACKBONE:-vit-b16}" ${WEIGHTS:+--weights "$WEIGHTS"} --task "$VTAB_ROOT/$task" \
    --n-train 800 --n-val 200 --n-test 0 \
    --device "$DEVICE" --threads "${THREADS:-8}" --workers "${WORKERS:-4}" --parallel "${PARALLEL:-1}" \
    --epochs "${EPOCHS:-100}" --batch "${BATCH:-64}" --seeds "${SEEDS:-2}" \
    --budget "${BUDGET:-0.2M}" --curve-budgets "${CURVE_BUDGETS-0.4M,0.6M,0.8M,1.0M}" \
    --curve-methods "${CURVE_METHODS:-sparse-only,spt-lora,spt-adapter,peft-lora,random-sparse}" \
    ${METHODS:+--methods "$METHODS"} \
    --lr-grid "${LR_GRID:-1e-3,3e-3}" --lr-grid-full "${LR_GRID_FULL:-1e-4,3e-4}" \
    --work-dir "$WORK" --out-dir "$OUT"
done
