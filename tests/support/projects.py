"""Throw-away projects for the pipeline tests: a git + DVC project for the Prefect flows, and a git repo with a copy
of this project's pipeline files and code for `dvc repro` (tests/test_dvc.py, tests/test_flywheel.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .params import TINY_REPO

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")
CODE = ("spt_core", "deploy", "pipelines")
GITIGNORE = "/mlflow.db\n/mlartifacts/\n/dvc_plots/\nruns/*/train_state/\n__pycache__/\n"


def sh(*cmd: str, cwd: Path) -> None:
    """Run a set-up command; its output only matters when it fails (CalledProcessError carries it)."""
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, timeout=300)


def git_dvc_project(root: Path, remote: Path, params: dict[str, Any]) -> Path:
    """`root` as a git + DVC project with `params` as params.yaml and `remote` as its default (local) DVC remote."""
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    sh("git", "init", "-q", cwd=root)
    sh(sys.executable, "-m", "dvc", "init", "-q", cwd=root)
    sh(sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(remote), cwd=root)
    return root


def repo_env(tmp: Path) -> dict[str, str]:
    """The environment of the stage commands in a `make_repo` repo: this venv first, MLflow in `tmp`, quiet tools."""
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `sensitune` and `python` of this venv for the stage cmds
        DVC_NO_ANALYTICS="1",
        GIT_PYTHON_REFRESH="quiet",
        MLFLOW_TRACKING_URI=os.environ.get("SENSITUNE_TEST_TRACKING_URI") or f"sqlite:///{tmp / 'mlflow.db'}",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.com",
        OMP_NUM_THREADS="1",
    )
    return env


def make_repo(repo: Path, demo: bool = True) -> Callable[..., str]:
    """A git repo with this project's pipeline files, code and tiny params (+ the demo images as data v1 when
    ``demo``); returns a command runner. The stage commands run the repo's copy of the code (PYTHONPATH)."""
    repo.mkdir(parents=True)
    for d in CODE:
        shutil.copytree(ROOT / d, repo / d, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("dvc.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore"):
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, repo / f)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY_REPO.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text(GITIGNORE)
    env = {**repo_env(repo.parent), "PYTHONPATH": str(repo)}

    def run(*cmd: str, ok: bool = True) -> str:
        exe = DVC if cmd[0] == "dvc" else cmd[0]
        p = subprocess.run([exe, *cmd[1:]], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        out = p.stdout + p.stderr
        if ok:
            assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}:\n{out[-3000:]}"
        return out

    run("git", "init", "-q")
    if not demo:
        return run
    run(str(BIN / "sensitune"), "demo", "-q")
    run("dvc", "add", "-q", "data/raw")
    run("dvc", "push", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "tiny pipeline, data v1")
    return run


def set_param(repo: Path, section: str, key: str, value: object) -> None:
    """Edit one key of the repo's params.yaml, as a user would before `dvc repro`."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def planned_project(root: Path, params: dict[str, Any]) -> Path:
    """`root` with `params` as params.yaml, run by the CLI through demo, prepare, measure and plan (train next)."""
    from pipelines.cli import main

    (root / "params.yaml").write_text(yaml.safe_dump(params))
    cwd = Path.cwd()
    os.chdir(root)
    try:
        for verb in ("demo", "prepare", "measure", "plan"):
            assert main([verb, "--config", "params.yaml", "-q"]) == 0, verb
    finally:
        os.chdir(cwd)
    return root
