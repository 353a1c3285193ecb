"""ONNX adapter: the champion as an ONNX graph plus an int8 dynamically quantized variant.

The graph is written from the model's weights (input scaling buffers, then ``Linear``/``ReLU``
pairs, then a sigmoid), so it outputs probabilities and needs neither torch nor a tracer to build.
Both files go into the version's model folder *before* its provenance is written and signed, so
the approvers' signatures and the provenance statement cover them exactly like the torch files:
a site verifies one folder and may then serve whichever runtime it has.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from quorum.configs.errors import ToolError

VARIANTS_DIR = "onnx"
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
MANIFEST_FILE = "serving.json"
INPUT_NAME = "features"
OUTPUT_NAME = "probability"
OPSET = 17


@dataclass(frozen=True)
class VariantFiles:
    """Where a version's variants live inside its model folder."""

    folder: Path

    @property
    def fp32(self) -> Path:
        return self.folder / FP32_FILE

    @property
    def int8(self) -> Path:
        return self.folder / INT8_FILE

    @property
    def manifest(self) -> Path:
        return self.folder / MANIFEST_FILE


def variant_files(model_files: Path) -> VariantFiles:
    return VariantFiles(Path(model_files) / VARIANTS_DIR)


def build_graph(weights: Sequence[NDArray[np.float32]]) -> bytes:
    """The serialized ONNX model of ``ScaledMLP`` weights (mean, std, then weight/bias pairs)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    mean, std, *layers = (np.asarray(w, dtype=np.float32) for w in weights)
    if len(layers) < 2 or len(layers) % 2:
        raise ValueError(f"expected scaling buffers then weight/bias pairs, got {len(weights)} tensors")
    initializers = [numpy_helper.from_array(mean, "feature_mean"), numpy_helper.from_array(std, "feature_std")]
    nodes = [
        helper.make_node("Sub", [INPUT_NAME, "feature_mean"], ["centred"]),
        helper.make_node("Div", ["centred", "feature_std"], ["h0"]),
    ]
    last = "h0"
    for index in range(len(layers) // 2):
        weight, bias = layers[2 * index], layers[2 * index + 1]
        initializers += [
            numpy_helper.from_array(np.ascontiguousarray(weight.T), f"w{index}"),
            numpy_helper.from_array(bias, f"b{index}"),
        ]
        nodes += [
            helper.make_node("MatMul", [last, f"w{index}"], [f"m{index}"]),
            helper.make_node("Add", [f"m{index}", f"b{index}"], [f"a{index}"]),
        ]
        last = f"a{index}"
        if index < len(layers) // 2 - 1:
            nodes.append(helper.make_node("Relu", [last], [f"r{index}"]))
            last = f"r{index}"
    initializers.append(numpy_helper.from_array(np.asarray([-1], dtype=np.int64), "flat"))
    nodes += [
        helper.make_node("Sigmoid", [last], ["p"]),
        helper.make_node("Reshape", ["p", "flat"], [OUTPUT_NAME]),
    ]
    graph = helper.make_graph(
        nodes,
        "quorum_scaled_mlp",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["rows", int(mean.shape[0])])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["rows"])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="quorum")
    model.ir_version = 8  # what every onnxruntime of the last years reads
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def export_variants(
    model_files: Path, weights: Sequence[NDArray[np.float32]], feature_names: Sequence[str]
) -> VariantFiles:
    """Write the fp32 graph, its int8 dynamically quantized copy and a manifest into ``model_files/onnx``.

    Call before the version's provenance is written: the files then belong to what is signed.
    """
    variants = variant_files(model_files)
    variants.folder.mkdir(parents=True, exist_ok=True)
    variants.fp32.write_bytes(build_graph(weights))
    quantize_int8(variants.fp32, variants.int8)
    mean = np.asarray(weights[0], dtype=np.float64)
    manifest = {
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "output_kind": "probability",
        "feature_names": list(feature_names),
        "feature_mean": [float(v) for v in mean],
        "variants": {"fp32": FP32_FILE, "int8": INT8_FILE},
    }
    variants.manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return variants


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic quantization: int8 weights of every MatMul, activations quantized per batch at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    quiet = _DropPreprocessHint()
    root.addFilter(quiet)  # quantize_dynamic advises a pre-processing pass through the root logger
    try:
        with tempfile.TemporaryDirectory(prefix="quorum-quant-") as scratch:
            staged = Path(scratch) / INT8_FILE
            try:
                quantize_dynamic(str(source), str(staged), weight_type=QuantType.QInt8)
            except Exception as exc:  # onnxruntime raises plain Exceptions of many kinds here
                raise ToolError(f"onnxruntime could not quantize {source}: {exc}", fix="check the onnx export") from exc
            target.write_bytes(staged.read_bytes())
    finally:
        root.removeFilter(quiet)


class _DropPreprocessHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def read_manifest(variants: VariantFiles) -> dict[str, object]:
    data: dict[str, object] = json.loads(variants.manifest.read_text(encoding="utf-8"))
    return data
