"""TensorRT backend of the runner contract (TensorRT 10.x and 11.x name-based tensor API).

Buffers and the stream come from cuda-python's CUDA runtime bindings (``cuda.bindings.runtime``, or ``cuda.cudart``
in cuda-python < 12.6), host arrays are numpy: a TensorRT device installs ``snexport[tensorrt]`` (tensorrt +
cuda-python) and never torch, which on a Jetson would fight JetPack's own build. Per I/O tensor the runner keeps
one device allocation (``cudaMalloc``, its address handed to ``IExecutionContext.set_tensor_address``) and one
page-locked host buffer (``cudaMallocHost``, viewed as a numpy array) so that ``cudaMemcpyAsync`` on the runner's
stream is a real asynchronous DMA; ``execute_async_v3`` runs on that stream and ``cudaStreamSynchronize`` ends
each ``run``. Every CUDA call's error code is checked and turned into a one-line BackendUnavailableError.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from snexport.errors import BackendUnavailableError, BuildDirError, SettingsError
from snexport.device.runtime.base import RunnerContext


def check_engine_version(expected: Optional[str], installed: str, engine_name: str = "engine") -> None:
    """Refuse an engine built by another TensorRT release.

    A plan file is only valid for the TensorRT version that built it (unless built version-compatible), and
    TensorRT has no API to read the builder version from a plan without deserializing it, so the manifest
    records the version at build time and the caller passes it here. Major.minor.patch must match; the
    fourth (build) field is ignored because NVIDIA ships rebuilt wheels of one release under it.
    """
    if not expected:
        return
    want, have = str(expected).split(".")[:3], str(installed).split(".")[:3]
    if want != have:
        raise BackendUnavailableError(
            f"{engine_name} was built with TensorRT {expected} but this machine has {installed}; "
            "rebuild the engine here with `snexport build` (engines are tied to one TensorRT version and GPU)"
        )


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(
            f"TensorRT is not installed on this machine ({exc}); "
            "export ONNX here and run `snexport bench` on the device"
        ) from exc
    return trt


def import_cudart():
    """cuda-python's CUDA runtime module: ``cuda.bindings.runtime`` (>= 12.6), else the older ``cuda.cudart``."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as exc:
            raise BackendUnavailableError(
                f"the TensorRT runner keeps its buffers with cuda-python, which is not installed ({exc}); "
                "pip install 'snexport[tensorrt]'"
            ) from exc
    return cudart


def cuda_call(cudart, result, what: str):
    """Unpack a cuda-python ``(cudaError_t, *values)`` tuple; a non-success code is a one-line error."""
    err, values = result[0], result[1:]
    if int(err) != 0:
        _, message = cudart.cudaGetErrorString(err)
        text = message.decode(errors="replace") if isinstance(message, bytes) else str(message)
        raise BackendUnavailableError(f"CUDA {what} failed: {text} (error {int(err)}); check the GPU and driver "
                                      "with nvidia-smi (tegrastats on Jetson)")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


# TensorRT DataType name -> numpy dtype name of its host buffer (member names differ between 10.x and 11.x, so
# they are looked up by name; BF16 and FP8 have no numpy type).
_NUMPY_DTYPES = (
    ("FLOAT", "float32"),
    ("HALF", "float16"),
    ("INT8", "int8"),
    ("UINT8", "uint8"),
    ("INT32", "int32"),
    ("INT64", "int64"),
    ("BOOL", "bool"),
)


def numpy_dtype(trt, trt_dtype) -> str:
    for name, dtype in _NUMPY_DTYPES:
        if getattr(trt.DataType, name, None) == trt_dtype:
            return dtype
    raise BackendUnavailableError(
        f"TensorRT tensor type {trt_dtype} has no numpy buffer type; export with FP32/FP16 I/O"
    )


class _Buffer:
    """One I/O tensor: a device allocation and a page-locked host array of the same bytes."""

    def __init__(self, cudart, name: str, shape: tuple, dtype: str):
        import ctypes

        import numpy as np

        self.name, self.shape, self.dtype = name, shape, np.dtype(dtype)
        count = 1
        for d in shape:
            count *= int(d)
        self.nbytes = count * self.dtype.itemsize
        size = max(self.nbytes, 1)  # a zero-sized tensor still needs a valid address
        self.device = self.host_ptr = self.host = None
        try:
            self.device = cuda_call(cudart, cudart.cudaMalloc(size), f"cudaMalloc of {size} bytes for '{name}'")
            self.host_ptr = cuda_call(cudart, cudart.cudaMallocHost(size),
                                      f"cudaMallocHost of {size} bytes for '{name}'")
        except BaseException:
            self.free(cudart)
            raise
        raw = (ctypes.c_uint8 * size).from_address(int(self.host_ptr))
        self.host = np.frombuffer(raw, dtype=np.uint8, count=self.nbytes).view(self.dtype).reshape(shape)

    def free(self, cudart) -> None:
        # The numpy view goes first: it must never outlive the pinned memory it points into.
        self.host = None
        if self.device is not None:
            cudart.cudaFree(self.device)
            self.device = None
        if self.host_ptr is not None:
            cudart.cudaFreeHost(self.host_ptr)
            self.host_ptr = None


