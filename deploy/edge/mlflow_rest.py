"""MLflow's REST API and artifact proxy over plain HTTP: what an edge box needs, without the mlflow package.

    reg = RestRegistry("http://mlflow:5000", "sensitune-tf_efficientnet_lite0")
    reg.alias("champion")                      -> {"version", "run_id", "tags"} or None
    reg.download(run_id, "export/openvino/fp32/model.bin", dest)
    reg.set_alias("champion", "4"); reg.delete_alias("challenger"); reg.set_version_tag("4", key, value)
    reg.model_version("4"); reg.model_tags(); reg.create_model(name, tags)   (the fleet decider's claims)
    reg.put_file("incoming/line-1/scratch/<sha>.png", data); reg.list_files("incoming/line-1")

Every call is outbound from the box and bounded as a whole: ``timeout_s`` for the connection and each read, and a
deadline for the whole request (``timeout_s`` for a JSON reply, ``download_deadline_s`` for a file), so a server
that drips bytes cannot hold a sync round; replies are capped in size (``max_bytes``). Every reply is validated: a
reply that is not the JSON expected, or a version or run id that is not a safe id (never a path), is a `BadReply`,
counted in ``bad_replies``. A failure is a `RegistryError` with one line.
Artifacts are read through the server's artifact proxy (``mlflow server --artifacts-destination ...``, the
default ``--serve-artifacts``): ``/api/2.0/mlflow-artifacts/artifacts/<path>``.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from deploy.edge.registry import CHALLENGER_ALIAS, CHAMPION_ALIAS, RegistryError
from deploy.edge.rollout.logs import now_iso as _now
from spt_core.portable.errors import one_line
from spt_core.portable.io import atomic_path

API, PROXY = "/api/2.0/mlflow", "/api/2.0/mlflow-artifacts/artifacts"
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # a registry version or run id: never a path (no . or /)
JSON_MAX_BYTES = 8 << 20
DETAIL_MAX_BYTES = 16 << 10  # an error reply's body, quoted whole: MLflow's are a few hundred bytes


class RestRegistry:
    """One registered model on one MLflow server, over HTTP.

    Args:
        url: The tracking server, e.g. ``http://mlflow:5000``.
        model_name: The registered model's name.
        timeout_s: Connection and per-read timeout; also the whole-request deadline of a JSON call.
        download_deadline_s: Whole-request deadline of one file download.
        max_bytes: Largest file accepted (a JSON reply: 8 MiB).
    """

    def __init__(self, url: str, model_name: str, timeout_s: float = 10.0, download_deadline_s: float = 600.0,
                 max_bytes: int = 2 << 30) -> None:  # fmt: skip
        if not url.startswith(("http://", "https://")):
            raise RegistryError(f"registry.url={url!r}: give the MLflow server's http(s):// address")
        self.url, self.model_name, self.timeout_s = url.rstrip("/"), model_name, timeout_s
        self.download_deadline_s, self.max_bytes = download_deadline_s, max_bytes
        self.bad_replies = 0  # replies that were not what the API promises (counted for /metrics)

    # ------------------------------------------------------------------------------------------------ HTTP
    def _bad(self, what: str) -> BadReply:
        self.bad_replies += 1
        return BadReply(f"MLflow at {self.url}: {what}; check registry.url points at an MLflow server")

    def _read(self, r: Any, what: str, deadline: float, max_bytes: int) -> bytes:
        """The body, read in pieces as they come, within `deadline` (monotonic) and `max_bytes`."""
        size = r.headers.get("Content-Length")
        if size is not None and size.isdigit() and int(size) > max_bytes:
            raise self._bad(f"{what} is {int(size)} bytes, over the {max_bytes}-byte cap")
        chunks, total = [], 0
        while block := r.read1(1 << 16):
            total += len(block)
            if total > max_bytes:
                raise self._bad(f"{what} is over the {max_bytes}-byte cap")
            if time.monotonic() > deadline:
                raise RegistryError(f"MLflow at {self.url}: {what} took longer than its deadline; check the network")
            chunks.append(block)
        return b"".join(chunks)

    def _call(self, method: str, path: str, *, query: dict | None = None, body: Any = None, raw: bool = False,
              deadline_s: float | None = None, max_bytes: int = JSON_MAX_BYTES) -> Any:  # fmt: skip
        deadline = time.monotonic() + (deadline_s or self.timeout_s)
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data, headers = None, {}
        if isinstance(body, bytes):
            data, headers["Content-Type"] = body, "application/octet-stream"
        elif body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                payload = self._read(r, f"{method} {path}", deadline, max_bytes)
        except urllib.error.HTTPError as e:
            detail = " ".join(e.read(DETAIL_MAX_BYTES).decode("utf-8", "replace").split())  # whole, on one line
            if "RESOURCE_ALREADY_EXISTS" in detail:
                raise AlreadyExists(f"{method} {path}: {detail}") from None
            if e.code == 404 or "RESOURCE_DOES_NOT_EXIST" in detail or "not found" in detail.lower():
                raise NotFound(f"{method} {path}: {detail}") from None
            raise RegistryError(f"MLflow at {self.url}: {method} {path} -> HTTP {e.code} {detail}") from None
        except (OSError, ValueError) as e:  # URLError, timeouts, refused connections
            raise RegistryError(f"MLflow at {self.url} unreachable ({type(e).__name__}: {one_line(e, None)})") from None
        if raw:
            return payload
        try:
            out = json.loads(payload or b"{}")
        except ValueError:
            raise self._bad(f"{method} {path} answered {payload[:60]!r}, not JSON") from None
        if not isinstance(out, dict):
            raise self._bad(f"{method} {path} answered {type(out).__name__}, not a JSON object")
        return out

    # -------------------------------------------------------------------------------------------- registry
    def alias(self, alias: str) -> dict[str, Any] | None:
        """The version behind ``alias`` (``version``, ``run_id``, ``tags``), or None when unset."""
        try:
            mv = self._call("GET", f"{API}/registered-models/alias", query={"name": self.model_name, "alias": alias})
        except NotFound:
            return None
        return self._version(mv, f"{self.model_name}@{alias}")

    def model_version(self, version: str) -> dict[str, Any] | None:
        """Registered version ``version`` as `alias` gives it (``version``, ``run_id``, ``tags``), or None."""
        try:
            mv = self._call("GET", f"{API}/model-versions/get", query={"name": self.model_name, "version": version})
        except NotFound:
            return None
        return self._version(mv, f"{self.model_name} v{version}")

    def _version(self, reply: dict[str, Any], what: str) -> dict[str, Any]:
        try:
            mv = reply["model_version"]
            version, run_id = str(mv["version"]), mv.get("run_id")
            tags = {str(t["key"]): t.get("value") for t in mv.get("tags") or []}
        except (KeyError, TypeError, AttributeError) as e:
            raise self._bad(f"{what}: malformed model_version ({type(e).__name__}: {e})") from None
        for key, value in (("version", version), ("run_id", run_id)):
            if not isinstance(value, str) or not SAFE_ID.fullmatch(value):
                raise self._bad(f"{what}: {key}={str(value)[:40]!r} is not a safe id")
        return {"version": version, "run_id": run_id, "source": mv.get("source"), "tags": tags}

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

    def model_tags(self, name: str | None = None) -> dict[str, str]:
        """The tags of registered model `name` (default: this one); NotFound when it does not exist."""
        rm = self._call("GET", f"{API}/registered-models/get", query={"name": name or self.model_name})
        try:
            return {str(t["key"]): t.get("value") for t in rm["registered_model"].get("tags") or []}
        except (KeyError, TypeError, AttributeError) as e:
            raise self._bad(f"registered model {name or self.model_name}: malformed ({type(e).__name__})") from None

    def create_model(self, name: str, tags: dict[str, str], description: str = "") -> bool:
        """Create registered model `name` with `tags` in one request; False when the name exists already. The
        registry's database holds names unique, so of any number of concurrent creators exactly one gets True."""
        body = {"name": name, "tags": [{"key": k, "value": v} for k, v in tags.items()], "description": description}
        try:
            self._call("POST", f"{API}/registered-models/create", body=body)
        except AlreadyExists:
            return False
        return True

    # ------------------------------------------------------------------------------------------- artifacts
    def _run_root(self, run_id: str) -> str:
        """The run's artifact folder as a proxy path (``<experiment>/<run>/artifacts``)."""
        try:
            uri = self._call("GET", f"{API}/runs/get", query={"run_id": run_id})["run"]["info"]["artifact_uri"]
        except (KeyError, TypeError) as e:
            raise self._bad(f"run {run_id}: malformed reply ({type(e).__name__}: {e})") from None
        if not isinstance(uri, str) or not uri.startswith("mlflow-artifacts:"):
            raise RegistryError(
                f"run {run_id}'s artifacts are at {uri}, which a box cannot download (the run's experiment keeps "
                "that location even after the server restarts with proxied artifacts): start a registry with "
                "`sensitune registry serve --dir DIR` (a new store) and `sensitune publish --tracking-uri <its URI>` "
                "the model into it, or publish into a new experiment (--set publish.experiment=NAME)"
            )
        path = urllib.parse.urlparse(uri).path
        if ".." in path.split("/"):
            raise self._bad(f"run {run_id}: artifact_uri {uri!r} climbs out of the artifact store")
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
        """One file through the artifact proxy, within ``download_deadline_s`` and ``max_bytes``."""
        return self._call("GET", f"{PROXY}/{urllib.parse.quote(path)}", raw=True,
                          deadline_s=self.download_deadline_s, max_bytes=self.max_bytes)  # fmt: skip

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


