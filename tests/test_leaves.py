"""spt_core's leaves and its layering: errors.one_line, io.write_text, device.resolve_device, import rules."""

from __future__ import annotations

import ast
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spt_core.device import resolve_device
from spt_core.errors import SensituneError, one_line
from spt_core.io import umask, write_text

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("pipelines", "deploy", "mlflow", "dvc", "prefect", "fastapi")
# Application modules that still sit in spt_core until they move to pipelines/; the rule holds for the rest.
APPLICATION = ("stages.py", "cli.py", "config.py")
TORCH_FREE = ("spt_core", "spt_core.preprocess", "spt_core.errors", "spt_core.io")


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


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    return names


def test_spt_core_imports_no_application_or_mlops_package():
    bad = [
        f"{path.relative_to(REPO)}: {name}"
        for path in sorted((REPO / "spt_core").rglob("*.py"))
        if path.parent.name != "spt_core" or path.name not in APPLICATION
        for name in sorted(_imports(path))
        if name.split(".")[0] in FORBIDDEN
    ]
    assert bad == []


def test_torch_free_leaves_import_without_torch():
    code = f"import sys; import {', '.join(TORCH_FREE)}; assert 'torch' not in sys.modules, 'torch imported'"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
