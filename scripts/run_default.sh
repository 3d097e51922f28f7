#!/usr/bin/env bash
# The main job: the whole pipeline on the embedded default (Lite0 + demo defects), reproducibly with DVC.
# Called by `make run` (which installs .venv first and puts it on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
export DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
start=$(date +%s)
if [ ! -d .git ]; then git init -q; fi   # DVC records data versions next to the code in git
if [ ! -d data/raw ]; then
  # The demo images are byte-identical to the version data/raw.dvc records, so regenerating equals pulling.
  dvc pull -q data/raw.dvc 2>/dev/null || sensitune demo
fi
if [ ! -f data/raw.dvc ] || dvc status data/raw.dvc | grep -q "modified"; then
  dvc add -q data/raw   # new images = a new data version
fi
dvc push -q data/raw.dvc 2>/dev/null || echo "note: dvc push to the local remote failed; data stays in .dvc/cache"
dvc repro
python - <<'PY'
import json
m = json.load(open("runs/main/metrics.json"))
r = json.load(open("runs/main/export/export_report.json"))
print(f"\ntest accuracy {m['test_acc']:.3f} (epoch {m['best_epoch']} chosen on validation) vs linear probe "
      f"{m['probe_test_acc']:.3f}; {m['trainable']:,} trainable backbone values ({m['trainable_pct']:.2f}%)")
print(f"export parity passed: {r.get('passed')}; artifacts in runs/main/export/")
PY
echo "main job took $(( $(date +%s) - start )) s"
