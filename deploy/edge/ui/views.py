"""What each operator page shows, as plain data from the running service (the templates only lay it out).

Everything is read from the service as it runs (`service.runtime`, `service.report()`), from the frame store and
from the in-memory ring of recent frames; nothing here changes state. Keys that newer parts of the service add
(``p_good``, ``escape_rate``, ``overkill``, ``threshold``, fleet sync) are used when present and derived or marked
absent otherwise.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deploy.edge.rollout.logs import read_jsonl
from deploy.edge.rollout.manifest import CHALLENGER, CHAMPION, DECISION_LOG
from deploy.edge.rollout.stats import wilson_interval
from deploy.edge.ui.recent import RecentFrames

REASON_WORDS = {
    "rejected": "rejected part",
    "low_margin": "low margin",
    "disagreement": "champion and challenger disagree",
    "corrected": "corrected",
    "random": "random sample",
}
PRIORITY = {"disagreement": 0, "rejected": 1, "low_margin": 2, "corrected": 3, "random": 4}


def natural(s: str) -> list[Any]:
    """cam-2 before cam-10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def class_names(service: Any) -> list[str]:
    rt = service.runtime
    names: list[str] = []
    for m in (rt.champion, rt.challenger):
        for c in m.class_names if m else []:
            if c not in names:
                names.append(c)
    return names


def arm_of(service: Any, camera_id: str) -> dict[str, str]:
    """The camera's arm now, in words: champion, challenger, or champion with the challenger in shadow."""
    rt = service.runtime
    role = rt.arm(camera_id)
    cv = rt.champion.version if rt.champion else "?"
    if role == CHALLENGER:
        return {"role": CHALLENGER, "text": f"challenger v{rt.challenger.version}"}
    if rt.config.shadow and rt.challenger is not None and not rt.health.disabled:
        return {"role": "shadow", "text": f"champion v{cv} + shadow v{rt.challenger.version}"}
    return {"role": CHAMPION, "text": f"champion v{cv}"}


def line_view(service: Any, recent: RecentFrames, shown: int = 3) -> dict[str, Any]:
    """Every camera (seen or pinned) with its arm, its last ``shown`` frames and its class counts for the hour."""
    rt, ok = service.runtime, service.runtime.config.ok_class
    seen = recent.cameras()
    ids = sorted(set(seen) | set(rt.config.pinned), key=natural)
    cams, totals = [], {"frames": 0, "defects": 0}
    for cid in ids:
        shots, counts = seen.get(cid, ([], {}))
        total = sum(counts.values())
        defects = total - counts.get(ok, 0)
        totals["frames"] += total
        totals["defects"] += defects
        order = sorted(counts, key=lambda c: (c != ok, -counts[c], c))
        cams.append({
            "id": cid,
            "arm": arm_of(service, cid),
            "shots": shots[:shown],
            "last_defect": bool(shots) and shots[0].cls != ok,
            "counts": [(c, counts[c], c != ok) for c in order],
            "total": total,
            "defects": defects,
        })  # fmt: skip
    return {"state": rt.state(), "ok_class": ok, "cameras": cams, "totals": totals, "now": time.time()}


def review_items(service: Any, recent: RecentFrames, store: Any, limit: int = 30) -> list[dict[str, Any]]:
    """Frames waiting for a label, most urgent first: the frame store's queue (low margin, disagreement, random
    sample) and the rejected parts among the recent frames that nobody has labelled yet."""
    ok = service.runtime.config.ok_class
    items: dict[str, dict[str, Any]] = {}
    for f in (store.review_queue(limit=limit) if store is not None else None) or []:  # None: the store failed
        reasons = list(f.reasons) + (["rejected"] if f.predicted and f.predicted != ok else [])
        items[f.frame_id] = {
            "frame_id": f.frame_id, "camera_id": f.camera_id, "predicted": f.predicted, "score": f.score,
            "margin": f.margin, "other": f.other, "role": f.role, "version": f.model_version, "ts": f.ts[11:19],
            "reasons": reasons,
        }  # fmt: skip
    for shots, _ in recent.cameras().values():
        for s in shots:
            if s.cls != ok and s.label is None and s.frame_id not in items:
                items[s.frame_id] = {
                    "frame_id": s.frame_id, "camera_id": s.camera_id, "predicted": s.cls, "score": s.score,
                    "margin": None, "other": None, "role": s.role, "version": s.version,
                    "ts": time.strftime("%H:%M:%S", time.localtime(s.ts)), "reasons": ["rejected"],
                }  # fmt: skip
    for it in items.values():
        it["reason_words"] = [REASON_WORDS.get(r, r) for r in it["reasons"]]
        it["priority"] = min((PRIORITY.get(r, 9) for r in it["reasons"]), default=9)
    return sorted(items.values(), key=lambda i: (i["priority"], i["margin"] if i["margin"] is not None else 2.0))[
        :limit
    ]


def _rate(k: int, n: int) -> dict[str, Any]:
    return {"k": k, "n": n, "p": k / n if n else None, "ci": wilson_interval(k, n)}


def arm_rates(stats: dict[str, Any], ok_class: str) -> dict[str, dict[str, Any]]:
    """Accuracy, escape rate (defects passed as good) and overkill (good parts rejected), each with its 95 % Wilson
    interval; taken from the report when it has them, else derived from its recall numbers (exact: they are k/n)."""
    n, defects = stats["labelled"], stats["defects"]
    out = {"accuracy": _rate(stats["correct"], n)}
    if "escape_rate" in stats:
        out["escape"] = _rate(stats.get("escaped", round((stats["escape_rate"] or 0) * defects)), defects)
    else:
        out["escape"] = _rate(defects - round((stats["defect_recall"] or 0) * defects), defects)
    goods = stats.get("goods", n - defects)
    if stats.get("overkill") is not None:
        out["overkill"] = _rate(round(stats["overkill"] * goods), goods)
    else:
        good_recall = stats["recall_per_class"].get(ok_class)
        out["overkill"] = _rate(round((1 - good_recall) * goods) if good_recall is not None else 0, goods)
    return out


