"""A fake MLflow REST server (stdlib, in a thread) with the few endpoints an edge box calls: aliases, runs/get, the
artifact proxy (download, upload, list), alias and tag writes (recorded, not applied). tests/test_sync_hostile.py
bends its replies with hooks; tests/test_journey_short.py runs a line's flywheel against it in seconds (a real
`mlflow server` takes tens of seconds to start).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

Hook = Callable[[BaseHTTPRequestHandler], bool]  # True: the hook answered the request


class FakeRegistry:
    """The few MLflow endpoints a box calls: aliases, runs/get, the artifact proxy, alias and tag writes."""

    def __init__(self) -> None:
        self.aliases: dict[str, dict[str, Any]] = {}
        self.files: dict[str, bytes] = {}  # proxy path -> bytes
        self.hooks: list[Hook] = []
        self.writes: list[tuple[str, str, dict]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def reply(self, code: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                if any(hook(self) for hook in fake.hooks):
                    return
                url = urlparse(self.path)
                q = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path.endswith("/registered-models/alias"):
                    mv = fake.aliases.get(q["alias"])
                    if mv is None:
                        return self.reply(404, b'{"error_code": "RESOURCE_DOES_NOT_EXIST"}')
                    return self.reply(200, json.dumps({"model_version": mv}).encode())
                if url.path.endswith("/runs/get"):
                    uri = f"mlflow-artifacts:/0/{q['run_id']}/artifacts"
                    return self.reply(200, json.dumps({"run": {"info": {"artifact_uri": uri}}}).encode())
                if url.path.endswith("/mlflow-artifacts/artifacts"):  # a listing: the names directly under a path
                    return self.reply(200, json.dumps({"files": fake.listing(q.get("path", ""))}).encode())
                path = unquote(url.path.split("/mlflow-artifacts/artifacts/", 1)[-1])
                if path in fake.files:
                    return self.reply(200, fake.files[path], "application/octet-stream")
                self.reply(404, b'{"error_code": "RESOURCE_DOES_NOT_EXIST"}')

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                fake.writes.append((self.command, urlparse(self.path).path, body))
                self.reply(200, b"{}")

            do_DELETE = do_POST  # noqa: N815

            def do_PUT(self) -> None:  # noqa: N802 - an upload through the artifact proxy (a box's labelled frames)
                path = unquote(urlparse(self.path).path.split("/mlflow-artifacts/artifacts/", 1)[-1])
                fake.files[path] = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.reply(200, b"{}")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def publish(self, art: Path, version: str, alias: str | None, tags: dict[str, str] | None = None) -> str:
        """`art`'s files as run ``r<version>``'s ``export/openvino/fp32/``; `alias` (if any) -> that version."""
        run = f"r{version}"
        for f in art.iterdir():
            self.files[f"0/{run}/artifacts/export/openvino/fp32/{f.name}"] = f.read_bytes()
        if alias:
            self.point(alias, version, run, tags)
        return run

    def point(self, alias: str, version: str, run: str | None = None, tags: dict[str, str] | None = None) -> None:
        tag_list = [{"key": k, "value": v} for k, v in (tags or {}).items()]
        self.aliases[alias] = {"version": version, "run_id": run or f"r{version}", "tags": tag_list}

    def listing(self, path: str) -> list[dict[str, Any]]:
        """The proxy's listing of `path`: each name directly under it, as a path relative to it (as MLflow answers)."""
        prefix = path.rstrip("/") + "/"
        names = {
            p[len(prefix) :].split("/")[0]: p.count("/") > prefix.count("/") for p in self.files if p.startswith(prefix)
        }
        return [{"path": name, "is_dir": is_dir} for name, is_dir in sorted(names.items())]
