"""The house rules, by construction: three layers, one direction, no cycles, short files, one stage order.

pipelines/ (the application)  ->  deploy/ (export; the torch-free edge)  ->  spt_core/ (the method)
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("spt_core", "pipelines", "deploy")
MAX_LINES = 400
EDGE = ("deploy.artifact", "deploy.inferencer", "deploy.metrics", "deploy.registry", "deploy.rollout", "deploy.service")
EDGE += ("deploy.api", "deploy.auth", "deploy.frames", "deploy.guard", "deploy.limits", "deploy.runtime")
EDGE += ("deploy.schemas", "deploy.frame_store", "deploy.ui", "deploy.mlflow_rest", "deploy.sync")
SPT_CORE_MAY_NOT = ("pipelines", "deploy", "mlflow", "dvc", "prefect", "fastapi", "uvicorn", "openvino", "onnxruntime")
TORCH_FREE_SPT_CORE = ("spt_core", "spt_core.errors", "spt_core.io", "spt_core.metrics", "spt_core.preprocess")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {
    _module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")) if "__pycache__" not in p.parts
}


def _imports(name: str) -> set[str]:
    """Every module `name` imports (absolute names; `from pkg import sub` counts as pkg.sub when sub is a module)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    tree = ast.parse(path.read_text())
    typing_only = {  # `if TYPE_CHECKING:` imports never run: they are no import edge
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
        for stmt in block.body
        for n in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
    return out


def _ours(imported: set[str]) -> set[str]:
    return {m for m in imported if m in MODULES}


def test_spt_core_imports_no_application_edge_or_mlops_code():
    bad = {
        (name, imp)
        for name in MODULES
        if name.split(".")[0] == "spt_core"
        for imp in _imports(name)
        if imp.split(".")[0] in SPT_CORE_MAY_NOT
    }
    assert not bad, sorted(bad)


def test_deploy_never_imports_the_application():
    bad = {(n, i) for n in MODULES if n.startswith("deploy") for i in _imports(n) if i.split(".")[0] == "pipelines"}
    assert not bad, sorted(bad)


def test_edge_modules_use_only_torch_free_spt_core_leaves():
    allowed = set(TORCH_FREE_SPT_CORE)
    bad = {
        (name, imp)
        for name in MODULES
        if name.startswith(EDGE)
        for imp in _imports(name)
        if imp.split(".")[0] == "spt_core" and imp not in allowed
    }
    assert not bad, sorted(bad)


@pytest.mark.parametrize(
    "modules",
    [EDGE, TORCH_FREE_SPT_CORE, ("pipelines.config", "pipelines.layout", "pipelines.tracking", "pipelines.track")],
    ids=["edge", "spt_core-leaves", "pipelines-config-tracking"],
)
def test_modules_load_no_torch_in_a_fresh_interpreter(modules):
    code = f"import importlib, sys\nfor m in {list(modules)!r}: importlib.import_module(m)\nprint(sorted(" + (
        "m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", f"{modules} imported torch: {out.stdout[:300]}"


def test_no_import_cycles():
    graph = {name: _ours(_imports(name)) - {name} for name in MODULES}
    # a package's __init__ re-exporting its submodules is an edge pkg -> sub; a submodule importing its own
    # package back would close a cycle, and is reported like any other
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_layers_point_one_way():
    rank = {"spt_core": 0, "deploy": 1, "pipelines": 2}
    upward = {(n, i) for n in MODULES for i in _ours(_imports(n)) if rank[i.split(".")[0]] > rank[n.split(".")[0]]}
    assert not upward, sorted(upward)


def test_files_are_short_enough_to_read_in_one_sitting():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_dvc_yaml_follows_the_one_stage_list():
    from pipelines import config
    from pipelines.stages import STAGES, TRACK_STAGE

    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == [s.name for s in STAGES] + [TRACK_STAGE]
    keys = config.keys()
    for s in STAGES:
        assert dvc[s.name]["cmd"] == f"sensitune {s.name}"
        wanted = {k.dotted for k in keys for sel in s.params if sel in (k.section, k.dotted)}
        assert set(dvc[s.name].get("params", [])) == wanted, s.name
        assert "pipelines/stages.py" in dvc[s.name]["deps"], s.name
    for name, st in dvc.items():
        for dep in st["deps"]:
            if not dep.startswith("$"):
                assert (ROOT / dep).exists(), f"dvc.yaml {name} depends on missing {dep}"
