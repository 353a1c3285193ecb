"""Scorers: one verified model folder, answering probabilities with ONNX Runtime or torch.

A site needs no torch when the version carries its ONNX variant (``onnx/model.onnx``, or the int8
``onnx/model.int8.onnx``): ``load_scorer`` imports torch only for the ``torch`` runtime, or when the
folder has no variant. Call it only on a folder that was just verified.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from quorum.configs.errors import ConfigError

VARIANTS_DIR = "onnx"  # the layout quorum.lineage.onnx_export writes
RUNTIME_FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}
MANIFEST_FILE = "serving.json"


class Scorer(Protocol):
    @property
    def runtime(self) -> str: ...

    @property
    def feature_mean(self) -> tuple[float, ...]: ...

    def predict(self, matrix: NDArray[np.float32]) -> NDArray[np.float64]: ...


@dataclass(frozen=True)
class OnnxScorer:
    runtime: str
    feature_mean: tuple[float, ...]
    session: Any

    def predict(self, matrix: NDArray[np.float32]) -> NDArray[np.float64]:
        output = self.session.run(None, {"features": matrix})[0]
        return np.asarray(output, dtype=np.float64).reshape(-1)


@dataclass(frozen=True)
class TorchScorer:
    runtime: str
    feature_mean: tuple[float, ...]
    model: Any

    def predict(self, matrix: NDArray[np.float32]) -> NDArray[np.float64]:
        import torch

        with torch.no_grad():
            logits = self.model(torch.from_numpy(np.ascontiguousarray(matrix)))
        return torch.sigmoid(logits).double().numpy().reshape(-1)


def onnx_session(model: Path | bytes, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session of a file or of a graph's bytes; one intra-op thread: tiny models lose
    time to thread hand-offs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def choose_runtime(files: Path, wanted: str) -> str:
    """``auto``: the fp32 ONNX variant when the folder has it and onnxruntime is installed, else torch."""
    has_onnx = (files / VARIANTS_DIR / RUNTIME_FILES["onnx"]).is_file()
    if wanted == "auto":
        return "onnx" if has_onnx and importlib.util.find_spec("onnxruntime") is not None else "torch"
    if wanted in RUNTIME_FILES and not (files / VARIANTS_DIR / RUNTIME_FILES[wanted]).is_file():
        raise ConfigError(
            f"serving.runtime is {wanted} but {files} has no {VARIANTS_DIR}/{RUNTIME_FILES[wanted]}",
            fix="use runtime auto or torch, or promote a version exported with its ONNX variants",
        )
    return wanted


def load_scorer(files: Path, runtime: str, hidden_sizes: Sequence[int]) -> Scorer:
    """The model in ``files`` (a verified MLflow model folder) behind the chosen runtime."""
    chosen = choose_runtime(files, runtime)
    if chosen in RUNTIME_FILES:
        manifest = json.loads((files / VARIANTS_DIR / MANIFEST_FILE).read_text(encoding="utf-8"))
        mean = tuple(float(v) for v in manifest["feature_mean"])
        return OnnxScorer(chosen, mean, onnx_session(files / VARIANTS_DIR / RUNTIME_FILES[chosen]))
    from quorum.tasks.model import get_weights, model_from_weights
    from quorum.tasks.model_files import load_model_folder

    # the folder holds an exported program; rebuilt as the plain module it came from, it runs in eval mode
    weights = get_weights(load_model_folder(files))
    mean = tuple(float(v) for v in weights[0])
    return TorchScorer("torch", mean, model_from_weights(weights, hidden_sizes))
