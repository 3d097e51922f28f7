"""Many lines per retrain: one `retrain` per production line with new data, fanned out by Prefect's task runner.

    python -m pipelines.lines run [--lines lines.yaml] [--config params.yaml]                 one after another
    python -m pipelines.lines run --ray-address auto                                          on a Ray cluster

lines.yaml names the lines; each line is params.yaml with its own raw data, classes, good class, budget,
registered model and rollout manifest (docs/scaling.md):

    resources: {num_cpus: 2, num_gpus: 1}      # what Ray reserves for one line's retrain (default: 1 CPU)
    lines:
      line-1:
        raw: data/lines/line-1/raw             # the watched ImageFolder: its own `dvc add`, its own data version
        classes: [crack, ok, scratch, spot]    # the class folders it must hold (null: whatever is there)
        ok_class: ok                           # the good class (data.ok_class where params.yaml has that key)
        budget: 1%                             # plan.budget
        model_name: sensitune-line-1           # MLflow registered model (default sensitune-<line>)
        rollout: deploy/line-1/rollout.yaml    # its rollout manifest (default <runs_root>/<line>/rollout.yaml)
        set: {train.epochs: 10}                # any other params.yaml key
        resources: {num_gpus: 1}               # overrides the default above

Each line works in ``<runs_root>/<line>/`` with its own lock, state file and attempts, so a failure in one line
(bad data, a crash, a lost Ray worker) leaves every other line's registry aliases, manifest and files untouched;
the flow reports every line and fails at the end if any did. Without ``--ray-address`` the lines run one after
another in this process (a one-worker task runner); with it, `prefect_ray.RayTaskRunner` places each line's
retrain on the cluster with the resources it requests. Paths are made absolute here: Ray workers need not share
this process's working directory, but they must see the same files (a shared file system on a multi-node cluster).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State
from prefect.task_runners import ThreadPoolTaskRunner

from deploy.edge.rollout.manifest import CHALLENGER_SHARE
from pipelines import flow_hooks, flows, tracking
from pipelines import tasks as t
from pipelines.config import load_params
from spt_core.portable.errors import SensituneError, one_line
from spt_core.portable.io import write_json

SUMMARY_FILE = "lines.json"
LINE_KEYS = {"raw", "classes", "ok_class", "budget", "model_name", "rollout", "set", "resources"}
RESOURCE_KEYS = {"num_cpus", "num_gpus", "memory", "resources"}  # ray.remote options a line may request


@dataclass
class Line:
    """One production line: its params (params.yaml + its own keys) and where its retrain keeps its state."""

    name: str
    params: dict
    root: Path  # <runs_root>/<name>: lock, state file, attempts
    model_name: str
    rollout: Path
    classes: list[str] | None
    ok_class: str | None
    resources: dict[str, Any] = field(default_factory=dict)


def _absolute(path: str | os.PathLike, base: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else (base / p).resolve()


def absolute_uri(uri: str, base: Path) -> str:
    """A relative ``sqlite:///file.db`` made absolute, so every Ray worker writes to the same registry."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str(_absolute(uri[len(prefix) :], base))
    return uri


def load_lines(lines_file: str | Path, config: str | Path | None, runs_root: str | Path) -> list[Line]:
    """Every line of `lines_file`, each with validated params; every problem of every line in one error."""
    base = Path.cwd()
    path = Path(lines_file)
    if not path.is_file():
        raise SensituneError(f"--lines {path}: file not found; write a lines.yaml (see docs/scaling.md)")
    doc = yaml.safe_load(path.read_text()) or {}
    entries, default_res = doc.get("lines"), doc.get("resources") or {"num_cpus": 1}
    if not isinstance(entries, dict) or not entries:
        raise SensituneError(f"{path}: expected `lines:` mapping each line name to its raw, classes, ok_class, ...")
    lines, problems = [], []
    for name, spec in entries.items():
        spec = spec or {}
        unknown = sorted(set(spec) - LINE_KEYS)
        res = {**default_res, **(spec.get("resources") or {})}
        unknown += sorted(f"resources.{k}" for k in set(res) - RESOURCE_KEYS)
        if unknown:
            problems.append(f"line {name}: unknown key(s) {unknown} (valid: {sorted(LINE_KEYS)})")
            continue
        if "raw" not in spec:
            problems.append(f"line {name}: give raw, the folder its new images arrive in")
            continue
        classes, ok = spec.get("classes"), spec.get("ok_class")
        if classes is not None and ok is not None and ok not in classes:
            problems.append(f"line {name}: ok_class {ok!r} is not one of its classes {classes}")
        overrides = {"paths.raw": str(_absolute(spec["raw"], base)), **dict(spec.get("set") or {})}
        if "budget" in spec:
            overrides["plan.budget"] = str(spec["budget"])
        defaults = load_params(None)
        if ok is not None and "ok_class" in defaults["data"]:
            overrides["data.ok_class"] = ok
        try:
            params = load_params(config, overrides)
        except SensituneError as e:
            problems.append(f"line {name}: {e}")
            continue
        root = _absolute(runs_root, base) / str(name)
        rollout = _absolute(spec["rollout"], base) if spec.get("rollout") else root / "rollout.yaml"
        model = str(spec.get("model_name") or f"sensitune-{name}")
        lines.append(Line(str(name), params, root, model, rollout, classes, ok, res))
    if problems:
        raise SensituneError(f"{path}: " + "; ".join(problems))
    return lines


