"""A demo line for the operator pages: two fitted OpenVINO artifacts, a rollout manifest, the edge app with its
tokens, cameras sending demo frames, and a headless Debian chromium driven by Playwright.

`benchmarks/ui_pages.py` plays it for the screenshots and page timings; the UI tests (tests/support/ui.py) drive
the same line. Models come from `benchmarks/stat_model.py` (tiny statistic models, least squares on the demo
defects): real, imperfect verdicts on real images, built in seconds.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.stat_model import CLASSES, build_artifact, demo_set, fit_linear, reference_logits, write_manifest
from deploy.edge.auth import TokenStore, token_digest
from deploy.edge.inferencer import OpenVINOInferencer
from deploy.edge.service import create_app
from spt_core.portable.preprocess import Preprocess, preprocess_image

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
TOKENS = {"cam-token": ("line7-cams", "camera"), "op-token": ("olga", "operator"), "admin-token": ("ada", "admin")}


@dataclass
class Line:
    root: Path
    manifest: Path
    images: list[bytes]  # PNG bytes as the cameras send them
    labels: list[int]  # true class index per image


def build_line(
    root: Path, n_per_class: int = 8, size: int = 64, bit_depth: int | None = None, **manifest_fields: Any
) -> Line:
    """Artifacts v1 (fitted at 32 px, the champion) and v2 (fitted at 48 px, the challenger) and rollout.yaml.
    ``bit_depth`` 12: the cameras send Mono12 frames (16-bit grey PNGs) and the artifacts read them at 12 bits."""
    items, pil, labels = demo_set(root / "images", n_per_class=n_per_class, size=size, bit_depth=bit_depth)
    arts = {}
    for version, px in (("1", 32), ("2", 48)):
        pre = Preprocess(size=(px, px), bit_depth=bit_depth)
        w, b = fit_linear(pil, labels, pre)
        extra = {"preprocess": pre.to_dict()} if bit_depth else None
        d = build_artifact(root / "artifacts" / f"v{version}", version, w, b, px, extra)
        arts[version] = d
        # what export's verification would record: the served IR against the numpy reference, on these images
        inf = OpenVINOInferencer(d / "model.xml", {"INFERENCE_PRECISION_HINT": "f32"})
        x = np.stack([preprocess_image(im, pre) for im in pil]).astype(np.float32)
        ov_logits, ref = inf.infer(x), reference_logits(pil, pre, w, b)
        acc = 100 * float((ref.argmax(1) == np.array(labels)).mean())
        acc_ov = 100 * float((ov_logits.argmax(1) == np.array(labels)).mean())
        m = json.loads((d / "manifest.json").read_text())
        m["data_version"] = "demo-defects-seed0"
        m["verification"] = {
            "n_images": len(pil), "pytorch_accuracy": acc, "accuracy": acc_ov, "accuracy_drop": acc - acc_ov,
            "max_abs_diff": float(np.abs(ov_logits - ref).max()),
            "agreement": 100 * float((ov_logits.argmax(1) == ref.argmax(1)).mean()),
        }  # fmt: skip
        m["promotable"] = True
        (d / "manifest.json").write_text(json.dumps(m, indent=2))
    path = root / "rollout.yaml"
    ref = lambda v: {"version": v, "path": os.path.relpath(arts[v], root)}  # noqa: E731
    fields = {"line": "line-7", "champion": ref("1"), "challenger": ref("2"), "challenger_share": 0.25}
    fields |= {"cameras": {"pinned": {"cam-3": "challenger", "cam-0": "champion"}}, "shadow": False}
    fields |= {"decision": {"min_samples": 20, "min_gain": 0.0, "max_latency_increase": 10.0, "max_error_rate": 0.05}}
    fields |= {"registry": None, "log_dir": "logs"}
    write_manifest(path, **(fields | manifest_fields))
    return Line(root, path, [p.read_bytes() for p, _ in items], labels)


def send(client: httpx.Client, base: str, line: Line, camera_id: str, i: int) -> dict[str, Any]:
    """One frame from a camera (image ``i``); the /predict answer."""
    files = {"file": ("frame.png", io.BytesIO(line.images[i % len(line.images)]), "image/png")}
    r = client.post(f"{base}/predict", files=files, data={"camera_id": camera_id},
                    headers={"Authorization": "Bearer cam-token"})  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


def label_of(line: Line, i: int) -> str:
    return CLASSES[line.labels[i % len(line.labels)]]


def create_app_with_tokens(manifest: Path) -> Any:
    """The edge service with `TOKENS` in its own token store (deploy.edge.auth), as `--tokens` would give it."""
    tokens = TokenStore([(name, role, token_digest(t)) for t, (name, role) in TOKENS.items()], "tests")
    return create_app(manifest, tokens)


def launch(playwright: Any) -> Any:
    """Debian's chromium, headless, with every background request to Google switched off."""
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} is missing: run `make test-deps` (apt-get install chromium)")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
