"""The MLflow model registry: the merged model as a pyfunc model version, aliased ``challenger``.

The rollout (the edge's online promotion, `deploy.edge.rollout`) moves ``champion``; the retrain flow's hand-over
gate (`pipelines.tasks.handover_gate`) decides whether a new version is offered to the line at all.
"""

from __future__ import annotations

import contextlib
import warnings
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from spt_core import __version__

CHALLENGER = "challenger"


def register_model(mlflow: Any, client: Any, model: dict) -> str:
    """Log the merged model as a pyfunc model, register it, alias the version (``model["alias"]``, default
    ``challenger``; None: no alias); returns the version."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    from pipelines import pyfunc

    h, w = model["input_size"]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, h, w))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, model["num_classes"]))]),
        params=ParamSchema([ParamSpec("output", "string", "logits")]),
    )
    where = {"name": "model"} if int(mlflow.__version__.split(".")[0]) >= 3 else {"artifact_path": "model"}
    with warnings.catch_warnings():
        # No input example on purpose (it would load and run the model here); the signature documents the input.
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        info = mlflow.pyfunc.log_model(
            **where,
            python_model=pyfunc.__file__,  # models from code: the file is stored with the model, nothing pickled
            artifacts={"merged": model["merged"]},
            signature=signature,
            pip_requirements=requirements(),  # explicit: MLflow's inference would load the model in a subprocess
            metadata={"sensitune": model["info"]},
            registered_model_name=model["name"],
        )
    version = str(info.registered_model_version)
    if (alias := model.get("alias", CHALLENGER)) is not None:
        client.set_registered_model_alias(model["name"], alias, version)
    for k, v in model["version_tags"].items():
        if v is not None:
            client.set_model_version_tag(model["name"], version, k, v)
    return version


def requirements() -> list[str]:
    reqs = [f"sensitune=={__version__}"]
    for pkg in ("torch", "timm", "safetensors", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")
    return reqs
