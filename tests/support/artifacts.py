"""Tiny OpenVINO artifacts for the edge tests: the statistic model of `benchmarks/stat_model.py` (shared with the
demo line of benchmarks/ui_pages.py, so it lives there), and the models only tests need.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.stat_model import (
    CLASSES,
    N_FEATURES,
    build_artifact,
    demo_images,
    demo_set,
    features,
    fit_linear,
    reference_logits,
    write_manifest,
)

__all__ = ["ALWAYS_OK", "variant", "CLASSES", "N_FEATURES", "build_artifact", "demo_images", "demo_set", "features",
           "fit_linear", "reference_logits", "write_manifest"]  # fmt: skip

# (w, b) of a model that calls every part "ok" (it misses every defect): P(ok) = e / (e + 3) on any image
ALWAYS_OK = (np.zeros((len(CLASSES), N_FEATURES)), np.array([1.0, 0.0, 0.0, 0.0]))


def variant(src: Path, dst: Path, version: str, files: dict[str, bytes] | None = None, **manifest: Any) -> Path:
    """A copy of artifact `src` as `version`, with some manifest keys and model files replaced; checksums kept
    consistent, so only the check under test (signature, compile, smoke test, compatibility) can refuse it."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    for name, data in (files or {}).items():
        (dst / name).write_bytes(data)
        m["files"][name] = hashlib.sha256(data).hexdigest()
    m.update(model_version=version, **manifest)
    (dst / "manifest.json").write_text(json.dumps(m, indent=2))
    return dst
