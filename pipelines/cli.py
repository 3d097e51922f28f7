"""`sensitune <verb>`: one verb per stage of `pipelines.stages.STAGES`, each one call writing one named output.

    sensitune init DIR   -> DIR/: a new line project (params.yaml, dvc.yaml, git + DVC; --from FOLDER: its images)
    sensitune demo       -> data/raw/<class>/*.png         (synthetic defects on real textures, a line's imbalance)
    sensitune import DIR -> data/raw/<class>/...            (your images, copied in; then `dvc add data/raw`)
    sensitune prepare    -> data/prepared/{train,val,test}/ + dataset.json
    sensitune measure    -> runs/main/sensitivity.safetensors
    sensitune plan       -> runs/main/plan.json (+ .safetensors, plan.png); prints the summary
    sensitune train      -> runs/main/tuned/, metrics.json, history.csv, confusion.png
    sensitune evaluate   -> runs/main/eval.json
    sensitune merge      -> runs/main/merged/
    sensitune merge --from-peft DIR -> runs/main/merged/ from a peft adapter (LoRA, SHiRA, ...; docs/peft.md)
    sensitune predict    -> predictions.csv (class, P(good), decision; any artifact; exit 1 if files failed)
    sensitune export     -> runs/main/export/ (ONNX, OpenVINO FP32/FP16/INT8, manifests)
    sensitune track      -> publish (below) + runs/main/mlflow_run.json: DVC's last stage
    sensitune run        every stage in order up to track
    sensitune publish    -> MLflow model version (once per identical model) + runs/main/published/ (sealed);
                            the aliases move only after the hand-over gate (`pipelines.gate`)
    sensitune registry serve --dir DIR                 a local MLflow registry boxes can pull from; prints its URI
    sensitune registry set challenger|champion V --why "..."   move an alias to an existing version, audited
    sensitune fleet start V --wave box-7 --wave 10% --wave all   roll V out to the boxes in waves, watch, stop

Values come from params.yaml (`--config`, default ./params.yaml when present); `--set section.key=value`
overrides any key, and each verb has flags for its common keys (derived from `pipelines.config`).
Bad input is one line on stderr and exit code 2; `--debug` shows the traceback. A run that `train.below_probe: stop`
ended (no candidate beat the linear probe on validation) is one line ``stopped: ...`` and exit code 3 (train, run,
merge, export), with nothing exported.

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
import warnings
from pathlib import Path
from typing import Any, Literal

from spt_core import __version__
from spt_core.portable.errors import SensituneError

from . import config, stages
from .below_probe import STOP_EXIT, Stopped
from .layout import FILES

# The verbs that are not pipeline stages; every stage of `pipelines.stages.STAGES` is a verb too (`verbs()`).
OTHER_VERBS = {
    "init": "make a new line project in DIR (params.yaml, dvc.yaml, git + DVC); --from FOLDER imports its images",
    "demo": "write a batch of demo defect images",
    "import": "copy your ImageFolder (DIR/<class>/...) into paths.raw and version it with DVC",
    "predict": "predict images or folders to CSV",
    "run": "run every stage in order, up to the ones that track (DVC's track stage, `sensitune publish`)",
    "publish": "register the merged model once and seal its export with the registry version",
    "registry": "serve a registry boxes can pull from, or move an alias (audited)",
    "fleet": "roll a version out to the boxes in waves, watch or stop it, run or serve the fleet decider",
}
_NULL_WORDS = ("none", "null", "all")
DISTRIBUTED_VERBS = ("measure", "train")  # the verbs that run under torchrun


def verbs() -> dict[str, str]:
    """Every verb with its help: init, demo and import, then each stage in the pipeline's order, then the rest."""
    head = ("init", "demo", "import")
    return {**{v: OTHER_VERBS[v] for v in head}, **{s.name: s.help for s in stages.STAGES},
            **{v: t for v, t in OTHER_VERBS.items() if v not in head}}  # fmt: skip


