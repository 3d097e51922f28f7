"""`sensitune init DIR`: a new line project, apart from the demo's clone, that `dvc repro` runs as it is.

    sensitune init line7 --from ~/my_line --ok-class good    # params.yaml, dvc.yaml, git + DVC, my_line in data/raw
    cd line7 && dvc repro

The project holds only what a line owns: params.yaml (every key at the package's default, so DVC sees each value a
stage reads; ``data.ok_class`` as declared), dvc.yaml (sensitune's stages, run by the installed ``sensitune``),
.gitignore, .dvcignore, an empty ``data/raw``, a git repository and a DVC repository with a default remote (the
retrain flow pushes each data version). ``--from FOLDER`` imports the images at once (`pipelines.ingest`), and
``dvc add`` versions them.

The good class is declared, never picked silently: ``--ok-class NAME`` (checked against the folder's classes by the
import), else with ``--from`` the one class folder named like a good class (good, ok, pass, normal; the output
says it was taken), else null in params.yaml with a note saying to set it. Anything that fails leaves no project
behind, so the same command can simply be run again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from spt_core import __version__
from spt_core.portable.errors import SensituneError, one_line

from . import config
from .ingest import GOOD_NAMES, class_folders, import_images, version_raw
from .layout import dvc_root

ROOT = Path(__file__).resolve().parents[1]  # the sensitune checkout: its dvc.yaml and .dvcignore are the templates
GITIGNORE = """\
/mlflow.db
/mlartifacts/
/registry/
/dvc_plots/
runs/*/train_state/
runs/*/mlflow_fallback*.json
/rollout.yaml
/runs/retrain/
/predictions.csv
__pycache__/
"""


# .dvc/config: no analytics (the line network may be offline) and the default remote the retrain flow pushes to
DVC_CONFIG = """\
[core]
    analytics = false
    remote = storage
['remote "storage"']
    url = {remote}
"""


def good_class_from_folders(classes: list[str], source: Path) -> str:
    """The one class folder named like a good class (`GOOD_NAMES`, any case); none or several: say --ok-class."""
    named = [c for c in classes if c.lower() in GOOD_NAMES]
    if len(named) == 1:
        return named[0]
    which = f"several are ({named})" if named else f"none is named {'/'.join(GOOD_NAMES)}"
    raise SensituneError(f"--from {source}: of its classes {classes} {which}: name the good class with --ok-class NAME")


def render_params(params: config.Params) -> str:
    """params.yaml: every section and key in the package's order, each key with its help as a comment."""
    help_of = {k.dotted: k.help for k in config.keys()}
    lines = [
        f"# sensitune parameters of this line (made by `sensitune init`, sensitune {__version__}); every verb and",
        "# DVC stage reads them. Keys and meanings: `sensitune <verb> --help`, pipelines/config.py.",
    ]
    for section, values in params.items():
        lines.append(f"\n{section}:")
        for key, value in values.items():
            text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
            lines.append(f"  {key}: {text} # {help_of.get(f'{section}.{key}', '')}".rstrip(" #"))
    return "\n".join(lines) + "\n"


def render_dvc_yaml() -> str:
    """sensitune's own dvc.yaml without its code dependencies: the line project runs the installed package."""
    doc = yaml.safe_load(_template("dvc.yaml"))
    for st in doc["stages"].values():
        st["deps"] = [d for d in st.get("deps", []) if not (isinstance(d, str) and not d.startswith("$"))]
    head = (
        f"# sensitune's pipeline (sensitune {__version__}): `dvc repro` runs the stages whose inputs changed.\n"
        "# The stages run the installed `sensitune`; its code is not a dependency here: after upgrading sensitune,\n"
        "# `dvc repro -f` runs every stage again.\n"
    )
    return head + yaml.safe_dump(doc, sort_keys=False, width=120)


