"""`sensitune <verb>`: one verb per stage, each one call into `pipelines.stages` writing one named output.

    sensitune demo       -> data/raw/<class>/*.png         (synthetic defects on real textures, a line's imbalance)
    sensitune import DIR -> data/raw/<class>/...            (your images, copied in; then `dvc add data/raw`)
    sensitune prepare    -> data/prepared/{train,val,test}/ + dataset.json
    sensitune measure    -> runs/main/sensitivity.safetensors
    sensitune plan       -> runs/main/plan.json (+ .safetensors, plan.png); prints the summary
    sensitune train      -> runs/main/tuned/, metrics.json, history.csv, confusion.png
    sensitune evaluate   -> runs/main/eval.json
    sensitune merge      -> runs/main/merged/
    sensitune predict    -> predictions.csv (class, P(good), decision; any artifact; exit 1 if files failed)
    sensitune export     -> runs/main/export/ (ONNX, OpenVINO FP32/FP16/INT8, manifests)
    sensitune run        every stage in order
    sensitune publish    -> MLflow model version (once per identical model) + runs/main/published/ (sealed)

Values come from params.yaml (`--config`, default ./params.yaml when present); `--set section.key=value`
overrides any key, and each verb has flags for its common keys (derived from `pipelines.config`).
Bad input is one line on stderr and exit code 2; `--debug` shows the traceback.

`measure` and `train` also run data-parallel (docs/scaling.md): `sensitune train --nproc 4` launches
`torchrun --standalone --nproc-per-node 4 -m pipelines.cli -- train ...` (one process per GPU; gloo on CPU), or
run that torchrun line yourself (multi-node: `--nnodes`, `--rdzv-endpoint`). Rank 0 alone writes and prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

from spt_core import __version__
from spt_core.portable.errors import SensituneError

from . import config
from .layout import FILES

VERBS = {
    "demo": "write a batch of demo defect images",
    "import": "copy your ImageFolder (DIR/<class>/...) into paths.raw and version it with DVC",
    "prepare": "split a source into train/val/test",
    "measure": "measure parameter sensitivity",
    "plan": "allocate the trainable budget",
    "train": "train the plan (validation-selected)",
    "evaluate": "evaluate on a split",
    "merge": "fold the tuners into the backbone",
    "predict": "predict images or folders to CSV",
    "export": "export ONNX/OpenVINO artifacts",
    "run": "run every stage in order",
    "publish": "register the merged model once and seal its export with the registry version",
}
_NULL_WORDS = ("none", "null", "all")
DISTRIBUTED_VERBS = ("measure", "train")  # the verbs that run under torchrun


def _flag_type(key: config.Key) -> Any:
    """argparse type of a key's flag: its scalar type; 'none'/'null'/'all' give null where null is allowed."""
    scalar = next((t for t in typing.get_args(key.type) if t is not type(None)), key.type)

    def parse(text: str) -> Any:
        if key.nullable and text.lower() in _NULL_WORDS:
            return None
        try:
            return scalar(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {config._type_name(key.type)}") from None

    parse.__name__ = key.dotted
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sensitune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"sensitune {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="params.yaml (default: ./params.yaml if present)")
    for key in ("run", "data", "raw"):
        common.add_argument(f"--{key}", dest=f"paths.{key}", default=argparse.SUPPRESS, help=f"paths.{key}")
    common.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any params.yaml key (repeatable; the value is YAML)")  # fmt: skip
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument("-q", "--quiet", action="store_true", help="less logging")
    sub = parser.add_subparsers(dest="verb", required=True)
    all_keys = config.keys()
    for verb, text in VERBS.items():
        p = sub.add_parser(verb, parents=[common], help=text, description=text)
        for key in (k for k in all_keys if verb in k.verbs):
            if key.type is bool:
                p.add_argument(key.flag, dest=key.dotted, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=key.help)  # fmt: skip
            else:
                # no argparse `choices`: config.validate reports a bad value in the one-line error format
                p.add_argument(key.flag, dest=key.dotted, type=_flag_type(key), help=key.help,
                               default=argparse.SUPPRESS)  # fmt: skip
        if verb in DISTRIBUTED_VERBS:
            p.add_argument("--nproc", type=int, default=None, metavar="N",
                           help="run on N processes (one per GPU) through torchrun --standalone")  # fmt: skip
        if verb in ("evaluate", "predict"):
            p.add_argument(
                "--model-path",
                type=Path,
                help="tuned-weights dir or merged .safetensors"
                + ("; predict also: export dir, OpenVINO dir/model.xml, model.onnx" if verb == "predict" else ""),
            )
        if verb == "evaluate":
            p.add_argument("--split", default="test", choices=["train", "val", "test"])
        if verb == "predict":
            p.add_argument("inputs", nargs="+", type=Path, help="image files or folders")
            p.add_argument("--out", type=Path, default=Path("predictions.csv"), help="CSV to write")
            p.add_argument("--force", action="store_true", help="replace an existing --out")
        if verb == "import":
            p.add_argument("source", type=Path, help="ImageFolder: DIR/<class>/<image files>")
            p.add_argument("--replace", action="store_true", help="replace paths.raw instead of adding to it")
            p.add_argument("--link", action="store_true", help="hard-link the files instead of copying them")
            p.add_argument("--no-dvc", action="store_true", help="do not run `dvc add` on paths.raw")
        if verb == "run":
            p.add_argument("--no-export", action="store_true", help="stop after merge")
        if verb == "publish":
            p.add_argument("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    return parser


def params_from_args(args: argparse.Namespace) -> config.Params:
    """params.yaml (or the defaults) with `--set` values, then the verb's flags, applied.

    Key flags default to `argparse.SUPPRESS`: a flag not given is absent, one given as 'none' is null.
    """
    path = args.config or ("params.yaml" if Path("params.yaml").is_file() else None)
    overrides = dict(config.parse_set(s) for s in args.sets)
    overrides.update({d: v for d, v in vars(args).items() if "." in d})
    return config.load_params(path, overrides)


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _summary(metrics: dict) -> dict:
    keys = ("test_acc", "test_balanced_acc", "escape_rate", "overkill", "threshold", "val_acc", "val_score",
            "probe_val_score", "probe_test_acc", "trainable", "best_epoch", "below_probe")  # fmt: skip
    out = {k: metrics.get(k) for k in keys}
    if metrics.get("ladder"):  # plan.budget: auto
        out["budget_chosen"] = metrics["budget_chosen"]
        out["ladder_val_score"] = {r["budget"]: round(r["val_score"], 4) for r in metrics["ladder"]}
    return out


def _report_train(metrics: dict) -> None:
    from .assess import summary_line

    _print(_summary(metrics))
    print(summary_line(metrics))
    for w in metrics.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)


def _live(params: config.Params) -> Any:
    """Per-epoch MLflow metrics while training, when $MLFLOW_TRACKING_URI names a tracking server or store."""
    import os

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    from .tracking.live import LiveRun

    return LiveRun(params, experiment=params["publish"]["experiment"])


def _run_verb(args: argparse.Namespace, params: config.Params) -> int:
    from . import stages

    verb = args.verb
    if verb == "demo":
        print(f"wrote {stages.demo_stage(params)}")
    elif verb == "prepare":
        info = stages.prepare_stage(params)
        print(f"prepared {params['paths']['data']}: {json.dumps(info['counts'])} (hash {info['data_hash'][:12]})")
    elif verb == "measure":
        s = stages.measure_stage(params)
        print(f"sensitivity of {len(s.candidates)} candidates in {s.meta['seconds']}s -> {params['paths']['run']}")
    elif verb == "plan":
        print(stages.plan_stage(params).summary())
    elif verb == "import":
        from .ingest import import_images

        r = import_images(args.source, params, replace=args.replace, link=args.link, dvc=not args.no_dvc)
        print(f"imported {r['files']} file(s) of {r['classes']} into {r['raw']}; {r['next']}")
    elif verb == "train":
        _report_train(stages.train_stage(params, on_epoch=_live(params)))
    elif verb == "evaluate":
        r = stages.evaluate_stage(params, args.model_path, args.split)
        print(f"{args.split} accuracy {r['accuracy']:.4f} on {r['n']} images")
    elif verb == "merge":
        r = stages.merge_stage(params)
        print(f"merge skipped: {r['skipped']}" if "skipped" in r else
              f"merged; max |merged - tuned| on val images = {r['merge_max_abs_diff']:.2e}")  # fmt: skip
    elif verb == "predict":
        from .predict import describe

        model = args.model_path or stages.run_dir(params) / FILES["merged"]
        result = stages.predict_stage(model, args.inputs, args.out, force=args.force)
        text, errors = describe(result)
        print(text)
        print("\n".join(errors), file=sys.stderr) if errors else None
        return 1 if result["failed"] else 0
    elif verb == "export":
        _print(stages.export_stage(params))
    elif verb == "publish":
        from .publish import publish

        _print(publish(params, tracking_uri_=args.tracking_uri))
    elif verb == "run":
        if params["data"]["source"] == "raw" and not Path(params["paths"]["raw"]).is_dir():
            stages.demo_stage(params)
        metrics: dict = {}
        for s in stages.stages_until("merge" if args.no_export else "export"):
            result = stages.train_stage(params, on_epoch=_live(params)) if s.name == "train" else s.run(params)
            if s.name == "plan":
                print(result.summary())
            elif s.name == "train":
                metrics = result
            elif s.name in ("merge", "export") and "skipped" in result:
                print(f"{s.name} skipped: {result['skipped']}")
        _report_train(metrics)
    return 0


def torchrun_command(argv: list[str], nproc: int) -> list[str]:
    """The torchrun line `--nproc N` stands for: this CLI with the same arguments, N processes on this machine."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [*run, "-m", "pipelines.cli", "--", *rest]  # "--": torchrun would take --run as its --run-path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    rank, size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    quiet = args.quiet or rank != 0
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    nproc = getattr(args, "nproc", None)
    if nproc is not None and nproc < 1:
        print(f"error: --nproc {nproc}: give 1 or more processes", file=sys.stderr)
        return 2
    if nproc is not None and nproc > 1 and size == 1:
        return subprocess.call(torchrun_command(argv, nproc))
    if size > 1 and args.verb not in DISTRIBUTED_VERBS:
        print(f"error: `{args.verb}` runs in one process; only {', '.join(DISTRIBUTED_VERBS)} run under torchrun",
              file=sys.stderr)  # fmt: skip
        return 2
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - rank 0 alone reports
    try:
        code = _run_verb(args, params_from_args(args))
    except SensituneError as e:
        if args.debug:
            raise
        msg = " ".join(str(e).split("\n"))
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume training", file=sys.stderr)
        return 130
    if size > 1:
        from spt_core.distributed import close

        close()
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
