"""MLflow's REST API and artifact proxy over plain HTTP: what an edge box needs, without the mlflow package.

    reg = RestRegistry("http://mlflow:5000", "sensitune-tf_efficientnet_lite0")
    reg.alias("champion")                      -> {"version", "run_id", "tags"} or None
    reg.download(run_id, "export/openvino/fp32/model.bin", dest)
    reg.set_alias("champion", "4"); reg.delete_alias("challenger"); reg.set_version_tag("4", key, value)
    reg.put_file("incoming/line-1/scratch/<sha>.png", data); reg.list_files("incoming/line-1")

Every call is outbound from the box, bounded by ``timeout_s``; a failure is a `RegistryError` with one line.
Artifacts are read through the server's artifact proxy (``mlflow server --artifacts-destination ...``, the
default ``--serve-artifacts``): ``/api/2.0/mlflow-artifacts/artifacts/<path>``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from deploy.edge.registry import RegistryError
from spt_core.portable.io import atomic_path

API, PROXY = "/api/2.0/mlflow", "/api/2.0/mlflow-artifacts/artifacts"


class RestRegistry:
    """One registered model on one MLflow server, over HTTP.

    Args:
        url: The tracking server, e.g. ``http://mlflow:5000``.
        model_name: The registered model's name.
        timeout_s: Per-request timeout.
    """

    def __init__(self, url: str, model_name: str, timeout_s: float = 10.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise RegistryError(f"registry.url={url!r}: give the MLflow server's http(s):// address")
        self.url, self.model_name, self.timeout_s = url.rstrip("/"), model_name, timeout_s

    # ------------------------------------------------------------------------------------------------ HTTP
    def _call(self, method: str, path: str, *, query: dict | None = None, body: Any = None, raw: bool = False) -> Any:
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data, headers = None, {}
        if isinstance(body, bytes):
            data, headers["Content-Type"] = body, "application/octet-stream"
        elif body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                payload = r.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace")
            if e.code == 404 or "RESOURCE_DOES_NOT_EXIST" in detail or "not found" in detail.lower():
                raise NotFound(f"{method} {path}: {detail}") from None
            raise RegistryError(f"MLflow at {self.url}: {method} {path} -> HTTP {e.code} {detail}") from None
        except (OSError, ValueError) as e:  # URLError, timeouts, refused connections
            raise RegistryError(f"MLflow at {self.url} unreachable ({type(e).__name__}: {e})") from None
        if raw:
            return payload
        return json.loads(payload or b"{}")

    # -------------------------------------------------------------------------------------------- registry
    def alias(self, alias: str) -> dict[str, Any] | None:
        """The version behind ``alias`` (``version``, ``run_id``, ``tags``), or None when unset."""
        try:
            mv = self._call("GET", f"{API}/registered-models/alias", query={"name": self.model_name, "alias": alias})
        except NotFound:
            return None
        mv = mv["model_version"]
        tags = {t["key"]: t.get("value") for t in mv.get("tags") or []}
        return {"version": str(mv["version"]), "run_id": mv.get("run_id"), "source": mv.get("source"), "tags": tags}

    def set_alias(self, alias: str, version: str) -> None:
        body = {"name": self.model_name, "alias": alias, "version": str(version)}
        self._call("POST", f"{API}/registered-models/alias", body=body)

    def delete_alias(self, alias: str) -> None:
        try:
            self._call("DELETE", f"{API}/registered-models/alias", body={"name": self.model_name, "alias": alias})
        except NotFound:
            pass

    def set_version_tag(self, version: str, key: str, value: str) -> None:
        body = {"name": self.model_name, "version": str(version), "key": key, "value": value}
        self._call("POST", f"{API}/model-versions/set-tag", body=body)

    def set_model_tag(self, key: str, value: str) -> None:
        self._call(
            "POST", f"{API}/registered-models/set-tag", body={"name": self.model_name, "key": key, "value": value}
        )

    def model_tags(self) -> dict[str, str]:
        rm = self._call("GET", f"{API}/registered-models/get", query={"name": self.model_name})["registered_model"]
        return {t["key"]: t.get("value") for t in rm.get("tags") or []}

    # ------------------------------------------------------------------------------------------- artifacts
    def _run_root(self, run_id: str) -> str:
        """The run's artifact folder as a proxy path (``<experiment>/<run>/artifacts``)."""
        uri = self._call("GET", f"{API}/runs/get", query={"run_id": run_id})["run"]["info"]["artifact_uri"]
        if not uri.startswith("mlflow-artifacts:"):
            raise RegistryError(
                f"run {run_id}'s artifacts are at {uri}, not behind the server's artifact proxy: start "
                "`mlflow server` with --artifacts-destination (and without --no-serve-artifacts)"
            )
        path = urllib.parse.urlparse(uri).path
        return path.lstrip("/")

    def read_run_file(self, run_id: str, path: str) -> bytes:
        return self.get_file(f"{self._run_root(run_id)}/{path}")

    def download(self, run_id: str, path: str, dest: Path) -> Path:
        """One run artifact file -> ``dest`` (written atomically)."""
        data = self.read_run_file(run_id, path)
        with atomic_path(dest) as tmp:
            tmp.write_bytes(data)
        return dest

    def get_file(self, path: str) -> bytes:
        return self._call("GET", f"{PROXY}/{urllib.parse.quote(path)}", raw=True)

    def put_file(self, path: str, data: bytes) -> None:
        """Upload bytes to ``path`` under the server's artifact destination."""
        self._call("PUT", f"{PROXY}/{urllib.parse.quote(path)}", body=data)

    def list_files(self, path: str) -> list[dict[str, Any]]:
        """``[{"path", "is_dir", "file_size"}]`` directly under ``path`` ([] when it does not exist)."""
        try:
            return self._call("GET", PROXY, query={"path": path}).get("files") or []
        except NotFound:
            return []

    def health(self) -> bool:
        return self._call("GET", "/health", raw=True).strip() == b"OK"


class NotFound(RegistryError):
    """The server answered 404 / RESOURCE_DOES_NOT_EXIST."""
