"""The merged model as an MLflow pyfunc model, so `models:/<name>@champion` loads and predicts anywhere.

Input: a float32 numpy array (N, 3, H, W), already preprocessed with the model's `Preprocess` (recorded in
the model's ``sensitune_info`` metadata and in ``merged.json``; `spt_core.portable.preprocess.preprocess_batch`
makes it from images). Output: float32 logits (N, classes) in ``class_names`` order, or softmax
probabilities with ``params={"output": "probabilities"}``.

Logged as "models from code": MLflow stores this file with the model and runs it at load time (the
`set_model` call at the bottom), so nothing is pickled. The loading environment needs the ``sensitune``
package (for `load_merged`) plus torch and timm: the model's pip requirements.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.models
import mlflow.pyfunc
import numpy as np

OUTPUTS = ("logits", "probabilities")


class SensituneModel(mlflow.pyfunc.PythonModel):
    """Wraps ``merged.safetensors`` (artifact key ``merged``); loads it with `pipelines.models.load_merged`."""

    def load_context(self, context: Any) -> None:
        """Load the merged timm model on CPU in eval mode.

        Args:
            context: MLflow's context; ``context.artifacts["merged"]`` is the local merged file.
        """
        from pipelines.models import load_merged  # torch/timm are imported only when the model is loaded

        self.model, self.info = load_merged(Path(context.artifacts["merged"]))

    # np.ndarray, not Any: MLflow reads this hint as a schema and accepts ndarray as "no inference" without
    # warnings; the logged TensorSpec signature checks dtype and shape.
    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        """Logits (or probabilities) for a preprocessed batch.

        Args:
            context: MLflow's context (unused).
            model_input: float32 array (N, 3, H, W), normalised as the model's preprocess says.
            params: ``{"output": "logits" | "probabilities"}``; default logits.

        Returns:
            float32 array (N, classes).
        """
        import torch

        from spt_core.portable.errors import SensituneError

        output = (params or {}).get("output", "logits")
        if output not in OUTPUTS:
            raise SensituneError(f"params.output={output!r}: use one of {', '.join(OUTPUTS)}")
        x = np.asarray(model_input, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != 3:
            raise SensituneError(
                f"model input has shape {x.shape}: pass a float32 (N, 3, H, W) batch made by preprocess_batch"
            )
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(np.ascontiguousarray(x)))  # (N, C)
            out = logits.softmax(-1) if output == "probabilities" else logits
        return out.float().numpy()


mlflow.models.set_model(SensituneModel())
