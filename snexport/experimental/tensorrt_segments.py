"""TensorRT engine packs: anchor *segments* built once as engines and chained at runtime, shared by all stitches.

Why segments and not one engine per stitch: a TensorRT engine owns its weights in device memory (kernel-specific
layouts), so N stitch engines hold the anchors' blocks N times, and there is no API to make two engines read one
weight buffer. The two other options TensorRT offers do not change that:

- weight-stripped, refittable plans (``BuilderFlag.STRIP_PLAN`` + ``REFIT_IDENTICAL``, refitted from the shared
  weights file with ``Refitter``/``OnnxParserRefitter``) shrink the *files*, but every deserialized engine is
  refitted into its own device copy: memory stays N copies (deployment notes: "shrink files, not memory");
- refitting *one* engine in place per switch fails because stitches differ in structure (block counts, widths).

So a stitch ``front[0..j] → layer → back[k..]`` is cut into segments that other stitches reuse: per anchor, the
units (0 = patch embedding, 1..L = blocks, L+1 = head) are split only where some chosen stitch enters or leaves
that anchor, and every stitching layer is its own tiny segment. Each segment becomes one ONNX file and one engine;
a stitch is the ordered list of its segments (``plan_segments`` computes the fewest segments that serve all chosen
stitches: every cut is forced by some stitch).

Trade-off (to be measured on the device; nothing here could run TensorRT):
- memory: each distinct block's weights are on the device once — the sum of the distinct weights, as for the ONNX
  Runtime pack — plus *one* activation scratch buffer shared by every execution context (contexts are created
  with user-managed device memory and all point at one buffer sized to the largest segment; segments run one
  after another on one stream) plus a few token buffers (197 × 768 × 4 B = 0.6 MB for DeiT-B). Standalone
  engines cost N full copies of the weights and N scratch buffers.
- latency: one ``execute_async_v3`` per segment instead of one per stitch: with S segments a run pays S − 1 extra
  launch gaps (a few µs each on desktop GPUs, ~10-20 µs on Jetson) and loses TensorRT fusions across segment
  boundaries (the residual add of block j with the LayerNorm of block j+1); inside a segment TensorRT optimises
  as usual. ``cuda_graph=True`` captures the whole chain into one CUDA graph per stitch, which removes the launch
  gaps. Expect a few percent for DeiT-S/B at batch 1 (a DeiT-B block is ~0.1-0.3 ms on Orin); measure with
  ``snexport bench`` on the device before relying on it.
- switching: every segment engine is deserialized once; switching stitches picks another chain of resident
  engines, so a warm switch costs no load at all.
- build time: fewer, smaller engines than one per stitch (segments are shared), and one timing cache serves all.

Pieces: ``plan_segments`` (pure), ``export_segments`` (segment ONNX files + ``segments.json``, validated by running
each stitch's chain in ONNX Runtime against the PyTorch stitch, so the decomposition is checked on any host),
``build_segment_engines`` (TensorRT, on the device), ``SegmentEnginePool`` + ``SegmentChainRunner`` (runner
contract over shared engines) and ``segment_runner_factory`` (for ``Selector(runner_factory=...)``). TensorRT and
torch are imported lazily; their tests skip where TensorRT is missing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from snexport.errors import BackendUnavailableError, BuildDirError, ExportValidationError, SnexportError
from snexport.hashing import atomic_path, atomic_write_json, sha256_file, sha256_json

log = logging.getLogger("snexport.export")

SEGMENTS_DIR = "engines/segments"
INDEX_FILE = "segments.json"
SEGMENTS_VERSION = 1
INPUT_NAME, OUTPUT_NAME = "input", "output"


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of one anchor's units, or one stitching layer."""

    id: str  # "deit_s.0-4" (anchor units first-last) or "deit_s>deit_b.3" (stitching layer 3 of that pair)
    kind: str  # "anchor" | "layer"
    anchor: str  # anchor name; for a layer the front anchor
    first: int  # first unit: 0 = patch embedding, 1..L = blocks 0..L-1, L+1 = head (layers: 0)
    last: int
    back: str = ""  # layers only: the back anchor
    layer: Optional[int] = None  # layers only: index within the (front, back) pair

    @property
    def takes_image(self) -> bool:
        return self.kind == "anchor" and self.first == 0

    def describe(self, depth: int) -> str:
        if self.kind == "layer":
            return f"stitching layer {self.layer} {self.anchor}→{self.back}"
        parts = []
        if self.first == 0:
            parts.append("embedding")
        lo, hi = max(self.first, 1) - 1, min(self.last, depth) - 1
        if hi >= lo:
            parts.append(f"blocks {lo}-{hi}" if hi > lo else f"block {lo}")
        if self.last == depth + 1:
            parts.append("head")
        return f"{self.anchor}: " + ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class SegmentPlan:
    segments: tuple  # Segment, in a stable order (anchors in plan order by first unit, then layers)
    routes: dict  # stitch id -> tuple of segment ids, in execution order

    def get(self, segment_id: str) -> Segment:
        for s in self.segments:
            if s.id == segment_id:
                return s
        raise KeyError(segment_id)

    def to_dict(self) -> dict:
        return {"segments": [dataclasses.asdict(s) for s in self.segments],
                "routes": {k: list(v) for k, v in self.routes.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "SegmentPlan":
        return cls(tuple(Segment(**s) for s in data["segments"]),
                   {k: tuple(v) for k, v in data["routes"].items()})


def _unit_ranges(stitch, depths: dict) -> list[tuple]:
    """The (kind, anchor, first, last[, back, layer]) pieces of one stitch's path, in order."""
    if stitch.is_anchor:
        return [("anchor", stitch.front, 0, depths[stitch.front] + 1)]
    return [
        ("anchor", stitch.front, 0, stitch.cut + 1),  # embedding + blocks 0..cut
        ("layer", stitch.front, stitch.back, stitch.layer),
        ("anchor", stitch.back, stitch.resume + 1, depths[stitch.back] + 1),  # blocks resume.. + head
    ]


def plan_segments(plan: Any, stitch_ids: Sequence[str]) -> SegmentPlan:
    """The fewest segments that compose every stitch in ``stitch_ids`` (anchors included if listed).

    An anchor's units are cut after unit u exactly when some chosen stitch ends there (its front, cut j: u = j+1)
    or resumes right after it (its back, resume k: u = k); no other cut is needed, so none is made.
    """
    if not stitch_ids:
        raise SnexportError("no stitches to segment")
    stitches = [plan.get(i) for i in dict.fromkeys(stitch_ids)]
    depths = {a.name: a.depth for a in plan.anchors}
    cuts: dict[str, set] = {a.name: set() for a in plan.anchors}
    used: dict[str, list] = {a.name: [] for a in plan.anchors}
    layers: list[tuple] = []
    for s in stitches:
        for piece in _unit_ranges(s, depths):
            if piece[0] == "layer":
                if piece[1:] not in layers:
                    layers.append(piece[1:])
                continue
            _, anchor, first, last = piece
            used[anchor].append((first, last))
            if first > 0:
                cuts[anchor].add(first - 1)
            if last < depths[anchor] + 1:
                cuts[anchor].add(last)
    segments: list[Segment] = []
    for a in plan.anchors:
        if not used[a.name]:
            continue
        lo_used = min(f for f, _ in used[a.name])
        hi_used = max(last for _, last in used[a.name])
        start = lo_used
        for end in sorted(c for c in cuts[a.name] if lo_used <= c < hi_used) + [hi_used]:
            segments.append(Segment(f"{a.name}.{start}-{end}", "anchor", a.name, start, end))
            start = end + 1
    for front, back, layer in layers:
        segments.append(Segment(f"{front}>{back}.{layer}", "layer", front, 0, 0, back=back, layer=layer))

    routes = {}
    for s in stitches:
        chain = []
        for piece in _unit_ranges(s, depths):
            if piece[0] == "layer":
                chain.append(f"{piece[1]}>{piece[2]}.{piece[3]}")
                continue
            _, anchor, first, last = piece
            chain += [g.id for g in segments if g.kind == "anchor" and g.anchor == anchor
                      and first <= g.first and g.last <= last]
        routes[s.id] = tuple(chain)
    return SegmentPlan(tuple(segments), routes)


# -------------------------------------------------------------------------------------------------------------
# Segment modules and their ONNX files (torch, any host)


def segment_module(net: Any, segment: Segment):
    """A standalone copy (eval mode) of one segment of the SN-Net ``net``."""
    import copy

    from torch import nn

    from snexport.families.vit_modules import ViTEmbedding, ViTHead
    from snexport.stitching.snnet import layer_key

    plan = net.plan
    index = {a.name: i for i, a in enumerate(plan.anchors)}
    if segment.kind == "layer":
        key = layer_key(index[segment.anchor], index[segment.back], segment.layer)
        return copy.deepcopy(net.stitch_layers[key]).eval()
    vit = net.anchors[index[segment.anchor]]
    depth = plan.anchor(segment.anchor).depth
    parts: list = []
    if segment.first == 0:
        parts.append(ViTEmbedding(vit))
    parts += list(vit.blocks)[max(segment.first, 1) - 1:min(segment.last, depth)]
    if segment.last == depth + 1:
        parts.append(ViTHead(vit))
    return copy.deepcopy(nn.Sequential(*parts)).eval()


def _segment_input_shape(plan: Any, segment: Segment, batch: int) -> tuple:
    spec = plan.anchor(segment.anchor)
    if segment.takes_image:
        return (batch, *spec.input_shape)
    return (batch, spec.num_tokens, spec.width)  # a layer's input is its front anchor's tokens


def _export_segment(module, shape: tuple, path: Path, opset: int, exporter: str) -> None:
    import warnings

    import torch

    example = torch.randn(*shape)
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript deprecation and timm's tracer notes are expected
        kwargs = {"dynamo": exporter == "dynamo"}
        if exporter == "dynamo":
            kwargs.update(external_data=False, verbose=False)
        torch.onnx.export(module, (example,), str(tmp), opset_version=opset, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], **kwargs)


def export_segments(
    build_dir: str | os.PathLike,
    net: Any,
    stitch_ids: Sequence[str],
    *,
    batch: int = 1,
    opset: int = 18,
    exporter: str = "torchscript",
    simplifier: str = "onnxsim",
    validate: bool = True,
    num_inputs: int = 2,
    seed: int = 0,
    progress: Optional[Callable[..., None]] = None,
) -> dict:
    """Export every segment of ``stitch_ids`` to ``<build>/engines/segments/`` and write ``segments.json``.

    Validation chains each stitch's segment files in ONNX Runtime and compares the result with the PyTorch
    stitch (``net.materialize``) at the FP32 gates, so a wrong cut fails here, before any device build.
    Returns the index (also written as ``segments.json``).
    """
    from snexport.export.simplify import simplify, simplifier_version
    from snexport.export.stage import safe_file_stem

    if exporter not in ("torchscript", "dynamo"):
        raise SnexportError(f"unknown exporter '{exporter}' for segments; use torchscript or dynamo")
    build_dir = Path(build_dir)
    out = build_dir / SEGMENTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    plan = net.plan
    seg_plan = plan_segments(plan, stitch_ids)
    tool = simplifier_version(simplifier)
    rows = []
    for seg in seg_plan.segments:
        path = out / f"{safe_file_stem(seg.id)}.onnx"
        shape = _segment_input_shape(plan, seg, batch)
        _export_segment(segment_module(net, seg), shape, path, opset, exporter)
        if simplifier != "none":
            simplify(path, path, simplifier)
        rows.append({**dataclasses.asdict(seg), "file": Path(os.path.relpath(path, build_dir)).as_posix(),
                     "sha256": sha256_file(path), "size_bytes": path.stat().st_size, "input_shape": list(shape),
                     "describe": seg.describe(plan.anchor(seg.anchor).depth)})
        if progress is not None:
            progress(1, description=f"segment {seg.id}")
    index = {
        "version": SEGMENTS_VERSION,
        "plan_hash": plan.hash,
        "settings": {"batch": batch, "opset": opset, "exporter": exporter, "simplifier": tool},
        "segments": rows,
        "routes": {k: list(v) for k, v in seg_plan.routes.items()},
        "engines": {},
    }
    if validate:
        index["validation"] = _validate_chains(build_dir, index, net, num_inputs, seed)
    index["hash"] = sha256_json({k: v for k, v in index.items() if k != "validation"})
    atomic_write_json(out / INDEX_FILE, index)
    return index


def read_segments(build_dir: str | os.PathLike) -> dict:
    path = Path(build_dir) / SEGMENTS_DIR / INDEX_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BuildDirError(f"no {INDEX_FILE} in {path.parent}; run export_segments first") from None


class OrtSegmentChain:
    """One stitch run as its chain of segment ONNX files in ONNX Runtime; sessions shared through ``sessions``.

    For validating a segment plan on any host (and for comparing a device's chain against it).
    """

    def __init__(self, build_dir: str | os.PathLike, index: dict, stitch_id: str, sessions: Optional[dict] = None):
        self.build_dir = Path(build_dir)
        self.files = {s["id"]: s["file"] for s in index["segments"]}
        self.route = index["routes"][stitch_id]
        self.sessions = sessions if sessions is not None else {}

    def run(self, x):
        import onnxruntime as ort

        for seg in self.route:
            if seg not in self.sessions:
                options = ort.SessionOptions()
                options.log_severity_level = 3
                self.sessions[seg] = ort.InferenceSession(str(self.build_dir / self.files[seg]), options,
                                                          providers=["CPUExecutionProvider"])
            x = self.sessions[seg].run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        return x


def _validate_chains(build_dir: Path, index: dict, net: Any, num_inputs: int, seed: int) -> dict:
    import numpy as np

    from snexport.export.validate import compare_logits, reference_logits

    plan = net.plan
    sessions: dict = {}
    batch = index["settings"]["batch"]
    figures, failures = {}, []
    for stitch_id in index["routes"]:
        shape = plan.anchor(plan.get(stitch_id).front).input_shape
        n = max(num_inputs, batch) // batch * batch
        inputs = np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)
        chain = OrtSegmentChain(build_dir, index, stitch_id, sessions)
        actual = np.concatenate([chain.run(inputs[i:i + batch]) for i in range(0, n, batch)])
        figs, fails = compare_logits(reference_logits(net.materialize(stitch_id), inputs), actual)
        figures[stitch_id] = {k: figs[k] for k in ("max_abs", "rel_max_abs", "cosine", "top1_agreement", "samples")}
        failures += [f"{stitch_id}: {f}" for f in fails]
    if failures:
        raise ExportValidationError("segment chains", failures)
    return figures


