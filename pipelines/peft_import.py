"""`sensitune merge --from-peft DIR`: a peft adapter trained elsewhere enters the line's merge -> export path.

The base model is the one params.yaml describes (``model.name``, ``model.weights``, the data's classes, the head
seeded by ``train.seed``), the adapter is folded into it by peft's ``merge_and_unload``
(`spt_core.peft_bridge.merge_peft`), the merged model is checked equal to the peft model on validation images,
and the reject threshold is chosen on validation by the same rule as after training
(`pipelines.assess.choose_operating_point`). It is written where `sensitune merge` writes its model, so
`sensitune export` (and publish) take it unchanged; ``weights_source`` in merged.json and in every export manifest
says the weights came from that adapter, and ``plan_hash`` is ``peft-<adapter digest>``: no sensitune plan made them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from spt_core import __version__
from spt_core.api import collect, load_dataset_info, load_peft, merge_peft
from spt_core.portable.errors import SensituneError
from spt_core.portable.io import atomic_path, write_json

from .assess import choose_operating_point
from .config import Params
from .layout import FILES
from .models import build_model, model_args
from .training import data_loaders, run_dir

log = logging.getLogger(__name__)
MAX_DIFF = 1e-4  # merged vs peft logits on validation images, as `sensitune merge` allows merged vs tuned


def merge_from_peft(params: Params, adapter: Path, check_images: int = 16) -> dict[str, Any]:
    """Merge the peft adapter directory `adapter` into the configured base model; write run/merged/.

    Returns:
        merged.json's record: the model info, the operating point chosen on validation, ``weights_source``.

    Raises:
        SensituneError: not an adapter directory, an adapter of another base or head, or a merge that changes
            the outputs.
    """
    run = run_dir(params)
    (run / FILES["merged"]).unlink(missing_ok=True)  # never leave an older model beside a new record
    ds_info = load_dataset_info(Path(params["paths"]["data"]))
    names = ds_info.class_names
    args = model_args(params, len(names))
    base, info = build_model(args, params["train"]["seed"])
    info = dataclasses.replace(info, preprocess=dataclasses.replace(info.preprocess, bit_depth=ds_info.bit_depth))
    peft_model = load_peft(base.eval(), adapter)
    x = next(iter(data_loaders(params, info.preprocess, check_images, 0)["val"]))[0]
    with torch.inference_mode():
        before = peft_model(x)
    model, source = merge_peft(peft_model, adapter=adapter)
    with torch.inference_mode():
        diff = float((model(x) - before).abs().max())
    if diff > MAX_DIFF:
        raise SensituneError(f"{adapter}: the merged model differs from the peft model by {diff:.2e} on val images; "
                             "merge it with peft (merge_and_unload) and report the adapter type")  # fmt: skip
    loaders = data_loaders(params, info.preprocess, 64, 0)
    val, test = collect(model, loaders["val"])[:2], collect(model, loaders["test"])[:2]
    op, measured = choose_operating_point(val, test, names, ds_info.ok_class, params["evaluate"]["max_escape_rate"])
    record = {
        **info.to_dict(),
        "model_args": args,
        "class_names": names,
        "data_hash": ds_info.data_hash,
        **{k: v for k, v in measured.items() if k not in ("val", "test")},
        "plan_hash": f"peft-{source['digest']}",
        "weights_source": {**source, "base_weights_sha256": info.weights_sha256},
        "merge_max_abs_diff": diff,
        "sensitune_version": __version__,
    }
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    with atomic_path(run / FILES["merged"]) as tmp:
        save_file(state, str(tmp), metadata={"sensitune": json.dumps(record)})
    write_json(run / FILES["merged_info"], record)
    log.info("merged peft %s adapter %s into %s", source["peft_type"], adapter, run / FILES["merged"])
    return record
