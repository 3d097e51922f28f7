"""The MLflow model registry: the merged model as a pyfunc model version, alias moves with an audit record, and a
registry a box can pull from.

    register_model(mlflow, client, model)      log + register the merged model (publish decides the aliases)
    move_alias(uri, name, alias, version, ...) point `champion`/`challenger` at a version; audited in the registry
    sensitune registry serve --dir DIR         a local `mlflow server` whose artifacts boxes can download
    sensitune registry set challenger 4 --why "..."   a person's alias move, audited

The rollout (the edge's online promotion, `deploy.edge.rollout`) moves ``champion``; the hand-over gate
(`pipelines.gate`) decides whether a new version is offered to the line at all, before any alias moves.

Audit records have the edge's shape (`deploy.edge.mlflow_rest.audit`: ts, model_name, alias, from_version,
to_version, who, evidence, box) and the same places: registered-model tag ``audit.<time>.<alias>`` and version tag
``audit.<alias>``, so one registry holds every alias move, whoever made it.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import shutil
import subprocess
import sys
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from deploy.edge.registry import CHALLENGER_ALIAS, CHAMPION_ALIAS, MlflowRegistry, RegistryError
from spt_core import __version__

CHALLENGER = CHALLENGER_ALIAS
ALIASES = (CHAMPION_ALIAS, CHALLENGER_ALIAS)
AUDIT_TAG_MAX = 4900  # MLflow caps a tag value at 5000 characters


def register_model(mlflow: Any, client: Any, model: dict) -> str:
    """Log the merged model as a pyfunc model, register it, alias the version (``model["alias"]``; absent or None:
    no alias, the usual case: `pipelines.publish` moves aliases after its gate); returns the version."""
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
            pip_requirements=requirements(),  # explicit: MLflow's inference would load the model in a subprocess
            metadata={"sensitune": model["info"]},
            registered_model_name=model["name"],
        )
    version = str(info.registered_model_version)
    if (alias := model.get("alias")) is not None:
        client.set_registered_model_alias(model["name"], alias, version)
    for k, v in model["version_tags"].items():
        if v is not None:
            client.set_model_version_tag(model["name"], version, k, v)
    return version


def requirements() -> list[str]:
    reqs = [f"sensitune=={__version__}"]
    for pkg in ("torch", "timm", "safetensors", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")
    return reqs


def who_am_i(tool: str) -> str:
    """``<tool> (<login>)``: who moved an alias, for the audit record."""
    try:
        return f"{tool} ({getpass.getuser()})"
    except (KeyError, OSError):  # no login name in a bare container
        return tool


def move_alias(uri: str, model_name: str, alias: str, version: str, *, who: str, why: str) -> dict[str, Any]:
    """Point `alias` at `version` and write the audit record (module docstring); returns the record.

    Raises:
        RegistryError: The version is not registered, or the registry refused (one line with the fix).
    """
    if alias not in ALIASES:
        raise RegistryError(f"alias {alias!r}: use {' or '.join(ALIASES)}")
    reg = MlflowRegistry(uri, model_name)
    move = reg.set_alias(alias, str(version))
    rec = {"ts": move.ts, "model_name": model_name, "alias": alias, "from_version": move.from_version,
           "to_version": move.to_version, "who": who, "evidence": why, "box": None}  # fmt: skip
    text = json.dumps(rec)[:AUDIT_TAG_MAX]
    stamp = "".join(ch for ch in move.ts[:23] if ch.isdigit())  # tag keys allow [\w.\- /] only
    reg.client.set_registered_model_tag(model_name, f"audit.{stamp}.{alias}", text)
    reg.client.set_model_version_tag(model_name, str(version), f"audit.{alias}", text)
    return rec


def set_alias(uri: str, model_name: str, alias: str, version: str, why: str) -> list[dict[str, Any]]:
    """`sensitune registry set`: a person points `alias` at an existing version; returns the audit records.

    A new champion takes `challenger` off itself (as the edge's promotion does); the champion cannot also be the
    challenger.
    """
    if not why.strip():
        raise RegistryError("--why is empty: say what the move rests on (a report, a sign-off)")
    reg, who = MlflowRegistry(uri, model_name), who_am_i("sensitune registry set")
    if alias == CHALLENGER_ALIAS and reg.get_alias(CHAMPION_ALIAS) == str(version):
        raise RegistryError(f"v{version} is {model_name}@champion already: point challenger at another version")
    records = [move_alias(uri, model_name, alias, version, who=who, why=why)]
    if alias == CHAMPION_ALIAS and reg.get_alias(CHALLENGER_ALIAS) == str(version):
        before = reg.clear_challenger()
        records.append({**before.to_dict(), "who": who, "evidence": why, "box": None})
    return records


def serve_command(folder: Path, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """The `mlflow server` a box can pull from: sqlite registry and proxied artifacts, both under `folder`.

    ``--serve-artifacts`` with ``--artifacts-destination``: runs get ``mlflow-artifacts:`` locations, which the
    box downloads through the server (`deploy.edge.mlflow_rest`); a ``file://`` location (the default of a
    ``sqlite:///mlflow.db`` store) exists only on the machine that wrote it.
    """
    folder = Path(folder).resolve()
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))  # the venv's, when not on PATH
    return [mlflow, "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts",
            "--host", host, "--port", str(port)]  # fmt: skip


def serve(folder: Path, host: str = "127.0.0.1", port: int = 5000, dry_run: bool = False) -> int:
    """`sensitune registry serve`: print the URI to use, then run the server in the foreground (Ctrl-C stops it)."""
    cmd = serve_command(folder, host, port)
    uri = f"http://{host}:{port}"
    print(f"registry: {uri}  (export MLFLOW_TRACKING_URI={uri}; box.yaml registry.url: {uri})")
    print(" ".join(cmd))
    if dry_run:
        return 0
    Path(folder).mkdir(parents=True, exist_ok=True)
    try:
        return subprocess.call(cmd)
    except FileNotFoundError:
        raise RegistryError("`mlflow` is not on PATH: pip install mlflow (or activate the project's venv)") from None
    except KeyboardInterrupt:
        return 0
