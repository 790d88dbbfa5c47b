"""ONNX Runtime backend of the runner contract (see ``base.py``).

Measurement-relevant session settings are explicit and echoed back in ``settings`` so that a latency number is
always stored next to the configuration that produced it (deployment-notes.md, "ONNX Runtime").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from snexport.errors import BackendUnavailableError, BuildDirError, ProfileError, WeightsError
from snexport.device.runtime.base import RunnerContext

_PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}

_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}

# ONNX TensorProto element types -> numpy dtype names, for checking shared initializers before ORT sees them.
_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 11: "float64"}

# ORT's NodeArg.type strings for the input dtypes we cast to.
_ORT_INPUT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}


def default_threads() -> int:
    """CPUs this process may run on: what we pass as intra-op threads when the caller does not choose."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class OnnxRuntimeRunner(RunnerContext):
    """Runs one ``.onnx`` file in an ``onnxruntime.InferenceSession``.

    ``threads`` sets ``intra_op_num_threads`` explicitly (default: the CPUs this process may use) because ORT's
    own default depends on affinity and core detection, which makes numbers from two machines incomparable.
    ``allow_spinning=False`` stops idle worker threads from busy-waiting, so co-located work (the selector, the
    camera pipeline) does not distort the measurement or get starved by it.

    ``cpu_mem_arena=False`` frees activations after every run instead of keeping a per-session arena at its
    peak (see docs/packs.md for its measured cost). ``shared_initializers`` maps initializer names to
    caller-owned numpy arrays (e.g. views into one memmapped weights file). With ``disable_prepacking=True`` the session computes directly from those buffers, so several
    sessions share one copy of the anchors' weights; with prepacking on, ORT makes private packed copies of
    MatMul weights and the sharing only covers the other tensors.
    """

    backend = "onnxruntime"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        threads: Optional[int] = None,
        inter_op_threads: int = 1,
        allow_spinning: bool = False,
        disable_prepacking: bool = False,
        cpu_mem_arena: bool = True,
        graph_optimization_level: str = "all",
        providers: Optional[Sequence[str]] = None,
        shared_initializers: Optional[Mapping[str, Any]] = None,
    ):
        self.path = Path(path)
        self.threads = int(threads) if threads is not None else default_threads()
        self.inter_op_threads = int(inter_op_threads)
        self.allow_spinning = bool(allow_spinning)
        self.disable_prepacking = bool(disable_prepacking)
        self.cpu_mem_arena = bool(cpu_mem_arena)
        if graph_optimization_level not in _OPT_LEVELS:
            raise ProfileError(
                f"unknown graph_optimization_level '{graph_optimization_level}'; use one of {', '.join(_OPT_LEVELS)}"
            )
        self.graph_optimization_level = graph_optimization_level
        self.providers = [_PROVIDER_ALIASES.get(p.lower(), p) for p in (providers or ["cpu"])]
        self.shared_initializers = dict(shared_initializers or {})
        self.session = None
        self.input_name = ""
        self.input_shape: tuple = ()
        self.input_dtype = ""
        self.output_name = ""
        self.output_shape: tuple = ()
        # OrtValues (and through them the numpy buffers) that the session reads from: they must outlive it.
        self._keepalive: list = []

    # -- contract -------------------------------------------------------------------------------------------

    def load(self) -> None:
        if self.session is not None:
            return
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailableError(
                f"onnxruntime is not importable here ({exc}); install the `onnxruntime` package"
            ) from exc
        if not self.path.is_file():
            raise BuildDirError(f"no ONNX file at {self.path}; run `snexport export` first or check the path")
        available = ort.get_available_providers()
        missing = [p for p in self.providers if p not in available]
        if missing:
            raise BackendUnavailableError(
                f"onnxruntime here lacks {', '.join(missing)} (available: {', '.join(available)}); "
                "install the matching onnxruntime build or ask for providers=['cpu']"
            )

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = self.inter_op_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        level = _OPT_LEVELS[self.graph_optimization_level]
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        spin = "1" if self.allow_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        if self.disable_prepacking:
            options.add_session_config_entry("session.disable_prepacking", "1")
        # Off: activations are allocated per run and freed after it instead of each session keeping an arena at
        # its peak, so many resident sessions cost little more than their weights (engine packs, docs/packs.md).
        options.enable_cpu_mem_arena = self.cpu_mem_arena

        keepalive = []
        if self.shared_initializers:
            self._check_shared_initializers()
            for name, array in self.shared_initializers.items():
                value = ort.OrtValue.ortvalue_from_numpy(array)
                options.add_initializer(name, value)
                keepalive.append((array, value))

        session = ort.InferenceSession(str(self.path), sess_options=options, providers=self.providers)
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1:
            raise BackendUnavailableError(
                f"{self.path.name} has {len(inputs)} inputs; snexport runners take exactly one image input"
            )
        self.input_name = inputs[0].name
        self.input_shape = tuple(inputs[0].shape)
        self.input_dtype = _ORT_INPUT_DTYPES.get(inputs[0].type, inputs[0].type)
        self.output_name = outputs[0].name
        self.output_shape = tuple(outputs[0].shape)
        self._keepalive = keepalive
        self.session = session

    def run(self, x: Any) -> Any:
        """Run one batch; ``x`` is cast to the model's input dtype (float32 or float16) when it differs."""
        import numpy as np

        if self.session is None:
            self.load()
        x = np.asarray(x)
        if x.dtype != self.input_dtype and self.input_dtype in _ORT_INPUT_DTYPES.values():
            x = x.astype(self.input_dtype)
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def close(self) -> None:
        self.session = None
        self._keepalive = []

    # -- details --------------------------------------------------------------------------------------------

    @property
    def settings(self) -> dict:
        """The session configuration, as plain JSON types, for storing next to measurements."""
        return {
            "backend": self.backend,
            "intra_op_num_threads": self.threads,
            "inter_op_num_threads": self.inter_op_threads,
            "allow_spinning": self.allow_spinning,
            "disable_prepacking": self.disable_prepacking,
            "cpu_mem_arena": self.cpu_mem_arena,
            "graph_optimization_level": self.graph_optimization_level,
            "providers": list(self.providers),
            "shared_initializers": sorted(self.shared_initializers),
        }

    def _check_shared_initializers(self) -> None:
        """Refuse names, shapes or dtypes that do not match the graph.

        ORT silently ignores an unknown name (the override would just not happen) and crashes the process on a
        wrong shape (seen with onnxruntime 1.32), so both are checked against the ONNX initializers first.
        """
        import numpy as np

        # Names, dims and types only: the graph is read without touching the weights (onnxproto, no onnx package).
        declared = _initializer_infos(self.path)
        for name, array in self.shared_initializers.items():
            if name not in declared:
                raise WeightsError(
                    f"shared initializer '{name}' is not an initializer of {self.path.name}; "
                    "check the names the exporter wrote (snexport.device.onnxproto.initializer_infos)"
                )
            if not isinstance(array, np.ndarray):
                raise WeightsError(f"shared initializer '{name}' must be a numpy array, got {type(array).__name__}")
            init = declared[name]
            want_shape = tuple(init["dims"])
            want_dtype = _ONNX_DTYPES.get(init["data_type"], str(init["data_type"]))
            if tuple(array.shape) != want_shape or str(array.dtype) != want_dtype:
                raise WeightsError(
                    f"shared initializer '{name}' is {array.dtype}{list(array.shape)} but {self.path.name} "
                    f"declares {want_dtype}{list(want_shape)}; pass the matching slice of the weights file"
                )
            if not array.flags["C_CONTIGUOUS"]:
                raise WeightsError(f"shared initializer '{name}' is not C-contiguous; pass np.ascontiguousarray(...)")


