"""Prefect: the `retrain` flow and its nightly deployment (docs/prefect.md).

    python -m pipelines.flows run   [--config params.yaml] [--force] ...   one retrain now
    python -m pipelines.flows serve [--cron "0 2 * * *"] [--timezone UTC]  serve the nightly deployment

One retrain: new images in ``paths.raw``? (content fingerprint vs the state file; nothing new -> done) ->
`dvc add` + `dvc push` (data version = DVC md5) -> prepare -> measure -> plan -> train -> evaluate -> merge ->
export -> publish (`pipelines.publish`: registered once, ``published/`` sealed with the registry version, no alias
moved) -> compare with the ``champion`` on held-out images -> the hand-over gate (`pipelines.gate`, judging the
precision the boxes will serve) -> hand over: alias ``challenger`` and the rollout manifest (or bootstrap the
champion, or "not promoted": no alias moves). An alias moves only after the gate passed, so a box following the
registry never pulls an ungated version. Before it, labelled frames uploaded by the edge boxes are ingested
into ``paths.raw`` (`pipelines.incoming`). "No new data", "Settling", "Stopped" (``train.below_probe: stop``: no
candidate beat the linear probe on validation; no stage after train runs) and "Not promoted" end as named Completed
states with a markdown artifact (`pipelines.flow_hooks.outcome`). With ``export_probe`` the probe is the challenger.

Each attempt works in its own ``<runs_root>/<data version>[.k]/`` (data split, artifacts, params used), so a
failure never touches the champion's files; the state file records a data version only once it is finished.
Two retrains never run at once: the deployment has ``concurrency_limit=1`` (ENQUEUE), and the flow holds a
non-blocking file lock (a second run exits at once, saying so).

Publish seals after registering: the edge refuses an artifact whose manifest ``model_version`` is not the rollout
manifest's (= MLflow's) version, and MLflow assigns that number at registration.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # before prefect is imported
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import yaml  # noqa: E402
from filelock import FileLock, Timeout  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402
from prefect.schedules import Cron  # noqa: E402

from deploy.edge.precision import SERVED, artifact_dir  # noqa: E402
from deploy.edge.registry import CHALLENGER_ALIAS, CHAMPION_ALIAS  # noqa: E402
from deploy.edge.rollout.manifest import CHALLENGER_SHARE  # noqa: E402
from pipelines import flow_hooks, stages, tracking  # noqa: E402
from pipelines import tasks as t  # noqa: E402
from pipelines.config import load_params  # noqa: E402
from pipelines.gate import served_precision  # noqa: E402
from spt_core.portable.errors import SensituneError  # noqa: E402
from spt_core.portable.io import write_json  # noqa: E402

DEFAULT_CRON = "0 2 * * *"  # nightly at 02:00
SETTLE_S = 60.0  # default settle_seconds of `retrain` and `retrain_lines` (challenger_share: CHALLENGER_SHARE)
STATE_FILE, LOCK_FILE, RECORD_FILE = "retrain_state.json", ".retrain.lock", "retrain.json"


def model_name_for(params: dict, model_name: str | None) -> str:
    """The registered model's name: the one given, else ``publish.model_name``, else ``sensitune-<timm model name>``:
    publish's own rule, so that the flow and `dvc repro` (the track stage) register versions of one model."""
    return model_name or params["publish"]["model_name"] or f"sensitune-{params['model']['name']}"


def run_params(params: dict, run_dir: Path) -> dict:
    """The params of one attempt: its own prepared data and artifacts under `run_dir`."""
    p = copy.deepcopy(params)
    p["paths"]["run"], p["paths"]["data"] = str(run_dir), str(run_dir / "data")
    return p


@task(name="detect-new-data", retries=1, retry_delay_seconds=5, timeout_seconds=1800, cache_policy=NO_CACHE)
def detect_new_data(raw: str) -> dict[str, Any]:
    """Fingerprint of the watched folder (cheap: reads the files once, no DVC, no torch)."""
    return t.fingerprint(Path(raw))


