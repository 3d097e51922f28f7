"""params.yaml: the one config users edit. Every CLI verb reads its sections; flags override single keys.

Unknown sections or keys are an error listing all of them at once (a typo must never be silently ignored).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from .errors import SensituneError

DEFAULTS: dict[str, dict[str, Any]] = {
    "paths": {
        "raw": "data/raw",  # incoming images (ImageFolder); the demo generator writes its batches here
        "data": "data/prepared",  # prepared train/val/test split (prepare's output)
        "run": "runs/main",  # sensitivity, plan, adapter, metrics, merged model, export
    },
    "data": {
        "source": "raw",  # "raw" (= paths.raw) | demo-defects | digits | fashion-mnist | DIR | CSV/JSONL | VTAB dir
        "n_train": 400,
        "n_val": 200,
        "n_test": None,
        "seed": 0,
        "image_size": None,
        "skip_bad": False,
    },
    "demo": {"n_per_class": 250, "size": 96, "seed": 0, "batch": 0},
    "model": {"name": "tf_efficientnet_lite0", "weights": "embedded", "img_size": 128, "drop_path_rate": 0.1},
    "sensitivity": {"batches": 16, "batch_size": 32, "head": "probe", "probe_epochs": 50, "device": "auto"},
    "plan": {"budget": "1%", "structured": "lora", "rank": 8, "alpha": 10.0, "beta": 5.0},
    "train": {
        "epochs": 10,
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "warmup_epochs": 1,
        "warmup_lr": 1e-6,
        "min_lr": 1e-5,
        "batch_size": 32,
        "label_smoothing": 0.0,
        "freeze_bn_stats": True,
        "amp": True,
        "device": "auto",
        "seed": 0,
        "grad_clip": None,
        "head_init": "probe",  # probe (start from the linear-probe head, LP-FT) | random (as SPT)
        "probe_baseline": True,  # also fit a linear probe on the same split and report it in metrics.json
        "probe_epochs": 50,
    },
    "export": {
        "precisions": ["fp32", "fp16", "int8"],
        "calibration_size": 300,
        "int8_max_drop": 1.0,
        "opset": 18,
        "model_version": "auto",
    },
}


def load_params(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """DEFAULTS updated with the YAML file at `path` (missing file and path=None give the defaults)."""
    params = copy.deepcopy(DEFAULTS)
    if path is None:
        return params
    path = Path(path)
    if not path.is_file():
        raise SensituneError(f"--config {path}: file not found; pass an existing params.yaml or omit --config")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SensituneError(f"{path}: invalid YAML ({first}); fix the file") from e
    if not isinstance(loaded, dict):
        raise SensituneError(f"{path}: expected a mapping of sections (data:, model:, ...) at the top level")
    problems = []
    for section, values in loaded.items():
        if section not in params:
            problems.append(f"unknown section {section!r}")
            continue
        if not isinstance(values, dict):
            problems.append(f"section {section!r} must be a mapping")
            continue
        for key, value in values.items():
            if key not in params[section]:
                problems.append(f"unknown key {section}.{key}")
            else:
                params[section][key] = value
    if problems:
        raise SensituneError(f"{path}: " + "; ".join(problems) + f" (valid sections: {', '.join(DEFAULTS)})")
    return params


def override(params: dict[str, dict[str, Any]], section: str, **flags: Any) -> dict[str, Any]:
    """The section with every flag that is not None applied; returns the merged section."""
    merged = dict(params[section])
    merged.update({k: v for k, v in flags.items() if v is not None})
    params[section] = merged
    return merged