# -------------------------------------------------------------------------------------------------------------
# TensorRT: build on the device, run chains over shared engines


def build_segment_engines(
    build_dir: str | os.PathLike,
    *,
    precision: str = "fp16",
    workspace_mb: int = 1024,
    timing_cache_path: Optional[str | os.PathLike] = None,
    progress: Optional[Callable[..., None]] = None,
) -> dict:
    """Build one engine per segment (``<stem>.<precision>.engine``) and record them in ``segments.json``.

    All segments share one timing cache (default ``engines/segments/timing.<precision>.cache``): every block of
    an anchor has the same shapes, so later builds reuse earlier tactics. FP16 segments are cast first
    (``export.fp16.cast_to_fp16``: LayerNorm/Softmax stay FP32), which builds strongly typed on TensorRT 10 and 11.
    """
    from snexport.export.fp16 import cast_to_fp16
    from snexport.export.stage import safe_file_stem
    from snexport.device.tensorrt_build import PRECISIONS, build_engine, import_tensorrt

    trt = import_tensorrt()
    if precision not in PRECISIONS:
        raise SnexportError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")
    build_dir = Path(build_dir)
    index = read_segments(build_dir)
    out = build_dir / SEGMENTS_DIR
    cache = Path(timing_cache_path) if timing_cache_path else out / f"timing.{precision}.cache"
    engines = {}
    for seg in index["segments"]:
        onnx_path = build_dir / seg["file"]
        if sha256_file(onnx_path) != seg["sha256"]:
            raise BuildDirError(f"{onnx_path} changed since export_segments; export the segments again")
        stem = safe_file_stem(seg["id"])
        engine_path = out / f"{stem}.{precision}.engine"
        fp16_onnx = None
        if precision == "fp16":
            fp16_onnx = out / f"{stem}.fp16.onnx"
            cast_to_fp16(onnx_path, fp16_onnx)
        info = build_engine(onnx_path, engine_path, precision=precision, workspace_mb=workspace_mb,
                            timing_cache_path=cache, fp16_onnx_path=fp16_onnx)
        engines[seg["id"]] = {"file": Path(os.path.relpath(engine_path, build_dir)).as_posix(),
                              "sha256": info["sha256"], "size_bytes": info["size_bytes"],
                              "tensorrt": info["tensorrt"], "gpu": info["gpu"]}
        if progress is not None:
            progress(1, description=f"engine {seg['id']}")
    index["engines"][precision] = {"tensorrt": trt.__version__, "segments": engines}
    atomic_write_json(out / INDEX_FILE, index)
    return index