@flow(name="retrain", description="Retrain on new defect data; register, compare with the champion, hand over.")
def retrain(
    config: str = "params.yaml",
    runs_root: str = "runs/retrain",
    tracking_uri: str | None = None,
    model_name: str | None = None,
    rollout: str = "rollout.yaml",
    line: str = "line-1",
    challenger_share: float = CHALLENGER_SHARE,
    min_gain: float = 0.0,
    use_dvc: bool = True,
    settle_seconds: float = SETTLE_S,
    force: bool = False,
) -> dict[str, Any]:
    """Retrain when ``paths.raw`` holds data not trained yet; see the module docstring for the steps.

    Args:
        config: params.yaml (paths, data split, model, sensitivity, plan, train, export).
        runs_root: Where attempts, the state file and the lock live.
        tracking_uri: MLflow URI (default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``).
        model_name: Registered model name (default ``sensitune-<timm model name>``).
        rollout: The rollout manifest to hand a better challenger to (created at the first champion).
        line: Production line name written into a newly created manifest.
        challenger_share: Fraction of cameras the handed-over challenger gets.
        min_gain: Margin: hand over only if challenger - champion held-out accuracy >= min_gain (may be < 0).
        use_dvc: Version the data with DVC when a DVC repository is found (else the fingerprint is the version).
        settle_seconds: Skip when a file in the folder changed this recently (a batch still being copied).
        force: Retrain even when the data version was trained already.

    Returns:
        ``status`` (trained | no-new-data | settling | locked) and, when trained, data/model versions, MLflow
        run id, comparison and ``decision`` (bootstrap | handover | not promoted).
    """
    opt = retrain_options(challenger_share, min_gain, use_dvc, settle_seconds, force)
    params = load_params(config)
    uri, name = tracking.tracking_uri(tracking_uri), model_name_for(params, model_name)
    return retrain_once(params, Path(runs_root), uri, name, rollout=rollout, line=line, **opt)


def retrain_options(share: float, min_gain: float, use_dvc: bool, settle_seconds: float, force: bool) -> dict:
    """`retrain_once`'s options, checked (one line's retrain: `retrain`, and each line of `pipelines.lines`)."""
    if not 0.0 <= share <= 1.0 or not -1.0 <= min_gain <= 1.0:
        raise t.RetrainError(f"challenger_share={share}, min_gain={min_gain}: give [0, 1] and [-1, 1]")
    return {"share": share, "min_gain": min_gain, "use_dvc": use_dvc, "settle_seconds": settle_seconds, "force": force}


def retrain_once(params: dict, root: Path, uri: str, name: str, **opt: Any) -> dict[str, Any]:
    """One line's retrain under its lock (`root/.retrain.lock`); `retrain` and each line of `pipelines.lines`."""
    if params["data"]["source"] != "raw":
        raise t.RetrainError(f"data.source={params['data']['source']!r}; retrain watches paths.raw: set raw")
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        get_run_logger().warning("another retrain holds %s: skipping this run", root / LOCK_FILE)
        return {"status": "locked"}
    try:
        return _retrain_locked(params, root, uri, name, **opt)
    finally:
        lock.release()


