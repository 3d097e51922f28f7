"""Servers on 127.0.0.1 for the tests: a free port, the edge app under uvicorn in a thread, a real `mlflow server`.

The pytest fixtures built on these (one MLflow server per test module, one Prefect test server) are in
tests/conftest.py; a test that must stop a server itself (tests/test_flywheel.py) uses `mlflow_server` directly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from benchmarks.edge_box import free_port, serve  # the edge on loopback: shared with the demo line

__all__ = ["BIN", "free_port", "mlflow_server", "serve", "stop_server"]

BIN = Path(sys.executable).parent


def stop_server(proc: subprocess.Popen) -> None:
    """Stop a server started by `mlflow_server` (its process group); a no-op when it has exited."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextmanager
def mlflow_server(tmp: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real MLflow tracking server (sqlite backend, proxied artifacts in tmp/artifacts): (URI, process)."""
    port = free_port()
    log = open(tmp / "server.log", "w")
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}"]
    cmd += ["--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd + ["--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # the first start creates the database (migrations): up to a minute on a busy box
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited {proc.returncode}: {(tmp / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"mlflow server not healthy: {(tmp / 'server.log').read_text()[-2000:]}")
        yield uri, proc
    finally:
        stop_server(proc)
        log.close()
