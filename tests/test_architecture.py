"""The house rules, by construction: three layers, one direction, folders as boundaries, no cycles, short files.

pipelines/ (the application)  ->  deploy/ (compile/: torch -> ONNX/OpenVINO; edge/: the torch-free box)  ->  spt_core/

Where torch may go is written in the folders, and this file checks folders, not lists of modules:
- deploy/edge/ imports no torch, no timm, nothing from deploy/compile/, and from spt_core only spt_core/portable/;
- spt_core/portable/ imports no torch or timm and nothing else of spt_core.

benchmarks/ is a consumer beside the layers: it may import all three; nothing of them imports it, and it imports
nothing of tests/ and finds its imports without editing sys.path (tests may import it).
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
EDGE = "deploy.edge"  # a folder: every module below it is on the box
COMPILE = "deploy.compile"
PORTABLE = "spt_core.portable"  # a folder: spt_core's torch-free pieces, the only part of spt_core the edge may import
TORCH_LIKE = ("torch", "torchvision", "timm", "peft", "safetensors.torch")
SPT_CORE_MAY_NOT = ("pipelines", "deploy", "mlflow", "dvc", "prefect", "fastapi", "uvicorn", "openvino", "onnxruntime")


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules_of(root: Path) -> dict[str, Path]:
    """Module name -> file for the three packages below `root`."""
    return {
        _module_name(p, root): p
        for pkg in PACKAGES
        for p in sorted((root / pkg).rglob("*.py"))
        if "__pycache__" not in p.parts
    }


MODULES = modules_of(ROOT)


def _imports(name: str, modules: dict[str, Path] = MODULES, *, typing: bool = False) -> set[str]:
    """Every module `name` imports (absolute names; `from pkg import sub` counts as pkg.sub when sub is a module);
    with `typing`, the ``if TYPE_CHECKING:`` imports too (no runtime edge, but one module naming the other)."""
    path = modules[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    tree = ast.parse(path.read_text())
    typing_only = {  # `if TYPE_CHECKING:` imports never run: they are no import edge
        id(n)
        for block in ast.walk(tree)
        if not typing and isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
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
            out.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules)
    return out


def _under(name: str, folder: str) -> bool:
    return name == folder or name.startswith(folder + ".")


def folder_violations(root: Path) -> list[tuple[str, str]]:
    """(module, import) pairs that cross a folder boundary: the edge reaching torch, timm, the compile side or
    spt_core outside portable/; portable/ reaching torch or the rest of spt_core."""
    modules = modules_of(root)
    bad = []
    for name in modules:
        for imp in _imports(name, modules):
            top = imp.split(".")[0]
            if _under(name, EDGE):
                if imp.startswith(TORCH_LIKE) or _under(imp, COMPILE) or (top == "spt_core" and not (
                    imp == "spt_core" or _under(imp, PORTABLE))):
                    bad.append((name, imp))
            elif _under(name, PORTABLE):
                outside = top == "spt_core" and not _under(imp, PORTABLE) and imp != "spt_core"
                if imp.startswith(TORCH_LIKE) or outside:
                    bad.append((name, imp))
    return sorted(bad)


def long_files(root: Path) -> dict[str, int]:
    """Every .py file in the repository (product, benchmarks/, tests/, scripts/) over MAX_LINES lines."""
    skip = {".git", ".venv", "__pycache__", ".dvc", "node_modules", "build"}
    out = {}
    for p in root.rglob("*.py"):
        if skip.intersection(p.relative_to(root).parts):
            continue
        if (n := len(p.read_text(errors="replace").splitlines())) > MAX_LINES:
            out[str(p.relative_to(root))] = n
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


def test_folders_are_the_torch_boundary():
    assert folder_violations(ROOT) == []


def _plant(tmp_path: Path, rel: str, line: str) -> Path:
    """A minimal copy of the three packages' folder shape with one planted module."""
    for pkg in ("spt_core/portable", "deploy/edge/ui", "deploy/compile", "pipelines"):
        (tmp_path / pkg).mkdir(parents=True, exist_ok=True)
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "spt_core/__init__.py").write_text("")
    (tmp_path / "deploy/__init__.py").write_text("")
    (tmp_path / "spt_core/portable/errors.py").write_text("class SensituneError(Exception): ...\n")
    (tmp_path / "spt_core/sensitivity.py").write_text("import torch\n")
    (tmp_path / "deploy/compile/export.py").write_text("import torch\n")
    (tmp_path / rel).write_text(line + "\n")
    return tmp_path