class AlreadyExists(RegistryError):
    """The server answered RESOURCE_ALREADY_EXISTS (a create whose name is taken)."""


class BadReply(RegistryError):
    """The server answered, but not what the API promises (not JSON, a malformed field, a path for a version)."""


def audit(reg: RestRegistry, alias: str, before: str | None, after: str | None, who: str, evidence: Any,
          box: str | None) -> dict[str, Any]:  # fmt: skip
    """Write one alias move's audit record to the registry (model tag ``audit.<time>``); returns it."""
    rec = {"ts": _now(), "model_name": reg.model_name, "alias": alias, "from_version": before, "to_version": after,
           "who": who, "evidence": evidence, "box": box}  # fmt: skip
    stamp = "".join(ch for ch in rec["ts"][:23] if ch.isdigit())  # tag keys allow [\w.\- /] only
    reg.set_model_tag(f"audit.{stamp}.{alias}", json.dumps(rec)[:4900])
    if after is not None:
        reg.set_version_tag(after, f"audit.{alias}", json.dumps(rec)[:4900])
    return rec


def move(
    reg: RestRegistry, version: str, *, who: str, evidence: Any, box: str | None = None, log_to: Any = None
) -> list:
    """Promote `version` in the registry: `champion` -> it, `challenger` cleared if it pointed there; audited."""
    before = (reg.alias(CHAMPION_ALIAS) or {}).get("version")
    records = []
    if before != str(version):
        reg.set_alias(CHAMPION_ALIAS, str(version))
        records.append(audit(reg, CHAMPION_ALIAS, before, str(version), who, evidence, box))
    if (reg.alias(CHALLENGER_ALIAS) or {}).get("version") == str(version):
        reg.delete_alias(CHALLENGER_ALIAS)
        records.append(audit(reg, CHALLENGER_ALIAS, str(version), None, who, evidence, box))
    for r in records:
        if log_to is not None:
            log_to(r)
    return records
