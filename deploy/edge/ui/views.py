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
from deploy.edge.rollout.stats import resolve_operating_point, restate, wilson_interval
from deploy.edge.ui.recent import RecentFrames
from spt_core.portable.errors import SensituneError
from spt_core.portable.operating_point import REJECT, OperatingPoint

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


def operating_point(service: Any) -> OperatingPoint:
    """The one place the pages get the good class and the threshold: the serving champion artifact's operating point
    (`deploy.edge.rollout.stats.resolve_operating_point`, as the rollout statistics use it)."""
    rt = service.runtime
    return resolve_operating_point(rt.config, getattr(rt.champion, "artifact", None))


def bit_depth(service: Any) -> int | None:
    """How the serving champion makes 16-bit frames 8-bit (its manifest's ``preprocess.bit_depth``): the pages show a
    frame as the model sees it, through the same conversion (`spt_core.portable.preprocess.to_8bit`)."""
    artifact = getattr(service.runtime.champion, "artifact", None)
    return artifact.preprocess.bit_depth if artifact is not None else None


def line_view(service: Any, recent: RecentFrames, shown: int = 3) -> dict[str, Any]:
    """Every camera (seen or pinned) with its arm, its last ``shown`` frames, its class counts and its parts
    rejected (the served decisions) for the hour."""
    rt, ok = service.runtime, operating_point(service).ok_class
    seen = recent.cameras()
    ids = sorted(set(seen) | set(rt.config.pinned), key=natural)
    cams, totals = [], {"frames": 0, "rejected": 0}
    for cid in ids:
        shots, counts, rejected = seen.get(cid, ([], {}, 0))
        total = sum(counts.values())
        totals["frames"] += total
        totals["rejected"] += rejected
        order = sorted(counts, key=lambda c: (c != ok, -counts[c], c))
        cams.append({
            "id": cid,
            "arm": arm_of(service, cid),
            "shots": shots[:shown],
            "last_rejected": bool(shots) and shots[0].rejected,
            "counts": [(c, counts[c], ok is not None and c != ok) for c in order],
            "total": total,
            "rejected": rejected,
        })  # fmt: skip
    return {"state": rt.state(), "ok_class": ok, "cameras": cams, "totals": totals, "now": time.time()}


def review_items(service: Any, recent: RecentFrames, store: Any, limit: int = 30) -> list[dict[str, Any]]:
    """Frames waiting for a label, most urgent first: the frame store's queue (low margin, disagreement, random
    sample) and the rejected parts among the recent frames that nobody has labelled yet. A stored frame keeps only
    its class, so it is judged by its class (`OperatingPoint.decision_of`)."""
    op = operating_point(service)
    items: dict[str, dict[str, Any]] = {}
    for f in (store.review_queue(limit=limit) if store is not None else None) or []:  # None: the store failed
        rejected = bool(f.predicted) and op.decision_of({"class": f.predicted}) == REJECT
        reasons = list(f.reasons) + (["rejected"] if rejected else [])
        items[f.frame_id] = {
            "frame_id": f.frame_id, "camera_id": f.camera_id, "predicted": f.predicted, "score": f.score,
            "margin": f.margin, "other": f.other, "role": f.role, "version": f.model_version, "ts": f.ts[11:19],
            "reasons": reasons, "p_good": p_good_text(None, f.score, f.predicted, op.ok_class),
        }  # fmt: skip
    for shots, _, _ in recent.cameras().values():
        for s in shots:
            if s.rejected and s.label is None and s.frame_id not in items:
                items[s.frame_id] = {
                    "frame_id": s.frame_id, "camera_id": s.camera_id, "predicted": s.cls, "score": s.score,
                    "margin": None, "other": None, "role": s.role, "version": s.version,
                    "ts": time.strftime("%H:%M:%S", time.localtime(s.ts)), "reasons": ["rejected"],
                    "p_good": p_good_text(s.p_good, s.score, s.cls, op.ok_class),
                }  # fmt: skip
    for it in items.values():
        it["reason_words"] = [REASON_WORDS.get(r, r) for r in it["reasons"]]
        it["priority"] = min((PRIORITY.get(r, 9) for r in it["reasons"]), default=9)
    return sorted(items.values(), key=lambda i: (i["priority"], i["margin"] if i["margin"] is not None else 2.0))[
        :limit
    ]


def p_good_text(p_good: float | None, score: float | None, predicted: str, ok_class: str | None) -> str:
    """A verdict's P(good) as the pages print it, never a bare "score": exact when known (the answer's own, or the
    score of a good verdict), else the bound a defect verdict gives (P(good) <= 1 - its score); without a good class
    (plain classification) the top class's own probability."""
    if score is None and p_good is None:
        return "P(good) unknown"
    if ok_class is None:
        return f"P({predicted}) {score or 0:.2f} · no good class"
    if p_good is None and predicted == ok_class:
        p_good = score
    return f"P(good) {p_good:.2f}" if p_good is not None else f"P(good) ≤ {1 - (score or 0):.2f}"


def _rate(k: int, n: int) -> dict[str, Any]:
    return {"k": k, "n": n, "p": k / n if n else None, "ci": wilson_interval(k, n)}