def check_classes(line: Line) -> None:
    """The line's raw folder holds exactly its declared class folders (a wrong camera feed fails only this line)."""
    if line.classes is None:
        return
    raw = Path(line.params["paths"]["raw"])
    found = sorted(p.name for p in raw.iterdir() if p.is_dir() and not p.name.startswith(".")) if raw.is_dir() else []
    if sorted(line.classes) != found:
        raise t.RetrainError(f"line {line.name}: {raw} holds classes {found}, lines.yaml says {sorted(line.classes)}")


@task(name="retrain-line", cache_policy=NO_CACHE)
def retrain_line(line: Line, uri: str, opt: dict[str, Any]) -> dict[str, Any] | State:
    """One line's retrain (`pipelines.flows.retrain_once`), wherever the task runner placed it."""
    started = time.time()
    check_classes(line)
    got = flows.retrain_once(line.params, line.root, uri, line.model_name, rollout=str(line.rollout),
                             line=line.name, **opt)  # fmt: skip
    where = {"line": line.name, "pid": os.getpid(), "started": started, "ended": time.time()}
    if isinstance(got, State):  # a named outcome (No new data, Settling, Not promoted): the task's state keeps it
        return Completed(name=got.name, message=f"line {line.name}: {got.message}", data={**got.result(), **where})
    return {**got, **where}


@flow(name="retrain-lines", task_runner=ThreadPoolTaskRunner(max_workers=1))
def retrain_lines(
    lines: str = "lines.yaml",
    config: str | None = "params.yaml",
    runs_root: str = "runs/lines",
    tracking_uri: str | None = None,
    challenger_share: float = CHALLENGER_SHARE,
    min_gain: float = 0.0,
    use_dvc: bool = True,
    settle_seconds: float = flows.SETTLE_S,
    force: bool = False,
) -> dict[str, Any]:
    """Retrain every line of `lines` that has new data: one task per line, placed by the flow's task runner.

    Args:
        lines: lines.yaml: each line's raw folder, classes, good class, budget, registry model, resources.
        config: The params.yaml every line starts from (a line's ``set:`` overrides it).
        runs_root: Where each line's attempts, state file and rollout manifest live (one folder per line).
        tracking_uri: MLflow URI (default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``).
        challenger_share: Fraction of a line's cameras its handed-over challenger gets.
        min_gain: Margin: hand over only if challenger - champion held-out accuracy >= min_gain (may be < 0).
        use_dvc: Version each line's data with DVC when a DVC repository is found.
        settle_seconds: Skip a line whose folder changed this recently (a batch still being copied).
        force: Retrain even when a line's data version was trained already.

    Returns:
        ``{line: record}`` (the line's retrain record, or ``status: failed`` with the error), also written to
        ``<runs_root>/lines.json``; raises after all lines finished if any failed.
    """
    logger = get_run_logger()
    opt = flows.retrain_options(challenger_share, min_gain, use_dvc, settle_seconds, force)
    all_lines = load_lines(lines, config, runs_root)
    uri = absolute_uri(tracking.tracking_uri(tracking_uri), Path.cwd())
    futures = {}
    for line in all_lines:
        with _ray_options(line.resources):
            futures[line.name] = retrain_line.submit(line, uri, opt)
    summary: dict[str, Any] = {}
    for name, future in futures.items():
        future.wait()
        state = future.state
        if state.is_completed():
            summary[name] = future.result()
        else:
            err = state.result(raise_on_failure=False)
            summary[name] = {"status": "failed", "line": name, "error": one_line(err) if err else state.message}
        logger.info("line %s: %s", name, summary[name].get("decision", summary[name]["status"]))
    write_json(Path(runs_root) / SUMMARY_FILE, summary)
    failed = [n for n, r in summary.items() if r["status"] == "failed"]
    if failed:
        raise t.RetrainError(f"line(s) {', '.join(failed)} failed ({summary[failed[0]]['error']}); the others finished")
    return summary


def _ray_options(resources: dict[str, Any]) -> contextlib.AbstractContextManager:
    """`prefect_ray`'s remote options (read by RayTaskRunner only); nothing when prefect-ray is not installed."""
    try:
        from prefect_ray.context import remote_options
    except ImportError:
        return contextlib.nullcontext()
    return remote_options(**resources) if resources else contextlib.nullcontext()


def lines_flow(ray_address: str | None = None, ray_init: dict[str, Any] | None = None) -> Any:
    """`retrain_lines` one line after another (None), or on Ray: "auto"/"ray://host:10001", or "local" (start one)."""
    if ray_address is None:
        return retrain_lines
    from prefect_ray import RayTaskRunner

    address = None if ray_address == "local" else ray_address
    return retrain_lines.with_options(task_runner=RayTaskRunner(address=address, init_kwargs=ray_init or {}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.lines", description=__doc__.split("\n\n")[0])
    p.add_argument("cmd", choices=["run"])
    p.add_argument("--ray-address", help="auto | ray://head:10001 | local (default: no Ray, one line at a time)")
    flow_hooks.add_flags(p, retrain_lines.fn)
    p.set_defaults(settle_seconds=0.0)  # asked for now: the data is there (a schedule waits for settling)
    a = vars(p.parse_args(argv))
    a.pop("cmd")
    try:
        load_lines(a["lines"], a["config"], a["runs_root"])  # a bad lines.yaml fails here, before Prefect starts
        summary = lines_flow(a.pop("ray_address"))(**a)
    except SensituneError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    for name, r in summary.items():
        print(f"{name}: {r['status']}" + (f", {r['decision']}" if "decision" in r else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
