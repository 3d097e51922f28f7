"""MLflow tracking of one pipeline run: params, per-epoch and final metrics, artifacts, the registered model.

    log_run(params, run_dir)   everything in runs/main -> one MLflow run; merged model registered as a pyfunc
                               model and aliased `challenger` (the rollout moves `champion`)
    replay(fallback_json)      log a run that was saved locally while the server was down

The store is ``sqlite:///mlflow.db`` (artifacts in ./mlartifacts beside it) unless ``MLFLOW_TRACKING_URI`` or
`tracking_uri` names another. Logging never breaks training: any MLflow failure (server down, DB locked, ...)
is a `TrackingWarning`, and everything that would have been logged is written to
``run_dir/mlflow_fallback.json`` instead; `replay` sends it once the server is back.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import re
import subprocess
import urllib.request
import warnings
from collections.abc import Iterator
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from spt_core import __version__
from spt_core.errors import SensituneError
from spt_core.io import write_json
from spt_core.stages import FILES

DEFAULT_URI = "sqlite:///mlflow.db"
ARTIFACT_DIR = "mlartifacts"  # beside the sqlite file; MLflow 3 needs an explicit artifact location for sqlite
RECORD_FILE = "mlflow_run.json"  # what the track stage wrote (run id, model version or fallback)
FALLBACK_FILE = "mlflow_fallback.json"
CHALLENGER = "challenger"
# Bounded MLflow HTTP calls: its defaults (7 retries with backoff, 120 s timeout) stall a run for minutes.
HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}
HEALTH_TIMEOUT_S = 5.0

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
    "val_acc": "best_val_acc",
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
RUN_ARTIFACTS = ("plan", "plan_png", "metrics", "history", "eval", "merged_info", "merged")
EXPORT_REPORT_KEYS = ("accuracy", "accuracy_drop", "max_abs_diff", "agreement")


class TrackingWarning(UserWarning):
    """MLflow could not be reached or refused the run; the run was saved to the fallback file instead."""


# ------------------------------------------------------------------------------------------------- public
def tracking_uri(uri: str | None = None) -> str:
    """The tracking URI in force: `uri`, else ``MLFLOW_TRACKING_URI``, else the local sqlite file."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def log_run(
    params: dict,
    run_dir: Path,
    *,
    tracking_uri: str | None = None,
    experiment: str = "sensitune",
    register: bool = True,
    tags: dict[str, str] | None = None,
    model_name: str | None = None,
) -> dict[str, Any]:
    """Log one finished pipeline run to MLflow; never raises for MLflow failures.

    Args:
        params: The resolved params (`spt_core.config.load_params`), logged flattened (``train.lr``).
        run_dir: The run directory (``paths.run``) holding metrics.json, history.csv, plan.json, ...
        tracking_uri: MLflow URI; default ``MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``.
        experiment: MLflow experiment name (created if missing).
        register: Register merged.safetensors as a pyfunc model version and alias it ``challenger``.
        tags: Extra run tags (e.g. the Prefect flow run id).
        model_name: Registered model name; default ``params["tracking"]["registered_model"]`` when that
            section exists, else ``sensitune-<timm model name>``.

    Returns:
        ``status`` ("logged" or "fallback"), ``tracking_uri``, ``experiment_id``, ``run_id``, ``model_name``,
        ``model_version``, ``alias`` and, on fallback, ``error`` and ``fallback`` (the JSON file written).

    Raises:
        SensituneError: run_dir lacks metrics.json (train has not run); a user error, not a tracking one.
    """
    record = collect_record(params, Path(run_dir), experiment=experiment, tags=tags, model_name=model_name)
    return _log_or_fallback(record, tracking_uri, register, Path(run_dir) / FALLBACK_FILE)


