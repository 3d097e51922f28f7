"""The run directory's layout: one file (or folder) per stage output, read by the next stage (torch-free).

sensitivity.safetensors   measure   Σg² per candidate parameter, with the model arguments and data hash
plan.json (+ .safetensors, plan.png)   plan   the budget's targets and sparse indices
tuned/                    train     the trained tuner values + head (safetensors + JSON), named "tuned" because
                                    "adapter" is one kind of tuner
metrics.json, history.csv train     selected epoch, threshold, defect metrics, warnings, counts, timings; per epoch
confusion.png             train     the test confusion matrix at the selected epoch, beside the one at the threshold
eval.json                 evaluate  accuracy, per-class recall and confusion matrix on a split
merged/                   merge     model.safetensors (a plain timm state dict) + merged.json; for a plan whose
                                    tuners cannot be merged only merged.json, saying why it was skipped
export/                   export    ONNX + OpenVINO FP32/FP16/INT8 with manifests and export_report.json
"""

from __future__ import annotations

from pathlib import Path

FILES = {
    "sensitivity": "sensitivity.safetensors",
    "plan": "plan.json",
    "plan_tensors": "plan.safetensors",
    "plan_png": "plan.png",
    "tuned": "tuned",
    "metrics": "metrics.json",
    "history": "history.csv",
    "confusion_png": "confusion.png",
    "eval": "eval.json",
    "merged_dir": "merged",
    "merged": "merged/model.safetensors",
    "merged_info": "merged/merged.json",
    "export": "export",
    "export_report": "export/export_report.json",
    "train_state": "train_state",
}


def dvc_root(path: Path) -> Path | None:
    """The DVC repository (folder with ``.dvc/``) that contains `path`, or None."""
    for d in [Path(path).resolve(), *Path(path).resolve().parents]:
        if (d / ".dvc").is_dir():
            return d
    return None
