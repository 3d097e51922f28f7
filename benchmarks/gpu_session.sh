#!/usr/bin/env bash
# Everything sensitune checks on a CUDA machine, as one bounded script (a short GPU lease, or CI with a GPU):
#   1. the CUDA tests (tests/test_gpu.py: tuners vs CPU, bf16 autocast rebuild, CUDA-allocator memory, fit + AMP,
#      the comparison harness on --device cuda);
#   2. benchmarks/compare.py on CUDA: DINOv2 ViT-S/14 @ 224 px on the demo defect set (800 train / 200 val /
#      2,000 test), every method, 2 seeds, the lr grid, a budget curve; peak CUDA memory per method;
#   3. benchmarks/memory.py on CUDA: ViT-B/16 @ 224, batch 64 (the SPT paper's setting), fp32 and bf16 autocast,
#      with the official code's "naive" sparse layer beside sensitune's.
# Usage: benchmarks/gpu_session.sh OUT_DIR [SECONDS]    (SECONDS: wall budget, default 540; later steps are skipped
#        when too little is left). Results land in OUT_DIR/results.tgz (tables, JSON, plots, logs), re-packed after
#        each step so a cut-off run still returns what finished.
# Environment: PYTHON (python3), VIT_WEIGHTS (the make_vit_s14.py file; fp16-rounded copies load too),
#   STEPS ("tests compare memory"), PARALLEL (compare.py runs at a time, 4). Step 2 resumes from benchmarks/results/gpu/compare_vit-s14_demo-defects.json when
#   that exists (finished rows are kept, failed ones retried).
set -uo pipefail

OUT=${1:?usage: $0 OUT_DIR [SECONDS]}
BUDGET=${2:-540}
mkdir -p "$OUT"
OUT=$(realpath -s "$OUT")  # paths given relative to the caller's directory, before the cd to the repo root
VIT=$(realpath -ms "${VIT_WEIGHTS:-$HOME/.cache/sensitune-fixtures/vit_small_patch14_dinov2.safetensors}")
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/sensitune-gpu.XXXX)
RES=$WORK/results
mkdir -p "$RES"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 SENSITUNE_NO_PROGRESS=1
export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736
left() { echo $((BUDGET - SECONDS)); }
step() { echo "== [${SECONDS}s] $*" | tee -a "$RES/session.log"; }
STEPS=${STEPS:-tests compare memory}
pack() {  # a complete archive or none: each pack writes its own temp file, then renames it
  local tmp
  cp -rf "$WORK"/compare/*/logs "$RES/" 2>/dev/null
  tmp=$(mktemp "$OUT/.results.XXXXXX") && tar czf "$tmp" -C "$WORK" results && chmod 644 "$tmp" &&
    mv -f "$tmp" "$OUT/results.tgz"
}
(while sleep 30; do pack; done) &
PACKER=$!
finish() {
  pkill -P "$PACKER" 2>/dev/null
  kill "$PACKER" 2>/dev/null
  wait "$PACKER" 2>/dev/null
  pack
  rm -f "$OUT"/.results.*
}
trap finish EXIT

step "environment"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import sys, torch, timm, peft; print(sys.version.split()[0], 'torch', torch.__version__, 'timm', \
timm.__version__, 'peft', peft.__version__, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$RES/env.txt"

if [[ $STEPS == *tests* && $(left) -gt 30 ]]; then
step "1. CUDA tests"
timeout $(($(left) < 150 ? $(left) : 150)) "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py \
  >"$RES/gpu_tests.txt" 2>&1
echo "pytest exit $?" >>"$RES/gpu_tests.txt"
tail -n 25 "$RES/gpu_tests.txt"
pack
fi

if [[ $STEPS == *compare* && $(left) -gt 120 ]]; then
  cp -n benchmarks/results/gpu/compare_vit-s14_demo-defects.json "$RES/" 2>/dev/null
  step "2. compare.py on CUDA: ViT-S/14 @224, demo defects"
  reserve=$([[ $STEPS == *memory* ]] && echo 70 || echo 10)
  timeout $(($(left) - reserve)) "$PY" benchmarks/compare.py --backbone vit-s14 --weights "$VIT" --img-size 224 \
    --task demo-defects --n-test 2000 --budget 1% --seeds 2 --epochs 8 --batch 32 \
    --lr-grid 1e-3,3e-3 --lr-grid-full 3e-5,1e-4 --lr-grid-linear 1e-3,1e-2 \
    --curve-budgets 0.25%,4% --curve-methods sparse-only,spt-lora,peft-lora \
    --device cuda --threads 2 --workers 2 --parallel "${PARALLEL:-4}" --work-dir "$WORK/compare" --out-dir "$RES" \
    >"$RES/compare.log" 2>&1
  echo "compare exit $?" | tee -a "$RES/compare.log"
  grep -c '"kind": "train"' "$RES/compare.log"
  pack
fi

for amp in "" "--amp"; do
  if [[ $STEPS == *memory* && $(left) -gt 45 ]]; then
    step "3. memory.py on CUDA: ViT-B/16 @224 batch 64 ${amp:-fp32}"
    timeout $(($(left) - 10)) "$PY" benchmarks/memory.py --model vit_base_patch16_224 --img-size 224 --batch 64 \
      --steps 3 --threads 4 --device cuda $amp --out "$RES/memory_vit_b16_cuda${amp:+_bf16}.md" \
      >"$RES/memory${amp:+_bf16}.log" 2>&1
    echo "memory exit $?" | tee -a "$RES/memory${amp:+_bf16}.log"
    pack
  fi
done
step "done"
pack
