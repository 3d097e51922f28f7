"""A tiny guarded line for the edge security tests (tests/test_edge_security.py, tests/test_edge_limits.py): two
artifacts, demo frames, a token per role, and the calls those tests make.

v1 is the always-"ok" model at 32 px and v2 a least-squares fit to the demo frames at 40 px (support/artifacts.py),
so every answer is known. The `edge_world` fixture (tests/conftest.py) builds one per session; tests only read it,
and `rollout` copies the artifacts into each test's own directory because some tests damage them.
"""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import httpx
from PIL import Image

from deploy.edge.auth import TokenStore, token_digest
from spt_core.portable.preprocess import Preprocess

from .artifacts import ALWAYS_OK, build_artifact, demo_set, fit_linear, write_manifest

HTTP = httpx.Client(timeout=60)
TOKENS = {"cams": ("camera", "cam-secret"), "panel": ("operator", "op-secret"), "alice": ("admin", "admin-secret")}
STORE = TokenStore([(n, role, token_digest(t)) for n, (role, t) in TOKENS.items()], "test")
AS = {n: {"Authorization": f"Bearer {t}"} for n, (_, t) in TOKENS.items()}
RULE = {"min_samples": 5, "min_gain": 0.0, "max_latency_increase": 100.0, "max_error_rate": 0.05}


@dataclass
class EdgeWorld:
    root: Path
    images: list[bytes]  # PNG bytes as a camera sends them
    labels: list[int]
    art: dict[str, Path]  # version -> artifact dir


def build_edge_world(root: Path) -> EdgeWorld:
    """16 demo frames of 48 px and the artifacts v1 (always ok, 32 px) and v2 (fitted, 40 px) under `root`."""
    items, pil, labels = demo_set(root / "images", n_per_class=4, size=48)
    w, b = fit_linear(pil, labels, Preprocess(size=(40, 40)))
    art = {"1": build_artifact(root / "v1", "1", *ALWAYS_OK, 32), "2": build_artifact(root / "v2", "2", w, b, 40)}
    return EdgeWorld(root, [p.read_bytes() for p, _ in items], labels, art)


def rollout(tmp: Path, world: EdgeWorld, champion: str, challenger: str | None, **kw: object) -> Path:
    """A rollout manifest in `tmp` with copies of the artifacts (tests may damage them)."""
    ref = {}
    for v in filter(None, (champion, challenger)):
        dst = tmp / f"art{v}"
        if not dst.exists():
            shutil.copytree(world.art[v], dst)
        ref[v] = {"version": v, "path": dst.name}
    fields = {"line": "line-7", "champion": ref[champion], "challenger": ref.get(challenger), "challenger_share": 0.5}
    fields |= {"decision": RULE, "log_dir": "logs"}
    return write_manifest(tmp / "rollout.yaml", **(fields | kw))


def png(img: Image.Image, fmt: str = "PNG") -> bytes:
    """The image encoded in memory, as a camera would upload it."""
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def post_frame(base: str, data: bytes, cam: str, fid: str | None = None, who: str = "cams") -> httpx.Response:
    """POST /predict with `who`'s token (a camera by default)."""
    form = {"camera_id": cam} | ({"frame_id": fid} if fid else {})
    return HTTP.post(f"{base}/predict", files={"file": ("f.png", data, "image/png")}, data=form, headers=AS[who])
