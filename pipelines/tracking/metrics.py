"""Which numbers of a run become MLflow metrics: history.csv per epoch, metrics.json's finals, an auto plan's rungs."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from .common import is_number, metric

# history.csv column -> MLflow metric, logged with step = epoch
EPOCH_METRICS = {
    "train_loss": "train_loss",
    "val_acc": "val_acc",
    "val_loss": "val_loss",
    "lr": "lr",
    "seconds": "epoch_seconds",
}
# metrics.json key -> MLflow metric (val_acc is the validation-selected epoch's, hence best_val_acc)
FINAL_METRICS = {
    "test_acc": "test_acc",
    "test_balanced_acc": "test_balanced_acc",
    "escape_rate": "test_escape_rate",  # at the validation-chosen threshold
    "overkill": "test_overkill",
    "threshold": "threshold",
    "val_score": "best_val_score",
    "probe_val_score": "probe_val_score",
    "val_acc": "best_val_acc",
    "val_loss": "best_val_loss",
    "best_epoch": "best_epoch",
    "probe_test_acc": "probe_test_acc",
    "probe_val_acc": "probe_val_acc",
    "gain_over_probe": "gain_over_probe",
    "trainable": "trainable",
    "trainable_pct": "trainable_pct",
    "trainable_head": "trainable_head",
    "backbone_params": "backbone_params",
    "budget": "budget_values",
    "peak_memory_mb": "peak_memory_mb",
    "sensitivity_seconds": "sensitivity_seconds",
    "probe_seconds": "probe_seconds",
    "train_seconds": "train_seconds",
    "seconds_per_epoch": "seconds_per_epoch",
}
# per rung of an auto plan (metrics.json "ladder")
LADDER_KEYS = ("val_score", "val_loss", "val_acc", "best_epoch", "trainable")


def ladder_metrics(ladder: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``plan.budget: auto``'s rungs as ``ladder.<budget>.<key>`` (MLflow keys take no "%": 0.5% -> 0.5pct)."""
    out = []
    for rung in ladder:
        name = str(rung["budget"]).replace("%", "pct")
        out += [metric(f"ladder.{name}.{k}", rung[k]) for k in LADDER_KEYS if is_number(rung.get(k))]
        out.append(metric(f"ladder.{name}.chosen", int(bool(rung.get("chosen")))))
    return out


def epoch_metrics(history: Path) -> list[dict[str, Any]]:
    """history.csv -> one metric per (column, epoch), step = epoch, flagged ``epoch_metric``."""
    if not history.is_file():
        return []
    out = []
    with open(history, newline="") as f:
        for row in csv.DictReader(f):
            for col, key in EPOCH_METRICS.items():
                if row.get(col) not in (None, ""):
                    out.append({**metric(key, float(row[col]), int(row["epoch"])), "epoch_metric": True})
    return out