def arm_rates(stats: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Accuracy, escape rate (defects passed as good) and overkill (good parts rejected), each with its 95 % Wilson
    interval, from the counts of an arm of the rollout report (`deploy.edge.rollout.stats.compare`)."""
    return {
        "accuracy": _rate(stats["correct"], stats["labelled"]),
        "escape": _rate(stats["escaped"], stats["defects"]),
        "overkill": _rate(stats["overkilled"], stats["goods"]),
    }


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
        arms[role] = {**st, "rates": arm_rates(st)}
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
        "ok_class": rep["ok_class"],  # the operating point the report was counted at (`operating_point`)
        "fleet": fleet_view(service),
    }


def fleet_view(service: Any) -> dict[str, Any] | None:
    """The fleet rollout this box follows, as its last sync read it (`deploy.edge.fleet.member`): the plan, its
    wave, whether this box is in it, the fleet's pooled numbers and this box's local decisions; None without one."""
    fleet = (getattr(getattr(service, "sync", None), "state", None) or {}).get("fleet") or {}
    if not fleet.get("plan"):
        return None
    local = (fleet.get("local") or {}).get(fleet["plan"].get("version"))
    return {"plan": fleet["plan"], "member": fleet.get("member"), "pooled": fleet.get("pooled"), "local": local}


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
        if (problem := manifest_problem(m)) is not None:  # shown as invalid: one stray file must not hide the rest
            version = m["model_version"] if isinstance(m["model_version"], (str, int)) else "?"
            models.append({"version": str(version)[:40], "role": roles.get(d), "path": str(d), "precision": None,
                           "invalid": problem})  # fmt: skip
            continue
        ver, op = m.get("verification") or {}, OperatingPoint.from_dict(m)
        try:  # rollout.yaml's ok_class restates the good class where a manifest declares none, as for the champion
            op = restate(op, m.get("class_names") or [], cfg.ok_class, f"v{m['model_version']}")
        except SensituneError:
            pass  # a version that disagrees with rollout.yaml shows what it declares
        models.append({
            "version": str(m.get("model_version")), "role": roles.get(d), "path": str(d),
            "precision": m.get("precision"), "format": m.get("format"), "model_name": m.get("model_name"),
            "class_names": m.get("class_names") or [], "ok_class": op.ok_class, "ok_class_recorded": "ok_class" in m,
            "threshold": op.threshold, "data_version": m.get("data_version"), "plan_hash": m.get("plan_hash"),
            "created": with_age(m.get("created")), "sensitune_version": m.get("sensitune_version"),
            "promotable": m.get("promotable"), "verification": ver,
        })  # fmt: skip
    models.sort(key=lambda m: (m["role"] is None, natural(m["version"]), m["precision"] or ""))
    sync = getattr(service, "sync", None)
    sync_state = None
    if sync is not None:
        state = getattr(sync, "state", None) or getattr(sync, "status", None)
        raw = dict((state() if callable(state) else state) or {})
        sync_state = sync_rows(raw)
        why = {(s.get("version"), s.get("precision")): s.get("why") for s in (raw.get("serving") or {}).values()}
        for m in models:  # which precision serves and why (`deploy.edge.acceptance.Intake.choose`)
            m["serving_why"] = why.get((m["version"], m["precision"])) if m["role"] else None
    return {"state": rt.state(), "models": models, "sync": sync_state}


_TEXT_KEYS = ("precision", "format", "model_name", "ok_class", "data_version", "plan_hash", "created",
              "sensitune_version")  # fmt: skip


def manifest_problem(m: dict[str, Any]) -> str | None:
    """Why the Models page cannot show an artifact manifest's fields (a type it does not have), or None. The page
    lists every manifest it finds, including strays that `deploy.edge.artifact.load_artifact` would refuse."""
    version = m.get("model_version")
    if isinstance(version, bool) or not isinstance(version, (str, int)):
        return f"model_version={version!r:.40} is not text"
    for key in _TEXT_KEYS:
        if m.get(key) is not None and not isinstance(m[key], str):
            return f"{key}={m[key]!r:.40} is not text"
    names = m.get("class_names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(c, str) for c in names)):
        return f"class_names={names!r:.40} is not a list of names"
    try:
        OperatingPoint.from_dict(m)
    except SensituneError:
        return f"ok_class={m.get('ok_class')!r:.40}, threshold={m.get('threshold')!r:.40} is no operating point"
    if m.get("promotable") is not None and not isinstance(m["promotable"], bool):
        return f"promotable={m['promotable']!r:.40} is not true or false"
    if m.get("verification") is not None and not isinstance(m["verification"], dict):
        return f"verification={m['verification']!r:.40} is not a mapping"
    return None


def sync_rows(state: dict[str, Any], now: float | None = None) -> list[tuple[str, str]]:
    """The sync's state as (name, text) rows an operator reads: times with their age, nothing empty shown as
    "None", machine-only keys (``*_epoch``: the same moment as its ISO twin) left out."""

    def text(v: Any) -> str:
        if v is None:
            return "–"
        if v == {} or v == []:
            return "none"
        if isinstance(v, float):
            return f"{v:.3g}"
        if isinstance(v, dict):
            return "; ".join(f"{k}: {text(x)}" for k, x in v.items())
        if isinstance(v, (list, tuple)):
            return ", ".join(text(x) for x in v)
        return str(with_age(v, now))

    return [(k.replace("_", " "), text(v)) for k, v in state.items() if not k.endswith("_epoch")]


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
    ago = ago if age < 2 * 86400 else f"{age / 86400:.0f} d"
    return f"{value[:19].replace('T', ' ')} ({ago} ago)"
