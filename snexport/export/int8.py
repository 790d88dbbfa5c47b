"""Static int8 (QDQ) variants of exported stitches for ONNX Runtime, and their measured top-1.

Made on the host at export time from the validated FP32 file (``onnxruntime.quantization`` needs the ``onnx``
package, which devices do not have), calibrated on the build's own calibration images: the training images the
stitching layers were least-squares-initialised from, or, for an architecture-only build (random-init anchors and
no ``--data``), the same seeded Gaussian noise; such a build's int8 accuracy is as unknown as its FP32 accuracy.

The recipe (``RECIPE``; facts from ONNX Runtime 1.32, /work/notes/device-apis.md §2):
- QDQ format (ONNX Runtime's recommended one since 1.11; TensorRT and OpenVINO read it too).
- Only MatMul/Gemm with a weight (an initializer) are quantized: those hold nearly all of a ViT's FLOPs. The two
  activation x activation MatMuls of attention (Q·Kᵀ, softmax·V), Softmax, LayerNorm, GELU and the residual adds
  stay float: ``op_types_to_quantize`` alone would still quantize the attention MatMuls, and ``nodes_to_exclude``
  alone would not keep ONNX Runtime from fusing their DQ->MatMul->Q, so both are set. LayerNorm in QDQ runs in
  float between DQ/Q anyway (error, no speed).
- The stitching layer stays float too (one Linear per stitch, a negligible share of the FLOPs): it maps one
  anchor's residual stream into another's, and quantizing it cost most of a stitch's int8 error (LS-initialised demo
  stitches: worst-sample cosine against FP32 0.888 -> 0.996 and 0.947 -> 0.993 with it float; the anchors, which
  have none, sit at 0.997-0.9996). The export stage finds it by module scope (``STITCH_SCOPE``) while node names
  still carry scopes, and records its weights in the FP32 file's metadata (``FLOAT_WEIGHTS_KEY``).
- Weights int8, symmetric, per output channel; activations uint8, asymmetric, per tensor, MinMax calibration.
- ``reduce_range``: 7-bit weights, because the file is made on the host for a device whose CPU it does not know:
  without VNNI (AVX2-only x86, like this project's build box) ONNX Runtime's u8s8 kernels use vpmaddubsw, whose
  int16 accumulation saturates on full-range weights. VNNI and ARM CPUs lose a little accuracy, nothing else.
- No ``quant_pre_process``: the graph is already static-shaped and simplified, and its symbolic shape inference
  would need sympy (+85 MB); ``quantize_static`` runs ONNX shape inference itself.

Gates (``INT8_GATES``; int8 logits against the FP32 ONNX file's, on real validation images when the build has
data, else on the seeded noise the stage validates with): worst-sample cosine >= 0.98 and top-1 agreement >= 0.9,
no max-abs gate. Looser than FP16's (0.999 / 0.99) because int8 error is intended, not a defect: with this recipe
the LS-initialised demo anchors and stitches sit at cosine 0.994-0.999 and agree on every real image, a random-init
DeiT-S/B stitch at 0.994 on noise, while a broken quantization (a wrong scale, activation ranges cut off by the
calibration, u8s8 saturation without reduce_range: 0.49-0.80 measured) lands far below. Top-1 agreement is gated
only on real images: on noise (architecture-only builds) an untrained model's top classes are near ties that any
rounding reorders, so it is reported there, not gated. The gates only reject broken files: what an int8 engine is
worth is its own top-1, measured on the validation split (``onnx_top1``), and its own latency, and it joins the
Pareto front only on those.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional

from snexport.errors import SnexportError

log = logging.getLogger("snexport.export")

INT8_GATES = {"rtol_scale": None, "min_cosine": 0.98, "require_top1": 0.9}
# At most this many of the build's calibration images calibrate each int8 file: calibration runs the FP32 model on
# every one (with every quantized tensor as an extra output): about 1 s per image for an 18-GFLOP stitch on the
# busy 2-core build box.
DEFAULT_CALIB_IMAGES = 32
QUANTIZED_OPS = ("MatMul", "Gemm")
STITCH_SCOPE = "stitch"  # the stitching layer's attribute in snexport.stitching.snnet.StitchedNet
FLOAT_WEIGHTS_KEY = "snexport.int8_float_weights"  # FP32-file metadata: JSON list of initializers int8 keeps float
RECIPE = {
    "format": "QDQ",
    "ops": list(QUANTIZED_OPS),
    "attention_matmuls": "float",
    "stitching_layer": "float",
    "weights": "int8 symmetric per-channel",
    "activations": "uint8 asymmetric per-tensor",
    "reduce_range": True,
    "calibration": "MinMax",
}


def quantize_int8(fp32_model: bytes, calib_images, workdir: str | os.PathLike, label: str = "model"):
    """The int8 QDQ ``ModelProto`` of a serialized FP32 model, calibrated on ``calib_images`` (N, C, H, W) float32.

    ``workdir`` holds ONNX Runtime's intermediate files (it insists on paths); they are removed before returning.
    """
    import numpy as np
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static

    images = np.ascontiguousarray(calib_images, dtype=np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise SnexportError(f"int8 calibration needs a non-empty (N, C, H, W) image array, got shape {images.shape}")
    model = onnx.load_from_string(fp32_model)
    _name_nodes(model)
    excluded = attention_matmuls(model) + _consumers(model, _float_weights(model))
    inp = model.graph.input[0]
    batch = inp.type.tensor_type.shape.dim[0].dim_value or 1

    class Images(CalibrationDataReader):
        def __init__(self):
            self.start = 0

        def get_next(self):
            if self.start >= len(images):
                return None
            chunk = images[self.start:self.start + batch]
            self.start += batch
            if len(chunk) < batch:  # a static batch: pad the last chunk by repeating its images
                chunk = np.concatenate([chunk, images[:batch - len(chunk)]])
            return {inp.name: chunk}

        def rewind(self):
            self.start = 0

    work = Path(tempfile.mkdtemp(prefix=".int8.", suffix=".tmp", dir=workdir))
    try:
        out = work / "int8.onnx"
        with _quiet_quantizer():
            quantize_static(model, out, Images(), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_exclude=excluded, per_channel=True,
                            reduce_range=RECIPE["reduce_range"], activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        quantized = onnx.load(str(out))
    except SnexportError:
        raise
    except Exception as exc:  # noqa: BLE001 - the quantizer raises whatever its internals raise
        raise SnexportError(f"int8 quantization of {label} failed: {type(exc).__name__}: {str(exc)[:300]}; "
                            "export without int8 (--precision fp32)") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not any(n.op_type == "DequantizeLinear" for n in quantized.graph.node):
        raise SnexportError(f"int8 quantization of {label} quantized nothing (no MatMul/Gemm with weights)")
    return quantized


def attention_matmuls(model) -> list[str]:
    """Names of the MatMul/Gemm nodes none of whose inputs is an initializer (activation x activation)."""
    weights = {t.name for t in model.graph.initializer}
    weights |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type in QUANTIZED_OPS and not any(i in weights for i in n.input)]


def stitch_layer_weights(model) -> list[str]:
    """Initializers read by the stitching layer's nodes, found by module scope in a freshly exported graph:
    TorchScript names nodes ``/stitch/MatMul``; dynamo records ``['', 'stitch', ...]`` in each node's
    ``pkg.torch.onnx.name_scopes``. Simplifiers rename fused nodes, so this runs before them."""
    floating = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16: weights, not a simplifier's shape constants
    weights = {t.name for t in model.graph.initializer if t.data_type in floating}
    found: list[str] = []
    for node in model.graph.node:
        if _in_stitch_scope(node):
            found.extend(i for i in node.input if i in weights and i not in found)
    return found


def _in_stitch_scope(node) -> bool:
    import ast

    # The top-level module's name: "stitch" today; "stitches.0" etc. would match too (a route of several hops).
    parts = node.name.split("/")
    if len(parts) > 2 and parts[0] == "" and parts[1].startswith(STITCH_SCOPE):
        return True
    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
    try:
        parsed = ast.literal_eval(scopes) if scopes else []
    except (ValueError, SyntaxError):
        return False
    return isinstance(parsed, list) and len(parsed) > 1 and str(parsed[1]).startswith(STITCH_SCOPE)


def _float_weights(model) -> set[str]:
    import json

    raw = next((p.value for p in model.metadata_props if p.key == FLOAT_WEIGHTS_KEY), "[]")
    return set(json.loads(raw))


def _consumers(model, names: set[str]) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS and any(i in names for i in n.input)]


def _name_nodes(model) -> None:
    # nodes_to_exclude works by name; exporters name every node, but a hand-made graph may not.
    taken = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"snexport_node_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


@contextlib.contextmanager
def _quiet_quantizer():
    """The quantizer logs advice (pre-processing, ...) through the root logger at WARNING; keep it off the CLI."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def onnx_top1(model: str | os.PathLike | bytes, batches: Iterable, threads: Optional[int] = None) -> tuple[float, int]:
    """Top-1 (percent) and sample count of an ONNX model with ONNX Runtime over ``(images, labels)`` batches."""
    import numpy as np

    from snexport.export.validate import onnx_session

    session = onnx_session(model, threads=threads)
    correct = total = 0
    for x, y in batches:
        x = np.asarray(x.numpy() if hasattr(x, "numpy") else x, dtype=np.float32)
        y = np.asarray(y.numpy() if hasattr(y, "numpy") else y)
        logits = session(x)
        correct += int((logits.argmax(axis=1) == y).sum())
        total += len(y)
    return (100.0 * correct / total if total else 0.0), total


def calibration_set(build_info: dict, input_shape: tuple, num_classes: int, count: int,
                    seed: int = 0) -> tuple[Any, str]:
    """The build's calibration images (numpy, at most ``count``) and their source, as the stitch stage took them."""
    import numpy as np

    import torch

    from snexport.stitching.stage import calibration_images

    ls = build_info.get("ls_init") or {}
    n = min(int(count), int(ls.get("calibration_images") or count))
    # Seeded: calibration_images draws the first batch of the shuffled training loader (and, for an ImageFolder,
    # its random augmentations) from torch's global RNG, so without a seed every export would calibrate on other
    # images and make a new int8 file.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        images, source = calibration_images(build_info.get("data"), tuple(input_shape), num_classes, n, seed=seed)
    return np.ascontiguousarray(images.numpy(), dtype=np.float32), source
