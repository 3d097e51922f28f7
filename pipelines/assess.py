"""What a line judges a tuned model by, computed once after training and again by `sensitune evaluate`.

- the operating point: a part is rejected when P(good) < threshold, chosen on validation for
  ``evaluate.max_escape_rate`` (`spt_core.portable.operating_point.OperatingPoint.choose`); it travels with the model
  (tuned info -> merged -> export manifest) and `predict`, the hand-over gate and the edge apply it;
- on test: per-class precision and recall, confusion matrix (``confusion.png``, beside the good/defect x
  accepted/rejected matrix at the threshold), balanced accuracy, and the escape rate and overkill at that threshold,
  each with a Wilson interval;
- warnings: a tuned model below the linear probe on validation (same metric, ``train.select``) is flagged in
  metrics.json (``below_probe``) and as an MLflow tag; ``train.below_probe`` then keeps the probe or stops the run
  (`pipelines.below_probe`), so such a model is never exported; the flow hands over nothing with ``warnings``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spt_core.portable.errors import SensituneError
from spt_core.portable.io import atomic_path
from spt_core.portable.metrics import softmax
from spt_core.portable.operating_point import OperatingPoint, flat_rates

log = logging.getLogger(__name__)


def choose_operating_point(
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray] | None,
    class_names: Sequence[str],
    ok_class: str | None,
    max_escape_rate: float,
) -> tuple[OperatingPoint, dict[str, Any]]:
    """The operating point chosen on validation (labels, probs) and the metrics of both splits at it.

    Returns:
        The `OperatingPoint` (no threshold without a good class), and its ``to_dict`` keys with ``val`` and
        ``test`` (`OperatingPoint.metrics`) and the headline numbers flat: ``test_balanced_acc``, ``escape_rate``,
        ``overkill`` (test, at the threshold) with ``*_ci95``.
    """
    op = OperatingPoint.choose(*val, class_names, ok_class, max_escape_rate)
    out: dict[str, Any] = {**op.to_dict(), "val": op.metrics(*val, class_names)}
    if test is not None:
        t = out["test"] = op.metrics(*test, class_names)
        out["test_balanced_acc"] = t["balanced_accuracy"]
        if "at_threshold" in t:
            for rate in ("escape_rate", "overkill"):
                out[rate], out[f"{rate}_ci95"] = t["at_threshold"][rate]["value"], t["at_threshold"][rate]["ci95"]
    return op, out


def probe_warnings(metrics: dict[str, Any]) -> list[str]:
    """The tuned model below the linear probe on validation, on the selection metric (and on accuracy)."""
    out = []
    select, tuned, probe = metrics.get("select"), metrics.get("val_score"), metrics.get("probe_val_score")
    if tuned is not None and probe is not None and tuned < probe:
        out.append(
            f"below the linear probe on validation: {select} {tuned:.4f} < probe {probe:.4f}; this model must not "
            "replace the probe: try more epochs, another lr or budget, or keep the probe"
        )
    return out


def decision_counts(at_threshold: dict[str, Any]) -> list[list[int]]:
    """The 2 x 2 confusion of the line's decision from `OperatingPoint.metrics`'s ``at_threshold`` rates: rows true
    good / defect, columns accepted / rejected (escapes are defects accepted, overkill good parts rejected)."""
    esc, over = at_threshold["escape_rate"], at_threshold["overkill"]
    return [[over["n"] - over["k"], over["k"]], [esc["k"], esc["n"] - esc["k"]]]


def _panel(ax: Any, cm: np.ndarray, rows: Sequence[str], cols: Sequence[str], xlabel: str, title: str) -> None:
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)  # each true row as fractions: the colour
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(rows)):
        for j in range(len(cols)):  # white on the dark cells, so that every count stays readable
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=9,
                    color="white" if share[i, j] > 0.5 else "black")  # fmt: skip
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)


def plot_confusion(
    cm: Sequence[Sequence[int]],
    class_names: Sequence[str],
    path: Path,
    title: str = "",
    at_threshold: dict[str, Any] | None = None,
) -> Path | None:
    """The confusion matrix (true rows, predicted columns, counts in the cells) as PNG; None without matplotlib.

    With ``at_threshold`` (`OperatingPoint.metrics`'s, which has ``threshold``, ``escape_rate``, ``overkill``), a
    second panel beside it: good / defect against accepted / rejected at the threshold, the decision the line makes
    (the argmax matrix alone hides it: a part whose top class is good is still rejected below the threshold)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed: skipping %s", path)
        return None
    cm = np.asarray(cm)
    k = len(class_names)
    panels = 1 if at_threshold is None else 2
    width = 1.2 + 0.7 * k + (3.2 if panels == 2 else 0.0)
    fig, axes = plt.subplots(1, panels, figsize=(width, 1.0 + 0.6 * max(k, 3)), dpi=100, squeeze=False,
                             gridspec_kw={"width_ratios": [k, 2][:panels]})  # fmt: skip
    _panel(axes[0, 0], cm, class_names, class_names, "predicted (top class)", title)
    if at_threshold is not None:
        t = at_threshold["threshold"]
        _panel(axes[0, 1], np.asarray(decision_counts(at_threshold)), ["good", "defect"], ["accepted", "rejected"],
               "decision", f"at the threshold\nreject when P(good) < {t:.3f}")  # fmt: skip
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def summary_line(m: dict[str, Any]) -> str:
    """One line for the CLI: accuracy, balanced accuracy, and escape/overkill at the threshold."""

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def ci(c: Sequence[float] | None) -> str:
        return "" if not c else f" [{100 * c[0]:.1f}, {100 * c[1]:.1f}]"

    text = f"test accuracy {pct(m.get('test_acc'))}, balanced {pct(m.get('test_balanced_acc'))}"
    if m.get("threshold") is not None:
        text += (
            f"; at threshold P({m['ok_class']}) < {m['threshold']:.4f} -> reject (chosen on validation for escape "
            f"<= {m['max_escape_rate']}): escape rate {pct(m.get('escape_rate'))}{ci(m.get('escape_rate_ci95'))}, "
            f"overkill {pct(m.get('overkill'))}{ci(m.get('overkill_ci95'))}"
        )
    return text


def held_out_scores(
    probs: Any, labels: Sequence[str], class_names: Sequence[str], op: OperatingPoint
) -> dict[str, Any]:
    """Accuracy and, with a good class, the escape rate and overkill of `op`'s decisions on labelled parts (class
    names): what the hand-over gate weighs (`pipelines.tasks.handover_gate`), in the rollout statistics' keys."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
    accuracy = float((np.asarray(class_names)[probs.argmax(1)] == labels).mean())
    out: dict[str, Any] = {"accuracy": accuracy, "ok_class": op.ok_class, "escaped": 0, "defects": 0,
                           "escape_rate": None, "escape_rate_ci95": None}  # fmt: skip
    if op.ok_class is not None:  # the model's own decision at its own threshold
        out |= flat_rates(op.rates(labels, op.decisions(probs, class_names)))
    return out


def registry_scores(uri: str, model_uri: str, images: list[Path], labels: list[str]) -> dict[str, Any]:
    """`held_out_scores` of a registered model, at the operating point its metadata carries. The merged model MLflow
    loads runs through the one model runner (`deploy.compile.inferencer.open_inferencer`), as predict and verify."""
    import mlflow.pyfunc

    from deploy.compile.inferencer import open_inferencer
    from deploy.edge.inferencer import ModelCard
    from pipelines.tracking.common import mlflow_session
    from spt_core.portable.preprocess import preprocess_batch

    with mlflow_session(uri):
        registered = mlflow.pyfunc.load_model(model_uri)
    info = (registered.metadata.metadata or {}).get("sensitune") or {}
    if "preprocess" not in info or "class_names" not in info:
        raise SensituneError(
            f"{model_uri} has no sensitune metadata (preprocess, class_names); register it with log_run"
        )
    op = OperatingPoint.from_dict(info, where=f"{model_uri} metadata")
    card = ModelCard.from_info(info)
    inf = open_inferencer(registered.unwrap_python_model().model, card=card)  # pipelines.pyfunc.SensituneModel
    batches = [inf.infer(preprocess_batch(images[i : i + 64], card.preprocess)) for i in range(0, len(images), 64)]
    return held_out_scores(softmax(np.concatenate(batches)), labels, card.class_names, op)  # (N, C) logits -> probs