def replay(fallback: Path, *, tracking_uri: str | None = None, register: bool = True) -> dict[str, Any]:
    """Log a run saved in a fallback file; on success the file is renamed ``*.replayed.json``.

    Args:
        fallback: A ``mlflow_fallback.json`` written by `log_run`.
        tracking_uri: MLflow URI (default as in `log_run`).
        register: Register the merged model, if the record has one.

    Returns:
        As `log_run`; on another failure the same file is rewritten with the new error.
    """
    fallback = Path(fallback)
    try:
        record = json.loads(fallback.read_text())["record"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise SensituneError(f"{fallback}: not a sensitune MLflow fallback file ({type(e).__name__})") from e
    metrics_path = next(
        (Path(a["path"]) for a in record["artifacts"] if Path(a["path"]).name == FILES["metrics"]), None
    )
    if metrics_path is None or _fingerprint(metrics_path) != record.get("fingerprint"):
        # The run directory has been overwritten by a later run since: its files are not this run's.
        warnings.warn(
            f"{fallback}: the run directory now holds another run; replaying params, metrics and tags only",
            TrackingWarning,
            stacklevel=2,
        )
        record = {**record, "artifacts": [], "model": None, "tags": {**record["tags"], "sensitune.replay": "no-files"}}
    result = _log_or_fallback(record, tracking_uri, register, fallback)
    if result["status"] == "logged":
        os.replace(fallback, fallback.with_suffix(".replayed.json"))
    return result


BENCHMARK_EXPERIMENT = "sensitune-benchmarks"
# a compare.py row's key -> MLflow metric of its child run
BENCHMARK_ROW_METRICS = (
    "val_acc", "test_acc", "best_epoch", "trainable_backbone", "trainable_head", "trainable_pct", "budget_count",
    "peak_memory_mb", "train_overhead_mb", "s_per_epoch", "s_per_train_epoch", "wall_s",
)  # fmt: skip


def log_benchmark(
    results_json: Path,
    *,
    summary: dict[str, float] | None = None,
    tracking_uri: str | None = None,
    experiment: str = BENCHMARK_EXPERIMENT,
) -> dict[str, Any]:
    """Log one `benchmarks/compare.py` table to MLflow: a parent run, one child run per (method, seed, lr, budget).

    The parent holds the table's settings as params (backbone, task, budget, epochs, device, command, ...), the
    `summary` metrics (e.g. ``test_acc.spt-lora``) and the .json/.md/.png files as artifacts; each child holds its
    row's params (method, seed, lr, budget) and metrics (accuracies, trainable counts, memory, times). Logging the
    same results twice logs nothing new (the parent is tagged with the sha256 of the rows and sensitivity passes,
    so a re-run that only rewrote the header is the same table); a resumed, grown table is a new parent run; a
    failed log marks its parent and children FAILED and the next call logs the table again. Never raises for
    MLflow failures: returns ``status="failed"`` with the error and warns.

    Returns:
        ``status`` ("logged", "exists" or "failed"), ``tracking_uri``, ``experiment_id``, ``run_id`` (the
        parent), ``children`` (child runs logged) and, on failure, ``error``.
    """
    results_json = Path(results_json)
    try:
        state = json.loads(results_json.read_text())
        meta = state["meta"]
        if not isinstance(state["rows"], list):
            raise TypeError("rows is not a list")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise SensituneError(f"{results_json}: not a benchmarks/compare.py results file ({type(e).__name__})") from e
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI  # as `tracking_uri()`
    # the results, not the file: a re-run that adds no row rewrites meta (date, command) but is the same table
    results = json.dumps({"rows": state["rows"], "sensitivity": state.get("sensitivity", [])}, sort_keys=True)
    sha = hashlib.sha256(results.encode()).hexdigest()
    result: dict[str, Any] = {"status": "logged", "tracking_uri": uri, "run_id": None, "children": 0}
    try:
        _check_reachable(uri)
        with _mlflow_session(uri) as mlflow:
            client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
            exp_id = result["experiment_id"] = _experiment_id(client, experiment, uri)
            done = (f"tags.`sensitune.results_sha256` = '{sha}' and tags.`sensitune.kind` = 'benchmark' "
                    "and attributes.status = 'FINISHED'")  # fmt: skip
            found = client.search_runs([exp_id], done, max_results=1)
            if found:
                return {**result, "status": "exists", "run_id": found[0].info.run_id}
            name = f"{meta['backbone']}@{meta['img_size']} {meta['task']} {meta['budget']}"
            tags = {"sensitune.kind": "benchmark", "sensitune.results": results_json.stem,
                    "sensitune.results_sha256": sha}  # fmt: skip
            parent = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
            result["run_id"] = parent
            try:
                _log_benchmark_runs(client, exp_id, parent, results_json, state, summary or {}, tags, result)
            except Exception:
                with contextlib.suppress(Exception):  # no half-logged table passes for a finished one
                    rows = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent}'", max_results=10000)
                    for run in rows:
                        client.set_terminated(run.info.run_id, "FAILED")
                    client.set_terminated(parent, "FAILED")
                raise
    except Exception as e:  # the committed table is the record; tracking is a copy of it
        result.update(status="failed", error=" ".join(f"{type(e).__name__}: {e}".split())[:500])
        warnings.warn(f"MLflow at {uri} failed for {results_json.name}: {result['error'][:200]}", TrackingWarning,
                      stacklevel=2)  # fmt: skip
    return result


