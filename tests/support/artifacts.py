"""Tiny OpenVINO artifacts for the edge tests: the statistic model of `benchmarks/stat_model.py` (shared with the
demo line of benchmarks/ui_pages.py, so it lives there), and the models only tests need.
"""

from __future__ import annotations

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

__all__ = ["ALWAYS_OK", "CLASSES", "N_FEATURES", "build_artifact", "demo_images", "demo_set", "features",
           "fit_linear", "reference_logits", "write_manifest"]  # fmt: skip

# (w, b) of a model that calls every part "ok" (it misses every defect): P(ok) = e / (e + 3) on any image
ALWAYS_OK = (np.zeros((len(CLASSES), N_FEATURES)), np.array([1.0, 0.0, 0.0, 0.0]))