# ---------------------------------------------------------------------------------------------------------------
# Engine packs: one weights file, mapped once, shared by every session (snexport.export.pack writes them)


def _initializer_infos(path: Path) -> dict[str, dict]:
    """``onnxproto.initializer_infos`` of an engine file; a file that is no ONNX model is a WeightsError."""
    from snexport.device import onnxproto

    if not path.is_file():
        raise BuildDirError(f"no ONNX file at {path}; run `snexport export` first or check the path")
    try:
        return onnxproto.initializer_infos(path)
    except onnxproto.OnnxFormatError as exc:
        raise WeightsError(f"{path} is not a readable ONNX model ({exc}); copy it again or re-run the export") from None


def external_initializers(path: str | os.PathLike) -> dict[str, dict]:
    """External-data initializers of one ONNX file: name -> {location, offset, length, dtype, shape}.

    Reads the graph only, not the weights (``snexport.device.onnxproto``: no onnx package). ``location`` is
    resolved against the ONNX file's directory (as ONNX Runtime resolves it); ``dtype`` is a numpy dtype name, or
    the ONNX type number where numpy has none.
    """
    from snexport.device.onnxproto import DATA_LOCATION_EXTERNAL

    path = Path(path)
    out = {}
    for name, info in _initializer_infos(path).items():
        if info["data_location"] != DATA_LOCATION_EXTERNAL:
            continue
        if not info["location"]:
            raise WeightsError(f"initializer '{name}' of {path.name} has external data without a location")
        out[name] = {
            "location": (path.parent / info["location"]).resolve(),
            "offset": info["offset"] or 0,
            "length": info["length"],
            "dtype": _ONNX_DTYPES.get(info["data_type"], str(info["data_type"])),
            "shape": tuple(int(d) for d in info["dims"]),
        }
    return out


