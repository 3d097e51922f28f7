"""Fixtures that several test files share; pytest finds them here, so no test file imports another.

Cheap ones are session-scoped and read-only. The servers and the tiny trained run are module-scoped, as they were
in the file that first needed them: each module that asks gets its own (its registry names and runs stay its own),
and a module that does not ask pays nothing. Plain helpers that tests call are in tests/support/.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from support.params import RAW_MD5, TINY_RUN
from support.servers import mlflow_server

if TYPE_CHECKING:
    from support.edge import EdgeWorld


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared digits dataset (10 classes of 8x8 RGB): 40 train, 20 val, 20 test, seed 0. Treat as read-only."""
    from spt_core.data import prepare

    out = tmp_path_factory.mktemp("data") / "digits"
    prepare("digits", out, n_train=40, n_val=20, n_test=20, seed=0, split=None, ok_class=None)
    return out


@pytest.fixture(scope="session")
def edge_world(tmp_path_factory: pytest.TempPathFactory) -> EdgeWorld:
    """The guarded line of the edge security tests (support/edge.py), built once; tests copy what they damage."""
    from support.edge import build_edge_world

    return build_edge_world(tmp_path_factory.mktemp("sec"))


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server with a sqlite backend, one per test module; killed (its process group) after."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as (uri, _):
        yield uri


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, Path]:
    """(params, run dir, params.yaml) of a finished tiny run (`TINY_RUN`): prepare .. merge, plus a small export dir
    whose raw.dvc declares `RAW_MD5`."""
    from pipelines import stages
    from pipelines.config import load_params
    from pipelines.layout import FILES

    tmp = tmp_path_factory.mktemp("mlrun")
    doc: dict[str, Any] = {"paths": {"raw": str(tmp / "raw"), "data": str(tmp / "prepared"), "run": str(tmp / "run")}}
    doc.update(TINY_RUN)
    config = tmp / "params.yaml"
    config.write_text(yaml.safe_dump(doc))
    params = load_params(config)
    stages.demo_stage(params)
    (tmp / "raw.dvc").write_text(yaml.safe_dump({"outs": [{"md5": RAW_MD5, "nfiles": 24, "path": "raw"}]}))
    for stage in stages.stages_until("merge"):
        stage.run(params)
    # The export stage's layout in miniature (the real export is tested in test_export.py): logged as is.
    export = tmp / "run" / FILES["export"]
    (export / "openvino" / "fp32").mkdir(parents=True)
    (export / "openvino" / "fp32" / "manifest.json").write_text('{"format": "openvino", "precision": "fp32"}\n')
    (export / "export_report.json").write_text(json.dumps({"accuracy": {"pytorch": 50.0, "fp32": 50.0}}))
    return params, tmp / "run", config


@pytest.fixture(scope="module")
def prefect_server() -> Iterator[None]:
    """One temporary Prefect server (SQLite) per module that asks for it: `pytestmark = usefixtures(...)`."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=600):  # a loaded shared CPU starts it slowly
        yield
