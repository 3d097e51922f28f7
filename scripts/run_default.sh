#!/usr/bin/env bash
# The main job: the whole pipeline on the embedded default (Lite0 + an imbalanced demo line), reproducibly with DVC.
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
pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
ci = lambda c: "" if not c else f" [95% CI {100 * c[0]:.1f}-{100 * c[1]:.1f}]"
t = m["test"]["at_threshold"] if m.get("test", {}).get("at_threshold") else None
print(f"\ntest accuracy {m['test_acc']:.3f}, balanced accuracy {m['test_balanced_acc']:.3f} (epoch {m['best_epoch']} "
      f"chosen on validation {m['select']}) vs linear probe {m['probe_test_acc']:.3f}; {m['trainable']:,} trainable "
      f"backbone values ({m['trainable_pct']:.2f}%)")
if t:
    print(f"at the threshold chosen on validation (reject when P({m['ok_class']}) < {m['threshold']:.4f}, escape ceiling "
          f"{m['max_escape_rate']}): escape rate {pct(m['escape_rate'])} ({t['escape_rate']['k']}/{t['escape_rate']['n']} "
          f"defects passed){ci(m['escape_rate_ci95'])}, overkill {pct(m['overkill'])} ({t['overkill']['k']}/"
          f"{t['overkill']['n']} good parts rejected){ci(m['overkill_ci95'])}")
for w in m.get("warnings", []):
    print(f"warning: {w}")
print(f"export parity passed: {r.get('passed')}; artifacts in runs/main/export/; confusion matrix runs/main/confusion.png")
PY
echo "main job took $(( $(date +%s) - start )) s"
