"""A stateful fake MLflow REST server for the fleet tests (stdlib, in a thread): the registry endpoints a box and the
fleet decider call, applied to an in-memory registry, so a small fleet runs in seconds (a real `mlflow server`
takes tens of seconds to start on a loaded 2-core box; tests/test_fleet.py's slow test races deciders on one).

Names are created atomically (a lock stands for the database's unique constraint), as MLflow's
``registered-models/create`` answers RESOURCE_ALREADY_EXISTS for a taken name. ``create_barrier`` holds the first
creates until that many have arrived (two deciders racing for one claim); ``fail_once`` answers one matching
request with HTTP 500 (a decider that dies between its claim and applying it).
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

API, PROXY = "/api/2.0/mlflow/", "/api/2.0/mlflow-artifacts/artifacts"


def _tags(d: dict[str, str]) -> list[dict[str, str]]:
    return [{"key": k, "value": v} for k, v in d.items()]


class FleetRegistry:
    """One MLflow server's registry in memory: models (tags, aliases, versions with tags), runs' artifact files."""

    def __init__(self) -> None:
        self.models: dict[str, dict[str, Any]] = {}
        self.files: dict[str, bytes] = {}
        self.lock = threading.Lock()
        self.calls: Counter[str] = Counter()  # "GET registered-models/alias", ... per request
        self.create_barrier: threading.Barrier | None = None
        self.fail_once: tuple[str, str] | None = None  # (endpoint, text in the body): answered 500 once
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def reply(self, code: int, body: Any, raw: bool = False) -> None:
                data = body if raw else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/octet-stream" if raw else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def handle_any(self) -> None:
                url = urlparse(self.path)
                size = int(self.headers.get("Content-Length", 0))
                data = self.rfile.read(size) if size else b""
                if url.path.startswith(PROXY):
                    return self.artifact(url, data)
                endpoint = url.path.removeprefix(API)
                fake.calls[f"{self.command} {endpoint}"] += 1
                body = {k: v[0] for k, v in parse_qs(url.query).items()} | (json.loads(data) if data else {})
                if fake.fail_once and fake.fail_once[0] == endpoint and fake.fail_once[1] in json.dumps(body):
                    fake.fail_once = None
                    return self.reply(500, {"error_code": "INTERNAL_ERROR", "message": "injected"})
                code, out = fake.answer(self.command, endpoint, body)
                self.reply(code, out)

            def artifact(self, url: Any, data: bytes) -> None:
                path = unquote(url.path.removeprefix(PROXY).lstrip("/"))
                if self.command == "PUT":
                    fake.files[path] = data
                    return self.reply(200, {})
                if path in fake.files:
                    return self.reply(200, fake.files[path], raw=True)
                self.reply(404, {"error_code": "RESOURCE_DOES_NOT_EXIST"})

            do_GET = do_POST = do_DELETE = do_PUT = handle_any  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()  # quick shutdown

    # ------------------------------------------------------------------------------------------ the REST API
    def answer(self, method: str, endpoint: str, b: dict[str, Any]) -> tuple[int, Any]:
        missing = (404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"{endpoint} {b} not found"})
        if endpoint == "registered-models/create":
            if (barrier := self.create_barrier) is not None:
                barrier.wait(timeout=20)
                self.create_barrier = None
            with self.lock:
                if b["name"] in self.models:
                    return 400, {"error_code": "RESOURCE_ALREADY_EXISTS", "message": f"{b['name']} already exists"}
                self.models[b["name"]] = self._model({t["key"]: t["value"] for t in b.get("tags") or []})
            return 200, {"registered_model": {"name": b["name"]}}
        if endpoint == "runs/get":
            return 200, {"run": {"info": {"artifact_uri": f"mlflow-artifacts:/0/{b['run_id']}/artifacts"}}}
        with self.lock:
            m = self.models.get(b.get("name"))
            if m is None:
                return missing
            if endpoint == "registered-models/get":
                return 200, {"registered_model": {"name": b["name"], "tags": _tags(m["tags"])}}
            if endpoint == "registered-models/set-tag":
                m["tags"][b["key"]] = b["value"]
                return 200, {}
            if endpoint == "registered-models/alias" and method == "GET":
                v = m["aliases"].get(b["alias"])
                return missing if v is None else (200, {"model_version": self._mv(m, v)})
            if endpoint == "registered-models/alias" and method == "POST":
                m["aliases"][b["alias"]] = str(b["version"])
                return 200, {}
            if endpoint == "registered-models/alias" and method == "DELETE":
                m["aliases"].pop(b["alias"], None)
                return 200, {}
            if str(b.get("version")) not in m["versions"]:
                return missing
            if endpoint == "model-versions/get":
                return 200, {"model_version": self._mv(m, str(b["version"]))}
            if endpoint == "model-versions/set-tag":
                m["versions"][str(b["version"])]["tags"][b["key"]] = b["value"]
                return 200, {}
        return 400, {"error_code": "BAD_REQUEST", "message": f"{method} {endpoint} is not faked"}

    @staticmethod
    def _model(tags: dict[str, str] | None = None) -> dict[str, Any]:
        return {"tags": dict(tags or {}), "aliases": {}, "versions": {}}

    @staticmethod
    def _mv(m: dict[str, Any], v: str) -> dict[str, Any]:
        return {"version": v, "run_id": m["versions"][v]["run_id"], "tags": _tags(m["versions"][v]["tags"])}

    # ------------------------------------------------------------------------------------- test-side helpers
    def publish(self, name: str, art: Path, version: str, alias: str | None = None) -> None:
        """`art`'s files as run ``r<version>``'s sealed export, registered as `version` of `name`."""
        with self.lock:
            m = self.models.setdefault(name, self._model())
            m["versions"][version] = {"run_id": f"r{version}", "tags": {}}
            if alias:
                m["aliases"][alias] = version
        for f in art.iterdir():
            self.files[f"0/r{version}/artifacts/export/openvino/fp32/{f.name}"] = f.read_bytes()

    def alias(self, name: str, alias: str) -> str | None:
        return self.models[name]["aliases"].get(alias)

    def claims(self, name: str) -> dict[str, dict[str, str]]:
        """The fleet's claimed decisions of model `name`: claim name -> its tags."""
        return {k: m["tags"] for k, m in self.models.items() if k.startswith(f"{name}.fleet-")}
