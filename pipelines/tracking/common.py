"""What every MLflow call of sensitune shares: the URI in force, a bounded session, the experiment, small helpers.

The store is ``sqlite:///mlflow.db`` (artifacts in ./mlartifacts beside it) unless ``MLFLOW_TRACKING_URI`` or a
`tracking_uri` argument names another.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

DEFAULT_URI = "sqlite:///mlflow.db"
ARTIFACT_DIR = "mlartifacts"  # beside the sqlite file; MLflow 3 needs an explicit artifact location for sqlite
# Bounded MLflow HTTP calls: its defaults (7 retries with backoff, 120 s timeout) stall a run for minutes.
HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}
HEALTH_TIMEOUT_S = 5.0
# MLflow 3 opens an experiment in its GenAI view unless this tag says it holds model training runs
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


class TrackingWarning(UserWarning):
    """MLflow could not be reached or refused the run; the run was saved to the fallback file instead."""


def tracking_uri(uri: str | None = None) -> str:
    """The tracking URI in force: `uri`, else ``MLFLOW_TRACKING_URI``, else the local sqlite file."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested params -> ``{"section.key": "value"}``; lists and None as JSON (``["fp32"]``, ``null``)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, str) else json.dumps(v)
    return out


def dvc_md5(tracked: Path) -> str | None:
    """The md5 DVC recorded for a `dvc add`-ed path (``data/raw`` -> ``data/raw.dvc``), or None."""
    dvc_file = tracked.with_name(tracked.name + ".dvc")
    try:
        outs = yaml.safe_load(dvc_file.read_text())["outs"]
        return str(outs[0]["md5"])
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError):
        return None


def git_commit(cwd: Path | None = None) -> tuple[str | None, bool]:
    """(HEAD commit, working tree has uncommitted changes to tracked files); (None, False) outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None, False
        status = ["git", "status", "--porcelain", "--untracked-files=no"]
        st = subprocess.run(status, cwd=cwd, capture_output=True, text=True, timeout=10)
        return head.stdout.strip(), bool(st.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        return None, False


def check_reachable(uri: str) -> None:
    """Fail fast (seconds, no retries) when an HTTP tracking server is down."""
    if uri.startswith(("http://", "https://")):
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S) as r:
            r.read()


@contextlib.contextmanager
def mlflow_session(uri: str) -> Iterator[Any]:
    """mlflow with this tracking/registry URI and bounded HTTP retries; restores the previous state exactly.

    mlflow's setters also write ``MLFLOW_TRACKING_URI``/``MLFLOW_REGISTRY_URI`` into the environment, and setting
    the registry back to the value ``get_registry_uri()`` reported pins it even when it was only following the
    tracking URI; both would leak into every later client and subprocess. So the environment is restored as it
    was, and a registry that followed the tracking URI follows it again."""
    import mlflow

    saved_env = {k: os.environ.get(k) for k in (*HTTP_ENV, "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    for k, v in HTTP_ENV.items():
        os.environ.setdefault(k, v)  # a user's own setting wins
    prev_tracking, prev_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    if saved_env["MLFLOW_REGISTRY_URI"] is None and prev_registry == prev_tracking:
        prev_registry = None  # it was following the tracking URI, not set
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(prev_tracking)
        mlflow.set_registry_uri(prev_registry)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def experiment_id(client: Any, name: str, uri: str) -> str:
    """The experiment's id, created if missing; tagged so that MLflow 3 opens it in the classic ML view."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
            client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # sqlite:///rel.db or sqlite:////abs.db
        location = (Path(uri[len("sqlite:///") :]).resolve().parent / ARTIFACT_DIR).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
    except Exception:  # created meanwhile by a concurrent run
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def run_name(params: dict, model_name: str | None, data_version: str | None) -> str:
    """``<model> <budget> <plan kind> data=<version[:8]>``: short enough that MLflow's column shows it all; the kind
    is ``per_row`` for the per-row allocation, else ``plan.structured`` (lora, adapter, none)."""
    short = str(model_name or params["model"]["name"]).removeprefix("tf_").replace("efficientnet", "effnet")
    data = (data_version or "none").removeprefix("fp-")[:8]
    plan = params["plan"]
    kind = "per_row" if plan.get("allocation") == "per_row" else plan["structured"]
    return f"{short} {plan['budget']} {kind} data={data}"


def data_version(params: dict) -> str | None:
    """The data version a run trains on: DVC's md5 of paths.raw, else the prepared split's content hash."""
    prepared = (read_json(Path(params["paths"]["data"]) / "dataset.json") or {}).get("data_hash")
    return dvc_md5(Path(params["paths"]["raw"])) or prepared


def dvc_experiment() -> str | None:
    """The DVC experiment being run (`dvc exp run` sets DVC_EXP_NAME for the stage commands), or None."""
    return os.environ.get("DVC_EXP_NAME") or None


def fingerprint(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def metric(key: str, value: Any, step: int = 0) -> dict[str, Any]:
    return {"key": key, "value": float(value), "step": step}


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
