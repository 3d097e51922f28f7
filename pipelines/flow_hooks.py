"""What the retrain flow gained for the flywheel (issue 14), kept beside `pipelines.tasks`: ingesting the boxes'
labelled frames, publishing (register once + seal), per-epoch progress, and named outcomes.

    ingest_feedback   MLflow server's incoming/ -> paths.raw/<label>/fb-<sha>.png (ledger: runs_root/ingested.jsonl)
    publish_run       `pipelines.publish.publish` as a retried task; a fallback (server down) is a failure here
    epoch_reporter    fit's on_epoch: one log line per epoch in the flow run + live MLflow metrics
    outcome           a Completed state with a name ("No new data", "Settling", "Not promoted"), its message and
                      a markdown artifact, so that the UI and `--watch` show why a run did nothing
    serve_deployment  `prefect.serve` that a SIGTERM ends even when the Prefect server is gone
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import os
import re
import threading
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from spt_core.portable.errors import SensituneError

INGEST_LEDGER = "ingested.jsonl"
SHUTDOWN_GRACE_S = 5.0  # after SIGTERM, Prefect's graceful shutdown (pause the schedule on the server) gets this long
log = logging.getLogger(__name__)


@task(name="ingest-feedback", retries=2, retry_delay_seconds=10, timeout_seconds=1800, cache_policy=NO_CACHE)
def ingest_feedback(uri: str, raw: str, ledger: str, model_name: str) -> dict[str, Any] | None:
    """Labelled frames uploaded by the boxes -> new images in paths.raw (only with an HTTP MLflow server)."""
    if not uri.startswith(("http://", "https://")):
        return None
    from .incoming import ingest_incoming

    out = ingest_incoming(uri, raw, ledger, model_name)
    logger = get_run_logger()
    logger.info("ingested %d labelled frame(s) from the edge into %s: %s", out["added"], raw, out["by_label"])
    for why in out["skipped"]:
        logger.warning("not ingested: %s", why)
    return {k: out[k] for k in ("added", "by_label", "skipped")}


@task(name="publish", retries=3, retry_delay_seconds=[10, 30, 90], timeout_seconds=1800, cache_policy=NO_CACHE)
def publish_run(params: dict, run_dir: str, uri: str, model_name: str, tags: dict[str, str]) -> dict[str, Any]:
    """Register the merged model once and seal run/published/ with that version; no alias moves here: the flow's
    hand-over gate moves them (`pipelines.tasks.hand_over`), after it has passed."""
    from pathlib import Path

    from .publish import publish

    result = publish(params, Path(run_dir), tracking_uri_=uri, model_name=model_name, tags=tags, gate=False)
    if result["status"] not in ("published", "identical"):
        raise SensituneError(f"MLflow at {uri} did not register the model ({result.get('error')}); check the server")
    if result["status"] == "identical":
        get_run_logger().warning("identical to %s v%s: not registered again", model_name, result["model_version"])
    return result


def epoch_reporter(params: dict, uri: str | None) -> Any:
    """An on_epoch callback: a log line in the flow run, and the epoch's metrics in MLflow as it ends."""
    from .tracking.live import LiveRun

    live = LiveRun(params, tracking_uri=uri) if uri else None
    logger, epochs = get_run_logger(), params["train"]["epochs"]

    def report(rec: dict[str, Any]) -> None:
        logger.info(
            "epoch %d/%d: train_loss %.4f, val_acc %.4f (best %.4f at epoch %d), %.1f s",
            rec["epoch"], epochs, rec["train_loss"], rec["val_acc"], rec["best_val_acc"], rec["best_epoch"],
            rec["seconds"],
        )  # fmt: skip
        if live is not None:
            live(rec)

    return report


def outcome(name: str, message: str, result: dict[str, Any]) -> Completed:
    """The flow's visible outcome: Completed named `name` with `message`, plus a markdown artifact."""
    get_run_logger().info("%s: %s", name, message)
    rows = "".join(f"| {k} | `{v}` |\n" for k, v in result.items() if not isinstance(v, (dict, list)))
    create_markdown_artifact(f"## {name}\n\n{message}\n\n| | |\n|---|---|\n{rows}", key="retrain-outcome",
                             description=f"retrain: {name}")  # fmt: skip
    return Completed(name=name, message=message, data={**result, "outcome": name})


def add_flags(parser: argparse.ArgumentParser, fn: Any, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per parameter of `fn` (a flow's function), typed by its default, helped by its docstring."""
    helps = _arg_helps(fn.__doc__ or "")
    for name, param in inspect.signature(fn).parameters.items():
        if name in skip:
            continue
        flag, default = "--" + name.replace("_", "-"), param.default
        if isinstance(default, bool):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=default,
                                help=helps.get(name))  # fmt: skip
        else:
            kind = float if isinstance(default, float) else str
            parser.add_argument(flag, dest=name, type=kind, default=default, help=helps.get(name))


def _arg_helps(doc: str) -> dict[str, str]:
    """``name: text`` lines of a Google-style ``Args:`` section (continuation lines joined)."""
    helps: dict[str, str] = {}
    body = doc.split("Args:", 1)[-1].split("Returns:", 1)[0]
    last = None
    for line in body.splitlines():
        m = re.match(r"\s{8}(\w+): (.*)", line)
        if m:
            last, helps[m[1]] = m[1], m[2]
        elif last and line.strip():
            helps[last] += " " + line.strip()
    return {k: v.replace("%", "%%") for k, v in helps.items()}


def serve_deployment(deployment: Any, grace_s: float = SHUTDOWN_GRACE_S) -> None:
    """Serve one deployment until SIGTERM or Ctrl-C, as `prefect.serve` does, except that SIGTERM always ends it.

    Prefect's own SIGTERM handler pauses the deployment's schedule on the server before it returns, and its client
    retries an unreachable server for minutes: a service manager's stop would hang. Here that graceful shutdown
    gets ``grace_s`` seconds; then the process exits with 143 (128 + SIGTERM), the schedule left as it was."""
    from prefect.exceptions import TerminationSignal
    from prefect.runner import Runner

    runner = Runner(pause_on_shutdown=True)
    runner.add_deployment(deployment)
    graceful = runner.handle_sigterm

    def give_up() -> None:
        log.warning("SIGTERM: shutdown not done after %.0f s (Prefect server unreachable?); exiting now", grace_s)
        logging.shutdown()
        os._exit(143)

    def on_sigterm(*args: Any) -> None:
        timer = threading.Timer(grace_s, give_up)
        timer.daemon = True  # a clean shutdown in time ends the process without it; a hung one meets it
        timer.start()
        graceful(*args)

    runner.handle_sigterm = on_sigterm  # `Runner.start` installs `self.handle_sigterm` as the SIGTERM handler
    print(f"serving {deployment.flow_name}/{deployment.name}; stop with Ctrl-C or SIGTERM", flush=True)
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal):
        pass