def _log_benchmark_runs(
    client: Any, exp_id: str, parent: str, results_json: Path, state: dict, summary: dict, tags: dict, result: dict
) -> None:
    from mlflow.entities import Metric, Param, RunTag

    now = int(datetime.now(timezone.utc).timestamp() * 1000)
    params = [Param(k, v[:6000]) for k, v in flatten(state["meta"]).items()]
    metrics = [Metric(k, float(v), now, 0) for k, v in summary.items() if _is_number(v)]
    for s in state.get("sensitivity", []):
        if _is_number(s.get("seconds")):
            metrics.append(Metric("sensitivity_seconds", float(s["seconds"]), now, int(s["seed"])))
    for i in range(0, len(params), 100):
        client.log_batch(parent, params=params[i : i + 100])
    client.log_batch(parent, metrics=metrics)
    for suffix in (".json", ".md", ".png"):
        if results_json.with_suffix(suffix).is_file():
            client.log_artifact(parent, str(results_json.with_suffix(suffix)))
    for r in state["rows"]:
        if "error" in r:
            continue
        key = f"{r['method']} seed{r['seed']} lr{r['lr']:g} {r['budget']}"
        child_tags = {**tags, "mlflow.parentRunId": parent, "sensitune.kind": "benchmark-row"}
        child = client.create_run(exp_id, run_name=key, tags=child_tags).info
        client.log_batch(
            child.run_id,
            params=[Param(k, str(r[k])) for k in ("method", "seed", "lr", "budget")],
            metrics=[Metric(k, float(r[k]), now, 0) for k in BENCHMARK_ROW_METRICS if _is_number(r.get(k))],
            tags=[RunTag("sensitune.details", json.dumps(r.get("details", {}))[:5000])],
        )
        client.set_terminated(child.run_id, "FINISHED")
        result["children"] += 1
    client.set_terminated(parent, "FINISHED")


