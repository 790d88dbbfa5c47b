"""FP32 ONNX → strongly typed FP16 ONNX (the form TensorRT 11 needs, and TensorRT 10 accepts).

TensorRT 11 builds every network strongly typed: each tensor computes in the dtype the ONNX graph gives it, and
the FP16 builder flag is gone. So reduced precision has to be written into the graph, with the numerically fragile
ops kept in FP32. For ViTs those are LayerNormalization and Softmax: in FP16 the variance/exp sums overflow and the
logits lose all agreement with FP32 (cosine 0.14 vs 0.9997 with LayerNorm in FP32; deployment notes).

What ``cast_to_fp16`` produces:
- every FP32 initializer and constant becomes FP16 (values clipped to ±65504), except those consumed only by kept
  ops (e.g. LayerNorm scale/bias), which stay FP32 so no cast is needed for them;
- every kept op (``keep_fp32_ops``) gets ``Cast(to=FLOAT)`` on its float inputs and ``Cast(to=FLOAT16)`` on its
  float outputs; two kept ops in a row share the FP32 tensor instead of round-tripping through FP16;
- graph inputs and outputs stay FP32: a ``Cast`` to FP16 right after each input and back to FP32 before each output,
  so callers, runners and the validation code feed and read float32 whatever the precision;
- ``Cast(to=FLOAT)``, ``ConstantOfShape`` and ``dtype`` attributes that create FP32 tensors now create FP16 ones, so
  the graph stays type-consistent; ``Resize``/``Upsample`` scales must be FP32 by the ONNX spec and get a cast back.
The result is checked with the ONNX checker in strict (full) mode before it is written.

Written from the ONNX spec with ``onnx.helper``; the overall approach (walk the graph, cast around a block list) is
the one onnxconverter-common's float16 converter popularised, but this is an independent, smaller implementation.
Graphs with control flow (If/Loop/Scan subgraphs) or local functions are refused: static ViT stitches have none.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from typing import Iterable

from snexport.errors import SnexportError
from snexport.hashing import atomic_path

log = logging.getLogger("snexport.export")

DEFAULT_KEEP_FP32 = (
    "LayerNormalization",
    "Softmax",
    "LogSoftmax",
    "GroupNormalization",
    "InstanceNormalization",
    "RMSNormalization",
)
# (op_type, input index) that the ONNX spec types as tensor(float) whatever the data dtype.
_FP32_ONLY_INPUTS = {("Resize", 2), ("Upsample", 1)}
_FP16_MAX = 65504.0


def cast_to_fp16(
    path_in: str | os.PathLike,
    path_out: str | os.PathLike,
    keep_fp32_ops: Iterable[str] = DEFAULT_KEEP_FP32,
) -> None:
    """Write a strongly typed FP16 copy of ``path_in`` to ``path_out`` (atomically); see the module doc."""
    import onnx

    model = onnx.load(os.fspath(path_in))
    _convert(model, frozenset(keep_fp32_ops), label=os.path.basename(os.fspath(path_in)))
    with atomic_path(path_out) as tmp:
        onnx.save(model, str(tmp))


def cast_model_to_fp16(model, keep_fp32_ops: Iterable[str] = DEFAULT_KEEP_FP32, label: str = "model"):
    """``cast_to_fp16`` in memory: converts ``model`` (a ``ModelProto``) in place and returns it."""
    _convert(model, frozenset(keep_fp32_ops), label=label)
    return model


def _convert(model, keep: frozenset, label: str) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
    g = model.graph
    if model.functions or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                              for n in g.node for a in n.attribute):
        raise SnexportError(f"{label}: FP16 conversion does not handle control flow or local functions")
    if any(n.domain not in ("", "ai.onnx") for n in g.node):
        raise SnexportError(f"{label}: FP16 conversion only handles default-domain ONNX ops")

    dtypes = _tensor_dtypes(model)
    init_names = {t.name for t in g.initializer}
    consumers = defaultdict(list)  # tensor name → [(node, input index)]
    for node in g.node:
        for i, name in enumerate(node.input):
            if name:
                consumers[name].append((node, i))

    def needs_fp32(node, idx) -> bool:
        return node.op_type in keep or (node.op_type, idx) in _FP32_ONLY_INPUTS

    def only_fp32_consumers(name) -> bool:
        cons = consumers.get(name, [])
        return bool(cons) and all(needs_fp32(n, i) for n, i in cons)

    clipped = 0

    def to_fp16(arr):
        nonlocal clipped
        big = np.abs(arr) > _FP16_MAX
        clipped += int(np.count_nonzero(big & np.isfinite(arr)))
        return np.clip(arr, -_FP16_MAX, _FP16_MAX).astype(np.float16)

    # 1. Weights: FP16 unless only FP32 consumers read them (LayerNorm scale/bias stay exact, no cast needed).
    still_fp32 = set()  # float tensors that remain FP32 after conversion
    for t in g.initializer:
        if t.data_type != FLOAT:
            continue
        if only_fp32_consumers(t.name):
            still_fp32.add(t.name)
            continue
        t.CopyFrom(numpy_helper.from_array(to_fp16(numpy_helper.to_array(t)), t.name))
    for vi in g.input:  # old-IR models also list initializers as inputs: keep their declared type in step
        if vi.name in init_names and vi.type.tensor_type.elem_type == FLOAT and vi.name not in still_fp32:
            vi.type.tensor_type.elem_type = FLOAT16

    # 2. Nodes that *create* FP32 tensors from attributes must create FP16 ones now.
    for node in g.node:
        if node.op_type == "Constant":
            out = node.output[0]
            if only_fp32_consumers(out):
                if dtypes.get(out) == FLOAT:
                    still_fp32.add(out)
                continue
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == FLOAT:
                    a.t.CopyFrom(numpy_helper.from_array(to_fp16(numpy_helper.to_array(a.t)), a.t.name))
                elif a.name == "value_float":
                    value = numpy_helper.from_array(to_fp16(np.array(a.f, dtype=np.float32)))
                    node.attribute.remove(a)
                    node.attribute.append(helper.make_attribute("value", value))
                elif a.name == "value_floats":
                    value = numpy_helper.from_array(to_fp16(np.array(a.floats, dtype=np.float32)))
                    node.attribute.remove(a)
                    node.attribute.append(helper.make_attribute("value", value))
        elif node.op_type == "ConstantOfShape":
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is None:  # the default fill is float32 zero: make it explicit in FP16
                node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float16))))
            elif attr.t.data_type == FLOAT:
                attr.t.CopyFrom(numpy_helper.from_array(to_fp16(numpy_helper.to_array(attr.t))))
        elif node.op_type == "Cast":
            for a in node.attribute:
                if a.name == "to" and a.i == FLOAT:
                    a.i = FLOAT16
        else:
            for a in node.attribute:
                if a.name == "dtype" and a.type == onnx.AttributeProto.INT and a.i == FLOAT:
                    a.i = FLOAT16

    # 3. Rebuild the node list in topological order with the casts in place.
    counter = iter(range(1 << 30))

    def cast(src: str, dst: str, to: int):
        return helper.make_node("Cast", [src], [dst], to=to, name=f"snexport_fp16_cast_{next(counter)}")

    new_nodes = []
    renamed_inputs = {}
    for vi in g.input:
        if vi.name in init_names or vi.type.tensor_type.elem_type != FLOAT:
            continue
        renamed_inputs[vi.name] = f"{vi.name}__fp16"
        new_nodes.append(cast(vi.name, renamed_inputs[vi.name], FLOAT16))
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in renamed_inputs:
                node.input[i] = renamed_inputs[name]

    fp32_alias = {}  # FP16 output of a kept op → the FP32 tensor it was cast from (reused by the next kept op)
    for node in g.node:
        pre, post = [], []
        for i, name in enumerate(node.input):
            original = _original_name(name, renamed_inputs)
            if not name or dtypes.get(original) != FLOAT or not needs_fp32(node, i) or name in still_fp32:
                continue
            if original != name:  # a graph input read by a kept op: use the FP32 original, no round trip
                node.input[i] = original
                continue
            if name in fp32_alias and node.op_type in keep:
                node.input[i] = fp32_alias[name]
                continue
            fp32_name = f"{name}__fp32_for_{node.name or node.op_type}_{i}"
            pre.append(cast(name, fp32_name, FLOAT))
            node.input[i] = fp32_name
        if node.op_type in keep:
            for i, name in enumerate(node.output):
                if name and dtypes.get(name) == FLOAT:
                    fp32_name = f"{name}__fp32"
                    node.output[i] = fp32_name
                    post.append(cast(fp32_name, name, FLOAT16))
                    fp32_alias[name] = fp32_name
        new_nodes.extend(pre + [node] + post)

    # 4. FP32 graph outputs: the producer now writes an FP16 tensor under a new name; a final node restores the
    #    FP32 tensor under the output's name (straight from the FP32 result when a kept op produced it).
    for out in g.output:
        if out.type.tensor_type.elem_type != FLOAT:
            continue
        fp16_name = f"{out.name}__fp16"
        for n in new_nodes:
            n.output[:] = [fp16_name if o == out.name else o for o in n.output]
            n.input[:] = [fp16_name if i == out.name else i for i in n.input]
        if out.name in fp32_alias:
            new_nodes.append(helper.make_node("Identity", [fp32_alias[out.name]], [out.name],
                                              name=f"snexport_fp16_out_{next(counter)}"))
        else:
            new_nodes.append(cast(fp16_name, out.name, FLOAT))

    # Casts this converter added that nobody reads (e.g. an input read only by kept ops) are dropped.
    read = {i for n in new_nodes for i in n.input} | {o.name for o in g.output}
    new_nodes = [n for n in new_nodes if not (n.name.startswith("snexport_fp16_") and n.output[0] not in read)]
    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]  # element types changed everywhere; stale FP32 annotations would contradict the graph
    if clipped:
        log.warning("%s: %d weight values exceeded the FP16 range and were clipped to ±65504", label, clipped)

    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # noqa: BLE001 - a bug in this converter or an op it does not know how to type
        raise SnexportError(f"{label}: FP16 conversion produced an inconsistent graph: {exc}") from exc


def _original_name(name: str, renamed_inputs: dict) -> str:
    for original, renamed in renamed_inputs.items():
        if renamed == name:
            return original
    return name


def _tensor_dtypes(model) -> dict:
    """Element type of every tensor in the graph (inputs, initializers, constants, inferred intermediates)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    dtypes = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type"):
            dtypes[vi.name] = vi.type.tensor_type.elem_type
    for t in g.initializer:
        dtypes[t.name] = t.data_type
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    dtypes[node.output[0]] = a.t.data_type
                elif a.name in ("value_float", "value_floats"):
                    dtypes[node.output[0]] = onnx.TensorProto.FLOAT
    return dtypes


def fp32_ops(path: str | os.PathLike) -> dict[str, int]:
    """Count of ops per type that compute in FP32 in a converted model (inputs all FP32) — for checks and tests."""
    import onnx
    from collections import Counter

    model = onnx.load(os.fspath(path))
    dtypes = _tensor_dtypes(model)
    counts = Counter()
    for node in model.graph.node:
        if node.op_type == "Cast":
            continue
        ins = [dtypes.get(n) for n in node.input if n]
        if ins and all(t == onnx.TensorProto.FLOAT for t in ins):
            counts[node.op_type] += 1
    return dict(counts)
