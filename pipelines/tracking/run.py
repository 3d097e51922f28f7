"""MLflow tracking of one pipeline run: params, per-epoch and final metrics, artifacts, the registered model.

    log_run(params, run_dir)   everything in runs/main -> one MLflow run; merged model registered as a pyfunc
                               model, with no alias unless asked (`pipelines.publish` moves aliases after its gate)
    replay(fallback_json)      log a run that was saved locally while the server was down

Logging never breaks training: any MLflow failure (server down, DB locked, ...) is a `TrackingWarning`, and
everything that would have been logged is written to ``run_dir/mlflow_fallback.json`` instead; `replay` sends
it once the server is back.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from spt_core import __version__
from spt_core.portable.errors import SensituneError
from spt_core.portable.io import write_json

from ..layout import FILES
from .common import (
    TrackingWarning,
    check_reachable,
    dvc_experiment,
    dvc_md5,
    experiment_id,
    fingerprint,
    flatten,
    git_commit,
    is_number,
    metric,
    mlflow_session,
    read_json,
    run_name,
    tracking_uri,
)
from .live import live_run_id
from .metrics import FINAL_METRICS, epoch_metrics, ladder_metrics
from .registry import register_model

RECORD_FILE = "mlflow_run.json"  # what the track stage wrote (run id, model version or fallback)
FALLBACK_FILE = "mlflow_fallback.json"
RUN_ARTIFACTS = ("plan", "plan_tensors", "plan_png", "metrics", "history", "eval", "confusion_png")  # at the run's root
# Not merged/ (the pyfunc model holds it) nor export/ (publish logs it once, sealed): no large file stored twice.
RUN_FOLDERS = ("tuned",)
EXPORT_REPORT_KEYS = ("accuracy", "accuracy_drop", "max_abs_diff", "agreement")


def log_run(
    params: dict,
    run_dir: Path,
    *,
    tracking_uri: str | None = None,
    experiment: str = "sensitune",
    register: bool = True,
    tags: dict[str, str] | None = None,
    model_name: str | None = None,
    register_alias: str | None = None,
    version_tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Log one finished pipeline run to MLflow; never raises for MLflow failures.

    Args:
        params: The resolved params (`pipelines.config.load_params`), logged flattened (``train.lr``).
        run_dir: The run directory (``paths.run``) holding metrics.json, history.csv, plan.json, ...
        tracking_uri: MLflow URI; default ``MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``.
        experiment: MLflow experiment name (created if missing).
        register: Register merged.safetensors as a pyfunc model version.
        tags: Extra run tags (e.g. the Prefect flow run id).
        model_name: Registered model name; default ``sensitune-<timm model name>``.
        register_alias: The alias the new version gets at once (None: none; `pipelines.publish` gates first).
        version_tags: Extra tags of the registered version.

    Returns:
        ``status`` ("logged" or "fallback"), ``tracking_uri``, ``experiment_id``, ``run_id``, ``model_name``,
        ``model_version``, ``alias`` and, on fallback, ``error`` and ``fallback`` (the JSON file written).

    Raises:
        SensituneError: run_dir lacks metrics.json (train has not run); a user error, not a tracking one.
    """
    record = collect_record(params, Path(run_dir), experiment=experiment, tags=tags, model_name=model_name)
    if record["model"] is not None:
        record["model"]["alias"] = register_alias
        record["model"]["version_tags"].update(version_tags or {})
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
    if metrics_path is None or fingerprint(metrics_path) != record.get("fingerprint"):
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

    metrics = epoch_metrics(run_dir / FILES["history"])
    metrics += [metric(FINAL_METRICS[k], m[k]) for k in FINAL_METRICS if is_number(m.get(k))]
    metrics += ladder_metrics(m.get("ladder") or [])
    if m.get("budget_chosen") is not None:
        flat["budget_chosen"] = str(m["budget_chosen"])
    if m.get("input_size") is not None:  # the side `model.input_size: auto` resolved to (the params say auto)
        flat["input_size_used"] = str(m["input_size"])
    if (ev := read_json(run_dir / FILES["eval"])) is not None:
        split = ev.get("split", "test")
        metrics += [metric(f"eval_{split}_{k}", ev[k]) for k in ("accuracy", "loss") if is_number(ev.get(k))]
    if (mi := read_json(run_dir / FILES["merged_info"])) is not None and is_number(mi.get("merge_max_abs_diff")):
        metrics.append(metric("merge_max_abs_diff", mi["merge_max_abs_diff"]))
    export_dir = run_dir / FILES["export"]
    if (rep := read_json(export_dir / "export_report.json")) is not None:
        for key in EXPORT_REPORT_KEYS:
            for fmt, v in (rep.get(key) or {}).items():
                if is_number(v):
                    metrics.append(metric(f"export.{key}.{fmt}", v))

    raw_md5 = dvc_md5(Path(params["paths"]["raw"]))
    prepared = (read_json(Path(params["paths"]["data"]) / "dataset.json") or {}).get("data_hash")
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
        "ok_class": m.get("ok_class"),
        "sensitune.warning.below_probe": "true" if m.get("below_probe") else None,
        "sensitune.model": m.get("model"),  # probe: train.below_probe: export_probe kept the linear probe
        "sensitune.warnings": " | ".join(m.get("warnings") or []) or None,
        "dvc.experiment": dvc_experiment(),
        **(tags or {}),
    }
    all_tags = {k: str(v) for k, v in all_tags.items() if v is not None}

    artifacts = [(run_dir / FILES[k], "") for k in RUN_ARTIFACTS]
    artifacts += [(run_dir / FILES[k], FILES[k]) for k in RUN_FOLDERS]
    merged = run_dir / FILES["merged"]
    model = None
    if merged.is_file() and mi is not None:
        name = model_name or f"sensitune-{m['model_name']}"
        model = {
            "name": name,
            "merged": str(merged.resolve()),
            "input_size": list(mi["preprocess"]["size"]),
            "num_classes": len(mi["class_names"]),
            "info": {
                k: mi.get(k)
                for k in ("class_names", "preprocess", "model_args", "plan_hash", "data_hash", "ok_class", "threshold")
            }
            | {"model": mi.get("model") or "tuned"},  # probe: train.below_probe: export_probe kept the linear probe
            "version_tags": {
                "plan_hash": all_tags.get("plan_hash"),
                "data_version": all_tags.get("data_version"),
                "test_acc": str(m.get("test_acc")),
                "model": m.get("model") or "tuned",
                "sensitune.version": __version__,
            },
        }
    ds = read_json(Path(params["paths"]["data"]) / "dataset.json") or {}
    dataset = {
        "name": Path(params["paths"]["raw"]).name
        if params["data"]["source"] == "raw"
        else str(params["data"]["source"]),
        "source": str(Path(params["paths"]["raw"]).resolve())
        if params["data"]["source"] == "raw"
        else str(params["data"]["source"]),
        "digest": (raw_md5 or prepared or "")[:36] or None,
        "dvc_md5": raw_md5,
        "prepared_hash": prepared,
        "class_counts": {
            c: sum(split.get(c, 0) for split in (ds.get("counts") or {}).values()) for c in ds.get("class_names", [])
        },
        "split_counts": ds.get("counts"),
    }
    return {
        "experiment": experiment,
        "fingerprint": fingerprint(metrics_path),
        "run_dir": str(run_dir.resolve()),
        "dataset": dataset if ds else None,
        "run_name": run_name(params, m.get("model_name"), all_tags.get("data_version")),
        "params": flat,
        "metrics": metrics,
        "tags": all_tags,
        "artifacts": [{"path": str(p.resolve()), "artifact_path": a} for p, a in artifacts if p.exists()],
        "model": model,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ------------------------------------------------------------------------------------------------ logging
def _log_or_fallback(record: dict, uri: str | None, register: bool, fallback: Path) -> dict[str, Any]:
    uri = tracking_uri(uri)
    result: dict[str, Any] = {"status": "logged", "tracking_uri": uri, "run_id": None, "model_version": None}
    try:
        check_reachable(uri)
        result.update(_log_record(record, uri, register, result))
    except Exception as e:  # any tracking failure must leave the trained run intact
        error = " ".join(f"{type(e).__name__}: {e}".split())[:500]
        result.update(status="fallback", error=error, fallback=str(fallback))
        record = _keep_unsent(fallback, record)
        saved = {"tracking_uri": uri, "error": error, "partial_run_id": result["run_id"], "record": record}
        write_json(fallback, saved)
        warnings.warn(
            f"MLflow at {uri} failed ({error[:200]}); run saved to {fallback}: "
            f"send it later with `python -m pipelines.track --replay {fallback}`",
            TrackingWarning,
            stacklevel=3,
        )
    return result


def _keep_unsent(fallback: Path, record: dict) -> dict:
    """An older fallback of another run is renamed (``mlflow_fallback.<created>.json``), not overwritten; a retry
    of the same run keeps its first ``created``. Returns the record to write."""
    old = read_json(fallback)
    if not isinstance(old, dict) or not isinstance(old.get("record"), dict):
        return record
    if old["record"].get("fingerprint") != record.get("fingerprint"):
        stamp = re.sub(r"[^0-9A-Za-z]", "", str(old["record"].get("created", "old")))
        os.replace(fallback, fallback.with_name(f"{fallback.stem}.{stamp}.json"))
        return record
    return {**record, "created": old["record"].get("created", record["created"])}


def _log_record(record: dict, uri: str, register: bool, result: dict) -> dict[str, Any]:
    with mlflow_session(uri) as mlflow:
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        exp_id = experiment_id(client, record["experiment"], uri)
        result["experiment_id"] = exp_id
        run_id = _live_run(client, record, uri)  # the run train opened, when it logged epochs live
        if run_id is None:
            run_id = client.create_run(exp_id, run_name=record["run_name"], tags=record["tags"]).info.run_id
        else:
            from mlflow.entities import RunTag

            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
            client.set_tag(run_id, "mlflow.runName", record["run_name"])
            record = {**record, "metrics": [x for x in record["metrics"] if x.get("epoch_metric") is not True]}
        result["run_id"] = run_id
        try:
            _log_into(mlflow, client, run_id, record, register, result)
        except Exception:
            with contextlib.suppress(Exception):  # mark the partial run; the fallback file holds the whole one
                client.set_terminated(run_id, "FAILED")
            raise
    return result


def _live_run(client: Any, record: dict, uri: str) -> str | None:
    """The live run of this run directory, if still open (a finished one belongs to an earlier track)."""
    run_id = live_run_id(Path(record.get("run_dir") or "."), uri) if record.get("run_dir") else None
    if run_id is None:
        return None
    try:
        return run_id if client.get_run(run_id).info.status == "RUNNING" else None
    except Exception:
        return None


def _log_dataset(client: Any, run_id: str, ds: dict) -> None:
    """The training data as an MLflow dataset input: source, DVC md5, class counts (the UI's Dataset column)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    profile = {"class_counts": ds["class_counts"], "split_counts": ds["split_counts"], "dvc_md5": ds["dvc_md5"],
               "prepared_hash": ds["prepared_hash"]}  # fmt: skip

    class _Data(MetaDataset):
        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(profile)}

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are the local-file source
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(Path(ds["source"]).as_uri() if ds["source"].startswith("/") else ds["source"])
    data = _Data(source=source, name=ds["name"], digest=ds["digest"])
    tag = InputTag("mlflow.data.context", "training")
    client.log_inputs(run_id, datasets=[DatasetInput(data._to_mlflow_entity(), tags=[tag])])


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
    if record.get("dataset"):
        try:
            _log_dataset(client, run_id, record["dataset"])
        except Exception as e:  # a dataset record is a convenience; the data version is in the tags
            warnings.warn(f"MLflow dataset input not logged ({type(e).__name__}: {e})", TrackingWarning, stacklevel=2)
    for a in record["artifacts"]:
        path = Path(a["path"])
        if path.is_dir():
            client.log_artifacts(run_id, str(path), a["artifact_path"] or None)
        elif path.is_file():
            client.log_artifact(run_id, str(path), a["artifact_path"] or None)
    model = record.get("model")
    if register and model is not None:
        with mlflow.start_run(run_id=run_id):  # log_model needs an active run; leaving it ends the run FINISHED
            version = register_model(mlflow, client, model)
        result.update(model_name=model["name"], model_version=version, alias=model.get("alias"))
    else:
        client.set_terminated(run_id, "FINISHED")