def rule_in_words(rule: Any) -> list[str]:
    r = asdict(rule)
    words = [
        f"Roll back at once if the challenger's inference error rate is above {r['max_error_rate']:.0%} with 95 % "
        "confidence (Wilson lower bound).",
        f"Otherwise wait until both champion and challenger have {r['min_samples']} labelled frames each.",
        f"Then promote if the challenger's accuracy is at least {r['min_gain']:+.1%} above the champion's and its "
        f"median latency at most {1 + r['max_latency_increase']:.2f} x the champion's; otherwise roll back.",
    ]
    extra = {
        k: v for k, v in r.items() if k not in ("max_error_rate", "min_samples", "min_gain", "max_latency_increase")
    }
    if extra:
        words.append("Further limits: " + ", ".join(f"{k} = {v}" for k, v in extra.items()) + ".")
    return words


def audit_trail(cfg: Any, n: int = 20) -> list[dict[str, Any]]:
    records, _ = read_jsonl(cfg.logs / DECISION_LOG)
    return list(reversed(records[-n:]))


def rollout_view(service: Any) -> dict[str, Any]:
    rt = service.runtime
    cfg = rt.config
    rep = service.report()
    arms = {}
    for role in (CHAMPION, CHALLENGER):
        st = rep["overall"][role]
        arms[role] = {**st, "rates": arm_rates(st, rep.get("ok_class") or cfg.ok_class)}
    need = cfg.decision.min_samples
    progress = {
        role: {"have": arms[role]["labelled"], "need": need, "left": max(0, need - arms[role]["labelled"])}
        for role in arms
    }
    done = min(p["have"] for p in progress.values())
    return {
        "state": rep["state"],
        "arms": arms,
        "paired": rep.get("paired"),
        "progress": progress,
        "progress_pct": min(100, round(100 * done / need)) if need else 100,
        "preview": rep["decision_preview"],
        "rule": rule_in_words(cfg.decision),
        "audit": audit_trail(cfg),
        "ok_class": rep.get("ok_class") or cfg.ok_class,
    }


def _store_root(artifact_dir: Path, version: str) -> Path:
    """The folder that holds every version: the parent of the ancestor named after this version (``3`` or ``v3``),
    else the artifact's own parent."""
    for d in artifact_dir.parents:
        if d.name in (version, f"v{version}"):
            return d.parent
    return artifact_dir.parent


def models_view(service: Any, max_manifests: int = 40) -> dict[str, Any]:
    """The versions in the box's store (every artifact manifest under the folder holding the served versions)."""
    rt = service.runtime
    cfg = rt.config
    serving = {CHAMPION: cfg.champion, CHALLENGER: cfg.challenger}
    roots, roles = set(), {}
    for role, ref in serving.items():
        if ref is not None:
            d = cfg.resolve(ref.path).resolve()
            roots.add(_store_root(d, ref.version))
            roles[d] = role
    found: dict[Path, dict[str, Any]] = {}
    for root in sorted(roots):
        for depth in ("*/manifest.json", "*/*/manifest.json", "*/*/*/manifest.json", "*/*/*/*/manifest.json"):
            for p in sorted(root.glob(depth)):
                if len(found) < max_manifests and p.parent.resolve() not in found:
                    try:
                        m = json.loads(p.read_text())
                    except (OSError, ValueError):
                        continue
                    if isinstance(m, dict) and "model_version" in m:
                        found[p.parent.resolve()] = m
    models = []
    for d, m in found.items():
        ver = m.get("verification") or {}
        models.append({
            "version": str(m.get("model_version")), "role": roles.get(d), "path": str(d),
            "precision": m.get("precision"), "format": m.get("format"), "model_name": m.get("model_name"),
            "class_names": m.get("class_names") or [], "ok_class": m.get("ok_class", cfg.ok_class),
            "threshold": m.get("threshold"), "data_version": m.get("data_version"), "plan_hash": m.get("plan_hash"),
            "created": m.get("created"), "sensitune_version": m.get("sensitune_version"),
            "promotable": m.get("promotable"), "verification": ver,
        })  # fmt: skip
    models.sort(key=lambda m: (m["role"] is None, natural(m["version"]), m["precision"] or ""))
    sync = getattr(service, "sync", None)
    sync_state = None
    if sync is not None:
        state = getattr(sync, "state", None) or getattr(sync, "status", None)
        sync_state = {k: with_age(v) for k, v in dict((state() if callable(state) else state) or {}).items()}
    return {"state": rt.state(), "models": models, "sync": sync_state}


def with_age(value: Any, now: float | None = None) -> Any:
    """An ISO-8601 time with how long ago it was (staleness at a glance); any other value as it is."""
    if not isinstance(value, str) or len(value) < 19 or value[4] != "-" or value[10] != "T":
        return value
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=timezone.utc)
    age = (time.time() if now is None else now) - ts.timestamp()
    ago = f"{age:.0f} s" if age < 120 else f"{age / 60:.0f} min" if age < 7200 else f"{age / 3600:.1f} h"
    return f"{value[:19].replace('T', ' ')} ({ago} ago)"
