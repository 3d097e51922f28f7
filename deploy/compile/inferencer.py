"""The compile side of the one model runner: `TorchInferencer`, and `open_inferencer` for PyTorch models too.

`deploy.edge.inferencer.open_inferencer` opens every exported artifact torch-free; this factory adds the model
that was exported (an ``nn.Module``) and PyTorch weights on disk (a merged ``.safetensors`` file, a tuned-weights
directory). Reading those needs the application's loader (`pipelines.models.load_any`, which knows how a run
stores them), passed in as ``torch_loader`` so that deploy/ never imports pipelines/. torch is imported only when a
PyTorch model is opened, so `sensitune predict` on an OpenVINO artifact stays torch-free.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deploy.edge.artifact import Artifact, ArtifactError
from deploy.edge.inferencer import Inferencer, ModelCard, is_exported
from deploy.edge.inferencer import open_inferencer as open_exported

if TYPE_CHECKING:
    from torch import nn

TorchLoader = Callable[[Path], "tuple[nn.Module, dict[str, Any]]"]  # path -> (eval-mode model, its info)


class TorchInferencer(Inferencer):
    """A PyTorch module: the same batch `infer` (and, with a card, `predict`) as the exported runtimes.

    Args:
        model: The model; put in eval mode. Inputs go to the device of its first parameter, logits come back as
            float32 numpy on the CPU.
        card: What the logits mean, if known (a merged model's info gives it: `ModelCard.from_info`).
        source: Where it came from, for messages.
    """

    runtime = "torch"

    def __init__(self, model: nn.Module, card: ModelCard | None = None, source: str = "PyTorch model") -> None:
        super().__init__(card, source)
        self.model = model.eval()
        param = next(iter(model.parameters()), None)
        self.device = param.device if param is not None else "cpu"

    def infer(self, x: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 -> (N, classes) float32 logits."""
        import torch

        with torch.inference_mode():
            return self.model(torch.from_numpy(np.ascontiguousarray(x)).to(self.device)).float().cpu().numpy()


def open_inferencer(
    path: str | Path | Artifact | nn.Module,
    precision: str | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    torch_loader: TorchLoader | None = None,
    card: ModelCard | None = None,
) -> Inferencer:
    """Any model: an exported artifact (`deploy.edge.inferencer.open_inferencer`, same arguments), an ``nn.Module``
    or PyTorch weights on disk read by ``torch_loader``.

    Args:
        path: An artifact path or `Artifact`; an ``nn.Module``; or a merged ``.safetensors`` / tuned-weights dir.
        precision: For artifacts: a row of `deploy.edge.precision` (see the edge factory).
        config: For artifacts: runtime properties over the manifest's ``runtime_config``.
        torch_loader: path -> (model, info with ``class_names``, ``preprocess``, operating point); needed for
            PyTorch weights on disk.
        card: For an ``nn.Module``: what its logits mean (a loaded model's card comes from its info).

    Raises:
        ArtifactError: An artifact that cannot be opened, or PyTorch weights and no ``torch_loader``.
    """
    if isinstance(path, (str, Path, Artifact)):
        if isinstance(path, Artifact) or is_exported(path):
            return open_exported(path, precision, config=config)
        if torch_loader is None:
            raise ArtifactError(f"{path}: not an exported artifact; pass torch_loader to read PyTorch weights")
        model, info = torch_loader(Path(path))
        return TorchInferencer(model, ModelCard.from_info(info), f"PyTorch model {path}")
    return TorchInferencer(path, card)
