"""TensorRT backend of the runner contract (TensorRT 10.x and 11.x name-based tensor API).

Device buffers are torch CUDA tensors rather than cuda-python (or pycuda) allocations: every host that runs
TensorRT for snexport already has torch (the export and validation stages need it), torch's caching allocator
and streams are well tested on Jetson wheels, and it saves one more CUDA binding whose version must match the
driver. cuda-python would be the choice for a torch-free device; only ``_allocate`` and ``run`` would change.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from snexport.errors import BackendUnavailableError, BuildDirError
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


def _torch_dtype(trt, torch, trt_dtype):
    """Map a ``tensorrt.DataType`` to the torch dtype of its buffer (names differ between 10.x and 11.x)."""
    pairs = [
        ("FLOAT", torch.float32),
        ("HALF", torch.float16),
        ("BF16", torch.bfloat16),
        ("INT8", torch.int8),
        ("UINT8", torch.uint8),
        ("INT32", torch.int32),
        ("INT64", torch.int64),
        ("BOOL", torch.bool),
    ]
    for name, dtype in pairs:
        if getattr(trt.DataType, name, None) == trt_dtype:
            return dtype
    raise BackendUnavailableError(
        f"TensorRT tensor type {trt_dtype} has no torch buffer type; export with FP32/FP16 I/O"
    )


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
        self._runtime = self._engine = self._context = self._stream = None
        self._buffers: dict = {}  # tensor name -> torch CUDA tensor whose address TensorRT writes/reads

    def load(self) -> None:
        if self._context is not None:
            return
        trt = _import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                "TensorRT engines need a CUDA GPU and this machine has none visible to torch; "
                "run `snexport bench` on the device"
            )
        if not self.path.is_file():
            raise BuildDirError(f"no TensorRT engine at {self.path}; build it on this device with `snexport build`")
        self.trt_version = trt.__version__
        check_engine_version(self.expected_trt_version, self.trt_version, self.path.name)

        torch.cuda.set_device(self.device)
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
        self._stream = torch.cuda.Stream(device=self.device)
        self._allocate(trt, torch)

    def _allocate(self, trt, torch) -> None:
        inputs, outputs = [], []
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            shape = tuple(self._engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BackendUnavailableError(
                    f"{self.path.name} has a dynamic shape {shape} for '{name}'; snexport exports static shapes, "
                    "rebuild the engine from the static ONNX"
                )
            dtype = _torch_dtype(trt, torch, self._engine.get_tensor_dtype(name))
            buffer = torch.empty(shape, dtype=dtype, device=f"cuda:{self.device}")
            self._context.set_tensor_address(name, buffer.data_ptr())
            self._buffers[name] = buffer
            is_input = self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (inputs if is_input else outputs).append(name)
        if len(inputs) != 1 or not outputs:
            raise BackendUnavailableError(
                f"{self.path.name} has inputs {inputs} and outputs {outputs}; snexport runners take one input"
            )
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.input_shape = tuple(self._buffers[self.input_name].shape)
        self.output_shape = tuple(self._buffers[self.output_name].shape)
        self.input_dtype = str(self._buffers[self.input_name].dtype).replace("torch.", "")

    def run(self, x: Any) -> Any:
        """Copy ``x`` (numpy or torch) in, run the engine on the runner's stream, return the first output."""
        import numpy as np
        import torch

        if self._context is None:
            self.load()
        src = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
        dst = self._buffers[self.input_name]
        with torch.cuda.stream(self._stream):
            dst.copy_(src.to(dst.dtype).reshape(dst.shape))
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise BackendUnavailableError(
                    f"TensorRT failed to execute {self.path.name}; see the TensorRT log above"
                )
            out = self._buffers[self.output_name].to("cpu")
        self._stream.synchronize()
        return out.numpy()

    def close(self) -> None:
        # Order matters: the context uses the engine, the engine was created by the runtime.
        self._context = None
        self._buffers = {}
        self._engine = None
        self._runtime = None
        self._stream = None

    @property
    def settings(self) -> dict:
        return {"backend": self.backend, "device": self.device, "tensorrt": self.trt_version or None}