def _retrain_locked(params: dict, root: Path, uri: str, name: str, **opt: Any) -> dict[str, Any]:
    logger = get_run_logger()
    raw = params["paths"]["raw"]
    state_path = root / STATE_FILE
    state = t.load_state(state_path)
    fed = t.ingest_feedback(uri, raw, str(root / t.INGEST_LEDGER), name)  # labelled frames from the boxes
    fp = detect_new_data(raw)
    done = state["trained"].get(fp["fingerprint"])
    nothing = {"status": "no-new-data", "fingerprint": fp["fingerprint"]}
    if done is not None and not opt["force"]:  # outcome(): a named Completed state + artifact, and the log line
        why = f"no new data in {raw} (data version {done['data_version']} trained in run {done['run_dir']})"
        return t.outcome("No new data", why, {**nothing, "data_version": done["data_version"]})
    age = datetime.now(timezone.utc).timestamp() - fp["newest_mtime"]
    if age < opt["settle_seconds"]:
        why = f"a file in {raw} changed {age:.0f} s ago (< settle_seconds): data still arriving, next run"
        return t.outcome("Settling", why, {"status": "settling", "fingerprint": fp["fingerprint"]})
    ver = t.version_data(raw, fp["fingerprint"], opt["use_dvc"])
    trained = {r["data_version"]: r for r in state["trained"].values()}
    if ver["data_version"] in trained and not opt["force"]:
        state["trained"][fp["fingerprint"]] = trained[ver["data_version"]]  # next time the fingerprint suffices
        t.save_state(state_path, state)
        why = f"data version {ver['data_version']} was trained already"
        return t.outcome("No new data", why, {**nothing, "data_version": ver["data_version"]})

    run_dir = t.new_run_dir(root, ver["data_version"])
    logger.info("new data version %s (%d files): training in %s", ver["data_version"], fp["files"], run_dir)
    p = run_params(params, run_dir)
    (run_dir / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    if ver["dvc_file"]:
        (run_dir / "raw.dvc").write_bytes(Path(ver["dvc_file"]).read_bytes())  # to check this version out later
    # the stage list in its order: first every stage up to the merged model (train: epochs -> logs, MLflow) ...
    results: dict[str, Any] = {}
    for s in (s for s in stages.STAGES if not s.needs_merge):
        results[s.name] = r = t.run_stage(s.name, p, uri)
        if isinstance(r, dict) and r.get("stopped"):  # train.below_probe: stop: no model, nothing after train
            done = {"status": "stopped", "decision": t.NOT_PROMOTED, "reason": r["stopped"], "run_dir": str(run_dir)}
            return t.outcome("Stopped", r["stopped"], {**done, "data_version": ver["data_version"]})
    metrics = results["train"]
    skipped = stages.merge_skipped(p)
    if skipped is not None:  # e.g. an adapter plan: nothing the edge could serve
        logger.warning("nothing to hand over: %s", skipped)
        return {
            "status": "trained",
            "decision": t.NOT_PROMOTED,
            "reason": skipped,
            "data_version": ver["data_version"],
            "run_dir": str(run_dir),
            "test_acc": metrics.get("test_acc"),
        }

    before = t.registry_aliases(uri, name)
    tags = {
        "prefect.flow_run_id": str(flow_run.id),
        "prefect.flow_run_name": str(flow_run.name),
        "retrain.data_version": ver["data_version"],
    }
    try:  # from registration on, a failure must leave the aliases as they were (the manifest is written last)
        for s in (s for s in stages.STAGES if s.needs_merge):  # ... then the rest: export, and track as publish_run
            if s.tracks:  # register once, seal published/ with its version; no alias moves before the gate below
                reg = t.publish_run(p, str(run_dir), uri, name, tags)
            else:
                results[s.name] = t.run_stage(s.name, p, uri)
        report = results["export"]
        version = str(reg["model_version"])
        export_dir = run_dir / "published"
        champ = before[CHAMPION_ALIAS]
        champ_rec = next(
            (r for r in state["trained"].values() if (r.get("model_name"), r["model_version"]) == (name, champ)), None
        )
        champ_run = Path(champ_rec["run_dir"]) if champ_rec else None
        cmp = t.compare_champion(
            uri, name, version, champ, p["paths"]["data"], str(champ_run / "data") if champ_run else None
        )
        served, served_why = served_precision(report, p["publish"]["precision"])  # what the boxes will pull
        decision, reason = t.handover_gate(
            cmp["challenger_acc"], cmp["champion_acc"], opt["min_gain"], served is not None, metrics.get("warnings"),
            (cmp["challenger"], cmp["champion"]), served_why=served_why,
        )  # fmt: skip
        if version in (champ, before[CHALLENGER_ALIAS]):  # publish found this very model registered already
            decision, reason = t.NOT_PROMOTED, f"identical to v{version} (same plan hash, data version, params)"
        moved = t.hand_over(
            decision,
            manifest=opt["rollout"],
            uri=uri,
            model_name=name,
            version=version,
            artifact=str(artifact_dir(export_dir, served or SERVED)),
            champion_artifact=str(artifact_dir(champ_run / "export", SERVED)) if champ_run else None,
            share=opt["share"],
            line=opt["line"],
            prev_challenger=before[CHALLENGER_ALIAS],
        )
    except BaseException:
        _restore(uri, name, before[CHALLENGER_ALIAS], logger)
        raise
    decision = moved["decision"]
    logger.info("v%s: %s (%s)", version, decision, reason)
    if moved["note"]:
        logger.info("hand-over: %s", moved["note"])
    extra = {"heldout_acc": cmp["challenger_acc"], "champion_heldout_acc": cmp["champion_acc"]}
    logged = t.log_extra(
        uri,
        reg["run_id"],
        metrics=extra,
        tags={"retrain.decision": decision, "retrain.reason": reason, "retrain.gate_split": cmp["gate_split"]},
        export_dir=None,  # publish logged the sealed export once
        return_state=True,
    )
    if not logged.is_completed():  # the hand-over happened: missing run metadata must not make it look failed
        logger.warning("could not add export/comparison to MLflow run %s: %s", reg["run_id"], logged.message)

    record = {
        "status": "trained",
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": fp["fingerprint"],
        "data_version": ver["data_version"],
        "dvc": ver["dvc"],
        "run_dir": str(run_dir),
        "mlflow_run_id": reg["run_id"],
        "model_name": name,
        "model_version": version,
        "test_acc": metrics.get("test_acc"),
        "model": metrics.get("model"),  # probe: no candidate beat the linear probe (train.below_probe: export_probe)
        "gate_split": cmp["gate_split"],  # the gate decided on these images: test_acc is gate-selected
        "device": metrics.get("device"),  # cuda when the machine has one (train.device: auto)
        "comparison": cmp,
        "decision": decision,
        "reason": reason,
        "handover": moved,
        "prefect_flow_run_id": str(flow_run.id),
        "ingested": fed,
        "publish": {k: reg.get(k) for k in ("status", "registered", "identity")},
    }
    write_json(run_dir / RECORD_FILE, record)
    state["trained"][fp["fingerprint"]] = {
        k: record[k]
        for k in ("data_version", "run_dir", "model_name", "model_version", "mlflow_run_id", "decision", "finished")
    }
    t.save_state(state_path, state)
    _link_prefect(record, logger)
    if decision == t.NOT_PROMOTED:
        return t.outcome("Not promoted", f"v{version}: {reason}", record)
    return record


def _restore(uri: str, name: str, version: str | None, logger: Any) -> None:
    try:
        t.restore_challenger(uri, name, version)
    except Exception as e:  # the original failure is what matters; this one is only logged
        logger.error("could not restore %s@%s to %s: %s", name, CHALLENGER_ALIAS, version, e)


def _link_prefect(record: dict[str, Any], logger: Any) -> None:
    """MLflow run id and model version onto the Prefect flow run: a markdown artifact and run tags."""
    rows = ["data_version", "run_dir", "mlflow_run_id", "model_name", "model_version", "test_acc", "decision"]
    md = "| | |\n|---|---|\n" + "".join(f"| {k} | `{record[k]}` |\n" for k in rows)
    md += f"\n{record['reason']}\n"
    create_markdown_artifact(md, key="retrain-summary", description=f"retrain of {record['data_version']}")
    try:
        from prefect import get_client

        with get_client(sync_client=True) as client:
            run = client.read_flow_run(flow_run.id)
            extra = [f"mlflow-run:{record['mlflow_run_id']}", f"model-version:{record['model_version']}"]
            client.update_flow_run(flow_run.id, tags=sorted({*run.tags, *extra}))
    except Exception as e:  # tags are a convenience; the artifact already holds the link
        logger.warning("could not tag the flow run: %s", e)


# --------------------------------------------------------------------------------------------- deployment
def build_deployment(
    name: str = "nightly",
    cron: str = DEFAULT_CRON,
    timezone: str = "UTC",
    parameters: dict[str, Any] | None = None,
    collision: str = "ENQUEUE",
) -> Any:
    """The scheduled deployment of `retrain`: cron schedule, at most one run at a time.

    Args:
        name: Deployment name (``retrain/<name>``).
        cron: Cron schedule, e.g. ``"0 2 * * *"`` (02:00 daily).
        timezone: IANA time zone the cron is read in (e.g. the factory's ``"Europe/Berlin"``).
        parameters: Flow parameters for scheduled runs (defaults of `retrain` otherwise).
        collision: ``ENQUEUE`` (a run arriving during another waits) or ``CANCEL_NEW``.

    Returns:
        A `prefect.deployments.runner.RunnerDeployment`, for `prefect.serve`.
    """
    if collision not in ConcurrencyLimitStrategy.__members__:
        raise SensituneError(f"collision={collision!r}: use ENQUEUE or CANCEL_NEW")
    return retrain.to_deployment(
        name=name,
        schedules=[Cron(cron, timezone=timezone)],
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy[collision]),
        parameters=parameters or {},
        tags=["sensitune", "retrain"],
        description=f"Retrain on new data in paths.raw, {cron} ({timezone}); one run at a time.",
    )


