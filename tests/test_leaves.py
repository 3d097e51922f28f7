"""spt_core's leaves: errors.one_line, io.write_text, device.resolve_device (import rules: test_architecture.py)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import torch

from spt_core.device import resolve_device
from spt_core.portable.errors import SensituneError, one_line
from spt_core.portable.io import umask, write_text

REPO = Path(__file__).resolve().parents[1]


def test_one_line_collapses_whitespace_and_cuts_at_the_limit():
    assert one_line(ValueError("a\n  b\tc")) == "a b c"
    assert one_line(KeyError()) == "KeyError"  # an empty message still says what happened
    long = one_line(RuntimeError("x" * 500))
    assert len(long) == 200 and long.endswith("...")
    assert one_line(RuntimeError("y" * 300), limit=300) == "y" * 300


def test_write_text_is_atomic_and_readable(tmp_path: Path):
    path = tmp_path / "sub" / "a.txt"
    write_text(path, "héllo\n")
    assert path.read_bytes() == "héllo\n".encode()
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask()
    write_text(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SensituneError, match="not a torch device"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(SensituneError, match="CUDA is not available here; use device: auto or cpu"):
            resolve_device("cuda:0")