def _flag_type(key: config.Key) -> Any:
    """argparse type of a key's flag: its scalar type; 'none'/'null'/'all' give null where null is allowed."""
    scalars = [t for t in typing.get_args(key.type) if t is not type(None)] or [key.type]

    def parse(text: str) -> Any:  # the first type that reads it: int | Literal["auto"] takes 96 as 96, and auto
        if key.nullable and text.lower() in _NULL_WORDS:
            return None
        for scalar in scalars:
            if typing.get_origin(scalar) is Literal:
                if text in typing.get_args(scalar):
                    return text
                continue
            try:
                return scalar(text)
            except ValueError:
                continue
        raise argparse.ArgumentTypeError(f"{text!r} is not {config._type_name(key.type)}")

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
    for verb, text in verbs().items():
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
        if verb == "merge":
            p.add_argument("--from-peft", type=Path, metavar="DIR", help="merge this peft adapter (save_pretrained's "
                           "folder) into the configured base model instead of run/tuned/ (docs/peft.md)")  # fmt: skip
        if verb == "predict":
            p.add_argument("inputs", nargs="+", type=Path, help="image files or folders")
            p.add_argument("--out", type=Path, default=Path("predictions.csv"), help="CSV to write")
            p.add_argument("--force", action="store_true", help="replace an existing --out")
        if verb == "import":
            p.add_argument("source", type=Path, help="ImageFolder: DIR/<class>/<image files>")
            p.add_argument("--replace", action="store_true", help="replace paths.raw instead of adding to it")
            p.add_argument("--into", action="store_true",
                           help="add classes paths.raw does not hold yet to the ones it does (a merge of datasets)")
            p.add_argument("--link", action="store_true", help="hard-link the files instead of copying them")
            p.add_argument("--no-dvc", action="store_true", help="do not run `dvc add` on paths.raw")
        if verb == "init":
            p.add_argument("dir", type=Path, help="the new project's folder (new or empty)")
            p.add_argument("--from", dest="source", type=Path, help="ImageFolder FOLDER/<class>/... to import at once")
            p.add_argument("--remote", help="DVC default remote (default: the folder DIR-dvc-storage beside DIR)")
        if verb == "run":
            p.add_argument("--no-export", action="store_true", help="stop before the stages that need the merged model")
        if verb in ("publish", "registry"):
            p.add_argument("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
        if verb == "registry":
            _registry_args(p)
        if verb == "fleet":
            from .fleet_cli import add_args

            add_args(p)
    return parser


def _registry_args(p: argparse.ArgumentParser) -> None:
    """`registry serve` and `registry set` (`pipelines.tracking.registry`)."""
    p.add_argument("action", choices=["serve", "set"], help="serve: run a registry; set: move an alias")
    p.add_argument("alias", nargs="?", choices=["challenger", "champion"], help="set: the alias to move")
    p.add_argument("version", nargs="?", help="set: the registered version it points at")
    p.add_argument("--why", help="set: what the move rests on (report, sign-off); recorded in the registry")
    p.add_argument("--dir", type=Path, default=Path("registry"), help="serve: where the database and artifacts live")
    p.add_argument("--host", default="127.0.0.1", help="serve: address to bind (boxes on the network: its address)")
    p.add_argument("--port", type=int, default=5000, help="serve: port")
    p.add_argument("--dry-run", action="store_true", help="serve: print the URI and the command, start nothing")


def _registry(args: argparse.Namespace, params: config.Params) -> int:
    from .tracking import registry, tracking_uri

    if args.action == "serve":
        return registry.serve(args.dir, args.host, args.port, dry_run=args.dry_run)
    if args.alias is None or args.version is None or not args.why:
        raise SensituneError('registry set: give ALIAS VERSION --why "...", e.g. set challenger 4 --why "QA report"')
    name = params["publish"]["model_name"] or f"sensitune-{params['model']['name']}"
    _print(registry.set_alias(tracking_uri(args.tracking_uri), name, args.alias, args.version, args.why))
    return 0


def params_from_args(args: argparse.Namespace) -> config.Params:
    """params.yaml (or the defaults) with `--set` values, then the verb's flags, applied.

    Key flags default to `argparse.SUPPRESS`: a flag not given is absent, one given as 'none' is null.
    """
    here = Path("params.yaml").is_file() and getattr(args, "verb", None) != "init"  # init starts from the defaults
    path = args.config or ("params.yaml" if here else None)
    overrides = dict(config.parse_set(s) for s in args.sets)
    overrides.update({d: v for d, v in vars(args).items() if "." in d})
    return config.load_params(path, overrides)


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _live(params: config.Params) -> Any:
    """Per-epoch MLflow metrics while training, when $MLFLOW_TRACKING_URI names a tracking server or store."""
    import os

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    from .tracking.live import LiveRun

    return LiveRun(params, experiment=params["publish"]["experiment"])


def _run_stage(s: stages.Stage, args: argparse.Namespace, params: config.Params) -> Any:
    """Run stage `s` with the verb's own flags it takes (e.g. evaluate's --split), print its report and warnings."""
    offered = {k: (lambda v=v: v) for k, v in vars(args).items() if "." not in k}
    result = stages.call(s, params, **offered, on_epoch=lambda: _live(params))
    print(s.report(result, params))
    for w in result.get("warnings", []) if isinstance(result, dict) else []:
        print(f"warning: {w}", file=sys.stderr)
    if isinstance(result, dict) and result.get("stopped"):  # train.below_probe: stop: no stage after it runs
        raise Stopped(result["stopped"])
    return result


def _run_verb(args: argparse.Namespace, params: config.Params) -> int:
    verb = args.verb
    if verb in (s.name for s in stages.STAGES):
        _run_stage(stages.stage(verb), args, params)
    elif verb == "demo":
        print(f"wrote {stages.demo_stage(params)}")
    elif verb == "init":
        from .init import init_project

        given = "data.ok_class" in vars(args) or any(config.parse_set(s)[0] == "data.ok_class" for s in args.sets)
        r = init_project(args.dir, params, source=args.source, ok_given=given, remote=args.remote)
        got = f"; imported {r['files']} file(s) of {r['classes']} into data/raw (dvc add)" if r["files"] else ""
        print(f"made {r['dir']}: params.yaml, dvc.yaml, git + DVC (remote {r['remote']}){got}")
        print(f"good class: {r['ok_class']} ({r['ok_from']})" if r["ok_class"] else "good class: not set (null)")
        print(f"next: {r['next']}")
    elif verb == "import":
        from .ingest import import_images

        ok_flag = any(config.parse_set(s)[0] == "data.ok_class" for s in args.sets)
        r = import_images(args.source, params, replace=args.replace, into=args.into, link=args.link,
                          dvc=not args.no_dvc, ok_flag=ok_flag)  # fmt: skip
        print(f"imported {r['files']} file(s) of {r['classes']} into {r['raw']}; {r['next']}")
    elif verb == "predict":
        from .predict import describe

        model = args.model_path or stages.run_dir(params) / FILES["merged"]
        result = stages.predict_stage(model, args.inputs, args.out, force=args.force)
        text, errors = describe(result)
        print(text)
        print("\n".join(errors), file=sys.stderr) if errors else None
        return 1 if result["failed"] else 0
    elif verb == "publish":
        from .publish import publish

        _print(publish(params, tracking_uri_=args.tracking_uri))
    elif verb == "registry":
        return _registry(args, params)
    elif verb == "fleet":
        from .fleet_cli import run as fleet

        return fleet(args, params)
    elif verb == "run":
        if params["data"]["source"] == "raw" and not Path(params["paths"]["raw"]).is_dir():
            stages.demo_stage(params)
        for s in run_order(no_export=args.no_export):
            _run_stage(s, argparse.Namespace(), params)  # run passes no verb flags: each stage's defaults
    return 0


def run_order(no_export: bool = False) -> tuple[stages.Stage, ...]:
    """The stages `sensitune run` runs: every stage in order but those that track (MLflow: DVC's track stage and
    `sensitune publish`), and with `no_export` none that needs the merged model."""
    return tuple(s for s in stages.STAGES if not s.tracks and not (no_export and s.needs_merge))


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


def _one_line_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    """A library's warning as the CLI's one line (``note: ...``), not Python's file, line and source echo."""
    kind = "note" if category is UserWarning else f"warning ({category.__name__})"
    print(f"{kind}: {' '.join(str(message).split())}", file=sys.stderr)


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
        with warnings.catch_warnings():  # restores Python's own display when the verb returns
            if not args.debug:
                warnings.showwarning = _one_line_warning
            code = _run_verb(args, params_from_args(args))
    except Stopped as e:  # a rule's outcome, not bad input
        print(f"stopped: {' '.join(str(e).split())}", file=sys.stderr)
        return STOP_EXIT
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
        from spt_core.api import close_distributed

        close_distributed()
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