def _trt_context(trt, engine):
    """An execution context without its own activation memory (the pool's scratch buffer is set later)."""
    strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
    if strategy is not None:  # TensorRT >= 10
        return engine.create_execution_context(strategy.USER_MANAGED)
    return engine.create_execution_context_without_device_memory()


def _scratch_size(engine) -> int:
    size = getattr(engine, "device_memory_size_v2", None)  # 10.x; device_memory_size is deprecated there
    return int(size if size is not None else engine.device_memory_size)


def _set_scratch(context, pointer: int, size: int) -> None:
    if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1
        context.set_device_memory(pointer, size)
    else:
        context.device_memory = pointer


class SegmentEnginePool:
    """The segment engines of one build on one GPU, each deserialized once, and one shared scratch buffer.

    Every ``SegmentChainRunner`` of the pool creates its contexts from these engines, so a block's weights are on
    the device once however many stitches use it. Runs are serialized by ``lock`` because all contexts share
    the scratch buffer (the selector runs one engine at a time anyway).
    """

    def __init__(self, build_dir: str | os.PathLike, precision: str = "fp16", device: int = 0):
        self.build_dir = Path(build_dir)
        self.precision = precision
        self.device = int(device)
        self.index = read_segments(self.build_dir)
        if precision not in self.index.get("engines", {}):
            raise BuildDirError(f"no {precision} segment engines in {self.build_dir / SEGMENTS_DIR}; run "
                                "build_segment_engines on this device")
        self.lock = threading.RLock()
        self.scratch = None  # torch uint8 CUDA tensor
        self.scratch_version = 0
        self._runtime = None
        self._engines: dict = {}

    def load(self, segment_ids: Sequence[str]) -> None:
        """Deserialize the engines of ``segment_ids`` not yet loaded; grow the scratch buffer if needed."""
        from snexport.device.tensorrt_build import import_tensorrt
        from snexport.device.runtime.tensorrt_runner import check_engine_version

        trt = import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise BackendUnavailableError("TensorRT segment engines need a CUDA GPU visible to torch")
        info = self.index["engines"][self.precision]
        check_engine_version(info["tensorrt"], trt.__version__, f"segment engines ({self.precision})")
        with self.lock:
            if self._runtime is None:
                self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            for seg in segment_ids:
                if seg in self._engines:
                    continue
                record = info["segments"][seg]
                path = self.build_dir / record["file"]
                data = path.read_bytes()
                from snexport.hashing import sha256_bytes

                if sha256_bytes(data) != record["sha256"]:
                    raise BuildDirError(f"{path} does not match its sha256 in {INDEX_FILE}; rebuild the segments")
                engine = self._runtime.deserialize_cuda_engine(data)
                if engine is None:
                    raise BackendUnavailableError(f"TensorRT could not deserialize {path.name}; rebuild it here")
                self._engines[seg] = engine
            need = max((_scratch_size(e) for e in self._engines.values()), default=0)
            if self.scratch is None or self.scratch.numel() < need:
                self.scratch = torch.empty(max(need, 1), dtype=torch.uint8, device=f"cuda:{self.device}")
                self.scratch_version += 1  # runners re-point their contexts (and re-capture graphs)

    def engine(self, segment_id: str):
        return self._engines[segment_id]

    @property
    def loaded(self) -> list[str]:
        return list(self._engines)

    def close(self) -> None:
        with self.lock:
            self._engines.clear()
            self.scratch = None
            self._runtime = None


