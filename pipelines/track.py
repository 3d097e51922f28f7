"""`python -m pipelines.track`: the DVC `track` stage; publishes runs/main (`pipelines.publish`: MLflow run,
model registered once, export sealed with the registry version in runs/main/published/) and writes mlflow_run.json.

    python -m pipelines.track                         params.yaml + paths.run -> MLflow (sqlite:///mlflow.db)
    python -m pipelines.track --tracking-uri http://mlflow:5000
    python -m pipelines.track --replay runs/main/mlflow_fallback.json   once the server is back

Exit code 0 whether MLflow was reached or not (a down server is a warning and a fallback file); 2 on bad
input (no params file, train has not run).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from spt_core.portable.errors import SensituneError
from spt_core.portable.io import write_json

from .config import Params, load_params
from .tracking import RECORD_FILE, TrackingWarning, log_run, replay


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.track", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="params.yaml (default: ./params.yaml if present)")
    p.add_argument("--run", dest="run_dir", type=Path, help="run directory (default: paths.run)")
    p.add_argument("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment name (default: publish.experiment)")
    p.add_argument("--model-name", help="registered model name (default: sensitune-<timm model name>)")
    p.add_argument("--no-register", action="store_true", help="log the run without registering the model")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="extra run tag (repeatable)")
    p.add_argument("--replay", type=Path, metavar="FALLBACK_JSON", help="log a saved fallback record instead")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the track stage; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TrackingWarning)
            result = _run(args)
    except SensituneError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    for w in caught:
        if issubclass(w.category, TrackingWarning):
            print(f"warning: {w.message}", file=sys.stderr)
        else:  # not ours: show as Python would
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    print(json.dumps(result, indent=2))
    return 0


def _run(args: argparse.Namespace) -> dict:
    if args.replay is not None:
        # mlflow_run.json is not rewritten: it is the DVC stage's output, and a changed output re-runs the stage
        return replay(args.replay, tracking_uri=args.tracking_uri, register=not args.no_register)
    config = args.config or ("params.yaml" if Path("params.yaml").is_file() else None)
    params = load_params(config)
    if args.experiment:
        params["publish"]["experiment"] = args.experiment
    tags = dict(_tag(t) for t in args.tag)
    return track_stage(params, args.run_dir, tracking_uri=args.tracking_uri, model_name=args.model_name, tags=tags,
                       register=not args.no_register)  # fmt: skip


def track_stage(
    params: Params,
    run_dir: Path | None = None,
    *,
    tracking_uri: str | None = None,
    model_name: str | None = None,
    tags: dict[str, str] | None = None,
    register: bool = True,
) -> dict:
    """The track stage (`pipelines.stages.STAGES`): publish paths.run (or `run_dir`) and write mlflow_run.json.

    ``register=False`` logs the MLflow run only. A down server is a warning and a fallback file, never an error.
    """
    run_dir = Path(run_dir or params["paths"]["run"])
    if not register:
        result = log_run(params, run_dir, tracking_uri=tracking_uri, experiment=params["publish"]["experiment"],
                         register=False, tags=tags or {}, model_name=model_name)  # fmt: skip
    else:
        from .publish import publish  # imports deploy.edge.artifact (torch-free)

        result = publish(params, run_dir, tracking_uri_=tracking_uri, model_name=model_name, tags=tags or {})
    write_json(run_dir / RECORD_FILE, result)
    return result


def _tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SensituneError(f"--tag {text!r}: write KEY=VALUE")
    return key, value


if __name__ == "__main__":
    sys.exit(main())
