"""PyTorch module → one static-shape, self-contained ONNX file.

Every stitch is exported the same way so the device side can treat all of them alike: eval mode, a fixed input
shape (batch, C, H, W), input named ``input``, output named ``logits``, metadata (stitch id, route, ...) in the
model's ``metadata_props``.

Why these choices:
- static shape: dynamic image size drags pos-embed resampling into the graph, which fails to export (deployment
  notes); a static batch lets TensorRT pick kernels for exactly that shape.
- opset ≥ 17: from opset 17 on, LayerNorm exports as one ``LayerNormalization`` op instead of a ReduceMean/Sub/Pow
  chain. TensorRT needs the single op to keep LayerNorm in FP32 inside an FP16 engine; the decomposed chain
  overflows in FP16 (known TensorRT issue with ViTs, cosine 0.14 vs 0.9997).
- exporter: ``"auto"`` tries the TorchScript exporter (``dynamo=False``, what timm's own helper uses) and falls
  back to ``torch.onnx.export(dynamo=True)`` (torch's default since 2.9) where TorchScript fails, logging why.
  TorchScript first for speed: dynamo is Python-bound (torch.export, decompositions, a torchlib registry rebuilt on
  every call, onnxscript's rewriter), 6-16 s per tiny demo stitch on a 2-core box at load average 4-5,
  against 0.4-1.7 s for TorchScript, and the graphs validate the same (benchmarks/export_timing.py).
- in memory: ``export_model`` returns the ``ModelProto`` (no file round trip: the export stage simplifies,
  validates and hashes it before anything is written); ``export_onnx`` writes it as one self-contained file. That
  caps a model at protobuf's 2 GB, far above any DeiT/ViT-B stitch; bigger models are refused with a clear message
  rather than half-supported.
- atomic: ``export_onnx`` writes a temp file in the destination directory and renames it to ``path`` only when
  complete; a killed export leaves no file at ``path``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from snexport.errors import SnexportError
from snexport.hashing import atomic_path

log = logging.getLogger("snexport.export")

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MIN_OPSET = 17
DEFAULT_OPSET = 18  # the dynamo exporter's native opset in torch ≥ 2.9: no version conversion needed
EXPORTERS = ("auto", "dynamo", "torchscript")
_PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # 2 GiB protobuf cap, minus room for the graph itself


def export_onnx(
    module: Any,
    input_shape: Sequence[int],
    path: str | os.PathLike,
    *,
    batch: int = 1,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    metadata: Optional[Mapping[str, str]] = None,
) -> dict:
    """Export ``module`` for inputs shaped ``(batch, *input_shape)`` to ``path``; return what was done.

    Returns ``{"exporter": "torch.onnx torchscript 2.15.0", "exporter_kind": "dynamo"|"torchscript",
    "fallback_reason": str|None, "opset", "input_name", "input_shape", "output_name", "output_shape",
    "size_bytes", "versions": {...}}``.
    """
    import onnx

    model, info = export_model(module, input_shape, batch=batch, opset=opset, exporter=exporter, metadata=metadata)
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return dict(info, size_bytes=path.stat().st_size)


def export_model(
    module: Any,
    input_shape: Sequence[int],
    *,
    batch: int = 1,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    metadata: Optional[Mapping[str, str]] = None,
    with_bytes: bool = False,
) -> tuple:
    """``export_onnx`` without the file: the ``ModelProto`` (I/O named, metadata set) and the same info, less
    ``size_bytes``. With ``with_bytes``, ``(model, info, data)``: ``data`` is the same graph serialized (the
    exporter's own bytes when renaming changed nothing; only the metadata is missing), so a caller that runs the
    raw export need not serialize hundreds of MB again."""
    import torch

    if exporter not in EXPORTERS:
        raise SnexportError(f"unknown exporter '{exporter}'; choose one of {', '.join(EXPORTERS)}")
    if int(opset) < MIN_OPSET:
        raise SnexportError(
            f"opset {opset} is below {MIN_OPSET}: LayerNorm would be decomposed into several ops, which breaks "
            f"FP16 on TensorRT. Use --opset {MIN_OPSET} or higher (default {DEFAULT_OPSET})."
        )
    if len(tuple(input_shape)) != 3 or batch < 1:
        raise SnexportError(f"input_shape must be (C, H, W) and batch ≥ 1; got {tuple(input_shape)}, batch={batch}")
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    param_bytes += sum(b.numel() * b.element_size() for b in module.buffers())
    if param_bytes > _PROTOBUF_LIMIT:
        raise SnexportError(
            f"model has {param_bytes / 1e9:.1f} GB of weights; a self-contained ONNX file is limited to 2 GB. "
            "Export models of this size with external data (not supported by snexport yet)."
        )

    shape = (int(batch), *(int(d) for d in input_shape))
    dtype = next((p.dtype for p in module.parameters()), torch.float32)
    example = torch.randn(*shape, dtype=dtype)
    was_training = module.training
    module.eval()
    try:
        kind, reason, data = _run_exporter(module, example, opset, exporter)
    finally:
        module.train(was_training)
    import onnx

    model = data if isinstance(data, onnx.ModelProto) else onnx.load_from_string(data)
    if _name_io(model) or not isinstance(data, bytes):
        data = model.SerializeToString() if with_bytes else None
    _set_metadata(model, metadata or {})
    actual_opset = _default_opset(model)
    if actual_opset < MIN_OPSET:  # a version converter that silently went lower would defeat the point
        raise SnexportError(f"exporter produced opset {actual_opset} < {MIN_OPSET}")

    versions = _versions(kind)
    info = {
        "exporter": f"torch.onnx {kind} {versions['torch']}",
        "exporter_kind": kind,
        "fallback_reason": reason,
        "opset": actual_opset,
        "input_name": INPUT_NAME,
        "input_shape": shape,
        "output_name": OUTPUT_NAME,
        "output_shape": _static_shape(model.graph.output[0]),
        "versions": versions,
    }
    return (model, info, data) if with_bytes else (model, info)


def _run_exporter(module, example, opset: int, exporter: str) -> tuple[str, Optional[str], Any]:
    """Run the requested exporter(s); returns (kind used, reason for falling back or None, the model: serialized
    bytes from TorchScript, a ModelProto from dynamo)."""
    order = {"auto": ("torchscript", "dynamo"), "torchscript": ("torchscript",), "dynamo": ("dynamo",)}[exporter]
    run = {"torchscript": _export_torchscript, "dynamo": _export_dynamo}
    hint = {"torchscript": "retry with --exporter dynamo", "dynamo": "retry with --exporter torchscript"}
    reason = None
    for i, kind in enumerate(order):
        try:
            model = run[kind](module, example, opset)
        except Exception as exc:  # noqa: BLE001 - any exporter failure is a reason to try the next one
            label = "dynamo" if kind == "dynamo" else "TorchScript"
            if i + 1 == len(order):
                more = f"; {hint[kind]}" if len(order) == 1 else f" (after TorchScript: {reason})"
                raise SnexportError(f"{label} ONNX export failed: {type(exc).__name__}: {_first_line(exc)}{more}") from exc
            reason = f"{type(exc).__name__}: {_first_line(exc)}"
            log.warning("TorchScript ONNX exporter failed (%s); falling back to the dynamo exporter", reason)
            continue
        if reason:
            log.info("exported with the dynamo exporter after the TorchScript failure")
        return kind, reason, model
    raise AssertionError("unreachable")


def _export_dynamo(module, example, opset: int):
    import torch

    # On failure torch.export prints whole FX graphs; keep our stdout/stderr readable (the reason is logged).
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        program = torch.onnx.export(
            module,
            (example,),
            None,  # in memory: the ONNXProgram holds the weights, model_proto embeds them (one self-contained model)
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            optimize=True,  # onnxscript's rewriter: constant folding, dead code; stays in the default ONNX domain
            verbose=False,  # otherwise it prints progress lines to stdout, which the CLI reserves for results
        )
        return program.model_proto


def _export_torchscript(module, example, opset: int):
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The deprecation notice and timm's TracerWarnings (asserts on static shapes) are expected here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            do_constant_folding=True,
        )
    return buffer.getvalue()


def _name_io(model) -> bool:
    """Ensure exactly one input called ``input`` and one output called ``logits`` (stable across stitches); True
    when something was renamed."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    if len(inputs) != 1 or len(g.output) != 1:
        raise SnexportError(
            f"expected one input and one output, got inputs {[i.name for i in inputs]} and outputs "
            f"{[o.name for o in g.output]}; a stitch must map one image batch to one logits tensor"
        )
    renamed = (inputs[0].name, g.output[0].name) != (INPUT_NAME, OUTPUT_NAME)
    _rename_value(model, inputs[0].name, INPUT_NAME)
    _rename_value(model, g.output[0].name, OUTPUT_NAME)
    return renamed


def _rename_value(model, old: str, new: str) -> None:
    if old == new:
        return
    g = model.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.name == old:
            vi.name = new
    for node in g.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new


def _set_metadata(model, metadata: Mapping[str, str]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for key, value in metadata.items():
        if key in existing:
            existing[key].value = str(value)
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = str(key), str(value)


def _default_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _static_shape(value_info) -> tuple:
    dims = value_info.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims)


def _versions(kind: str) -> dict:
    import onnx
    import torch

    versions = {"torch": torch.__version__.split("+")[0], "onnx": onnx.__version__}
    if kind == "dynamo":
        try:
            import onnxscript

            versions["onnxscript"] = onnxscript.__version__
        except ImportError:
            pass
    return versions


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(exc: BaseException) -> str:
    """First line of the message, without terminal colours, plus the root cause when it was wrapped.

    The dynamo exporter wraps torch.export's error ("Failed to export ... step 1/3 ..."); the useful part, e.g.
    a data-dependent branch, is in the innermost ``__cause__``.
    """
    def line(e: BaseException) -> str:
        text = _ANSI.sub("", str(e)).strip().splitlines()
        return text[0][:300] if text else ""

    root = exc
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    head = line(exc) or type(exc).__name__
    if root is not exc and line(root):
        head += f" (cause: {type(root).__name__}: {line(root)})"
    return head


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, without loading its weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}
