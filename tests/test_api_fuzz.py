"""Schemathesis over the whole edge API (its own /openapi.json): no 5xx, every answer matches the declared status
codes, content types, headers and response schemas, invalid input is refused. Bounded examples (~30 s).

Runs in process through ASGI with an admin token, so every route is reached past the guard; the artifacts are the
tiny models of tests/support/artifacts.py. A promotion or rollback may happen mid-run: that is part of the API too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from support.artifacts import CLASSES, N_FEATURES, build_artifact, write_manifest

from deploy.edge.auth import TokenStore, token_digest
from deploy.edge.service import create_app

ADMIN = {"Authorization": "Bearer fuzz-admin"}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> schemathesis.BaseSchema:
    root = tmp_path_factory.mktemp("fuzz")
    w = np.random.default_rng(0).normal(size=(len(CLASSES), N_FEATURES))
    build_artifact(root / "v1", "1", w, np.zeros(len(CLASSES)), 32)
    shutil.copytree(root / "v1", root / "v2")  # the same model as version 2 (model_version is not hashed)
    manifest = json.loads((root / "v2" / "manifest.json").read_text())
    (root / "v2" / "manifest.json").write_text(json.dumps(manifest | {"model_version": "2"}))
    cfg = write_manifest(
        root / "rollout.yaml",
        line="fuzz",
        champion={"version": "1", "path": "v1"},
        challenger={"version": "2", "path": "v2"},
        challenger_share=0.5,
        shadow=True,
        log_dir="logs",
    )
    tokens = TokenStore([("fuzzer", "admin", token_digest("fuzz-admin"))], "fuzz")
    app = create_app(cfg, tokens, hosts=["testserver"])  # the host name schemathesis calls an ASGI app by
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_api_fuzz_no_5xx_and_no_schema_violations(api: schemathesis.BaseSchema) -> None:
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 9
    for operation in operations:  # every route, each with its own bounded, reproducible Hypothesis run

        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def fuzz(case: schemathesis.Case) -> None:
            case.call_and_validate(headers=ADMIN, checks=CHECKS)

        fuzz()
    counts = api.app.state.service.metrics.counts
    assert counts["requests"] > 0 and counts["refused_limits"] > 0  # the fuzzer reached /predict past the guard


def test_the_schema_declares_auth_and_every_route(api: schemathesis.BaseSchema) -> None:
    paths = set(api.raw_schema["paths"])
    assert {"/predict", "/feedback", "/report", "/decide", "/promote", "/rollback", "/reload", "/healthz"} <= paths
    assert "HTTPBearer" in api.raw_schema["components"]["securitySchemes"]
    predict = api.raw_schema["paths"]["/predict"]["post"]["responses"]
    assert {"200", "401", "403", "413", "415", "422"} <= set(predict)
    assert Path(__file__).exists()
