"""The one model-runner interface: batch logits for every runtime, and one frame -> the edge's answer.

An `Inferencer` turns a preprocessed (N, 3, H, W) float32 batch into (N, classes) logits (`infer`). With a
`ModelCard` (what a sealed manifest or a merged model says its logits mean) it also answers one image the way the
edge does (`predict`: softmax, class, P(good) and the decision at the model's threshold). Implementations: OpenVINO
and ONNX Runtime here (torch-free), PyTorch in `deploy.compile.inferencer`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from deploy.edge.artifact import MANIFEST, Artifact, ArtifactError
from deploy.edge.graph_spec import HOST
from spt_core.portable.errors import one_line
from spt_core.portable.metrics import softmax
from spt_core.portable.operating_point import OperatingPoint
from spt_core.portable.preprocess import Preprocess, preprocess_image

Logits = Callable[[np.ndarray], np.ndarray]  # (N, 3, H, W) float32 -> (N, classes)


@dataclass(frozen=True)
class ModelCard:
    """What a model's logits mean and how its input is made: the part of a manifest that `predict` reads.

    Attributes:
        class_names: One name per logit, in logit order.
        preprocess: The preprocessing the model takes.
        operating_point: The good class and the reject threshold on P(good) (`OperatingPoint`).
        version: The model version, where one is recorded.
    """

    class_names: list[str]
    preprocess: Preprocess
    operating_point: OperatingPoint = OperatingPoint()
    version: str | None = None

    @classmethod
    def of(cls, artifact: Artifact) -> ModelCard:
        """The card of a sealed artifact (its manifest)."""
        return cls(artifact.class_names, artifact.preprocess, artifact.operating_point, artifact.version)

    @classmethod
    def from_info(cls, info: Mapping[str, Any], version: str | None = None) -> ModelCard:
        """The card in a merged model's or a registered model's metadata (``class_names``, ``preprocess``, ...)."""
        pre, op = Preprocess.from_dict(info["preprocess"]), OperatingPoint.from_dict(info, where="model metadata")
        return cls(list(info["class_names"]), pre, op, version)

    def decide(self, probs: Any) -> dict[str, Any]:
        """One softmax vector -> ``p_good`` and ``decision`` (`OperatingPoint.answer`, the edge's one rule)."""
        return self.operating_point.answer(probs, self.class_names)


def check_input(artifact: Artifact) -> None:
    """Refuse an artifact whose preprocessing is not what every inferencer feeds: RGB, (N, 3, H, W)."""
    pre = artifact.preprocess
    if pre.color != "RGB" or pre.layout != "NCHW":
        where = artifact.dir / MANIFEST
        raise ArtifactError(f"{where}: preprocess color/layout {pre.color}/{pre.layout}; need RGB/NCHW")


class Inferencer(ABC):
    """One model on one runtime; thread-safe.

    Args:
        card: What the logits mean (needed by `predict`, `smoke_test`, `class_names`, `version`); None for a bare
            model file that is not sealed yet (`infer` only, e.g. verification before sealing).
        source: Where the model came from, for messages and the CSV of `sensitune predict`.
        config: The runtime properties in effect (OpenVINO compile properties, ONNX Runtime session options).
    """

    runtime: ClassVar[str]  # "openvino" | "onnxruntime" | "torch"
    n_requests: int = 1  # inferences that may run at once (OpenVINO: its infer-request pool)
    artifact: Artifact | None = None  # the sealed artifact it was opened from (its bytes dropped once compiled)
    input_variant: ClassVar[str] = HOST  # what `model_input` feeds it: host preprocessing (graph: `FrameInferencer`)
    variant_why: str | None = None  # why a box serves this variant (`deploy.edge.serving.Serving.variant_choice`)

    def __init__(self, card: ModelCard | None, source: str, config: Mapping[str, Any] | None = None) -> None:
        self.card, self.source, self.config = card, source, dict(config or {})

    @abstractmethod
    def infer(self, x: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 -> (N, classes) logits, a fresh array the caller owns."""

    def model_input(self, image: Image.Image) -> np.ndarray:
        """One frame -> what `infer` takes: (1, 3, H, W) float32 by the card's preprocessing (the host variant).
        `graph_input.FrameInferencer` takes the decoded frame itself, resized and normalised in the compiled model."""
        return preprocess_image(image, self._card().preprocess)[None]

    @contextlib.contextmanager
    def _slot(self) -> Iterator[Logits]:
        """A logits function reserved for one call; OpenVINO hands out a pooled infer request. Entering it is the
        wait `predict` reports as ``queue_ms``."""
        yield self.infer

    def _card(self) -> ModelCard:
        if self.card is None:
            raise ArtifactError(f"{self.source}: no manifest.json, so no class names; open the sealed artifact dir")
        return self.card

    @property
    def version(self) -> str | None:
        """The model version its manifest records."""
        return self._card().version

    @property
    def class_names(self) -> list[str]:
        """Class names, in logit order."""
        return self._card().class_names

    def predict(self, image: Image.Image, gate: threading.Semaphore | None = None) -> dict[str, Any]:
        """One image -> {class, class_index, score (softmax), margin, p_good, decision, latency_ms, queue_ms}.

        Args:
            image: RGB image.
            gate: shared by all models of a runtime: at most that many inferences run at once on the box.
                Without it, the model with less traffic (the challenger) would mostly run while the other one
                runs too and look slower than it is; with it, every inference meets the same contention.

        `latency_ms` is preprocessing + inference without the wait for the gate and a free slot (`queue_ms`),
        which grows with a model's share of the traffic; latency_ms is what the rollout rule compares.
        """
        card = self._card()
        t0 = time.perf_counter()
        x = self.model_input(image)  # (1, 3, H, W) float32; a graph variant's frame tensor (graph_input.py)
        t1 = time.perf_counter()
        with gate or contextlib.nullcontext():
            with self._slot() as run:
                t2 = time.perf_counter()
                logits = np.array(run(x)[0], dtype=np.float64)  # (C,), copied out of any reused buffer
            t3 = time.perf_counter()
        p = softmax(logits)
        i = int(p.argmax())
        ms, queue_ms = (t1 - t0 + t3 - t2) * 1e3, (t2 - t1) * 1e3
        return {
            "class": card.class_names[i],
            "class_index": i,
            "score": float(p[i]),
            "margin": float(p[i] - np.partition(p, -2)[-2]) if len(p) > 1 else 1.0,  # top-1 - top-2 probability
            **card.decide(p),  # p_good and the decision at the manifest's threshold
            "latency_ms": ms,
            "queue_ms": queue_ms,
        }

    def smoke_test(self) -> None:
        """Run one mid-grey frame through `predict`; raise `ArtifactError` unless it answers a finite score for one
        of the model's classes. A promotion calls this before it writes anything."""
        h, w = self._card().preprocess.size
        try:
            out = self.predict(Image.new("RGB", (w, h), (128, 128, 128)))
        except Exception as e:
            raise ArtifactError(f"{self.source}: smoke test failed ({one_line(e)}); re-export it") from None
        if not np.isfinite(out["score"]):
            raise ArtifactError(f"{self.source}: smoke test gave a non-finite score; re-export it")