def _parser() -> argparse.ArgumentParser:
    """`run` and `serve` options, derived from `retrain`'s own signature and docstring (one definition)."""
    p = argparse.ArgumentParser(prog="python -m pipelines.flows", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    run, serve = sub.add_parser("run", help="one retrain now"), sub.add_parser("serve", help="serve the deployment")
    flow_hooks.add_flags(run, retrain.fn)
    flow_hooks.add_flags(serve, retrain.fn, skip=RUN_ONLY)
    run.set_defaults(settle_seconds=0.0)  # asked for now: the data is there (a schedule waits for settling)
    serve.add_argument("--name", default="nightly")
    serve.add_argument("--cron", default=DEFAULT_CRON)
    serve.add_argument("--timezone", default="UTC")
    serve.add_argument("--collision", default="ENQUEUE", choices=list(ConcurrencyLimitStrategy.__members__))
    return p


RUN_ONLY = ("force", "settle_seconds")  # a scheduled deployment keeps their defaults


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.flows run|serve`; returns the exit code (2 on bad input)."""
    a = _parser().parse_args(argv)
    names = inspect.signature(retrain.fn).parameters
    kw = {k: v for k, v in vars(a).items() if k in names}
    try:
        if a.cmd == "run":
            result = retrain(**kw)
            print(
                f"retrain: {result.get('outcome', result['status'])}"
                + (f", {result['decision']}" if "decision" in result else "")
            )
        else:
            flow_hooks.serve_deployment(
                build_deployment(
                    a.name, a.cron, a.timezone, {k: v for k, v in kw.items() if v is not None}, a.collision
                )
            )
    except SensituneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