class WeightsFileMap:
    """One read-only memory map of a pack's weights file, and numpy views into it for each engine.

    Every engine of a pack gets its initializers as views of this one map, handed to its session through
    ``OnnxRuntimeRunner(shared_initializers=...)``: the bytes are the kernel's page cache, resident once however
    many sessions use them. Read-only (``mode="r"``): neither this process nor a runtime bug can change the file
    or make the sessions diverge. The map stays alive as long as any view does (the runners keep theirs), so
    ``close`` only drops this object's reference.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).resolve()
        self._array = None

    @property
    def array(self):
        """The whole file as a read-only uint8 numpy memmap (mapped on first use)."""
        if self._array is None:
            import numpy as np

            if not self.path.is_file():
                raise WeightsError(f"weights file {self.path} is missing; copy the whole pack directory")
            self._array = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._array

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def initializers(self, onnx_path: str | os.PathLike) -> dict:
        """Views of this file for every external initializer of ``onnx_path`` (all must live in this file)."""
        import numpy as np

        onnx_path = Path(onnx_path)
        data = self.array
        views = {}
        for name, info in external_initializers(onnx_path).items():
            if info["location"] != self.path:
                raise WeightsError(
                    f"{onnx_path.name} reads '{name}' from {info['location']}, not from the pack's weights file "
                    f"{self.path}; the engine and the manifest belong to different packs: re-run the pack"
                )
            dtype = np.dtype(info["dtype"]) if info["dtype"] in _ONNX_DTYPES.values() else None
            if dtype is None:
                raise WeightsError(f"initializer '{name}' of {onnx_path.name} has ONNX type {info['dtype']}, which "
                                   "numpy cannot view; pack it with a float32/float16 export")
            count = 1
            for d in info["shape"]:
                count *= d
            length, offset = count * dtype.itemsize, info["offset"]
            if info["length"] is not None and info["length"] != length:
                raise WeightsError(f"initializer '{name}' of {onnx_path.name} declares {info['length']} bytes but "
                                   f"its shape and dtype need {length}; the file is corrupt, re-run the pack")
            if offset + length > data.size:
                raise WeightsError(f"initializer '{name}' of {onnx_path.name} lies past the end of {self.path.name} "
                                   f"({offset}+{length} > {data.size} bytes): truncated or mismatched weights file")
            if offset % dtype.itemsize:
                raise WeightsError(f"initializer '{name}' of {onnx_path.name} is at offset {offset}, not aligned to "
                                   f"its {dtype.itemsize}-byte elements; re-run the pack")
            views[name] = data[offset:offset + length].view(dtype).reshape(info["shape"])
        return views

    def close(self) -> None:
        self._array = None


# CPU features that select ONNX Runtime's (MLAS) kernels and with them the layout of prepacked weights.
_ISA_FLAGS = frozenset({
    "sse4_1", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "avxvnni", "amx_tile", "amx_bf16", "amx_int8",  # x86 (/proc/cpuinfo flags)
    "asimd", "asimdhp", "asimddp", "fphp", "sve", "sve2", "i8mm", "bf16", "sme",  # arm64 (Features)
})
ORT_PACK_METADATA = "snexport.ort_pack"  # metadata_props key of an ONNX Runtime-optimized pack file


def ort_pack_identity() -> dict:
    """What an ONNX Runtime-optimized file with serialized prepacked weights is tied to on this machine.

    ORT writes prepacked blobs in the layout of the kernels it picked for this CPU (MLAS chooses by instruction
    set) and its own version; the blobs are keyed by their content only, so a file used elsewhere would be read
    as-is and compute garbage. Hence the version, the architecture and the kernel-relevant CPU flags.
    """
    import platform

    import onnxruntime as ort

    flags: set = set()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                flags.update(value.split())
                break
    except OSError:
        pass
    return {"onnxruntime": ort.__version__, "arch": platform.machine(), "isa": sorted(flags & _ISA_FLAGS)}


def check_ort_pack(path: str | os.PathLike) -> Optional[dict]:
    """Refuse an ONNX Runtime-optimized pack file made for another ORT version or CPU; None for other files."""
    import json

    from snexport.device import onnxproto

    try:
        meta = onnxproto.metadata(path)
    except (OSError, onnxproto.OnnxFormatError) as exc:
        raise WeightsError(f"cannot read {path} ({exc}); copy it again or re-run the pack") from None
    if ORT_PACK_METADATA not in meta:
        return None
    try:
        made_for = json.loads(meta[ORT_PACK_METADATA])
    except ValueError:
        raise WeightsError(f"{Path(path).name} has corrupt {ORT_PACK_METADATA} metadata; re-run optimize_pack on "
                           "this device") from None
    here = ort_pack_identity()
    if made_for != here:
        raise BackendUnavailableError(
            f"{Path(path).name} was optimized for {made_for} but this machine is {here}; its prepacked weights "
            "are only valid there: re-run optimize_pack on this device"
        )
    return made_for
