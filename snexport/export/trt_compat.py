"""Static check that an ONNX file only uses what TensorRT's ONNX parser supports — no TensorRT needed.

Run on the host right after export, so an unsupported op is reported there and not after copying files to a Jetson
and waiting for an engine build to fail.

The CNN and Swin families add no op outside the table: ResNet stitches export as Conv (BatchNorm folded into it by
the exporter in eval mode), Relu, MaxPool, Add, GlobalAveragePool, Flatten, Gemm; Swin's shifted windows as
Reshape/Transpose/Slice/Concat (roll), Pad where a map is not a multiple of the window, MatMul, Softmax,
LayerNormalization (tests/test_families_cnn.py exports both and checks them here).

Source of the table: onnx-tensorrt ``docs/operators.md`` (TensorRT 10.15 edition: "supports operators in the inclusive
range of opset 9 to opset 24"; the TensorRT 10.0 edition says opset 9 to 20). Per op we keep the data types listed
there for the op's main data input; the restrictions we can check statically are checked too (see ``_restrictions``).
Ops the parser gained after 10.0 are tagged with the release that added them (from the onnx-tensorrt changelog), so
a check for an older target (JetPack 6 ships TensorRT 10.3) flags them.

Data types (same document): TensorRT handles FLOAT, FLOAT16, BFLOAT16, INT32, INT64, BOOL, UINT8 (network I/O only)
and the quantized types INT8/INT4/FP8/FP4 (only through Q/DQ). DOUBLE has "limited support": TensorRT casts it down to
FLOAT, clamping to ±FLT_MAX — a warning, since the model still builds but does not compute what it says. Other
types (strings, complex, int16, uint16/32/64) are unsupported.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any, Optional

# Short type names used in the table below, mapped from ONNX TensorProto enum names.
_F = "FP32 FP16 BF16"
_FI = "FP32 FP16 BF16 INT32 INT64"
_FIB = "FP32 FP16 BF16 INT32 INT64 BOOL"

# op → (supported data types of its main input, first TensorRT version whose parser has it)
SUPPORTED_OPS: dict[str, tuple[str, str]] = {
    "Abs": (_FI, "10.0"), "Acos": (_F, "10.0"), "Acosh": (_F, "10.0"), "Add": (_FI, "10.0"),
    "And": ("BOOL", "10.0"), "ArgMax": (_FI, "10.0"), "ArgMin": (_FI, "10.0"), "Asin": (_F, "10.0"),
    "Asinh": (_F, "10.0"), "Atan": (_F, "10.0"), "Atanh": (_F, "10.0"),
    "Attention": ("FP32 FP16 BF16 INT8 FP8", "10.15"),
    "AveragePool": (_F, "10.0"), "BatchNormalization": (_F, "10.0"), "BlackmanWindow": ("FP32 FP16", "10.0"),
    "Cast": ("FP32 FP16 BF16 INT32 INT64 UINT8 BOOL", "10.0"),
    "CastLike": ("FP32 FP16 BF16 INT32 INT64 UINT8 BOOL", "10.0"),
    "Ceil": (_F, "10.0"), "Celu": (_F, "10.0"), "Clip": (_F, "10.0"), "Concat": (_FIB, "10.0"),
    "Constant": ("FP32 FP16 BF16 FP8 FP4 INT4 INT32 INT64 BOOL", "10.0"),
    "ConstantOfShape": ("FP32 FP16 BF16 FP8 FP4 INT4 INT32 INT64 BOOL", "10.0"),
    "Conv": (_F, "10.0"), "ConvTranspose": (_F, "10.0"), "Cos": (_F, "10.0"), "Cosh": (_F, "10.0"),
    "CumSum": (_F, "10.0"), "DeformConv": ("FP32 FP16", "10.0"), "DepthToSpace": (_FI, "10.0"),
    "DequantizeLinear": ("INT8 FP8 FP4 INT4", "10.0"), "Div": (_FI, "10.0"), "Dropout": (_F, "10.0"),
    "Einsum": (_F, "10.0"), "Elu": (_F, "10.0"), "Equal": (_FI, "10.0"), "Erf": (_F, "10.0"),
    "Exp": (_F, "10.0"), "Expand": (_FIB, "10.0"), "EyeLike": (_FIB, "10.0"), "Flatten": (_FIB, "10.0"),
    "Floor": (_F, "10.0"), "Gather": (_FIB, "10.0"), "GatherElements": (_FIB, "10.0"), "GatherND": (_FIB, "10.0"),
    "Gelu": ("FP32 FP16 BF16 INT8 INT32 INT64", "10.0"), "Gemm": (_F, "10.0"),
    "GlobalAveragePool": (_F, "10.0"), "GlobalLpPool": (_F, "10.0"), "GlobalMaxPool": (_F, "10.0"),
    "Greater": (_FI, "10.0"), "GreaterOrEqual": (_FI, "10.0"), "GridSample": ("FP32 FP16", "10.0"),
    "GroupNormalization": (_F, "10.0"), "GRU": (_F, "10.0"), "HammingWindow": ("FP32 FP16", "10.0"),
    "HannWindow": ("FP32 FP16", "10.0"), "HardSigmoid": (_F, "10.0"), "HardSwish": (_F, "10.0"),
    "Hardmax": (_F, "10.0"), "Identity": (_FIB, "10.0"), "If": (_FIB, "10.0"), "ImageScaler": (_F, "10.0"),
    "InstanceNormalization": (_F, "10.0"), "IsInf": (_F, "10.0"), "IsNaN": (_FI, "10.0"),
    "LayerNormalization": (_F, "10.0"), "LeakyRelu": (_F, "10.0"), "Less": (_FI, "10.0"),
    "LessOrEqual": (_FI, "10.0"), "Log": (_F, "10.0"), "LogSoftmax": (_F, "10.0"), "Loop": (_FIB, "10.0"),
    "LRN": (_F, "10.0"), "LSTM": (_F, "10.0"), "LpNormalization": (_F, "10.0"), "LpPool": (_F, "10.0"),
    "MatMul": (_F, "10.0"), "Max": (_FI, "10.0"), "MaxPool": (_F, "10.0"),
    "Mean": ("FP32 FP16 BF16 FP8 INT32 INT64", "10.0"), "MeanVarianceNormalization": (_F, "10.0"),
    "Min": (_FI, "10.0"), "Mish": ("FP32 FP16", "10.0"), "Mod": (_FI, "10.0"), "Mul": (_FI, "10.0"),
    "Neg": (_FI, "10.0"), "NonMaxSuppression": ("FP32 FP16", "10.0"), "NonZero": ("FP32 FP16", "10.0"),
    "Not": ("BOOL", "10.0"), "OneHot": (_FIB, "10.0"), "Or": ("BOOL", "10.0"), "Pad": (_FI, "10.0"),
    "ParametricSoftplus": (_F, "10.0"), "Pow": (_FI, "10.0"), "PRelu": (_F, "10.0"),
    "QuantizeLinear": (_F, "10.0"), "RandomNormal": (_F, "10.0"), "RandomNormalLike": (_F, "10.0"),
    "RandomUniform": (_F, "10.0"), "RandomUniformLike": (_F, "10.0"), "Range": (_FI, "10.0"),
    "Reciprocal": (_F, "10.0"), "ReduceL1": (_FI, "10.0"), "ReduceL2": (_FI, "10.0"),
    "ReduceLogSum": (_FI, "10.0"), "ReduceLogSumExp": (_FI, "10.0"), "ReduceMax": (_FI, "10.0"),
    "ReduceMean": (_FI, "10.0"), "ReduceMin": (_FI, "10.0"), "ReduceProd": (_FI, "10.0"),
    "ReduceSum": (_FI, "10.0"), "ReduceSumSquare": (_FI, "10.0"), "Relu": (_FI, "10.0"),
    "Reshape": (_FIB, "10.0"), "Resize": (_F, "10.0"), "ReverseSequence": (_FIB, "10.0"),
    "RMSNormalization": (_F, "10.15"), "RNN": (_F, "10.0"), "RoiAlign": ("FP32 FP16", "10.0"),
    "RotaryEmbedding": (_F, "10.15"), "Round": (_F, "10.0"), "STFT": ("FP32", "10.0"),
    "ScaledTanh": (_F, "10.0"), "Scan": (_F, "10.0"), "Scatter": (_FI, "10.0"), "ScatterElements": (_FI, "10.0"),
    "ScatterND": (_FI, "10.0"), "Selu": (_F, "10.0"), "Shape": (_FIB, "10.0"), "Shrink": (_FI, "10.0"),
    "Sigmoid": (_F, "10.0"), "Sign": (_FI, "10.0"), "Sin": (_F, "10.0"), "Sinh": (_F, "10.0"),
    "Size": (_FIB, "10.0"), "Slice": (_FIB, "10.0"), "Softmax": (_F, "10.0"), "Softplus": (_F, "10.0"),
    "Softsign": (_F, "10.0"), "SpaceToDepth": (_FI, "10.0"), "Split": (_FIB, "10.0"), "Sqrt": (_F, "10.0"),
    "Squeeze": (_FIB, "10.0"), "Sub": (_FI, "10.0"), "Sum": (_FI, "10.0"), "Tan": (_F, "10.0"),
    "Tanh": (_F, "10.0"), "TensorScatter": ("FP32 FP16 BF16 INT32", "10.15"), "ThresholdedRelu": (_F, "10.0"),
    "Tile": (_FIB, "10.0"), "TopK": (_FI, "10.0"), "Transpose": (_FIB, "10.0"), "Trilu": (_FIB, "10.0"),
    "Unsqueeze": (_FIB, "10.0"), "Upsample": (_F, "10.0"), "Where": (_FIB, "10.0"), "Xor": ("BOOL", "10.0"),
}

# Inclusive opset range of the default ONNX domain, per TensorRT release (operators.md headers).
OPSET_RANGES = {(10, 0): (9, 20), (10, 15): (9, 24), (11, 0): (9, 24)}
DEFAULT_TARGET = "10.3"  # JetPack 6.x: the oldest TensorRT we deploy to, so the strictest check

# For ops whose first input is not the data tensor (Where: condition; Cast: checked on both ends).
_DATA_INPUT = {"Where": 1, "DequantizeLinear": 0, "QuantizeLinear": 0}
_TYPE_NAMES = {
    1: "FP32", 10: "FP16", 16: "BF16", 6: "INT32", 7: "INT64", 9: "BOOL", 3: "INT8", 2: "UINT8", 11: "DOUBLE",
    17: "FP8", 18: "FP8", 19: "FP8", 20: "FP8", 22: "INT4", 23: "FP4", 21: "UINT4",
    8: "STRING", 4: "UINT16", 5: "INT16", 12: "UINT32", 13: "UINT64", 14: "COMPLEX64", 15: "COMPLEX128",
}
_NEVER = {"STRING", "UINT16", "INT16", "UINT32", "UINT64", "COMPLEX64", "COMPLEX128", "UINT4"}


def _version_tuple(version: str) -> tuple[int, int]:
    parts = [int(p) for p in str(version).split(".")[:2] if p.isdigit()]
    return (parts[0], parts[1] if len(parts) > 1 else 0) if parts else (10, 0)


def opset_range(target: str = DEFAULT_TARGET) -> tuple[int, int]:
    """Opset range known to work for TensorRT ``target``: that of the newest documented release not after it."""
    t = _version_tuple(target)
    known = [v for v in sorted(OPSET_RANGES) if v <= t]
    return OPSET_RANGES[known[-1]] if known else OPSET_RANGES[min(OPSET_RANGES)]


def check_tensorrt_compat(model_or_path: Any, target: str = DEFAULT_TARGET) -> dict:
    """Report on an ONNX model (path or ``ModelProto``) for TensorRT ``target`` (e.g. "10.3", "11.0").

    Returns ``{"ok", "target", "opset", "opset_range", "ops": {op: count}, "unsupported": [...], "warnings": [...]}``;
    ``ok`` is False iff ``unsupported`` is not empty. Each problem is reported once per op, with the node count and
    up to three node names.
    """
    import onnx

    if isinstance(model_or_path, (str, os.PathLike)):
        model = onnx.load(os.fspath(model_or_path), load_external_data=False)
    else:
        model = model_or_path
    tv = _version_tuple(target)
    lo, hi = opset_range(target)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    problems: dict[str, list[str]] = {}  # message → node names
    warnings: list[str] = []

    def flag(message: str, node) -> None:
        problems.setdefault(message, []).append(node.name or node.op_type)

    if opset is None:
        problems["model imports no default-domain opset"] = []
    elif not lo <= opset <= hi:
        problems[f"opset {opset} is outside TensorRT {target}'s supported range {lo}-{hi}"] = []
    for o in model.opset_import:
        if o.domain not in ("", "ai.onnx"):
            warnings.append(f"imports custom domain '{o.domain}' (version {o.version}): needs a TensorRT plugin")

    dtypes, constants = _types_and_constants(model)
    g = model.graph
    ops = Counter()
    for node in _all_nodes(g):
        ops[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"] += 1
        if node.domain not in ("", "ai.onnx"):
            flag(f"{node.domain}::{node.op_type} is a custom-domain op; TensorRT parses it only with a plugin", node)
            continue
        entry = SUPPORTED_OPS.get(node.op_type)
        if entry is None:
            flag(f"{node.op_type} is not supported by the TensorRT ONNX parser", node)
            continue
        types, since = entry
        if tv < _version_tuple(since):
            flag(f"{node.op_type} needs TensorRT {since} or newer (target {target})", node)
            continue
        idx = _DATA_INPUT.get(node.op_type, 0)
        if len(node.input) > idx and node.input[idx]:
            t = _TYPE_NAMES.get(dtypes.get(node.input[idx]))
            if t == "DOUBLE":
                pass  # reported once below, as a model-level dtype warning
            elif t is not None and t not in types.split():
                flag(f"{node.op_type} on {t} data is not supported (TensorRT supports {types.replace(' ', ', ')})", node)
        for message in _restrictions(node, constants):
            flag(message, node)

    for name, t in sorted(dtypes.items()):
        tn = _TYPE_NAMES.get(t)
        if tn in _NEVER:
            problems.setdefault(f"tensors of type {tn} are not supported by TensorRT", []).append(name)
    doubles = sorted(n for n, t in dtypes.items() if t == 11)
    if doubles:
        warnings.append(f"{len(doubles)} DOUBLE tensors (e.g. {', '.join(doubles[:3])}): TensorRT casts them to FLOAT, "
                        "clamping to ±FLT_MAX; export in float32 instead")
    uint8_inner = [vi.name for vi in g.value_info if vi.type.tensor_type.elem_type == 2]
    if uint8_inner:
        warnings.append(f"UINT8 tensors inside the network ({', '.join(uint8_inner[:3])}): TensorRT allows UINT8 "
                        "only as network input or output")

    unsupported = [_describe(msg, names) for msg, names in problems.items()]
    return {
        "ok": not unsupported,
        "target": str(target),
        "opset": opset,
        "opset_range": (lo, hi),
        "ops": dict(sorted(ops.items())),
        "unsupported": unsupported,
        "warnings": warnings,
    }


def _describe(message: str, names: list[str]) -> str:
    if not names:
        return message
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{message} ({len(names)} node{'s' if len(names) != 1 else ''}: {shown})"


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for a in node.attribute:  # If/Loop/Scan bodies are parsed by TensorRT too
            if a.g is not None and a.g.node:
                yield from _all_nodes(a.g)
            for sub in a.graphs:
                yield from _all_nodes(sub)


def _types_and_constants(model) -> tuple[dict, set]:
    """Element type of every tensor (after shape inference), and the names of build-time constants."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - an unknown op stops inference; report on what we have
        inferred = model
    g = inferred.graph
    dtypes = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type"):
            dtypes[vi.name] = vi.type.tensor_type.elem_type
    constants = set()
    for t in g.initializer:
        dtypes[t.name] = t.data_type
        constants.add(t.name)
    for node in g.node:
        if node.op_type == "Constant":
            constants.update(node.output)
            for a in node.attribute:
                if a.name == "value":
                    dtypes[node.output[0]] = a.t.data_type
    return dtypes, constants