def collect_record(
    params: dict,
    run_dir: Path,
    *,
    experiment: str = "sensitune",
    tags: dict[str, str] | None = None,
    model_name: str | None = None,
) -> dict[str, Any]:
    """Everything one run logs, as plain JSON data (what the fallback file holds).

    Returns:
        ``experiment``, ``run_name``, ``params`` (flat str -> str), ``metrics`` (list of key/value/step),
        ``tags``, ``artifacts`` (list of local path + artifact dir) and ``model`` (registration data or None).
    """
    run_dir = Path(run_dir)
    metrics_path = run_dir / FILES["metrics"]
    if not metrics_path.is_file():
        raise SensituneError(f"{metrics_path} not found: run `sensitune train` (or `dvc repro`) before tracking")
    m = json.loads(metrics_path.read_text())
    flat = flatten(params)
    flat.update({f"trainable.{kind}": str(n) for kind, n in (m.get("by_kind") or {}).items()})
    flat["trainable.total"] = str(m.get("trainable"))

    metrics = _epoch_metrics(run_dir / FILES["history"])
    metrics += [_metric(FINAL_METRICS[k], m[k]) for k in FINAL_METRICS if _is_number(m.get(k))]
    if (ev := _read_json(run_dir / FILES["eval"])) is not None:
        split = ev.get("split", "test")
        metrics += [_metric(f"eval_{split}_{k}", ev[k]) for k in ("accuracy", "loss") if _is_number(ev.get(k))]
    if (mi := _read_json(run_dir / FILES["merged_info"])) is not None and _is_number(mi.get("merge_max_abs_diff")):
        metrics.append(_metric("merge_max_abs_diff", mi["merge_max_abs_diff"]))
    export_dir = run_dir / FILES["export"]
    if (rep := _read_json(export_dir / "export_report.json")) is not None:
        for key in EXPORT_REPORT_KEYS:
            for fmt, v in (rep.get(key) or {}).items():
                if _is_number(v):
                    metrics.append(_metric(f"export.{key}.{fmt}", v))

    raw_md5 = dvc_md5(Path(params["paths"]["raw"]))
    prepared = (_read_json(Path(params["paths"]["data"]) / "dataset.json") or {}).get("data_hash")
    commit, dirty = git_commit()
    all_tags = {
        "sensitune.version": __version__,
        "plan_hash": m.get("plan_hash"),
        "model_name": m.get("model_name"),
        "data.raw_md5": raw_md5,  # the DVC version of paths.raw (from its .dvc file)
        "data.prepared_hash": prepared or m.get("data_hash"),
        "data_version": raw_md5 or prepared or m.get("data_hash"),
        "git.commit": commit,
        "mlflow.source.git.commit": commit,
        "git.dirty": None if commit is None else str(dirty).lower(),
        **(tags or {}),
    }
    all_tags = {k: str(v) for k, v in all_tags.items() if v is not None}

    artifacts = [(run_dir / FILES[k], "") for k in RUN_ARTIFACTS]
    artifacts += [(run_dir / "plan.safetensors", ""), (run_dir / FILES["adapter"], "adapter"), (export_dir, "export")]
    merged = run_dir / FILES["merged"]
    model = None
    if merged.is_file() and mi is not None:
        name = model_name or (params.get("tracking") or {}).get("registered_model") or f"sensitune-{m['model_name']}"
        model = {
            "name": name,
            "merged": str(merged.resolve()),
            "input_size": list(mi["preprocess"]["size"]),
            "num_classes": len(mi["class_names"]),
            "info": {k: mi.get(k) for k in ("class_names", "preprocess", "model_args", "plan_hash", "data_hash")},
            "version_tags": {
                "plan_hash": all_tags.get("plan_hash"),
                "data_version": all_tags.get("data_version"),
                "test_acc": str(m.get("test_acc")),
                "sensitune.version": __version__,
            },
        }
    return {
        "experiment": experiment,
        "fingerprint": _fingerprint(metrics_path),
        "run_name": f"{m.get('model_name')} budget={params['plan']['budget']} plan={m.get('plan_hash')}",
        "params": flat,
        "metrics": metrics,
        "tags": all_tags,
        "artifacts": [{"path": str(p.resolve()), "artifact_path": a} for p, a in artifacts if p.exists()],
        "model": model,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


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


# ------------------------------------------------------------------------------------------------ logging
def _log_or_fallback(record: dict, uri: str | None, register: bool, fallback: Path) -> dict[str, Any]:
    uri = tracking_uri(uri)
    result: dict[str, Any] = {"status": "logged", "tracking_uri": uri, "run_id": None, "model_version": None}
    try:
        _check_reachable(uri)
        result.update(_log_record(record, uri, register, result))
    except Exception as e:  # any tracking failure must leave the trained run intact
        error = " ".join(f"{type(e).__name__}: {e}".split())[:500]
        result.update(status="fallback", error=error, fallback=str(fallback))
        _keep_unsent(fallback, record)
        saved = {"tracking_uri": uri, "error": error, "partial_run_id": result["run_id"], "record": record}
        write_json(fallback, saved)
        warnings.warn(
            f"MLflow at {uri} failed ({error[:200]}); run saved to {fallback}: "
            f"send it later with `python -m pipelines.track --replay {fallback}`",
            TrackingWarning,
            stacklevel=3,
        )
    return result


def _keep_unsent(fallback: Path, record: dict) -> None:
    """An older fallback of another run is renamed (``mlflow_fallback.<created>.json``), not overwritten."""
    old = _read_json(fallback)
    if not isinstance(old, dict) or not isinstance(old.get("record"), dict):
        return
    if old["record"].get("fingerprint") != record.get("fingerprint"):
        stamp = re.sub(r"[^0-9A-Za-z]", "", str(old["record"].get("created", "old")))
        os.replace(fallback, fallback.with_name(f"{fallback.stem}.{stamp}.json"))


def _check_reachable(uri: str) -> None:
    """Fail fast (seconds, no retries) when an HTTP tracking server is down."""
    if uri.startswith(("http://", "https://")):
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S) as r:
            r.read()


@contextlib.contextmanager
def _mlflow_session(uri: str) -> Iterator[Any]:
    """mlflow with this tracking/registry URI and bounded HTTP retries; restores the previous URI."""
    import mlflow

    saved_env = {k: os.environ.get(k) for k in HTTP_ENV}
    for k, v in HTTP_ENV.items():
        os.environ.setdefault(k, v)  # a user's own setting wins
    prev_tracking, prev_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
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


