"""Edge boxes as the slow loop tests run them: `python -m deploy.edge.service --box` processes on loopback that follow
a real `mlflow server`, and waiting for what they report (tests/test_flywheel.py, tests/test_journey.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from deploy.edge.auth import token_digest

from .servers import free_port

ROOT = Path(__file__).resolve().parents[2]
# one token per role (deploy/README.md): the cameras predict, the operators label, an admin promotes
TOKENS = {"line7-cams": ("camera", "cam-token"), "panel": ("operator", "op-token"), "alice": ("admin", "admin-token")}
AS = {role: {"Authorization": f"Bearer {token}"} for role, token in TOKENS.values()}


def write_tokens(path: Path) -> Path:
    """tokens.yaml with the sha256 of each of `TOKENS` (never the token), as `python -m deploy.edge.auth new` writes."""
    rows = [{"name": n, "role": role, "sha256": token_digest(t)} for n, (role, t) in TOKENS.items()]
    path.write_text(yaml.safe_dump({"tokens": rows}))
    return path


def start_box(
    root: Path, name: str, url: str, model_name: str, *, frames: bool = False, tokens: bool = False,
    line: str = "line-1",
) -> tuple[subprocess.Popen, str]:  # fmt: skip
    """A box in `root` (box.yaml, no manifest yet, an empty store) syncing from `url` every second: (process, URL).

    ``frames``: keep every served frame, so that each labelled one is uploaded. ``tokens``: `TOKENS` guard it.
    """
    root.mkdir(parents=True)
    reg = {"url": url, "model_name": model_name, "timeout_s": 3}
    box = {"box": name, "line": line, "store": "store", "registry": reg,
           "sync": {"interval_s": 1, "stale_after_s": 5, "challenger_share": 0.5}}  # fmt: skip
    if frames:
        box["frames"] = {"dir": "frames", "random_rate": 1.0, "quota_mb": 50}
    (root / "box.yaml").write_text(yaml.safe_dump(box))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "deploy.edge.service", "--config", str(root / "rollout.yaml"), "--box",
           str(root / "box.yaml"), "--port", str(port), "--log-level", "warning"]  # fmt: skip
    if tokens:
        cmd += ["--tokens", str(write_tokens(root / "tokens.yaml"))]
    proc = subprocess.Popen(cmd, stdout=open(root / "service.log", "w"), stderr=subprocess.STDOUT, env=env)
    return proc, f"http://127.0.0.1:{port}"


def stop_boxes(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
        proc.wait(30)


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 240.0) -> Any:
    """`fn()`'s first answer that is not None or False, polled every 0.5 s; an AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if (got := fn()) is not None and got is not False:
                return got
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def ready(url: str, champion: str, challenger: str | None) -> dict | None:
    """The box's /readyz when it serves exactly this champion and challenger, else None."""
    s = httpx.get(f"{url}/readyz", timeout=5).json()
    return s if (s.get("champion"), s.get("challenger")) == (champion, challenger) else None


def stale(url: str) -> dict | None:
    """The box's /healthz when its sync reports staleness with an error, else None."""
    h = httpx.get(f"{url}/healthz", timeout=5).json()
    return h if h["sync"]["stale"] and h["sync"]["error"] else None


def uploaded(uri: str, model_name: str, line: str, classes: list[str]) -> list[str]:
    """The labelled frames (not their provenance files) boxes have uploaded to ``incoming/<line>/<class>/``."""
    from deploy.edge.mlflow_rest import RestRegistry

    reg = RestRegistry(uri, model_name)
    files = [f["path"] for c in classes for f in reg.list_files(f"incoming/{line}/{c}")]
    return [f for f in files if not f.endswith(".json")]
