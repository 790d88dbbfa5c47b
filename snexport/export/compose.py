"""A stitch's ONNX graph composed from the graphs of its pieces, each piece exported once per export run.

Every configuration of an SN-Net is a chain of shared pieces (``StitchedNet.pieces``): an anchor's stem, some of
its blocks, a stitching layer, the other anchor's blocks and head. Tracing each stitch whole repeats the same work
for every stitch (the trace and the simplifier grow with the stitch: 4.8 s + 4.7 s for an 18-GFLOP DeiT-S/B
stitch on 2 cores), so ``PieceGraphs`` exports and simplifies each piece once, for the input shape it meets, and a
stitch's graph is its pieces' graphs chained: tensor names prefixed with the piece's place in the route, node
names with the route's module path (``/stitch/...`` for the stitching layer, as a whole-model trace names it, so
the int8 export still finds it), one piece's output wired to the next one's input.

Weights are serialized once too: a piece's large initializers are kept as serialized ``TensorProto`` bytes (less
their name), and a stitch's file is spliced from them (``ComposedModel.serialize``): protobuf allows a message's
fields in any order and repeated fields to be written one entry at a time, so the file is the model's small part,
serialized, followed by one initializer entry (a name field and the cached bytes) per weight. Serializing a
346 MB ``ModelProto`` whole took 0.85-1.3 s on 2 cores, copying the cached pieces into it 0.2-0.5 s more.

The composed graph is validated like a traced one (the export stage runs it against the PyTorch reference of the
whole stitch); a piece that does not compose (several inputs, a subgraph or a local function, mixed opsets) makes
``compose`` raise ``NotComposable`` and the stage traces that stitch whole.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Optional, Sequence

from snexport.errors import SnexportError

_WRAPPER_SCOPE = "/0"  # TorchScript's scope of the piece inside the Sequential it is traced in


class NotComposable(SnexportError):
    """This module cannot be composed from piece graphs; trace it whole."""


def composable(module: Any) -> bool:
    """Whether ``module`` is a route made of keyed pieces (``StitchedNet`` from ``SNNet.materialize``)."""
    return getattr(module, "piece_keys", None) is not None and callable(getattr(module, "pieces", None))


class PieceGraphs:
    """The simplified ONNX graph of each piece met so far, by (piece key, input shape); one per export run, since
    the key names a piece of one SN-Net with fixed weights."""

    def __init__(self, *, opset: int, exporter: str, simplifier: str):
        self.opset, self.exporter, self.simplifier = int(opset), exporter, simplifier
        self._graphs: dict[tuple, Any] = {}
        self._refused: dict[tuple, str] = {}  # pieces that cannot be traced or simplified alone, and why
        self.kind: Optional[str] = None  # the exporter that made the pieces (the first one's)
        self.fallback_reason: Optional[str] = None

    def __len__(self) -> int:
        return len(self._graphs)

    def compose(self, module: Any, input_shape: Sequence[int], batch: int = 1,
                metadata: Optional[Mapping[str, str]] = None) -> tuple:
        """``(ComposedModel, info)`` of ``module`` for inputs shaped ``(batch, *input_shape)``, ``info`` as
        ``onnx_export.export_model`` gives it; pieces not met before are exported and simplified here."""
        import onnx

        from snexport.export.onnx_export import (INPUT_NAME, MIN_OPSET, OUTPUT_NAME, _default_opset, _set_metadata,
                                                 _static_shape, _versions)

        if not composable(module):
            raise NotComposable(f"{type(module).__name__} is not a route of keyed pieces")
        graphs = []
        traced, started = 0, time.perf_counter()
        shape = (int(batch), *(int(d) for d in input_shape))
        for path, key, piece in module.pieces():
            if key is None:
                raise NotComposable(f"piece {path} has no key")
            if (key, shape) in self._refused:
                raise NotComposable(self._refused[(key, shape)])
            cached = self._graphs.get((key, shape))
            if cached is None:
                try:
                    cached = self._export_piece(piece, shape, label=f"{key} {shape}")
                except SnexportError as exc:  # the stitch is traced whole; its own errors are the ones to report
                    self._refused[(key, shape)] = f"piece {key} {shape}: {exc}"
                    raise NotComposable(self._refused[(key, shape)]) from None
                self._graphs[(key, shape)] = cached
                traced += 1
            graphs.append((path, cached))
            # The next piece's input: this one's static output shape (no forward pass for pieces met before).
            shape = _static_shape(cached[0].graph.output[0])
            if not all(isinstance(d, int) and d > 0 for d in shape):
                raise NotComposable(f"{key} has no static output shape ({shape})")
        tracing_s = time.perf_counter() - started  # new pieces' traces (the rest of the loop is lookups)

        model = onnx.ModelProto()
        model.ir_version = max(g.ir_version for _, (g, _) in graphs)
        model.producer_name = "snexport compose"
        opsets: dict[str, int] = {}
        for _, (g, _) in graphs:
            for o in g.opset_import:
                if opsets.setdefault(o.domain, o.version) != o.version:
                    raise NotComposable(f"pieces use opset {opsets[o.domain]} and {o.version} of '{o.domain}'")
        for domain, version in opsets.items():
            entry = model.opset_import.add()
            entry.domain, entry.version = domain, version
        graph = model.graph
        graph.name = str(getattr(module, "stitch_id", "") or "stitch")
        first_input = _data_input(graphs[0][1][0])
        graph.input.add().CopyFrom(first_input)
        graph.input[0].name = INPUT_NAME
        incoming = INPUT_NAME
        big: list[tuple] = []
        for i, (path, (g, weights)) in enumerate(graphs):
            last = i == len(graphs) - 1
            outgoing = OUTPUT_NAME if last else f"{path}/output"
            big += _append(graph, g, weights, path, incoming, outgoing)
            if last:
                graph.output.add().CopyFrom(g.graph.output[0])
                graph.output[0].name = OUTPUT_NAME
            else:
                boundary = graph.value_info.add()
                boundary.CopyFrom(g.graph.output[0])
                boundary.name = outgoing
            incoming = outgoing
        _set_metadata(model, metadata or {})
        if _default_opset(model) < MIN_OPSET:
            raise SnexportError(f"pieces were exported at opset {_default_opset(model)} < {MIN_OPSET}")
        versions = _versions(self.kind)
        info = {
            "exporter": f"torch.onnx {self.kind} {versions['torch']}",
            "exporter_kind": self.kind,
            "fallback_reason": self.fallback_reason,
            "opset": _default_opset(model),
            "input_name": INPUT_NAME,
            "input_shape": (int(batch), *(int(d) for d in input_shape)),
            "output_name": OUTPUT_NAME,
            "output_shape": _static_shape(graph.output[0]),
            "versions": versions,
            "composed_from": len(graphs),
            "pieces_traced": traced,  # pieces met for the first time in this run, traced for this stitch
            "pieces_traced_s": round(tracing_s, 3),
        }
        return ComposedModel(model, big), info

    def _export_piece(self, piece: Any, shape: tuple, label: str):
        """One piece traced at ``shape`` and simplified (weights kept out of the simplifier, simplify.py)."""
        import onnx
        import torch

        from snexport.export.onnx_export import _run_exporter
        from snexport.export.simplify import simplify_model

        example = torch.randn(*shape, dtype=next((p.dtype for p in piece.parameters()), torch.float32))
        was_training = piece.training
        piece.eval()
        try:
            # In a Sequential, traced at top level with one argument: traced alone, a timm block's optional
            # arguments (attn_mask, is_causal) would become graph inputs, which TorchScript passes as tensors.
            kind, reason, data = _run_exporter(torch.nn.Sequential(piece), example, self.opset, self.exporter)
        finally:
            piece.train(was_training)
        g = data if isinstance(data, onnx.ModelProto) else onnx.load_from_string(data)
        if self.kind is None:
            self.kind = kind
        self.fallback_reason = self.fallback_reason or reason
        if len(g.functions) or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                   for n in g.graph.node for a in n.attribute):
            raise NotComposable(f"{label} exports local functions or subgraphs")
        _data_input(g)  # exactly one data input
        if len(g.graph.output) != 1:
            raise NotComposable(f"{label} has {len(g.graph.output)} outputs")
        return _split_weights(simplify_model(g, self.simplifier, label=label))


class ComposedModel:
    """A composed stitch: ``model`` holds everything but the large initializers, whose serialized bytes are
    spliced in by ``serialize`` (module doc)."""

    def __init__(self, model, big: Sequence[tuple]):
        self.model = model  # metadata goes here
        self._big = list(big)  # (external-data stub named as in this graph, TensorProto bytes without the name)

    def skeleton(self):
        """The model with each large initializer as a stub pointing at data that is never read: what checks of
        ops, dtypes and shapes need (like the export stage's ``_to_skeleton``)."""
        import onnx

        out = onnx.ModelProto()
        out.CopyFrom(self.model)
        out.graph.initializer.extend(stub for stub, _ in self._big)
        return out

    def serialize(self) -> bytes:
        """The self-contained ONNX file's bytes: parses to the model with every initializer inline."""
        import onnx

        init_tag = _tag(onnx.GraphProto, "initializer")
        name_tag = _tag(onnx.TensorProto, "name")
        graph_parts = [self.model.graph.SerializeToString()]
        for stub, body in self._big:
            name = stub.name.encode("utf-8")
            entry = [name_tag, _varint(len(name)), name]
            size = sum(len(p) for p in entry) + len(body)
            graph_parts += [init_tag, _varint(size), *entry, body]
        graph_size = sum(len(p) for p in graph_parts)
        header = onnx.ModelProto()
        header.CopyFrom(self.model)
        header.ClearField("graph")
        return b"".join([header.SerializeToString(), _tag(onnx.ModelProto, "graph"), _varint(graph_size),
                         *graph_parts])


# Initializers of at least this many bytes are kept serialized and spliced (smaller ones stay in the graph); the
# export stage's weightless skeletons stub the same ones.
SPLICE_MIN_BYTES = 4096


def weightless_stub(tensor):
    """``tensor``'s name, dtype and shape, its data "external" at a location that is never read: what checks of
    ops, dtypes and shapes need of a weight."""
    import onnx

    stub = onnx.TensorProto()
    stub.name, stub.data_type = tensor.name, tensor.data_type
    stub.dims.extend(tensor.dims)
    stub.data_location = onnx.TensorProto.EXTERNAL
    entry = stub.external_data.add()
    entry.key, entry.value = "location", "weights-not-loaded"
    return stub


def _split_weights(model) -> tuple:
    """(``model`` less its large initializers, {name: (stub, TensorProto bytes without the name)})."""
    import onnx

    weights = {}
    keep = []
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.raw_data) < SPLICE_MIN_BYTES:
            keep.append(t)
            continue
        stub = weightless_stub(t)
        t.ClearField("name")
        weights[stub.name] = (stub, t.SerializeToString())
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    inputs = [i for i in model.graph.input if i.name not in weights]  # initializers listed as inputs (old IRs)
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    return model, weights


