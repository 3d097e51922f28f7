"""`benchmarks/compare.py` tables in MLflow: one parent run per table, one child run per row.

The harness's record keeping, beside the product's (`pipelines.tracking`: runs and the registry), whose URI,
session and helpers it shares. `make benchmarks-mlflow` logs every committed table:

    python benchmarks/tracking.py benchmarks/results/compare_*.json     # MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.report import summary_metrics
from pipelines.tracking.common import (
    TrackingWarning,
    check_reachable,
    experiment_id,
    flatten,
    is_number,
    mlflow_session,
)
from pipelines.tracking.common import tracking_uri as resolve_uri
from spt_core.portable.errors import SensituneError

BENCHMARK_EXPERIMENT = "sensitune-benchmarks"
# a compare.py row's key -> MLflow metric of its child run
BENCHMARK_ROW_METRICS = (
    "val_acc", "test_acc", "best_epoch", "trainable_backbone", "trainable_head", "trainable_pct", "budget_count",
    "peak_memory_mb", "train_overhead_mb", "s_per_epoch", "s_per_train_epoch", "wall_s",
)  # fmt: skip


def log_benchmark(
    results_json: Path,
    *,
    summary: dict[str, float] | None = None,
    tracking_uri: str | None = None,
    experiment: str = BENCHMARK_EXPERIMENT,
) -> dict[str, Any]:
    """Log one `benchmarks/compare.py` table to MLflow: a parent run, one child run per (method, seed, lr, budget).

    The parent holds the table's settings as params (backbone, task, budget, epochs, device, command, ...), the
    `summary` metrics (e.g. ``test_acc.spt-lora``) and the .json/.md/.png files as artifacts; each child holds its
    row's params (method, seed, lr, budget) and metrics (accuracies, trainable counts, memory, times). Logging the
    same results twice logs nothing new (the parent is tagged with the sha256 of the rows and sensitivity passes,
    so a re-run that only rewrote the header is the same table); a resumed, grown table is a new parent run; a
    failed log marks its parent and children FAILED and the next call logs the table again. Never raises for
    MLflow failures: returns ``status="failed"`` with the error and warns.

    Returns:
        ``status`` ("logged", "exists" or "failed"), ``tracking_uri``, ``experiment_id``, ``run_id`` (the
        parent), ``children`` (child runs logged) and, on failure, ``error``.
    """
    results_json = Path(results_json)
    try:
        state = json.loads(results_json.read_text())
        meta = state["meta"]
        if not isinstance(state["rows"], list):
            raise TypeError("rows is not a list")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise SensituneError(f"{results_json}: not a benchmarks/compare.py results file ({type(e).__name__})") from e
    uri = resolve_uri(tracking_uri)
    # the results, not the file: a re-run that adds no row rewrites meta (date, command) but is the same table
    results = json.dumps({"rows": state["rows"], "sensitivity": state.get("sensitivity", [])}, sort_keys=True)
    sha = hashlib.sha256(results.encode()).hexdigest()
    result: dict[str, Any] = {"status": "logged", "tracking_uri": uri, "run_id": None, "children": 0}
    try:
        check_reachable(uri)
        with mlflow_session(uri) as mlflow:
            client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
            exp_id = result["experiment_id"] = experiment_id(client, experiment, uri)
            done = (f"tags.`sensitune.results_sha256` = '{sha}' and tags.`sensitune.kind` = 'benchmark' "
                    "and attributes.status = 'FINISHED'")  # fmt: skip
            found = client.search_runs([exp_id], done, max_results=1)
            if found:
                return {**result, "status": "exists", "run_id": found[0].info.run_id}
            name = f"{meta['backbone']}@{meta['img_size']} {meta['task']} {meta['budget']}"
            tags = {"sensitune.kind": "benchmark", "sensitune.results": results_json.stem,
                    "sensitune.results_sha256": sha}  # fmt: skip
            parent = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
            result["run_id"] = parent
            try:
                _log_benchmark_runs(client, exp_id, parent, results_json, state, summary or {}, tags, result)
            except Exception:
                with contextlib.suppress(Exception):  # no half-logged table passes for a finished one
                    rows = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent}'", max_results=10000)
                    for run in rows:
                        client.set_terminated(run.info.run_id, "FAILED")
                    client.set_terminated(parent, "FAILED")
                raise
    except Exception as e:  # the committed table is the record; tracking is a copy of it
        result.update(status="failed", error=" ".join(f"{type(e).__name__}: {e}".split())[:500])
        warnings.warn(f"MLflow at {uri} failed for {results_json.name}: {result['error'][:200]}", TrackingWarning,
                      stacklevel=2)  # fmt: skip
    return result


def log_table(results_json: Path) -> dict[str, Any]:
    """`log_benchmark` with the table's headline numbers (`report.summary_metrics`) as the parent's metrics; prints
    the outcome (never raises for MLflow)."""
    res = log_benchmark(results_json, summary=summary_metrics(json.loads(results_json.read_text())))
    print(f"MLflow: {res['status']} {results_json.name} -> {res['tracking_uri']} run {res.get('run_id')} "
          f"({res['children']} row runs){' ' + res['error'] if 'error' in res else ''}")  # fmt: skip
    return res


def _log_benchmark_runs(
    client: Any, exp_id: str, parent: str, results_json: Path, state: dict, summary: dict, tags: dict, result: dict
) -> None:
    from mlflow.entities import Metric, Param, RunTag

    now = int(datetime.now(timezone.utc).timestamp() * 1000)
    params = [Param(k, v[:6000]) for k, v in flatten(state["meta"]).items()]
    metrics = [Metric(k, float(v), now, 0) for k, v in summary.items() if is_number(v)]
    for s in state.get("sensitivity", []):
        if is_number(s.get("seconds")):
            name = "sensitivity_stem_seconds" if s.get("include_stem") else "sensitivity_seconds"  # one per step
            metrics.append(Metric(name, float(s["seconds"]), now, int(s["seed"])))
    for i in range(0, len(params), 100):
        client.log_batch(parent, params=params[i : i + 100])
    client.log_batch(parent, metrics=metrics)
    for suffix in (".json", ".md", ".png"):
        if results_json.with_suffix(suffix).is_file():
            client.log_artifact(parent, str(results_json.with_suffix(suffix)))
    for r in state["rows"]:
        if "error" in r:
            continue
        key = f"{r['method']} seed{r['seed']} lr{r['lr']:g} {r['budget']}"
        child_tags = {**tags, "mlflow.parentRunId": parent, "sensitune.kind": "benchmark-row"}
        child = client.create_run(exp_id, run_name=key, tags=child_tags).info
        client.log_batch(
            child.run_id,
            params=[Param(k, str(r[k])) for k in ("method", "seed", "lr", "budget")],
            metrics=[Metric(k, float(r[k]), now, 0) for k in BENCHMARK_ROW_METRICS if is_number(r.get(k))],
            tags=[RunTag("sensitune.details", json.dumps(r.get("details", {}))[:5000])],
        )
        client.set_terminated(child.run_id, "FINISHED")
        result["children"] += 1
    client.set_terminated(parent, "FINISHED")


def main(argv: list[str] | None = None) -> int:
    """Log each table given (idempotent: a table already logged is reported as "exists"); exit 2 on a file that
    is not a results JSON."""
    ap = argparse.ArgumentParser(description="Log benchmarks/compare.py tables to MLflow (one parent run per table).")
    ap.add_argument("tables", type=Path, nargs="+", help="results/compare_*.json")
    for path in ap.parse_args(argv).tables:
        try:
            log_table(path)
        except (SensituneError, OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            print(f"error: {path}: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
