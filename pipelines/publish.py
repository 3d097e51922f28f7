"""publish: the one step from a finished run to a model the edge accepts, used by `sensitune publish`, the DVC
`track` stage and the retrain flow.

    publish(params, run_dir)   register the merged model (once) -> seal run/published/ with that registry version
                               -> log the sealed export to the run (once) -> the hand-over gate -> maybe move an alias

Why this order: the edge serves an artifact only if its manifest's ``model_version`` equals the rollout
manifest's, which is the registry's version, and MLflow assigns that number at registration. The export stage
seals ``export/`` with the plan hash (it runs before any registry exists); publish copies the model files into
``published/openvino/<precision>/`` and seals a new manifest there with the registry version (a sealed
directory is never rewritten). An alias moves last: a box follows the aliases, so by then the sealed export it
downloads is in the registry, and the gate has passed.

Signing: with ``$SENSITUNE_SIGNING_KEY`` (an Ed25519 private key file, kept out of the registry and the run), each
sealed manifest is signed (``signature.json`` beside it, `deploy.edge.signing`); boxes that trust the public key
refuse anything else (deploy/README.md, "Signed models").

Identity, per store: a model with the same plan hash, data version and params (all but paths and
export.model_version) as a version registered in this registry, whose files lie in the artifact store this
experiment writes to now, is that version: nothing is registered again, and publish says which version it is. A
version registered elsewhere (another server, or a ``file://`` store a box cannot download from) is not.

The aliases (params ``publish.challenger``; `pipelines.gate.gate_published`, each move audited in the registry):
    publish (default)  the gate runs, except inside a DVC experiment (`dvc exp run`, i.e. a sweep): sweep runs are
                       registered, tagged ``dvc.experiment``, and leave the aliases alone; pick the sweep's best by
                       validation and `sensitune publish` it.
    always             sweeps are gated too.
    never              publish only registers; the retrain flow or a person (`sensitune registry set`) moves aliases.
The gate: with no champion, the first model whose served precision (``publish.precision`` and its fallback) is
promotable becomes champion; otherwise the model becomes challenger only if it matches the champion on this run's
held-out split. A gate that cannot run (no split, registry error) moves nothing and says why.
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
    gate: bool = True,
) -> dict[str, Any]:
    """Register (once), seal, log; see the module docstring.

    Args:
        params: The resolved params (``publish`` section: model_name, experiment, challenger rule).
        run_dir: The run directory (default ``paths.run``).
        tracking_uri_: MLflow URI (default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``).
        model_name: Registered model name (default ``publish.model_name`` or ``sensitune-<timm model name>``).
        tags: Extra run tags.
        move_challenger: Override the ``publish.challenger`` rule (whether the gate runs and may move an alias).
        gate: False: never touch an alias (the retrain flow gates and moves them itself).

    Returns:
        ``status`` (published | identical | fallback | skipped), ``model_name``, ``model_version``, ``run_id``,
        ``registered`` (a new version), ``challenger_moved``, ``champion_set``, ``gate`` (`gate_published`'s
        answer, when it ran), ``published`` (the sealed folder), ``identity``, ``warnings``, ``model`` (tuned, or
        probe: no candidate beat the linear probe on validation and ``train.below_probe: export_probe`` kept it;
        the registered version and the MLflow run carry it as ``model`` / ``sensitune.model``).
    """
    run_dir = Path(run_dir or params["paths"]["run"])
    pub = params.get("publish") or {}
    uri = tracking_uri(tracking_uri_)
    merged_info, trained = _read(run_dir / FILES["merged_info"]), _read(run_dir / FILES["metrics"])
    exported = any(artifact_dir(run_dir / FILES["export"], p).is_dir() for p in BUILDABLE)
    # train.below_probe: stop kept no model (an older run's files may still lie here): nothing to publish
    if trained.get("stopped") or "skipped" in merged_info or not exported:
        missing = f"{run_dir / FILES['export']}/openvino missing: run `sensitune export`"
        why = trained.get("stopped") or merged_info.get("skipped") or missing
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
    out: dict[str, Any] = {"model_name": name, "identity": ident, "tracking_uri": uri, "dvc_experiment": sweep,
                           "warnings": [], "model": trained.get("model")}  # fmt: skip
    try:
        existing = _find_identical(uri, name, ident, pub.get("experiment", "sensitune"), out["warnings"])
    except Exception as e:  # server down: the track stage keeps its fallback behaviour (exit 0, replay later)
        existing, out["lookup_error"] = None, f"{type(e).__name__}: {e}"
    if existing is not None:
        out.update(status="identical", registered=False, model_version=existing["version"], run_id=existing["run_id"])
        log.warning("publish: identical to %s v%s (same plan hash, data version, params): not registered again",
                    name, existing["version"])  # fmt: skip
    else:
        res = log_run(params, run_dir, tracking_uri=uri, experiment=pub.get("experiment", "sensitune"),
                      tags={**(tags or {}), "sensitune.identity": ident}, model_name=name,
                      register_alias=None, version_tags={IDENTITY_TAG: ident})  # fmt: skip
        if res["status"] != "logged" or not res.get("model_version"):
            out.update(status="fallback", registered=False, model_version=None, run_id=res.get("run_id"),
                       error=res.get("error"), fallback=res.get("fallback"))  # fmt: skip
            _write_published(run_dir, out)
            return out
        out.update(status="published", registered=True, model_version=str(res["model_version"]), run_id=res["run_id"])
    out["published"] = str(seal_published(run_dir, name, out["model_version"], out["run_id"]))
    if out["registered"]:
        _log_published(uri, out["run_id"], run_dir / PUBLISHED)
    if gate and move:  # last: what a box downloads once an alias moves is in the registry by now
        out["gate"] = _gate(params, run_dir, uri, name, out["model_version"])
    moved = {m["alias"] for m in (out.get("gate") or {}).get("alias_moves", [])}
    out["challenger_moved"], out["champion_set"] = "challenger" in moved, "champion" in moved
    for w in out["warnings"]:
        warnings.warn(w, TrackingWarning, stacklevel=2)
    _write_published(run_dir, out)
    return out


def _gate(params: dict, run_dir: Path, uri: str, name: str, version: str) -> dict[str, Any]:
    """`pipelines.gate.gate_published`; a gate that cannot run moves nothing and says why (the model stays
    registered and sealed: `sensitune registry set` or a later publish can still move an alias)."""
    from .gate import gate_published
    from .tracking.registry import who_am_i

    try:
        result = gate_published(params, run_dir, uri, name, version, who=who_am_i("sensitune publish"))
    except Exception as e:  # the registration stands; only the alias move is withheld
        why = " ".join(f"{type(e).__name__}: {e}".split())
        result = {"decision": "not run", "reason": why, "alias_moves": []}
    log.warning("publish: %s v%s: %s (%s)", name, version, result["decision"], result["reason"])
    return result


def seal_published(run_dir: Path, model_name: str, version: str, run_id: str | None) -> Path:
    """Copy every precision export/ built (besides the ONNX source) into the same place under published/
    (``published/openvino/<precision>/``, ...), sealed with `version`."""
    for p in BUILDABLE:
        src, dst = artifact_dir(run_dir / FILES["export"], p), artifact_dir(run_dir / PUBLISHED, p)
        if not (src / MANIFEST).is_file():
            continue
        if (dst / MANIFEST).is_file():
            old = load_artifact(dst)
            if old.version == version and (old.manifest.get("registry") or {}).get("run_id") == run_id:
                continue
            shutil.rmtree(dst)  # an older publish (another version, or the same number in another store)
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


def _find_identical(uri: str, name: str, ident: str, experiment: str, notes: list[str]) -> dict[str, str] | None:
    """The version of this registry with identity `ident` whose files lie where `experiment` stores them now, or
    None. A version of another artifact store (e.g. ``file://`` from before a server with proxied artifacts) is not
    identical here: a box could not download it. `notes` gets a warning when this store itself is such a one."""
    from .tracking.common import check_reachable

    check_reachable(uri)
    with mlflow_session(uri) as mlflow:
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        served = uri.startswith(("http://", "https://"))
        # a new experiment of a server stores behind its proxy (`registry serve`); of a local store, anywhere local
        root = ("mlflow-artifacts:" if served else "") if exp is None else exp.artifact_location.rstrip("/") + "/"
        if served and not root.startswith("mlflow-artifacts:"):
            notes.append(f"MLflow at {uri}: experiment {experiment!r} stores artifacts at {root}, which a box cannot "
                         "download; publish into a new experiment (--set publish.experiment=NAME) or a registry "
                         "started with `sensitune registry serve`")  # fmt: skip
        try:
            versions = client.search_model_versions(f"name='{name}'")
        except Exception as e:
            if "RESOURCE_DOES_NOT_EXIST" in str(e):
                return None
            raise
        for mv in sorted(versions, key=lambda v: int(v.version)):
            if mv.tags.get(IDENTITY_TAG) != ident:
                continue
            where = client.get_run(mv.run_id).info.artifact_uri.rstrip("/") + "/" if mv.run_id else ""
            if where.startswith(root):
                return {"version": str(mv.version), "run_id": mv.run_id}
            log.info("publish: %s v%s has this identity but its files are at %s, not in %s: registering again",
                     name, mv.version, where, root)  # fmt: skip
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