def _template(name: str) -> str:
    path = ROOT / name
    if not path.is_file():
        raise SensituneError(f"{path}: not found; sensitune init copies it from the sensitune checkout "
                             "(install with `make install` or `pip install -e <checkout>`)")  # fmt: skip
    return path.read_text()


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise SensituneError(f"{cmd[0]} is not installed: install it (init makes a git + DVC project)") from None
    if p.returncode != 0:
        shown = " ".join(c if c != sys.executable else "python" for c in cmd)
        raise SensituneError(f"`{shown}` in {cwd} failed: {one_line(p.stderr or p.stdout or 'no output')[:300]}")


def _check_target(target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise SensituneError(f"{target}: exists and is not empty; sensitune init makes a new project: give a new "
                             "folder, e.g. ~/lines/line7")  # fmt: skip
    outer = dvc_root(target.parent)
    if outer is not None:
        raise SensituneError(f"{target} is inside the DVC project {outer} (the demo's clone?): make the line "
                             "project outside it, e.g. ~/lines/line7")  # fmt: skip


def init_project(
    target: Path,
    params: config.Params,
    *,
    source: Path | None = None,
    ok_given: bool = False,
    remote: str | None = None,
) -> dict[str, Any]:
    """Make the line project `target` (new or empty) with `params`; import `source` when given.

    Args:
        params: The project's params (the package's defaults with the user's ``--set``); ``data.ok_class`` is used
            only when ``ok_given``, else it comes from `good_class_from_folders` (with `source`) or is null.
        remote: DVC's default remote (default: the folder ``<target>-dvc-storage`` beside the project).

    Returns:
        ``dir``, ``ok_class``, ``ok_from`` (how it was declared), ``remote``, the import's ``files`` and
        ``classes`` (0 and [] without `source`), and ``next``: what to run.

    Raises:
        SensituneError: `target` not empty or inside a DVC project, no good class to take, a failed import, git or
            DVC missing or failing; nothing is left behind.
    """
    target = Path(target).expanduser().absolute()
    _check_target(target)
    ok, ok_from = params["data"]["ok_class"], "--ok-class"
    if not ok_given:
        ok, ok_from = None, None
        if source is not None:
            if not Path(source).is_dir():
                raise SensituneError(f"--from {source}: not a directory; give an ImageFolder DIR/<class>/<images>")
            ok = good_class_from_folders(sorted(class_folders(Path(source))), Path(source))
            ok_from = "the folder of that name; --ok-class NAME names another"
    params = {**params, "data": {**params["data"], "ok_class": ok}}
    remote = remote or str(target.parent / f"{target.name}-dvc-storage")
    made = not target.exists()
    try:
        (target / "data" / "raw").mkdir(parents=True, exist_ok=True)
        (target / "params.yaml").write_text(render_params(params))
        (target / "dvc.yaml").write_text(render_dvc_yaml())
        (target / ".gitignore").write_text(GITIGNORE)
        (target / ".dvcignore").write_text(_template(".dvcignore"))
        got: dict[str, Any] = {"files": 0, "classes": []}
        if source is not None:  # checked and copied before git and DVC run: a bad folder costs nothing
            at = {**params, "paths": {**params["paths"], "raw": str(target / params["paths"]["raw"])}}
            got = import_images(Path(source), at, dvc=False, ok_flag=ok_given)
        _run(["git", "init", "-q"], target)
        _run([sys.executable, "-m", "dvc", "init", "-q"], target)
        (target / ".dvc" / "config").write_text(DVC_CONFIG.format(remote=remote))  # = `dvc remote add -d storage`
        if source is not None:
            version_raw(target / params["paths"]["raw"])
    except BaseException:
        if made:
            shutil.rmtree(target, ignore_errors=True)
        else:  # it was an empty folder the user made: empty it again
            for p in target.iterdir():
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        raise
    where = os.path.relpath(target)
    then = "dvc repro" if source is not None else "sensitune import FOLDER && dvc repro"
    if ok is None:
        then = "set data.ok_class in params.yaml to your good class's folder name, then " + then
    return {"dir": str(target), "ok_class": ok, "ok_from": ok_from, "remote": remote, "files": got["files"],
            "classes": got["classes"], "next": f"cd {where} && {then}"}  # fmt: skip