@pytest.mark.parametrize(
    "rel, line",
    [
        ("deploy/edge/ui/planted.py", "import torch"),
        ("deploy/edge/planted.py", "from timm import create_model"),
        ("deploy/edge/planted.py", "from deploy.compile.export import export_all"),
        ("deploy/edge/planted.py", "from ..compile import export"),
        ("deploy/edge/planted.py", "from spt_core.sensitivity import measure_sensitivity"),
        ("spt_core/portable/planted.py", "import torch.nn"),
        ("spt_core/portable/planted.py", "from ..sensitivity import x"),
    ],
)
def test_a_planted_import_across_a_folder_boundary_is_caught(tmp_path, rel, line):
    root = _plant(tmp_path, rel, line)
    assert sorted({m for m, _ in folder_violations(root)}) == [_module_name(root / rel, root)]


def test_allowed_imports_are_not_flagged(tmp_path):
    line = "from spt_core.portable.errors import SensituneError\nimport numpy"
    root = _plant(tmp_path, "deploy/edge/planted.py", line)
    assert folder_violations(root) == []


@pytest.mark.parametrize("modules", ["edge", "portable", "pipelines-light"])
def test_modules_load_no_torch_in_a_fresh_interpreter(modules):
    chosen = {
        "edge": [m for m in MODULES if _under(m, EDGE) and not m.endswith("__main__")],
        "portable": [m for m in MODULES if _under(m, PORTABLE)],
        "pipelines-light": ["pipelines.config", "pipelines.layout", "pipelines.tracking", "pipelines.track"],
    }[modules]
    code = f"import importlib, sys\nfor m in {chosen!r}: importlib.import_module(m)\nprint(sorted(" + (
        "m for m in sys.modules if m.split('.')[0] in ('torch', 'timm')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", f"{modules} imported torch: {out.stdout[:300]}"


def test_no_import_cycles():
    graph = {name: _ours(_imports(name, typing=True)) - {name} for name in MODULES}
    # a package's __init__ re-exporting its submodules is an edge pkg -> sub; a submodule importing its own
    # package back would close a cycle, and is reported like any other. Typing-only imports count: two modules
    # that name each other's types are one concept in two files even when neither import runs first
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


# pipelines/ reaches spt_core through these doors only: the package (its __version__), spt_core.api (the method's
# front door: the modules behind it may move) and the torch-free leaves in spt_core/portable/ (one folder, one door)
SPT_CORE_DOORS = ("spt_core", "spt_core.api", PORTABLE)


def spt_core_doors(root: Path, folder: str = "pipelines") -> set[str]:
    """The spt_core modules that `folder` imports, a module under spt_core/portable/ counted as that folder."""
    modules = modules_of(root)
    imported = {i for n in modules if _under(n, folder) for i in _imports(n, modules, typing=True)}
    return {PORTABLE if _under(i, PORTABLE) else i for i in imported if i.split(".")[0] == "spt_core"}


def test_pipelines_import_spt_core_through_its_front_door():
    doors = spt_core_doors(ROOT)
    assert len(doors) <= len(SPT_CORE_DOORS) and doors <= set(SPT_CORE_DOORS), sorted(doors)


def test_an_import_behind_the_front_door_is_caught(tmp_path):
    root = _plant(tmp_path, "pipelines/planted.py", "from spt_core.sensitivity import measure_sensitivity")
    assert spt_core_doors(root) == {"spt_core.sensitivity"}


def test_layers_point_one_way():
    rank = {"spt_core": 0, "deploy": 1, "pipelines": 2}
    upward = {(n, i) for n in MODULES for i in _ours(_imports(n)) if rank[i.split(".")[0]] > rank[n.split(".")[0]]}
    assert not upward, sorted(upward)


def test_files_are_short_enough_to_read_in_one_sitting():
    assert long_files(ROOT) == {}


def test_the_line_rule_sees_benchmarks_and_tests(tmp_path):
    for rel in ("benchmarks/long.py", "tests/test_long.py", "deploy/edge/ok.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n" * (MAX_LINES + (0 if rel.endswith("ok.py") else 1)))
    assert long_files(tmp_path) == {"benchmarks/long.py": MAX_LINES + 1, "tests/test_long.py": MAX_LINES + 1}


CONSUMER = "benchmarks"  # a folder: the harness, which measures the product and writes benchmarks/results/


def consumer_violations(root: Path) -> list[tuple[str, str]]:
    """(module, import) pairs that break the consumer rule: a module of the three layers importing benchmarks/, or
    a module of benchmarks/ importing tests/ (a test file, its helpers in support/) or touching ``sys.path``."""
    product = modules_of(root)
    bad = [(n, i) for n in product for i in _imports(n, product) if i.split(".")[0] == CONSUMER]
    files = [p for p in sorted((root / CONSUMER).rglob("*.py")) if "__pycache__" not in p.parts]
    consumer = {_module_name(p, root): p for p in files}
    of_tests = {"tests", "support"} | {p.stem for p in (root / "tests").glob("*.py")}
    for name, path in consumer.items():
        bad += [(name, i) for i in _imports(name, consumer) if i.split(".")[0] in of_tests]
        nodes = ast.walk(ast.parse(path.read_text()))
        if any(isinstance(n, ast.Attribute) and ast.unparse(n) == "sys.path" for n in nodes):
            bad.append((name, "sys.path"))
    return sorted(bad)


def test_benchmarks_consume_the_layers_and_nothing_consumes_them():
    assert consumer_violations(ROOT) == []


@pytest.mark.parametrize(
    "rel, line",
    [
        ("pipelines/planted.py", "from benchmarks.report import summarize"),
        ("deploy/edge/planted.py", "import benchmarks.tracking"),
        ("spt_core/planted.py", "from benchmarks import methods"),
        ("benchmarks/planted.py", "from support.ui import build_line"),
        ("benchmarks/planted.py", "from test_compare import _model"),
        ("benchmarks/planted.py", "import sys\nsys.path.insert(0, 'tests')"),
    ],
)
def test_a_planted_consumer_violation_is_caught(tmp_path, rel, line):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_compare.py").write_text("")
    root = _plant(tmp_path, rel, line)
    assert sorted({m for m, _ in consumer_violations(root)}) == [_module_name(root / rel, root)]


def test_benchmarks_may_import_every_layer(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    lines = "from pipelines.tracking.common import flatten\nfrom deploy.compile import export\nimport spt_core.plan"
    assert consumer_violations(_plant(tmp_path, "benchmarks/planted.py", lines)) == []


def test_dvc_yaml_follows_the_one_stage_list():
    from pipelines import config
    from pipelines.stages import STAGES

    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == [s.name for s in STAGES]
    keys = config.keys()
    for s in STAGES:
        assert dvc[s.name]["cmd"] == s.cmd
        wanted = {k.dotted for k in keys for sel in s.params if sel in (k.section, k.dotted)}
        listed = dvc[s.name].get("params", [])
        every = [{"params.yaml": None}]  # DVC's spelling of "every key of params.yaml"
        assert (set(listed) if listed != every else {k.dotted for k in keys}) == wanted, s.name
        assert f"{s.run.__module__.replace('.', '/')}.py" in dvc[s.name]["deps"], s.name  # its code re-runs it
    for name, st in dvc.items():
        for dep in st["deps"]:
            if not dep.startswith("$"):
                assert (ROOT / dep).exists(), f"dvc.yaml {name} depends on missing {dep}"
