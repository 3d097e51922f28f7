"""Simulated cameras for a fleet of boxes: parts with known labels, each model version's answers cached as logits,
written into a box's rollout logs exactly as the edge service writes them (`deploy.edge.service`), so that the box's
own statistics, sync and fleet report read them as they read a line's.

A version's `Behaviour` fixes its error rate: exactly the fraction ``wrong`` of the pool's parts is answered with a
wrong class (a defect called ``ok``: an escape; a good part called a defect: overkill), and ``errors`` fail in
inference (the champion answers those frames instead, as the service does). Each frame shows a part drawn uniformly
from the pool, independently for every frame, camera and box (a generator seeded by the box and frame number), so a
version's rates hold on any subset of cameras or boxes: its wrong answers on n frames are Binomial(n, ``wrong``).
(A fixed stride over the pool would not do: with 8 cameras taking turns over 1000 parts, each camera would see a
fixed eighth of the pool and every box the same parts, so an arm's cameras would see another rate than the version's.)
Which camera a model answers is the box's own sticky split (`deploy.edge.rollout.split.assign_arm`) on its current
manifest. Used by benchmarks/fleet_sim.py and tests/test_fleet.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.stat_model import CLASSES
from deploy.edge.rollout.manifest import CHALLENGER, CHAMPION, FEEDBACK_LOG, PRED_LOG, load_config
from deploy.edge.rollout.split import assign_arm
from spt_core.portable.operating_point import OperatingPoint

OK = CLASSES[0]
OP = OperatingPoint(ok_class=OK)  # the statistic models' manifests declare ok, no threshold: the top class decides


@dataclass(frozen=True)
class Behaviour:
    """How a version answers: the fraction of wrong answers and of inference errors, and its latency."""

    wrong: float = 0.05
    errors: float = 0.0
    latency_ms: float = 5.0


def versioned(src: Path, dst: Path, version: str) -> Path:
    """A copy of artifact `src` sealed as `version` (the model files and their checksums unchanged)."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["model_version"] = version
    (dst / "manifest.json").write_text(json.dumps(m, indent=2))
    return dst


class Cameras:
    """A pool of `pool` parts (``defect_rate`` of them defects) seen in turn by every camera, and each version's
    cached logits on them. Args: behaviours per version (a version not named answers as `Behaviour()`)."""

    def __init__(self, behaviours: dict[str, Behaviour], pool: int = 1000, defect_rate: float = 0.1, seed: int = 0):
        self.behaviours, self.pool, self.seed = behaviours, pool, seed
        rng = np.random.default_rng(seed)
        n_defect = round(pool * defect_rate)
        self.labels = rng.permutation(np.r_[np.zeros(pool - n_defect, int), rng.integers(1, len(CLASSES), n_defect)])
        self._logits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.served: dict[tuple[str, str, str], int] = {}  # (box, role, version) -> frames answered

    def logits(self, version: str) -> tuple[np.ndarray, np.ndarray]:
        """(logits (pool, C), inference fails (pool,)) of `version`: exactly round(wrong * pool) parts answered
        wrongly, spread evenly over good parts and defects."""
        if version not in self._logits:
            b = self.behaviours.get(version, Behaviour())
            rng = np.random.default_rng([self.seed, int(version)])
            wrong = np.zeros(self.pool, bool)
            for is_defect in (False, True):  # the same fraction of each: escapes and overkill both at `wrong`
                idx = np.flatnonzero((self.labels != 0) == is_defect)
                wrong[rng.choice(idx, round(b.wrong * len(idx)), replace=False)] = True
            answer = np.where(wrong, np.where(self.labels == 0, 1 + rng.integers(0, len(CLASSES) - 1, self.pool), 0),
                              self.labels)  # fmt: skip
            logits = np.full((self.pool, len(CLASSES)), -2.0) + rng.normal(0, 0.1, (self.pool, len(CLASSES)))
            logits[np.arange(self.pool), answer] = 3.0
            fails = np.zeros(self.pool, bool)
            fails[rng.choice(self.pool, round(b.errors * self.pool), replace=False)] = True
            self._logits[version] = (logits, fails)
        return self._logits[version]

    def parts(self, box: str, start: int, frames: int) -> np.ndarray:
        """The parts frames ``start .. start + frames - 1`` of `box` show: uniform over the pool and independent of
        every other box's and batch's (module docstring), the same on every call."""
        box_key = int.from_bytes(hashlib.sha256(box.encode()).digest()[:8], "big")
        return np.random.default_rng([self.seed, box_key, start]).integers(0, self.pool, frames)

    def serve(self, rollout: Path, box: str, cameras: list[str], frames: int, start: int = 0,
              labelled: float = 1.0, ts: str = "") -> int:  # fmt: skip
        """`frames` frames over `cameras` on the box whose rollout manifest is `rollout`, appended to its logs with
        an operator's label on the first ``labelled`` share of them; returns the next frame number."""
        cfg = load_config(rollout)
        cfg.logs.mkdir(parents=True, exist_ok=True)
        preds, labels = [], []
        for n, k in zip(range(start, start + frames), self.parts(box, start, frames).tolist(), strict=True):
            cam = cameras[n % len(cameras)]
            role = assign_arm(cam, cfg)
            fid, base = f"{box}-{n}", {"ts": ts, "frame_id": f"{box}-{n}", "camera_id": cam}
            if role == CHALLENGER and self.logits(cfg.challenger.version)[1][k]:  # fails: the champion answers
                preds.append({**base, "role": CHALLENGER, "model_version": cfg.challenger.version,
                              "error": "simulated inference error", "served": False})  # fmt: skip
                role = CHAMPION
            version = (cfg.challenger if role == CHALLENGER else cfg.champion).version
            logits = self.logits(version)[0][k]
            answer = OP.answer(np.exp(logits) / np.exp(logits).sum(), CLASSES)
            latency = self.behaviours.get(version, Behaviour()).latency_ms * (1 + 0.1 * ((n % 10) / 10))
            preds.append({**base, "role": role, "model_version": version, "class": CLASSES[int(logits.argmax())],
                          **answer, "latency_ms": latency, "served": True})  # fmt: skip
            self.served[(box, role, version)] = self.served.get((box, role, version), 0) + 1
            if n - start < labelled * frames:
                labels.append({"ts": ts, "frame_id": fid, "camera_id": cam, "label": CLASSES[self.labels[k]]})
        for name, records in ((PRED_LOG, preds), (FEEDBACK_LOG, labels)):
            with open(cfg.logs / name, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        return start + frames
