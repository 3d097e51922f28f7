"""One model runner for every runtime (in the spirit of Anomalib's ``deploy/inferencers``).

`base.Inferencer` is the interface (batch `infer`; `predict` and `smoke_test` for one frame), with one
implementation per runtime: `openvino_inferencer.OpenVINOInferencer`, `onnx_inferencer.OnnxRuntimeInferencer`
(torch-free, here) and `deploy.compile.inferencer.TorchInferencer` (compile side). `factory.open_inferencer` opens
any artifact path; the edge service, `sensitune predict`, `deploy.compile.verify`, the gate's scoring and the
benchmarks all go through it, so a model is compiled with the same properties and fed the same way everywhere.
"""

from deploy.edge.inferencer.base import Inferencer, ModelCard, check_input
from deploy.edge.inferencer.factory import is_exported, open_artifact, open_inferencer
from deploy.edge.inferencer.onnx_inferencer import OnnxRuntimeInferencer
from deploy.edge.inferencer.openvino_inferencer import OpenVINOInferencer

__all__ = [
    "Inferencer",
    "ModelCard",
    "OnnxRuntimeInferencer",
    "OpenVINOInferencer",
    "check_input",
    "is_exported",
    "open_artifact",
    "open_inferencer",
]