def _restrictions(node, constants: set) -> list[str]:
    """The operators.md restrictions that can be decided from the graph alone."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    out = []
    op = node.op_type
    if op == "LayerNormalization" and any(node.output[1:]):
        out.append("LayerNormalization: only the first output (Y) is supported")
    if op.startswith("Reduce") and len(node.input) > 1 and node.input[1] and node.input[1] not in constants:
        out.append(f"{op}: `axes` must be an initializer")
    if op == "TopK" and attrs.get("sorted", 1) != 1:
        out.append("TopK: `sorted` must be 1")
    if op == "ScatterND" and attrs.get("reduction", b"none") not in (b"none", "none"):
        out.append("ScatterND: `reduction` other than none is not supported")
    if op in ("MaxPool", "AveragePool", "LpPool") and any(d != 1 for d in attrs.get("dilations", [])):
        out.append(f"{op}: `dilations` must be empty or all ones")
    if op in ("MaxPool", "AveragePool") and len(attrs.get("kernel_shape", (0, 0))) not in (2, 3):
        # CNN stems pool 2-D (ResNet's 3x3 max pool); a 1-D pool over tokens is what TensorRT refuses.
        out.append(f"{op}: 2D or 3D pooling only")
    if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
        out.append("MaxPool: the `Indices` output is not supported")
    if op == "Dropout" and len(node.input) > 2 and node.input[2] and node.input[2] not in constants:
        out.append("Dropout: `is_training` must be an initializer (and false)")
    if op == "CumSum" and len(node.input) > 1 and node.input[1] not in constants:
        out.append("CumSum: `axis` must be a build-time constant")
    if op == "Resize" and attrs.get("antialias", 0):
        out.append("Resize: antialiasing is not supported")
    if op == "Constant" and any(k in attrs for k in ("sparse_value", "value_string", "value_strings")):
        out.append("Constant: sparse and string values are not supported")
    return out


def summarize(report: dict) -> Optional[str]:
    """One line for a CLI: None when the model is fine for the target."""
    if report["ok"] and not report["warnings"]:
        return None
    head = "TensorRT-compatible" if report["ok"] else "not TensorRT-compatible"
    parts = report["unsupported"] + report["warnings"]
    return f"{head} (target {report['target']}): " + "; ".join(parts)
