"""The rollout's camera split recomputed from its documented rule, independently of deploy.edge.rollout.split."""

from __future__ import annotations

import hashlib


def bucket(camera: str, version: str) -> float:
    """The camera's place in [0, 1) for this challenger version: the first 8 bytes of sha256(camera NUL version)."""
    return int.from_bytes(hashlib.sha256(f"{camera}\x00{version}".encode()).digest()[:8], "big") / 2.0**64
