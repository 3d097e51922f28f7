"""`sensitune <verb>`: one verb per stage, each one library call writing one named output.

    sensitune demo       -> data/raw/<class>/*.png         (synthetic defects on real textures)
    sensitune prepare    -> data/prepared/{train,val,test}/ + dataset.json
    sensitune measure    -> runs/main/sensitivity.safetensors
    sensitune plan       -> runs/main/plan.json (+ .safetensors, plan.png); prints the summary
    sensitune train      -> runs/main/adapter/, metrics.json, history.csv
    sensitune evaluate   -> runs/main/eval.json
    sensitune merge      -> runs/main/merged.safetensors
    sensitune predict    -> predictions.csv
    sensitune export     -> runs/main/export/ (ONNX, OpenVINO FP32/FP16/INT8, manifests)
    sensitune run        all of the above in order

Values come from params.yaml (`--config`, default ./params.yaml when present); flags override single keys.
Bad input is one line on stderr and exit code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .config import load_params, override
from .errors import SensituneError


class _Null:
    """A flag given as 'none'/'all': set the key to null (None itself means "flag not given")."""


NULL = _Null()


def _opt_int(s: str) -> int | _Null:
    return NULL if s.lower() in ("none", "all", "null") else int(s)


# verb -> [(flag, section, key, type, help)]
FLAGS: dict[str, list[tuple[str, str, str, Any, str]]] = {
    "demo": [
        ("--n-per-class", "demo", "n_per_class", int, "images per class"),
        ("--size", "demo", "size", int, "image side in pixels"),
        ("--seed", "demo", "seed", int, "generator seed"),
        ("--batch", "demo", "batch", int, "data batch number (new batches = new defect data)"),
    ],
    "prepare": [
        ("--source", "data", "source", str, "raw | demo-defects | digits | fashion-mnist | DIR | CSV/JSONL | VTAB dir"),
        ("--n-train", "data", "n_train", _opt_int, "train images (class-balanced; 'all')"),
        ("--n-val", "data", "n_val", _opt_int, "validation images"),
        ("--n-test", "data", "n_test", _opt_int, "test images ('all' = the rest)"),
        ("--seed", "data", "seed", int, "subset seed"),
        ("--image-size", "data", "image_size", _opt_int, "resize images on disk (default: keep)"),
    ],
    "measure": [
        ("--model", "model", "name", str, "timm model name"),
        ("--weights", "model", "weights", str, "embedded | hub | none | PATH (.safetensors/.pth/.bin)"),
        ("--img-size", "model", "img_size", _opt_int, "input size"),
        ("--batches", "sensitivity", "batches", int, "mini-batches to measure (SPT: 16)"),
        ("--batch-size", "sensitivity", "batch_size", int, "images per batch (SPT: 32)"),
        ("--head", "sensitivity", "head", str, "random (SPT) | probe (fit the head first)"),
        ("--device", "sensitivity", "device", str, "auto | cpu | cuda"),
    ],
    "plan": [
        ("--budget", "plan", "budget", str, "trainable values: 400000, 0.4M, 400k or 0.5%%"),
        ("--structured", "plan", "structured", str, "lora | adapter | none (sparse only)"),
        ("--rank", "plan", "rank", int, "LoRA rank / adapter width"),
        ("--alpha", "plan", "alpha", float, "structured when >= module params/alpha entries selected"),
        ("--beta", "plan", "beta", float, "vector trained whole when >= 1/beta selected"),
    ],
    "train": [
        ("--epochs", "train", "epochs", int, "epochs"),
        ("--lr", "train", "lr", float, "peak learning rate"),
        ("--batch-size", "train", "batch_size", int, "batch size"),
        ("--warmup-epochs", "train", "warmup_epochs", int, "linear warm-up epochs"),
        ("--weight-decay", "train", "weight_decay", float, "AdamW weight decay (not on 1-D values)"),
        ("--seed", "train", "seed", int, "seed"),
        ("--device", "train", "device", str, "auto | cpu | cuda"),
        ("--head-init", "train", "head_init", str, "random | probe"),
    ],
    "export": [
        ("--calibration-size", "export", "calibration_size", int, "INT8 calibration images"),
        ("--int8-max-drop", "export", "int8_max_drop", float, "max INT8 accuracy loss in points"),
        ("--model-version", "export", "model_version", str, "version label of the artifacts (auto = plan hash)"),
    ],
}
_RUN_FLAGS = ("--model", "--weights", "--img-size", "--batches", "--head", "--budget", "--structured", "--rank",
              "--epochs", "--lr", "--head-init")  # fmt: skip
FLAGS["run"] = [f for verb in ("measure", "plan", "train") for f in FLAGS[verb] if f[0] in _RUN_FLAGS]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sensitune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"sensitune {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="params.yaml (default: ./params.yaml if present)")
    common.add_argument("--run", dest="paths_run", help="run directory (paths.run)")
    common.add_argument("--data", dest="paths_data", help="prepared data directory (paths.data)")
    common.add_argument("--raw", dest="paths_raw", help="incoming images directory (paths.raw)")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    common.add_argument("-q", "--quiet", action="store_true", help="less logging")
    sub = parser.add_subparsers(dest="verb", required=True)
    helps = {
        "demo": "write a batch of demo defect images",
        "prepare": "split a source into train/val/test",
        "measure": "measure parameter sensitivity",
        "plan": "allocate the trainable budget",
        "train": "train the plan (validation-selected)",
        "evaluate": "evaluate on a split",
        "merge": "fold the tuners into the backbone",
        "predict": "predict images or folders to CSV",
        "export": "export ONNX/OpenVINO artifacts",
        "run": "run every stage in order",
    }
    for verb, text in helps.items():
        p = sub.add_parser(verb, parents=[common], help=text, description=text)
        for flag, section, key, typ, h in FLAGS.get(verb, []):
            p.add_argument(flag, dest=f"{section}.{key}", type=typ, help=h)
        if verb == "prepare":
            p.add_argument("--skip-bad", dest="data.skip_bad", action="store_true", default=None, help="skip bad files")
        if verb == "train" or verb == "run":
            p.add_argument("--no-probe-baseline", dest="train.probe_baseline", action="store_false", default=None)
        if verb == "evaluate":
            p.add_argument("--model-path", type=Path, help="adapter dir or merged .safetensors (default: the run's)")
            p.add_argument("--split", default="test", choices=["train", "val", "test"])
        if verb == "predict":
            p.add_argument("inputs", nargs="+", type=Path, help="image files or folders")
            p.add_argument("--model-path", type=Path, help="adapter dir or merged .safetensors (default: merged)")
            p.add_argument("--out", type=Path, default=Path("predictions.csv"), help="CSV to write")
        if verb == "export":
            p.add_argument("--precisions", nargs="+", dest="export.precisions", choices=["fp32", "fp16", "int8"])
        if verb == "run":
            p.add_argument("--no-export", action="store_true", help="stop after merge")
    return parser


def _params(args: argparse.Namespace) -> dict:
    config = args.config or ("params.yaml" if Path("params.yaml").is_file() else None)
    params = load_params(config)
    override(params, "paths", run=args.paths_run, data=args.paths_data, raw=args.paths_raw)
    for dest, value in vars(args).items():
        if "." in dest and value is not None:
            section, key = dest.split(".", 1)
            params[section][key] = None if value is NULL else value
    return params


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _run_verb(args: argparse.Namespace, params: dict) -> None:
    from . import stages

    verb = args.verb
    if verb == "demo":
        print(f"wrote {stages.demo(params)}")
    elif verb == "prepare":
        info = stages.prepare_data(params)
        print(f"prepared {params['paths']['data']}: {json.dumps(info['counts'])} (hash {info['data_hash'][:12]})")
    elif verb == "measure":
        s = stages.measure(params)
        print(f"sensitivity of {len(s.candidates)} candidates in {s.meta['seconds']}s -> {params['paths']['run']}")
    elif verb == "plan":
        print(stages.make_plan(params).summary())
    elif verb == "train":
        m = stages.train(params)
        _print({k: m.get(k) for k in ("test_acc", "val_acc", "probe_test_acc", "trainable", "best_epoch")})
    elif verb == "evaluate":
        r = stages.evaluate_stage(params, args.model_path, args.split)
        print(f"{args.split} accuracy {r['accuracy']:.4f} on {r['n']} images")
    elif verb == "merge":
        r = stages.merge_stage(params)
        print(f"merged; max |merged - tuned| on val images = {r['merge_max_abs_diff']:.2e}")
    elif verb == "predict":
        model = args.model_path or stages.run_dir(params) / stages.FILES["merged"]
        print(f"wrote {stages.predict_stage(model, args.inputs, args.out)}")
    elif verb == "export":
        _print(stages.export_stage(params))
    elif verb == "run":
        if params["data"]["source"] == "raw" and not Path(params["paths"]["raw"]).is_dir():
            stages.demo(params)
        stages.prepare_data(params)
        stages.measure(params)
        print(stages.make_plan(params).summary())
        m = stages.train(params)
        stages.evaluate_stage(params)
        if params["plan"]["structured"] == "adapter":  # nonlinear: nothing to fold into a plain model
            print("adapter plans cannot be merged into a plain model: skipping merge and export (use structured: lora)")
        else:
            stages.merge_stage(params)
            if not args.no_export:
                stages.export_stage(params)
        _print({k: m.get(k) for k in ("test_acc", "val_acc", "probe_test_acc", "trainable", "best_epoch")})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        _run_verb(args, _params(args))
    except SensituneError as e:
        if args.debug:
            raise
        msg = " ".join(str(e).split("\n"))
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume training", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
