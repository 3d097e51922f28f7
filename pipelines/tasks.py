"""The steps of the `retrain` flow (pipelines/flows.py) as Prefect tasks, and the few flow-only helpers.

Every training step is `run_stage`, one task per entry of `pipelines.stages.STAGES`; tracking goes through
`pipelines.tracking`, alias moves through `deploy.edge.registry`, the rollout manifest through `deploy.edge.rollout`.
What
only the flow needs lives here: the watched folder's fingerprint, the DVC versioning call, the champion
comparison on held-out images and the hand-over itself; the hand-over gate (offline: is the new model offered to
the line at all?) is `pipelines.gate`, shared with `sensitune publish`. The edge's online promotion (champion vs
challenger on live feedback) is `deploy.edge.rollout.decision`, not this gate.

Retries: each task retries what can fail transiently (DVC/MLflow I/O, a killed worker) and has a timeout.
A retried `train` resumes from its last finished epoch (``run/train_state``). Nothing here writes outside
the run's own directory except `hand_over` (registry aliases + rollout manifest), which is the last step.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # before prefect is imported
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from filelock import FileLock  # noqa: E402
from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from deploy.edge.registry import CHALLENGER_ALIAS, CHAMPION_ALIAS, MlflowRegistry  # noqa: E402
from pipelines import (
    flow_hooks,  # noqa: E402
    stages,  # noqa: E402
    tracking,  # noqa: E402
)
from pipelines.assess import registry_scores  # noqa: E402
from pipelines.gate import BOOTSTRAP, GATE_SPLIT, HANDOVER, NOT_PROMOTED, handover_gate  # noqa: E402, F401 - the flow's names
from pipelines.layout import dvc_root  # noqa: E402
from spt_core.portable.errors import SensituneError  # noqa: E402
from spt_core.portable.io import write_json  # noqa: E402

DVC_TIMEOUT_S = 3600


class RetrainError(SensituneError):
    """The retrain flow cannot go on (watched folder, DVC, registry or rollout manifest); one line with the fix."""


# -------------------------------------------------------------------------------------------------- data
def fingerprint(raw: Path) -> dict[str, Any]:
    """Content fingerprint of the watched folder: sha256 over sorted relative paths and file sha256s.

    Hidden files (the temp files of atomic writes, ``.DS_Store``) are skipped, as `.dvcignore` does.

    Returns:
        ``fingerprint`` (hex), ``files`` (count) and ``newest_mtime`` (epoch seconds).

    Raises:
        RetrainError: The folder is missing or holds no files.
    """
    raw = Path(raw)
    if not raw.is_dir():
        raise RetrainError(
            f"paths.raw={raw} does not exist: point it at the watched ImageFolder (or run sensitune demo)"
        )
    files = sorted(
        p for p in raw.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(raw).parts)
    )
    if not files:
        raise RetrainError(f"paths.raw={raw} holds no files: put images into <class>/ folders under it")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(raw).as_posix()}\0{hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
    return {"fingerprint": h.hexdigest(), "files": len(files), "newest_mtime": max(p.stat().st_mtime for p in files)}


def _dvc(root: Path, *args: str) -> str:
    cmd = [sys.executable, "-m", "dvc", *args]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    try:
        p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=DVC_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise RetrainError(f"`dvc {' '.join(args)}` in {root} took over {DVC_TIMEOUT_S} s; check the remote") from e
    if p.returncode != 0:
        last = (p.stderr.strip() or p.stdout.strip() or "no output").splitlines()[-1]
        raise RetrainError(
            f"`dvc {' '.join(args)}` in {root} failed ({last}); fix DVC or run the flow with use_dvc=False"
        )
    return p.stdout


@task(name="version-data", retries=2, retry_delay_seconds=30, timeout_seconds=2 * DVC_TIMEOUT_S, cache_policy=NO_CACHE)
def version_data(raw: str, fp: str, use_dvc: bool = True) -> dict[str, Any]:
    """`dvc add` + `dvc push` the watched folder; the data version is DVC's md5 of the folder.

    Without a DVC repository around `raw` (or with ``use_dvc=False``) nothing is versioned and the data version
    is the content fingerprint (``fp-<12 hex>``), which the log says.
    """
    from prefect import get_run_logger

    logger, raw_path = get_run_logger(), Path(raw)
    root = dvc_root(raw_path) if use_dvc else None
    if root is None:
        why = "use_dvc=False" if not use_dvc else f"no DVC repository (.dvc/) above {raw}"
        logger.warning("DVC versioning skipped (%s): data version = content fingerprint", why)
        return {"data_version": f"fp-{fp[:12]}", "dvc": False, "dvc_file": None}
    target = raw_path.resolve().relative_to(root).as_posix()
    # lines retrained at once share the repository, and DVC refuses a second concurrent command: take turns
    (root / ".dvc" / "tmp").mkdir(exist_ok=True)
    with FileLock(str(root / ".dvc" / "tmp" / "sensitune-dvc.lock"), timeout=DVC_TIMEOUT_S):
        _dvc(root, "add", "-q", target)
        md5 = tracking.dvc_md5(root / target)
        if md5 is None:
            raise RetrainError(f"`dvc add {target}` wrote no md5 into {target}.dvc; check the DVC repository at {root}")
        _dvc(root, "push", "-q", f"{target}.dvc")
    logger.info("data version %s (dvc add + push of %s)", md5, target)
    return {"data_version": md5, "dvc": True, "dvc_file": str(root / f"{target}.dvc")}


# ------------------------------------------------------------------------------------------ training steps
# Prefect's retry and time limits per stage; a retried `train` resumes from its last finished epoch.
STAGE_LIMITS: dict[str, dict[str, Any]] = {
    "prepare": {"retries": 1, "timeout_seconds": 3600, "retry_delay_seconds": 10},
    "measure": {"retries": 1, "timeout_seconds": 4 * 3600, "retry_delay_seconds": 30},
    "plan": {"retries": 1, "timeout_seconds": 600, "retry_delay_seconds": 10},
    "train": {"retries": 1, "timeout_seconds": 12 * 3600, "retry_delay_seconds": 60},
    "evaluate": {"retries": 1, "timeout_seconds": 3600, "retry_delay_seconds": 10},
    "merge": {"retries": 1, "timeout_seconds": 3600, "retry_delay_seconds": 10},
    "export": {"retries": 1, "timeout_seconds": 4 * 3600, "retry_delay_seconds": 30},
}


@task(cache_policy=NO_CACHE)
def _stage(name: str, params: dict, uri: str | None = None) -> Any:
    # looked up at call time: the one stage list decides what runs; a stage that reports epochs gets one line per
    # epoch in the flow's log and live metrics in MLflow
    return stages.call(stages.stage(name), params, on_epoch=lambda: flow_hooks.epoch_reporter(params, uri))


def run_stage(name: str, params: dict, uri: str | None = None) -> Any:
    """Run stage `name` of `pipelines.stages.STAGES` as a Prefect task named after it (CUDA when present); a stage
    without an entry in STAGE_LIMITS runs with Prefect's defaults (no retry, no time limit)."""
    return _stage.with_options(name=name, **STAGE_LIMITS.get(name, {}))(name, params, uri)