class SegmentChainRunner:
    """Runner contract (load/run/close) for one stitch as a chain of the pool's segment engines."""

    backend = "tensorrt"

    def __init__(self, pool: SegmentEnginePool, stitch_id: str, *, cuda_graph: bool = False):
        self.pool = pool
        self.stitch_id = stitch_id
        self.route = list(pool.index["routes"][stitch_id])
        self.cuda_graph = bool(cuda_graph)
        self.input_name, self.output_name = INPUT_NAME, OUTPUT_NAME
        self.input_shape: tuple = ()
        self.output_shape: tuple = ()
        self.input_dtype = "float32"
        self._contexts: list = []
        self._buffers: list = []  # buffers[i] is segment i's input, buffers[i+1] its output
        self._stream = None
        self._graph = None
        self._version = -1

    def load(self) -> None:
        if self._contexts:
            return
        from snexport.device.tensorrt_build import import_tensorrt

        trt = import_tensorrt()
        import torch

        self.pool.load(self.route)
        device = f"cuda:{self.pool.device}"
        buffers, contexts = [], []
        for i, seg in enumerate(self.route):
            engine = self.pool.engine(seg)
            names = [engine.get_tensor_name(k) for k in range(engine.num_io_tensors)]
            ins = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            outs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
            if len(ins) != 1 or len(outs) != 1:
                raise BackendUnavailableError(f"segment {seg} has inputs {ins} and outputs {outs}; expected one each")
            if i == 0:  # the chain's input; FP32 I/O even for FP16 segments (cast_to_fp16 keeps FP32 I/O)
                buffers.append(torch.empty(tuple(engine.get_tensor_shape(ins[0])), dtype=torch.float32, device=device))
            elif tuple(buffers[-1].shape) != tuple(engine.get_tensor_shape(ins[0])):
                raise BackendUnavailableError(f"segment {seg} expects {tuple(engine.get_tensor_shape(ins[0]))}, "
                                              f"its predecessor gives {tuple(buffers[-1].shape)}")
            buffers.append(torch.empty(tuple(engine.get_tensor_shape(outs[0])), dtype=torch.float32, device=device))
            context = _trt_context(trt, engine)
            if context is None:
                raise BackendUnavailableError(f"TensorRT could not create a context for segment {seg}")
            context.set_tensor_address(ins[0], buffers[i].data_ptr())
            context.set_tensor_address(outs[0], buffers[i + 1].data_ptr())
            contexts.append(context)
        self._contexts, self._buffers = contexts, buffers
        self._stream = torch.cuda.Stream(device=device)
        self.input_shape, self.output_shape = tuple(buffers[0].shape), tuple(buffers[-1].shape)

    def _prepare(self) -> None:
        """Point every context at the pool's scratch buffer (again, if it grew) and capture the graph."""
        import torch

        if self._version == self.pool.scratch_version:
            return
        scratch = self.pool.scratch
        for context in self._contexts:
            _set_scratch(context, scratch.data_ptr(), scratch.numel())
        self._graph = None
        if self.cuda_graph:
            with torch.cuda.stream(self._stream):
                self._enqueue()  # TensorRT does lazy set-up on the first enqueue; that must not be captured
            self._stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self._stream):
                self._enqueue()
            self._graph = graph
        self._version = self.pool.scratch_version

    def _enqueue(self) -> None:
        handle = self._stream.cuda_stream
        for seg, context in zip(self.route, self._contexts):
            if not context.execute_async_v3(handle):
                raise BackendUnavailableError(f"TensorRT failed to execute segment {seg} of {self.stitch_id}")

    def run(self, x: Any) -> Any:
        import numpy as np
        import torch

        if not self._contexts:
            self.load()
        src = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
        with self.pool.lock:
            self._prepare()
            with torch.cuda.stream(self._stream):
                self._buffers[0].copy_(src.to(torch.float32).reshape(self._buffers[0].shape))
                if self._graph is not None:
                    self._graph.replay()
                else:
                    self._enqueue()
                out = self._buffers[-1].to("cpu")
            self._stream.synchronize()
        return out.numpy()

    def close(self) -> None:
        self._graph = None
        self._contexts = []
        self._buffers = []
        self._stream = None
        self._version = -1

    @property
    def settings(self) -> dict:
        return {"backend": self.backend, "segments": list(self.route), "cuda_graph": self.cuda_graph,
                "precision": self.pool.precision}


def segment_runner_factory(pool: SegmentEnginePool, *, cuda_graph: bool = False) -> Callable[[dict, Path], Any]:
    """A ``Selector(runner_factory=...)`` that runs each manifest engine as its stitch's chain in ``pool``."""

    def factory(entry: dict, manifest_dir: Path):
        runner = SegmentChainRunner(pool, entry["stitch_id"], cuda_graph=cuda_graph)
        runner.load()
        return runner

    return factory
