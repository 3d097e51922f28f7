"""The hand-over gate: may a newly registered version be offered to the line, or, with no champion yet, become it?

One rule for every path that registers a model, applied before any alias moves, so that a box polling the registry
never pulls a version the gate has not passed:

    retrain flow        `pipelines.flows`: publish registers only; `handover_gate` on the held-out comparison
                        (`pipelines.tasks.compare_champion`); `pipelines.tasks.hand_over` moves the aliases
    sensitune publish   `pipelines.publish` -> `gate_published`: no champion -> the first served-precision-promotable
    DVC track stage     model becomes champion; else the same held-out comparison on this run's gate split, and
                        `challenger` moves only on a pass

What the gate judges is what the boxes will serve: `served_precision` applies the box's own fallback rule
(`deploy.edge.precision.choose_served`: int8, else fp16, else fp32, from ``publish.precision`` down) to the export
report's ``promotable`` flags, so an INT8 export that lost too much does not block a version whose FP16 serves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deploy.edge.precision import choose_served, report_verdicts
from deploy.edge.registry import CHALLENGER_ALIAS, CHAMPION_ALIAS, MlflowRegistry
from deploy.edge.rollout.decision import escape_worse

from .layout import FILES

BOOTSTRAP, HANDOVER, NOT_PROMOTED = "bootstrap", "handover", "not promoted"
# The split every hand-over gate (publish's and the flow's) takes its held-out images from. It is the one metrics.json
# reports as "test": a separate gate split would re-split every line's data. So the test numbers of a model the gate
# passed are gate-selected, and the comparison, the flow's record and its MLflow run say which split decided
# (``gate_split``).
GATE_SPLIT = "test"


def served_precision(report: dict[str, Any] | None, wanted: str) -> tuple[str | None, str]:
    """(the precision boxes set to `wanted` will serve, or None; why) from an export_report.json's flags."""
    if not report or not report.get("promotable"):
        return None, "export_report.json has no promotable flags: run `sensitune export`"
    return choose_served(wanted, report_verdicts(report))


def handover_gate(
    challenger_acc: float,
    champion_acc: float | None,
    min_gain: float,
    promotable: bool,
    warnings: list[str] | None = None,
    escapes: tuple[dict, dict | None] | None = None,
    served_why: str | None = None,
) -> tuple[str, str]:
    """The offline hand-over gate: (decision, reason). No champion -> bootstrap; else gain >= min_gain -> handover.

    It decides whether a new model is offered to the line at all; the line's own promotion of a challenger to
    champion, on live operator feedback, is `deploy.edge.rollout.decision.decide`. A model none of whose served
    precisions may serve (``promotable`` False, ``served_why`` saying why), with training warnings (metrics.json
    ``warnings``: below the linear probe on validation) or whose held-out escape rate (``escapes``: challenger and
    champion `pipelines.assess.registry_scores`) is worse beyond its interval is never handed over.
    """
    if not promotable:
        return NOT_PROMOTED, f"no precision the boxes may serve: {served_why or 'export verification failed'}"
    if warnings:
        return NOT_PROMOTED, f"training warned: {warnings[0]}"
    if escapes and escapes[1] and (why := escape_worse(escapes[0], escapes[1])):
        return NOT_PROMOTED, f"held-out {why}"
    if champion_acc is None:
        return BOOTSTRAP, "no champion yet: the challenger becomes the champion"
    gain = challenger_acc - champion_acc
    verdict = ">=" if gain >= min_gain else "<"
    reason = (
        f"held-out accuracy {challenger_acc:.4f} vs champion {champion_acc:.4f}: gain {gain:+.4f} {verdict} {min_gain}"
    )
    return (HANDOVER if gain >= min_gain else NOT_PROMOTED), reason


def gate_published(params: dict, run_dir: Path, uri: str, name: str, version: str, *, who: str) -> dict[str, Any]:
    """publish's gate for a version it registered (or found identical): the aliases move only on a pass.

    No champion -> the version becomes champion if a precision the boxes serve is promotable (bootstrap). Else it
    is compared with the champion on this run's held-out split (`GATE_SPLIT`), both loaded from the
    registry, and becomes challenger on a gain >= 0 (the flow's default margin). Each move is audited
    (`pipelines.tracking.registry.move_alias`).

    Returns:
        ``decision`` (bootstrap | handover | not promoted), ``reason``, ``precision`` and ``precision_why`` (what
        the boxes will serve), ``alias_moves`` (audit records) and, when compared, ``comparison``.
    """
    from .tracking.registry import move_alias

    reg = MlflowRegistry(uri, name)
    champion, challenger = reg.get_alias(CHAMPION_ALIAS), reg.get_alias(CHALLENGER_ALIAS)
    prec, why = served_precision(_read(Path(run_dir) / FILES["export_report"]), params["publish"]["precision"])
    out: dict[str, Any] = {"precision": prec, "precision_why": why, "alias_moves": []}
    warnings = (_read(Path(run_dir) / FILES["metrics"]) or {}).get("warnings")
    if version in (champion, challenger):
        decision, reason = NOT_PROMOTED, f"v{version} is {'champion' if version == champion else 'challenger'} already"
    elif champion is None:
        decision, reason = handover_gate(1.0, None, 0.0, prec is not None, warnings, served_why=why)
        if decision == BOOTSTRAP:
            reason = "no champion yet: the first published model becomes the champion"
            out["alias_moves"].append(move_alias(uri, name, CHAMPION_ALIAS, version, who=who, why=reason))
    else:
        cmp = compare_on_split(uri, name, version, champion, Path(params["paths"]["data"]) / GATE_SPLIT)
        out["comparison"] = {k: cmp[k] for k in ("split", "n_heldout", "challenger_acc", "champion_acc")}
        decision, reason = handover_gate(cmp["challenger_acc"], cmp["champion_acc"], 0.0, prec is not None, warnings,
                                         (cmp["challenger"], cmp["champion"]), served_why=why)  # fmt: skip
        if decision == HANDOVER:
            out["alias_moves"].append(move_alias(uri, name, CHALLENGER_ALIAS, version, who=who, why=reason))
    return {**out, "decision": decision, "reason": reason}


def compare_on_split(uri: str, name: str, version: str, champion: str, split_dir: Path) -> dict[str, Any]:
    """Challenger and champion `registry_scores` on the images of one prepared split (``<class>/<file>``)."""
    from spt_core.portable.errors import SensituneError

    from .assess import registry_scores

    files = sorted(p for p in Path(split_dir).glob("*/*") if p.is_file())
    if not files:
        raise SensituneError(f"{split_dir} holds no images to compare v{version} with champion v{champion} on: "
                             "run `sensitune prepare`, or publish with --set publish.challenger=never")  # fmt: skip
    labels = [p.parent.name for p in files]
    new = registry_scores(uri, f"models:/{name}/{version}", files, labels)
    old = registry_scores(uri, f"models:/{name}/{champion}", files, labels)
    return {"split": Path(split_dir).name, "n_heldout": len(files), "challenger": new, "champion": old,
            "challenger_acc": new["accuracy"], "champion_acc": old["accuracy"]}  # fmt: skip


def _read(path: Path) -> dict[str, Any] | None:
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) else None