ingest_feedback = flow_hooks.ingest_feedback
publish_run = flow_hooks.publish_run
outcome = flow_hooks.outcome
INGEST_LEDGER = flow_hooks.INGEST_LEDGER


# ------------------------------------------------------------------------------------------------ MLflow
@task(name="log-extra", retries=2, retry_delay_seconds=10, timeout_seconds=900, cache_policy=NO_CACHE)
def log_extra(uri: str, run_id: str, *, metrics: dict, tags: dict, export_dir: str | None = None) -> None:
    """Add what is known only after registration to the MLflow run: export artifacts, comparison, decision."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if export_dir is not None:
        client.log_artifacts(run_id, export_dir, "export")
        report = json.loads((Path(export_dir) / "export_report.json").read_text())
        for key in tracking.EXPORT_REPORT_KEYS:
            for fmt, v in (report.get(key) or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    metrics = {**metrics, f"export.{key}.{fmt}": v}
    for k, v in metrics.items():
        if v is not None:
            client.log_metric(run_id, k, float(v))
    for k, v in tags.items():
        client.set_tag(run_id, k, str(v))


@task(name="read-aliases", retries=2, retry_delay_seconds=10, timeout_seconds=300, cache_policy=NO_CACHE)
def registry_aliases(uri: str, model_name: str) -> dict[str, str | None]:
    """The versions `champion` and `challenger` point at now (None when unset or no model yet)."""
    from mlflow.exceptions import MlflowException

    reg = MlflowRegistry(uri, model_name)
    try:
        reg.client.get_registered_model(model_name)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":  # the first run: no model, hence no champion
            return {CHAMPION_ALIAS: None, CHALLENGER_ALIAS: None}
        raise RetrainError(f"MLflow at {uri}: cannot read model {model_name} ({str(e).splitlines()[0]})") from e
    return {CHAMPION_ALIAS: reg.get_alias(CHAMPION_ALIAS), CHALLENGER_ALIAS: reg.get_alias(CHALLENGER_ALIAS)}


def restore_challenger(uri: str, model_name: str, version: str | None) -> None:
    """Point `challenger` back at `version` (or delete it): a failed or rejected candidate leaves no alias."""
    reg = MlflowRegistry(uri, model_name)
    if version is None:
        reg.clear_challenger()
    else:
        reg.set_challenger(version)


# ---------------------------------------------------------------------------------------- champion compare
def split_names(data_dir: Path, splits: tuple[str, ...] = ("train", "val")) -> set[str]:
    """``class/file`` names of the images in some splits of a prepared dataset (empty if it is gone)."""
    return {f"{p.parent.name}/{p.name}" for s in splits for p in (Path(data_dir) / s).glob("*/*") if p.is_file()}


def registry_accuracy(uri: str, model_uri: str, images: list[Path], labels: list[str]) -> float:
    """Accuracy of a registered pyfunc model on images, preprocessed as its own metadata says."""
    return registry_scores(uri, model_uri, images, labels)["accuracy"]  # pipelines.assess


@task(name="compare-champion", retries=2, retry_delay_seconds=10, timeout_seconds=3600, cache_policy=NO_CACHE)
def compare_champion(
    uri: str, model_name: str, version: str, champion: str | None, data_dir: str, champion_data_dir: str | None
) -> dict[str, Any]:
    """Challenger and champion accuracy on the same held-out images.

    Held out = this run's `GATE_SPLIT` split minus the images the champion was trained or selected on (when its
    prepared data is known): a re-split of grown data may move old training images into the new test split. The
    result names that split (``gate_split``): it is metrics.json's test split, so the gate has seen those numbers.
    """
    from prefect import get_run_logger

    test = Path(data_dir) / GATE_SPLIT
    files = sorted(p for p in test.glob("*/*") if p.is_file())
    seen = split_names(Path(champion_data_dir)) if champion_data_dir else set()
    if champion is not None and champion_data_dir is None:
        get_run_logger().warning("champion v%s's training split is unknown: held-out may hold its images", champion)
    held = [p for p in files if f"{p.parent.name}/{p.name}" not in seen]
    out: dict[str, Any] = {"gate_split": GATE_SPLIT, "n_test": len(files), "n_heldout": len(held),
                           "champion_version": champion}  # fmt: skip
    if not held:
        raise RetrainError(f"{test}: no test image is unseen by champion v{champion}; add data or lower data.n_train")
    labels = [p.parent.name for p in held]
    out["challenger"] = registry_scores(uri, f"models:/{model_name}/{version}", held, labels)
    out["challenger_acc"], out["champion_acc"], out["champion"] = out["challenger"]["accuracy"], None, None
    if champion is not None:
        out["champion"] = registry_scores(uri, f"models:/{model_name}/{champion}", held, labels)
        out["champion_acc"] = out["champion"]["accuracy"]
    return out


# ------------------------------------------------------------------------------------------------ hand over
@task(name="hand-over", retries=2, retry_delay_seconds=10, timeout_seconds=600, cache_policy=NO_CACHE)
def hand_over(
    decision: str,
    *,
    manifest: str,
    uri: str,
    model_name: str,
    version: str,
    artifact: str,
    champion_artifact: str | None,
    share: float,
    line: str,
    prev_challenger: str | None,
) -> dict[str, Any]:
    """Carry out the hand-over gate's decision on the registry aliases and the rollout manifest.

    bootstrap: alias ``champion`` -> version, manifest champion -> its FP32 artifact (manifest created if absent).
    handover: alias ``challenger`` -> version (its first move: publish registered without an alias), manifest
    challenger -> version at ``share`` of the cameras; the rollout's own rule (`deploy.edge.rollout.decide`)
    promotes or rolls it back from live feedback. With no manifest yet and a champion this flow did not make (its
    artifact unknown), the alias alone hands over: boxes that follow the registry pull it.
    not promoted: alias ``challenger`` stays (or goes back) where it was; the manifest is not touched.

    Returns:
        ``decision`` (as carried out), ``manifest`` (path, or None when untouched), ``alias_moves``, ``note``.
    """
    from deploy.edge import rollout

    reg, path = MlflowRegistry(uri, model_name), Path(manifest)
    out: dict[str, Any] = {"decision": decision, "manifest": None, "alias_moves": [], "note": ""}
    base = path.resolve().parent
    ref = rollout.ModelRef(version, os.path.relpath(Path(artifact).resolve(), base))
    if decision == HANDOVER and not path.is_file() and champion_artifact is None:
        # a champion published outside this flow (`dvc repro`, `sensitune publish`): its artifact is not known here,
        # so no local manifest can name it; boxes follow the registry (deploy.edge.sync), and the alias hands over
        out["alias_moves"].append(reg.set_challenger(version).to_dict())
        out["note"] = f"{path} not written (the champion's artifact is not this flow's): boxes follow the alias"
        return out
    if decision == NOT_PROMOTED:
        restore_challenger(uri, model_name, prev_challenger)
        out["alias_moves"].append({"alias": CHALLENGER_ALIAS, "to_version": prev_challenger})
        return out
    path.parent.mkdir(parents=True, exist_ok=True)
    with rollout.manifest_lock(path):  # the edge service rewrites the manifest too (auto roll-back)
        if path.is_file():
            cfg = rollout.load_config(path)
        else:
            champ = ref
            if decision == HANDOVER:  # a champion registered earlier, whose artifact this flow made
                champ = rollout.ModelRef(str(reg.get_alias(CHAMPION_ALIAS)), os.path.relpath(champion_artifact, base))
            registry = {"tracking_uri": uri, "model_name": model_name}
            data = {"line": line, "champion": vars(champ), "registry": registry}
            cfg = rollout.parse_config(data, base, source=str(path))
        if decision == BOOTSTRAP:
            cfg = replace(cfg, champion=ref, challenger=None)
        else:
            if cfg.challenger is not None:
                out["note"] = f"replaces challenger v{cfg.challenger.version} (superseded by newer data)"
            cfg = replace(cfg, challenger=ref, challenger_share=share)
        rollout.write_config(cfg, path)
    if decision == BOOTSTRAP:
        out["alias_moves"] += [reg.set_champion(version).to_dict(), reg.clear_challenger().to_dict()]
    else:  # handover: the gate has passed, so boxes following the registry may pull it now
        out["alias_moves"].append(reg.set_challenger(version).to_dict())
    out["manifest"] = str(path)
    return out


# ---------------------------------------------------------------------------------------------- run state
def load_state(path: Path) -> dict[str, Any]:
    """The retrain state file: ``{"trained": {fingerprint: record}}`` (empty when absent)."""
    try:
        state = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {"trained": {}}
    except (OSError, json.JSONDecodeError) as e:
        raise RetrainError(f"{path}: unreadable retrain state ({type(e).__name__}); fix or delete it to retrain") from e
    state.setdefault("trained", {})
    return state


def save_state(path: Path, state: dict[str, Any]) -> None:
    write_json(path, state)


def new_run_dir(root: Path, data_version: str) -> Path:
    """A fresh directory for one attempt: ``root/<version>``, then ``<version>.2``, ... (never reused)."""
    base = data_version.removesuffix(".dir").removeprefix("fp-")[:12]
    base = f"fp-{base}" if data_version.startswith("fp-") else base
    for k in range(1, 10_000):
        d = Path(root) / (base if k == 1 else f"{base}.{k}")
        try:
            d.mkdir(parents=True)
            return d
        except FileExistsError:
            continue
    raise RetrainError(f"{root}: 10000 attempts for data version {data_version}; clean up old run directories")