def _log_record(record: dict, uri: str, register: bool, result: dict) -> dict[str, Any]:
    with _mlflow_session(uri) as mlflow:
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        exp_id = _experiment_id(client, record["experiment"], uri)
        result["experiment_id"] = exp_id
        run = client.create_run(exp_id, run_name=record["run_name"], tags=record["tags"])
        run_id = result["run_id"] = run.info.run_id
        try:
            _log_into(mlflow, client, run_id, record, register, result)
        except Exception:
            with contextlib.suppress(Exception):  # mark the partial run; the fallback file holds the whole one
                client.set_terminated(run_id, "FAILED")
            raise
    return result


def _log_into(mlflow: Any, client: Any, run_id: str, record: dict, register: bool, result: dict) -> None:
    from mlflow.entities import Metric, Param, RunTag

    now = int(datetime.now(timezone.utc).timestamp() * 1000)
    params = [Param(k, v) for k, v in record["params"].items()]
    metrics = [Metric(x["key"], float(x["value"]), now, int(x["step"])) for x in record["metrics"]]
    for i in range(0, len(params), 100):  # MLflow's per-call limits: 100 params, 1000 metrics
        client.log_batch(run_id, params=params[i : i + 100])
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    client.log_batch(run_id, tags=[RunTag("sensitune.logged", record["created"])])
    for a in record["artifacts"]:
        path = Path(a["path"])
        if path.is_dir():
            client.log_artifacts(run_id, str(path), a["artifact_path"] or None)
        elif path.is_file():
            client.log_artifact(run_id, str(path), a["artifact_path"] or None)
    model = record.get("model")
    if register and model is not None:
        with mlflow.start_run(run_id=run_id):  # log_model needs an active run; leaving it ends the run FINISHED
            version = _register(mlflow, client, model)
        result.update(model_name=model["name"], model_version=version, alias=CHALLENGER)
    else:
        client.set_terminated(run_id, "FINISHED")


def _experiment_id(client: Any, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # sqlite:///rel.db or sqlite:////abs.db
        location = (Path(uri[len("sqlite:///") :]).resolve().parent / ARTIFACT_DIR).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created meanwhile by a concurrent run
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _register(mlflow: Any, client: Any, model: dict) -> str:
    """Log the merged model as a pyfunc model, register it, alias the version ``challenger``; returns it."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    from pipelines import pyfunc

    h, w = model["input_size"]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, h, w))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, model["num_classes"]))]),
        params=ParamSchema([ParamSpec("output", "string", "logits")]),
    )
    where = {"name": "model"} if int(mlflow.__version__.split(".")[0]) >= 3 else {"artifact_path": "model"}
    with warnings.catch_warnings():
        # No input example on purpose (it would load and run the model here); the signature documents the input.
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        info = mlflow.pyfunc.log_model(
            **where,
            python_model=pyfunc.__file__,  # models from code: the file is stored with the model, nothing pickled
            artifacts={"merged": model["merged"]},
            signature=signature,
            pip_requirements=_requirements(),  # explicit: MLflow's inference would load the model in a subprocess
            metadata={"sensitune": model["info"]},
            registered_model_name=model["name"],
        )
    version = str(info.registered_model_version)
    client.set_registered_model_alias(model["name"], CHALLENGER, version)
    for k, v in model["version_tags"].items():
        if v is not None:
            client.set_model_version_tag(model["name"], version, k, v)
    return version


def _requirements() -> list[str]:
    reqs = [f"sensitune=={__version__}"]
    for pkg in ("torch", "timm", "safetensors", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")
    return reqs


# -------------------------------------------------------------------------------------------------- helpers
def _epoch_metrics(history: Path) -> list[dict[str, Any]]:
    if not history.is_file():
        return []
    out = []
    with open(history, newline="") as f:
        for row in csv.DictReader(f):
            for col, key in EPOCH_METRICS.items():
                if row.get(col) not in (None, ""):
                    out.append(_metric(key, float(row[col]), int(row["epoch"])))
    return out


def _fingerprint(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def _metric(key: str, value: Any, step: int = 0) -> dict[str, Any]:
    return {"key": key, "value": float(value), "step": step}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