class TensorRTRunner(RunnerContext):
    """Runs one serialized TensorRT engine (``.engine`` / ``.plan``) on one CUDA device.

    ``expected_trt_version`` (from the manifest) is checked before the plan is deserialized, so a stale engine
    fails with a message that says to rebuild it instead of TensorRT's internal serialization error.
    """

    backend = "tensorrt"

    def __init__(self, path: str | os.PathLike, *, device: int = 0, expected_trt_version: Optional[str] = None):
        self.path = Path(path)
        self.device = int(device)
        self.expected_trt_version = expected_trt_version
        self.input_name = ""
        self.input_shape: tuple = ()
        self.input_dtype = ""
        self.output_name = ""
        self.output_shape: tuple = ()
        self.trt_version = ""
        self._cudart = None
        self._runtime = self._engine = self._context = self._stream = None
        self._buffers: dict[str, _Buffer] = {}  # tensor name -> device + pinned host memory

    def load(self) -> None:
        if self._context is not None:
            return
        trt = _import_tensorrt()
        cudart = import_cudart()
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0 or not count:
            raise BackendUnavailableError(
                "TensorRT engines need a CUDA GPU and this machine has none visible to the CUDA runtime; "
                "run `snexport bench` on the device"
            )
        if not 0 <= self.device < int(count):
            raise BackendUnavailableError(f"CUDA device {self.device} does not exist here ({count} visible); "
                                          "pass device=0 or set CUDA_VISIBLE_DEVICES")
        if not self.path.is_file():
            raise BuildDirError(f"no TensorRT engine at {self.path}; build it on this device with `snexport build`")
        self.trt_version = trt.__version__
        check_engine_version(self.expected_trt_version, self.trt_version, self.path.name)

        self._cudart = cudart
        cuda_call(cudart, cudart.cudaSetDevice(self.device), f"cudaSetDevice({self.device})")
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise BackendUnavailableError(
                f"TensorRT {self.trt_version} could not deserialize {self.path.name} (other TensorRT version or "
                "GPU, or a corrupt file); rebuild it on this device with `snexport build`"
            )
        context = engine.create_execution_context()
        if context is None:
            raise BackendUnavailableError(
                f"TensorRT could not create an execution context for {self.path.name} (out of GPU memory?); "
                "close other engines or lower the memory budget"
            )
        # Keep the runtime alive as long as the engine: TensorRT requires it to outlive engines it created.
        self._runtime, self._engine, self._context = runtime, engine, context
        try:
            self._stream = cuda_call(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
            self._allocate(trt)
        except BaseException:
            self.close()
            raise

    def _allocate(self, trt) -> None:
        inputs, outputs = [], []
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            shape = tuple(int(d) for d in self._engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BackendUnavailableError(
                    f"{self.path.name} has a dynamic shape {shape} for '{name}'; snexport exports static shapes, "
                    "rebuild the engine from the static ONNX"
                )
            buffer = _Buffer(self._cudart, name, shape, numpy_dtype(trt, self._engine.get_tensor_dtype(name)))
            self._buffers[name] = buffer
            if not self._context.set_tensor_address(name, int(buffer.device)):
                raise BackendUnavailableError(f"TensorRT refused the buffer address of '{name}' in {self.path.name}")
            is_input = self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (inputs if is_input else outputs).append(name)
        if len(inputs) != 1 or not outputs:
            raise BackendUnavailableError(
                f"{self.path.name} has inputs {inputs} and outputs {outputs}; snexport runners take one input"
            )
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.input_shape = self._buffers[self.input_name].shape
        self.output_shape = self._buffers[self.output_name].shape
        self.input_dtype = str(self._buffers[self.input_name].dtype)

    def run(self, x: Any) -> Any:
        """Copy ``x`` (an array-like of the input's size) in, run on the runner's stream, return the first output."""
        import numpy as np

        if self._context is None:
            self.load()
        cudart = self._cudart
        src, dst = self._buffers[self.input_name], self._buffers[self.output_name]
        x = np.asarray(x)
        if x.size != src.host.size:
            raise SettingsError(f"{self.path.name} takes {src.shape} ({src.host.size} values), got an array of "
                                f"shape {x.shape}; pass one batch of the engine's static input shape")
        src.host[...] = x.reshape(src.shape)  # cast to the engine's input dtype into pinned memory
        to_device, to_host = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_call(cudart, cudart.cudaMemcpyAsync(src.device, src.host_ptr, src.nbytes, to_device, self._stream),
                  "cudaMemcpyAsync (input)")
        if not self._context.execute_async_v3(int(self._stream)):
            raise BackendUnavailableError(f"TensorRT failed to execute {self.path.name}; see the TensorRT log above")
        cuda_call(cudart, cudart.cudaMemcpyAsync(dst.host_ptr, dst.device, dst.nbytes, to_host, self._stream),
                  "cudaMemcpyAsync (output)")
        cuda_call(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return dst.host.copy()  # the pinned buffer is overwritten by the next run

    def close(self) -> None:
        # Order matters: the context uses the engine and the buffers, the engine was created by the runtime.
        cudart = self._cudart
        if cudart is not None and self._stream is not None:
            cudart.cudaStreamSynchronize(self._stream)  # no copy may still target a buffer freed below
        self._context = None
        for buffer in self._buffers.values():
            buffer.free(cudart)
        self._buffers = {}
        if cudart is not None and self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
        self._stream = None
        self._engine = None
        self._runtime = None

    @property
    def settings(self) -> dict:
        return {"backend": self.backend, "device": self.device, "tensorrt": self.trt_version or None}
