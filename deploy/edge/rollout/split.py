"""The sticky camera split: which arm (champion or challenger) serves a camera."""

from __future__ import annotations

import hashlib

from deploy.edge.rollout.manifest import CHALLENGER, CHAMPION, RolloutConfig


def camera_bucket(camera_id: str, challenger_version: str) -> float:
    """Uniform in [0, 1), fixed for a (camera, challenger version): a new challenger reshuffles the cameras."""
    digest = hashlib.sha256(f"{camera_id}\x00{challenger_version}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_arm(camera_id: str, cfg: RolloutConfig) -> str:
    """Which model serves this camera: pinned cameras first, then the sticky hash against the share."""
    if cfg.challenger is None:
        return CHAMPION
    if camera_id in cfg.pinned:
        return cfg.pinned[camera_id]
    return CHALLENGER if camera_bucket(camera_id, cfg.challenger.version) < cfg.challenger_share else CHAMPION