def _tag(message, field: str) -> bytes:
    """The wire-format key of a length-delimited field of ``message`` (numbers from ONNX's own descriptors)."""
    return _varint(message.DESCRIPTOR.fields_by_name[field].number << 3 | 2)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _data_input(g):
    inits = {t.name for t in g.graph.initializer}
    inputs = [i for i in g.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise NotComposable(f"a piece graph has {len(inputs)} data inputs")
    return inputs[0]


def _append(graph, piece, weights: Mapping[str, tuple], path: str, incoming: str, outgoing: str) -> list:
    """Copy ``piece``'s graph into ``graph``: its input read from ``incoming``, its output written to
    ``outgoing``, every other tensor name prefixed with ``path``, every node name under ``/path``. Returns its
    large initializers as (stub renamed, bytes) for ``ComposedModel``."""
    g = piece.graph
    data_in, data_out = _data_input(piece).name, g.output[0].name
    rename = {data_in: incoming, data_out: outgoing, "": ""}

    def new(name: str) -> str:
        got = rename.get(name)
        if got is None:
            got = rename[name] = f"{path}/{name}"
        return got

    for t in g.initializer:
        copy = graph.initializer.add()
        copy.CopyFrom(t)
        copy.name = new(t.name)
    big = []
    for name, (stub, body) in weights.items():
        renamed = type(stub)()
        renamed.CopyFrom(stub)
        renamed.name = new(name)
        big.append((renamed, body))
    for node in g.node:
        copy = graph.node.add()
        copy.CopyFrom(node)
        name = node.name[len(_WRAPPER_SCOPE):] if node.name.startswith(_WRAPPER_SCOPE + "/") else node.name
        copy.name = f"/{path}{name}" if name.startswith("/") else f"/{path}/{name}"
        copy.input[:] = [new(n) for n in node.input]
        copy.output[:] = [new(n) for n in node.output]
    for vi in g.value_info:
        if vi.name in (data_in, data_out):
            continue
        copy = graph.value_info.add()
        copy.CopyFrom(vi)
        copy.name = new(vi.name)
    return big
