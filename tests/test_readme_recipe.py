"""README.md's "Your own images" recipe, run as written: the bash block is read from README.md, so a README that
changes and stops working fails here. Only two things are put in: `<this repo>` (a git repository of this working
tree) and the user's folder, `~/my_line` (HOME is the test's folder, so the line itself is not rewritten).

Default suite: the lines between the install line and `dvc repro` (the project is made and the images imported,
with this venv's `sensitune`). Slow: every line, from `git clone` and `make install` to `dvc repro` and the commit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support.images import mono12_line
from support.projects import repo_env

ROOT = Path(__file__).resolve().parents[1]
COUNTS = {"good": 30, "scratch": 10, "dent": 10, "stain": 10}  # a line's imbalance, every class splittable


def recipe() -> list[str]:
    """The commands of the first bash block under README's "## Your own images" heading, one per line."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Your own images") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README.md: no bash block under ## Your own images"
    return [line for line in block.group(1).splitlines() if line.strip()]


def _shell(lines: list[str], cwd: Path, env: dict[str, str], timeout: int) -> str:
    script = "set -euo pipefail\n" + "\n".join(lines) + "\n"
    p = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"the README's lines exited {p.returncode}:\n{script}\n{out[-4000:]}"
    return out


def _home(tmp: Path) -> dict[str, str]:
    """The user's shell: HOME is `tmp` (holding my_line), git knows who commits, nothing points at an MLflow server."""
    env = {k: v for k, v in repo_env(tmp).items() if k != "MLFLOW_TRACKING_URI"}
    mono12_line(tmp / "my_line", COUNTS, size=32)
    return {**env, "HOME": str(tmp)}


def _made_the_project(line7: Path) -> None:
    """What `sensitune init --from ~/my_line --ok-class good` promises: the classes in data/raw, versioned by DVC,
    the good class declared, the pipeline of this package, a git repository."""
    raw = line7 / "data/raw"
    assert {p.name: len(list(p.iterdir())) for p in raw.iterdir()} == COUNTS
    assert len(list(raw.rglob("*.tif"))) == sum((n + 2) // 3 for n in COUNTS.values())  # TIFFs imported as they are
    assert yaml.safe_load((line7 / "data/raw.dvc").read_text())["outs"][0]["nfiles"] == sum(COUNTS.values())
    assert yaml.safe_load((line7 / "params.yaml").read_text())["data"]["ok_class"] == "good"
    assert list(yaml.safe_load((line7 / "dvc.yaml").read_text())["stages"])[0] == "prepare"
    assert (line7 / ".git").is_dir() and (line7 / ".dvc/config").is_file()


def test_the_readme_recipe_makes_the_line_project(tmp_path: Path) -> None:
    lines = recipe()
    assert "<this repo>" in lines[0] and "install" in lines[0], lines[0]
    until = next(i for i, line in enumerate(lines) if "dvc repro" in line)
    steps = lines[1:until]
    assert any("~/my_line" in s for s in steps), steps
    env = _home(tmp_path)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the installed sensitune of the line
    out = _shell(steps, tmp_path, env, timeout=600)
    assert "good class: good (--ok-class)" in out, out
    _made_the_project(tmp_path / "line7")


def _snapshot(dst: Path) -> Path:
    """This working tree (tracked and new files, no ignored ones) as a git repository to clone."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")  # fmt: skip
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    env = repo_env(dst.parent)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "snapshot"]):
        subprocess.run(cmd, cwd=dst, env=env, check=True, capture_output=True)
    return dst


def _dependencies(dst: Path) -> Path:
    """This venv's installed packages, sensitune's own install left out (so the clone's is the one imported)."""
    site = Path(next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix)))
    dst.mkdir()
    for p in site.iterdir():
        if "sensitune" not in p.name:
            (dst / p.name).symlink_to(p)
    return dst


def _commands(tmp: Path) -> Path:
    """The dependencies' own commands (dvc, mlflow, ...) that pip would have put into the new venv's bin/, last on
    PATH: this venv's python, pip and sensitune are left out, so the recipe's own install is the one that runs."""
    dst = tmp / "commands"
    dst.mkdir()
    for p in Path(sys.prefix, "bin").iterdir():
        if not p.name.startswith(("python", "pip", "sensitune", "activate", "Activate")):
            (dst / p.name).symlink_to(p)
    return dst


@pytest.mark.slow  # make install and a whole `dvc repro` of the default Lite0: minutes
def test_the_readme_recipe_from_clone_to_commit(tmp_path: Path) -> None:
    """Every line. make install runs for real (a venv, pip install -e of the clone); the dependencies pip would
    download (torch and the rest) are found on PYTHONPATH, this venv's packages but sensitune, with their commands
    last on PATH (`_commands`), as on a machine that has them already: the test needs PyPI only for pip itself and
    the build backend."""
    lines = recipe()
    src = _snapshot(tmp_path / "src")
    lines[0] = lines[0].replace("<this repo>", str(src))
    env = _home(tmp_path)
    path = [p for p in env["PATH"].split(os.pathsep) if not p.startswith(sys.prefix)] + [str(_commands(tmp_path))]
    env.update(PYTHONPATH=str(_dependencies(tmp_path / "deps")), PATH=os.pathsep.join(path))
    _shell(lines, tmp_path, env, timeout=3600)
    line7 = tmp_path / "line7"
    _made_the_project(line7)
    where = [str(tmp_path / "sensitune/.venv/bin/python"), "-c", "import pipelines; print(pipelines.__file__)"]
    installed = subprocess.run(where, cwd=tmp_path, env=env, capture_output=True, text=True).stdout
    assert installed.startswith(str(tmp_path / "sensitune")), installed  # the recipe's own install of the clone
    record = json.loads((line7 / "runs/main/mlflow_run.json").read_text())
    assert record["status"] == "published" and record["champion_set"], record  # the first model is the champion
    metrics = json.loads((line7 / "runs/main/metrics.json").read_text())
    assert metrics["ok_class"] == "good" and metrics["threshold"] is not None
    log = subprocess.run(["git", "log", "--oneline"], cwd=line7, capture_output=True, text=True).stdout
    assert "line 7, data v1" in log
    assert not subprocess.run(["git", "status", "--porcelain"], cwd=line7, capture_output=True, text=True).stdout
