"""The flywheel's training side: labelled frames that edge boxes uploaded become images in ``paths.raw``.

    ingest_incoming("http://mlflow:5000", "data/raw", ledger="runs/retrain/ingested.jsonl")

Boxes (`deploy.edge.sync`) upload ``incoming/<line>/<label>/<sha256>.<ext>`` plus ``<sha256>.json`` (provenance) to
the MLflow server's artifact store. Each image whose provenance is complete and whose content hash is neither in
the ledger nor already in ``paths.raw`` is written to ``paths.raw/<label>/fb-<sha256[:16]><ext>`` (atomically;
its mtime is the upload time) and its provenance appended to the ledger. The retrain flow then sees a new data
version (``dvc add``) like any other batch. Labels that are not a class folder of ``paths.raw`` are skipped and
reported (a new class is a decision for a person). Unlabelled uploads (``_unlabelled``) are never ingested.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from deploy.edge.mlflow_rest import RestRegistry
from spt_core.portable.io import file_sha256, write_bytes

INCOMING = "incoming"


def _known_hashes(raw: Path, ledger: Path) -> set[str]:
    seen = set()
    if ledger.is_file():
        seen |= {json.loads(line)["sha256"] for line in ledger.read_text().splitlines() if line.strip()}
    seen |= {file_sha256(p) for p in raw.rglob("fb-*") if p.is_file()}
    return seen


def ingest_incoming(url: str, raw: str | Path, ledger: str | Path, model_name: str = "") -> dict[str, Any]:
    """Copy new labelled uploads into ``raw``; returns ``added`` (count), ``by_label``, ``skipped`` (reasons)."""
    raw, ledger = Path(raw), Path(ledger)
    reg = RestRegistry(url, model_name or "-")
    classes = {p.name for p in raw.iterdir() if p.is_dir() and not p.name.startswith(".")} if raw.is_dir() else set()
    seen = _known_hashes(raw, ledger)
    out: dict[str, Any] = {"added": 0, "by_label": {}, "skipped": [], "files": []}
    for line in _listing(reg, INCOMING, dirs=True):
        for folder in _listing(reg, line, dirs=True):
            label = Path(folder).name
            files = {Path(f).name: f for f in _listing(reg, folder, dirs=False)}
            for name, path in sorted(files.items()):
                sha, ext = Path(name).stem, Path(name).suffix
                if ext == ".json" or sha in seen:
                    continue
                if f"{sha}.json" not in files:  # the image arrived, its provenance not yet: next time
                    continue
                if label == "_unlabelled" or label not in classes:
                    out["skipped"].append(f"{path}: label {label!r} is not a class folder of {raw}")
                    continue
                data = reg.get_file(path)
                if file_sha256_bytes(data) != sha:
                    out["skipped"].append(f"{path}: content does not match its sha256 name")
                    continue
                prov = json.loads(reg.get_file(files[f"{sha}.json"]))
                dest = raw / label / f"fb-{sha[:16]}{ext}"
                write_bytes(dest, data)
                _set_mtime(dest, prov.get("uploaded_at"))
                rec = {"sha256": sha, "path": str(dest), "label": label, "source": path,
                       **{k: prov.get(k) for k in ("line", "camera_id", "box", "model_version", "ts", "labelled_by",
                                                   "labelled_at", "uploaded_at", "frame_id", "predicted")}}  # fmt: skip
                ledger.parent.mkdir(parents=True, exist_ok=True)
                with open(ledger, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                seen.add(sha)
                out["added"] += 1
                out["by_label"][label] = out["by_label"].get(label, 0) + 1
                out["files"].append(str(dest))
    return out


def _listing(reg: RestRegistry, folder: str, dirs: bool) -> list[str]:
    """Full paths of the folders (or files) directly under `folder` (the proxy lists names relative to it)."""
    return [f"{folder}/{Path(f['path']).name}" for f in reg.list_files(folder) if bool(f.get("is_dir")) == dirs]


def file_sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _set_mtime(path: Path, iso: str | None) -> None:
    try:
        t = datetime.fromisoformat(iso).timestamp() if iso else None
    except ValueError:
        t = None
    if t is not None:
        os.utime(path, (t, t))
