"""publish: the one step from a finished run to a model the edge accepts, used by `sensitune publish`, the DVC
`track` stage and the retrain flow.

    publish(params, run_dir)   register the merged model (once) -> seal run/published/ with that registry version
                               -> log the sealed export to the run (once) -> maybe move alias `challenger`

Why this order: the edge serves an artifact only if its manifest's ``model_version`` equals the rollout
manifest's, which is the registry's version, and MLflow assigns that number at registration. The export stage
seals ``export/`` with the plan hash (it runs before any registry exists); publish copies the model files into
``published/openvino/<precision>/`` and seals a new manifest there with the registry version (a sealed
directory is never rewritten).

Signing: with ``$SENSITUNE_SIGNING_KEY`` (an Ed25519 private key file, kept out of the registry and the run), each
sealed manifest is signed (``signature.json`` beside it, `deploy.edge.signing`); boxes that trust the public key
refuse anything else (deploy/README.md, "Signed models").

Identity: a model with the same plan hash, data version and params (all but paths and export.model_version)
as a registered version is that version: nothing is registered again, and publish says which version it is.

The `challenger` rule (params ``publish.challenger``):
    publish (default)  a newly registered version becomes `challenger`, except inside a DVC experiment
                       (`dvc exp run`, i.e. a sweep): sweep runs are registered, tagged ``dvc.experiment``, and
                       leave the alias alone; pick the sweep's best by validation and `sensitune publish` it.
    always             sweeps move it too.
    never              publish only registers; the retrain flow or a person moves aliases.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from deploy.edge.artifact import MANIFEST, load_artifact, seal
from deploy.edge.precision import BUILDABLE, artifact_dir
from deploy.edge.signing import KEY_ENV, sign_artifact
from spt_core.portable.errors import SensituneError
from spt_core.portable.io import umask, write_json

from .layout import FILES
from .tracking import TrackingWarning, collect_record, flatten, log_run, tracking_uri
from .tracking.common import dvc_experiment, mlflow_session

log = logging.getLogger(__name__)
PUBLISHED, RECORD = "published", "publish.json"
IDENTITY_TAG = "sensitune.identity"
CHALLENGER_RULES = ("publish", "always", "never")


def identity(params: dict, run_dir: Path) -> str:
    """sha256[:16] of (plan hash, data version, every param but paths and export.model_version)."""
    m = json.loads((Path(run_dir) / FILES["metrics"]).read_text())
    record_tags = collect_record(params, Path(run_dir))["tags"]
    flat = {k: v for k, v in flatten(params).items() if not k.startswith("paths.") and k != "export.model_version"}
    blob = json.dumps([m.get("plan_hash"), record_tags.get("data_version"), flat], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def moves_challenger(rule: str, in_sweep: bool) -> bool:
    if rule not in CHALLENGER_RULES:
        raise SensituneError(f"publish.challenger={rule!r}: use one of {', '.join(CHALLENGER_RULES)}")
    return rule == "always" or (rule == "publish" and not in_sweep)


def publish(
    params: dict,
    run_dir: Path | None = None,
    *,
    tracking_uri_: str | None = None,
    model_name: str | None = None,
    tags: dict[str, str] | None = None,
    move_challenger: bool | None = None,
) -> dict[str, Any]:
    """Register (once), seal, log; see the module docstring.

    Args:
        params: The resolved params (``publish`` section: model_name, experiment, challenger rule).
        run_dir: The run directory (default ``paths.run``).
        tracking_uri_: MLflow URI (default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``).
        model_name: Registered model name (default ``publish.model_name`` or ``sensitune-<timm model name>``).
        tags: Extra run tags.
        move_challenger: Override the ``publish.challenger`` rule.

    Returns:
        ``status`` (published | identical | fallback | skipped), ``model_name``, ``model_version``, ``run_id``,
        ``registered`` (a new version), ``challenger_moved``, ``published`` (the sealed folder), ``identity``.
    """
    run_dir = Path(run_dir or params["paths"]["run"])
    pub = params.get("publish") or {}
    uri = tracking_uri(tracking_uri_)
    merged_info = _read(run_dir / FILES["merged_info"])
    if "skipped" in merged_info or not any(artifact_dir(run_dir / FILES["export"], p).is_dir() for p in BUILDABLE):
        why = merged_info.get("skipped") or f"{run_dir / FILES['export']}/openvino missing: run `sensitune export`"
        result = {"status": "skipped", "reason": why, "model_version": None, "tracking_uri": uri}
        result.update(log_run(params, run_dir, tracking_uri=uri, register=False, tags=tags, model_name=model_name))
        result["status"] = "skipped"
        _write_published(run_dir, result)
        return result
    name = model_name or pub.get("model_name") or f"sensitune-{params['model']['name']}"
    ident = identity(params, run_dir)
    sweep = dvc_experiment()
    move = (
        moves_challenger(pub.get("challenger", "publish"), sweep is not None)
        if move_challenger is None
        else move_challenger
    )
    out: dict[str, Any] = {"model_name": name, "identity": ident, "tracking_uri": uri, "dvc_experiment": sweep}
    try:
        existing = _find_identical(uri, name, ident)
    except Exception as e:  # server down: the track stage keeps its fallback behaviour (exit 0, replay later)
        existing, out["lookup_error"] = None, f"{type(e).__name__}: {e}"
    if existing is not None:
        out.update(status="identical", registered=False, model_version=existing["version"], run_id=existing["run_id"])
        log.warning("publish: identical to %s v%s (same plan hash, data version, params): not registered again",
                    name, existing["version"])  # fmt: skip
    else:
        alias = "challenger" if move else None
        res = log_run(params, run_dir, tracking_uri=uri, experiment=pub.get("experiment", "sensitune"),
                      tags={**(tags or {}), "sensitune.identity": ident}, model_name=name,
                      register_alias=alias, version_tags={IDENTITY_TAG: ident})  # fmt: skip
        if res["status"] != "logged" or not res.get("model_version"):
            out.update(status="fallback", registered=False, model_version=None, run_id=res.get("run_id"),
                       error=res.get("error"), fallback=res.get("fallback"))  # fmt: skip
            _write_published(run_dir, out)
            return out
        out.update(status="published", registered=True, model_version=str(res["model_version"]), run_id=res["run_id"])
    out["challenger_moved"] = bool(move and out["registered"])
    out["published"] = str(seal_published(run_dir, name, out["model_version"], out["run_id"]))
    if out["registered"]:
        _log_published(uri, out["run_id"], run_dir / PUBLISHED)
    _write_published(run_dir, out)
    return out


def seal_published(run_dir: Path, model_name: str, version: str, run_id: str | None) -> Path:
    """Copy every precision export/ built (besides the ONNX source) into the same place under published/
    (``published/openvino/<precision>/``, ...), sealed with `version`."""
    for p in BUILDABLE:
        src, dst = artifact_dir(run_dir / FILES["export"], p), artifact_dir(run_dir / PUBLISHED, p)
        if not (src / MANIFEST).is_file():
            continue
        if (dst / MANIFEST).is_file():
            if load_artifact(dst).version == version:
                continue
            shutil.rmtree(dst)  # an older publish of another version in this run dir (its registry copy stays)
        art = load_artifact(src)  # verified before it is re-sealed
        manifest = {**art.manifest, "model_version": version, "registry": {"model_name": model_name, "run_id": run_id}}
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{src.name}.tmp-", dir=dst.parent))
        tmp.chmod(0o777 & ~umask())
        for name in art.files:
            shutil.copy2(src / name, tmp / name)
        seal(tmp, manifest)
        if key := os.environ.get(KEY_ENV):  # signs the very manifest bytes the box will read
            sign_artifact(tmp, key)
        tmp.rename(dst)
    if (rep := run_dir / FILES["export_report"]).is_file():
        shutil.copy2(rep, run_dir / PUBLISHED / rep.name)
    return run_dir / PUBLISHED


def _find_identical(uri: str, name: str, ident: str) -> dict[str, str] | None:
    from .tracking.common import check_reachable

    check_reachable(uri)
    with mlflow_session(uri) as mlflow:
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        try:
            versions = client.search_model_versions(f"name='{name}'")
        except Exception as e:
            if "RESOURCE_DOES_NOT_EXIST" in str(e):
                return None
            raise
        for mv in sorted(versions, key=lambda v: int(v.version)):
            if mv.tags.get(IDENTITY_TAG) == ident:
                return {"version": str(mv.version), "run_id": mv.run_id}
    return None


def _log_published(uri: str, run_id: str, folder: Path) -> None:
    """The sealed export under the run's ``export/`` (what `sensitune-edge sync` downloads), logged once."""
    try:
        with mlflow_session(uri) as mlflow:
            mlflow.MlflowClient(tracking_uri=uri).log_artifacts(run_id, str(folder), "export")
    except Exception as e:
        warnings.warn(f"MLflow at {uri}: the sealed export was not logged ({e})", TrackingWarning, stacklevel=2)


def _write_published(run_dir: Path, result: dict[str, Any]) -> None:
    (run_dir / PUBLISHED).mkdir(parents=True, exist_ok=True)
    write_json(run_dir / PUBLISHED / RECORD, result)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
