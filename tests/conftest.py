"""Shared fixtures: keep this small, each fixture cheap (CPU, seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared digits dataset (10 classes of 8x8 RGB): 40 train, 20 val, 20 test, seed 0. Treat as read-only."""
    from spt_core.data import prepare

    out = tmp_path_factory.mktemp("data") / "digits"
    prepare("digits", out, n_train=40, n_val=20, n_test=20, seed=0)
    return out
