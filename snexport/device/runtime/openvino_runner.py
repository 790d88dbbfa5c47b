"""OpenVINO backend of the runner contract (see ``base.py``): one ``.onnx`` file compiled for the CPU.

Why a second CPU runtime: on x86 OpenVINO's CPU plugin is often faster than ONNX Runtime on the same ONNX file
(issue 13: DeiT-S, 2 threads, 85.6 vs 94.3 ms), so `snexport bench` measures both and runs each engine on the
faster (``snexport.device.bench``). Every setting that changes a number is explicit and echoed in ``settings``,
read back from the compiled model (what OpenVINO actually applied, not what was asked):

- ``threads`` -> ``INFERENCE_NUM_THREADS`` (default: the CPUs this process may run on, as for ONNX Runtime);
- ``performance_hint="LATENCY"`` and ``num_streams=1``: one request at a time, all threads on it (batch-1 serving);
- ``precision_hint="f32"`` -> ``INFERENCE_PRECISION_HINT``: the CPU plugin's default is bf16 on CPUs with native
  bf16 (AMX / avx512_bf16) and f16 on some ARM cores, which would silently make an "fp32" engine a lower-precision
  one with another accuracy; f32 keeps the engine what the manifest says it is;
- ``cpu_pinning=False``: no thread pinning, so co-located work (the app, the selector) is not starved — the
  closest OpenVINO has to ONNX Runtime's ``allow_spinning=False``;
- ``enable_mmap=True``: external weights are mapped, not read, so engines of one pack share the weights file's
  page cache. OpenVINO does not share anything else across compiled models: each keeps its own repacked copy of
  its weights (about 1.1x its weights anonymous + its slice of the mapped file, mapped once per compiled model;
  measured in benchmarks/openvino_memory.py; docs: device-apis §1).

OpenVINO reads the portable ONNX (standalone files, or a pack's files whose external data lies in the shared
weights file); it cannot use ONNX Runtime's optimized pack, whose prepacked blobs are ORT's own
(``deployset.backend_files`` picks the file). The runtime is imported in ``load``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Optional

from snexport.device.runtime.base import RunnerContext
from snexport.device.runtime.onnxruntime_runner import default_threads
from snexport.errors import BackendUnavailableError, BuildDirError, ProfileError

PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
PRECISION_HINTS = ("f32", "bf16", "f16")
# OpenVINO element types -> numpy dtype names of inputs we cast to.
_INPUT_DTYPES = {"f32": "float32", "f16": "float16", "f64": "float64"}


class OpenVinoRunner(RunnerContext):
    """Runs one ``.onnx`` file on OpenVINO (``device="CPU"``); see the module docstring for the settings.

    ``run`` is safe from several threads at once (the selector's contract): each thread gets its own infer
    request of the one compiled model, created on first use; ``close`` drops them all.
    """

    backend = "openvino"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        threads: Optional[int] = None,
        performance_hint: str = "LATENCY",
        num_streams: int = 1,
        precision_hint: str = "f32",
        cpu_pinning: bool = False,
        enable_mmap: bool = True,
        cache_dir: Optional[str | os.PathLike] = None,
        device: str = "CPU",
    ):
        self.path = Path(path)
        self.threads = int(threads) if threads is not None else default_threads()
        if self.threads < 1:
            raise ProfileError(f"threads must be >= 1, got {self.threads}")
        if performance_hint not in PERFORMANCE_HINTS:
            raise ProfileError(f"unknown performance_hint '{performance_hint}'; use one of "
                               f"{', '.join(PERFORMANCE_HINTS)}")
        if precision_hint not in PRECISION_HINTS:
            raise ProfileError(f"unknown precision_hint '{precision_hint}'; use one of {', '.join(PRECISION_HINTS)}")
        if int(num_streams) < 1:
            raise ProfileError(f"num_streams must be >= 1, got {num_streams}")
        self.performance_hint = performance_hint
        self.num_streams = int(num_streams)
        self.precision_hint = precision_hint
        self.cpu_pinning = bool(cpu_pinning)
        self.enable_mmap = bool(enable_mmap)
        # A compiled-model cache makes the next load faster but writes a blob holding a full copy of the weights
        # per engine (device-apis §1), so it is off unless asked for.
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.device = str(device)
        self.compiled = None
        self.input_name = ""
        self.input_shape: tuple = ()
        self.input_dtype = ""
        self.output_name = ""
        self.output_shape: tuple = ()
        self._applied: dict = {}
        self._version = ""
        self._requests: dict[int, Any] = {}  # thread id -> its infer request
        self._requests_lock = threading.Lock()
        self._tensor = None  # ov.Tensor, bound in load

    # -- contract -------------------------------------------------------------------------------------------

    def load(self) -> None:
        if self.compiled is not None:
            return
        try:
            import openvino as ov
        except ImportError as exc:
            raise BackendUnavailableError(
                f"openvino is not importable here ({exc}); pip install 'snexport[openvino]'"
            ) from exc
        if not self.path.is_file():
            raise BuildDirError(f"no ONNX file at {self.path}; run `snexport export` first or check the path")
        core = ov.Core()
        if self.device not in core.available_devices:
            raise BackendUnavailableError(f"OpenVINO here has no {self.device} device (available: "
                                          f"{', '.join(core.available_devices)}); use device='CPU'")
        if self.cache_dir is not None:
            core.set_property({"CACHE_DIR": str(self.cache_dir)})
        # The ONNX frontend itself, not Core.read_model: read_model tries every frontend on a file it cannot
        # parse (TensorFlow's prints parse errors to stderr); this one says "not an ONNX model" and nothing else.
        frontend = ov.frontend.FrontEndManager().load_by_framework("onnx")
        model = frontend.convert(frontend.load(str(self.path), self.enable_mmap))
        if len(model.inputs) != 1:
            raise BackendUnavailableError(
                f"{self.path.name} has {len(model.inputs)} inputs; snexport runners take exactly one image input"
            )
        config = {
            "INFERENCE_NUM_THREADS": self.threads,
            "PERFORMANCE_HINT": self.performance_hint,
            "NUM_STREAMS": self.num_streams,
            "INFERENCE_PRECISION_HINT": self.precision_hint,
            "ENABLE_CPU_PINNING": self.cpu_pinning,
        }
        try:
            compiled = core.compile_model(model, self.device, config)
        except RuntimeError as exc:  # an op or type the plugin does not support: not a bug of ours
            first = (str(exc).strip().splitlines() or [""])[-1][:200]
            raise BackendUnavailableError(f"OpenVINO cannot compile {self.path.name} for {self.device} ({first}); "
                                          "run it with onnxruntime instead (`snexport bench --backends onnxruntime`)"
                                          ) from None
        port, out = compiled.inputs[0], compiled.outputs[0]
        self.input_name = port.get_any_name()
        self.input_shape = _dims(port.get_partial_shape())
        self.input_dtype = _INPUT_DTYPES.get(port.get_element_type().get_type_name(), "")
        self.output_name = out.get_any_name()
        self.output_shape = _dims(out.get_partial_shape())
        self._applied = {key: _plain(compiled.get_property(key)) for key in config}
        self._version = ov.get_version().split("-")[0]
        self._tensor = ov.Tensor
        del model  # the compiled model keeps what it needs (the mapping, its repacked weights)
        self.compiled = compiled

    def run(self, x: Any) -> Any:
        """Run one batch; ``x`` is cast to the model's input dtype when it differs. Returns a fresh array."""
        import numpy as np

        if self.compiled is None:
            self.load()
        x = np.ascontiguousarray(x, dtype=self.input_dtype or None)
        request = self._request()
        # Shared memory: OpenVINO reads the caller's buffer instead of copying it (the lowest-overhead call,
        # ~50 us vs ~85 us for compiled(x) on a tiny model); the output is copied since the request reuses it.
        request.set_input_tensor(self._tensor(x, shared_memory=True))
        request.infer()
        return request.get_output_tensor(0).data.copy()

    def close(self) -> None:
        with self._requests_lock:
            self._requests.clear()
        self.compiled = None

    # -- details --------------------------------------------------------------------------------------------

    def _request(self):
        key = threading.get_ident()
        request = self._requests.get(key)
        if request is None:
            with self._requests_lock:
                compiled = self.compiled
                if compiled is None:
                    raise RuntimeError("runner is closed; load() it again")
                request = self._requests.setdefault(key, compiled.create_infer_request())
        return request

    @property
    def settings(self) -> dict:
        """What the engine runs with, as plain JSON types; ``applied`` is read back from the compiled model."""
        return {
            "backend": self.backend,
            "openvino": self._version or None,
            "device": self.device,
            "threads": self.threads,
            "performance_hint": self.performance_hint,
            "num_streams": self.num_streams,
            "precision_hint": self.precision_hint,
            "cpu_pinning": self.cpu_pinning,
            "enable_mmap": self.enable_mmap,
            "cache_dir": None if self.cache_dir is None else str(self.cache_dir),
            "applied": dict(self._applied),
        }


def _dims(shape) -> tuple:
    """A partial shape as a tuple: ints for static dimensions, '?' for dynamic ones (ORT gives names there)."""
    return tuple(d.get_length() if d.is_static else "?" for d in shape)


def _plain(value: Any) -> Any:
    """A property value as JSON: OpenVINO types ('f32'), enums by name, numbers and strings as they are."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "get_type_name"):
        return value.get_type_name()
    return getattr(value, "name", None) or str(value)
