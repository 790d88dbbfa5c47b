"""The one backend table: which runtimes exist, which files they run, how to tell they are installed.

Adding a backend (OpenVINO, say) = one runner module + one entry here; profiles, bench, the selector and the
manifest schema take their backend names from this table. Standard library only: runner classes are imported
when a runner is built, and availability checks look for the runtime without importing it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from snexport.errors import BackendUnavailableError


@dataclass(frozen=True)
class Backend:
    name: str
    label: str  # how people call it, for messages
    runner: str  # "module:Class" of its runner (imported on use)
    suffixes: tuple  # engine file suffixes it runs; () for in-memory modules
    module: str  # the Python package of the runtime, to check it is installed
    extra: str  # the pip extra of snexport that installs it
    needs_gpu: bool = False


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("onnxruntime", "ONNX Runtime", "snexport.device.runtime.onnxruntime_runner:OnnxRuntimeRunner", (".onnx",),
                "onnxruntime", "ort"),
        Backend("tensorrt", "TensorRT", "snexport.device.runtime.tensorrt_runner:TensorRTRunner", (".engine", ".plan", ".trt"),
                "tensorrt", "tensorrt", needs_gpu=True),
        # Runs a materialised stitch in PyTorch (the reference, and the CUDA-graph baseline): host toolchain only.
        Backend("torch", "PyTorch", "snexport.device.runtime.torch_runner:TorchRunner", (), "torch", "build"),
    )
}


def runner_class(backend: str):
    if backend not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend '{backend}'; use one of {', '.join(BACKENDS)}")
    module, _, cls = BACKENDS[backend].runner.partition(":")
    return getattr(importlib.import_module(module), cls)


def backend_for_path(path: str | os.PathLike) -> str:
    """The backend that runs a file, from its suffix (.onnx -> onnxruntime, .engine/.plan -> tensorrt)."""
    suffix = Path(path).suffix.lower()
    for backend in BACKENDS.values():
        if suffix in backend.suffixes:
            return backend.name
    known = ", ".join(s for b in BACKENDS.values() for s in b.suffixes)
    raise BackendUnavailableError(
        f"no runtime for '{suffix or Path(path).name}' files; pass backend= one of {', '.join(BACKENDS)} "
        f"(known suffixes: {known})"
    )


def open_runner(path: str | os.PathLike, backend: Optional[str] = None, **options):
    """Build the runner for ``path`` and load it; ``options`` go to the backend's constructor.

    Loading here (not lazily at the first ``run``) keeps the expensive part where callers expect it: the
    selector opens engines ahead of a switch, and cold-load profiling times this call.
    """
    backend = backend or backend_for_path(path)
    if backend in BACKENDS and not BACKENDS[backend].suffixes:
        cls = BACKENDS[backend].runner.partition(":")[2]
        raise BackendUnavailableError(
            f"the {backend} backend runs an in-memory module, not a file; use {cls}(module, input_shape)"
        )
    runner = runner_class(backend)(path, **options)
    runner.load()
    return runner


def cuda_device_count() -> int:
    """CUDA GPUs visible to this process, asked of the lightest binding installed (0 when none answers).

    cuda-python is what a TensorRT device installs (the `tensorrt` extra); torch is asked only when it is
    installed anyway (a host). Neither is a dependency of the device half.
    """
    if importlib.util.find_spec("cuda") is not None:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        except ImportError:
            try:
                from cuda import cudart  # older cuda-python layout
            except ImportError:
                cudart = None
        if cudart is not None:
            try:
                err, count = cudart.cudaGetDeviceCount()
                return int(count) if int(err) == 0 else 0
            except Exception:  # noqa: BLE001 - no driver: no GPU
                return 0
    if importlib.util.find_spec("torch") is not None:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    return 0


def runtime_available(backend: str) -> tuple[bool, str]:
    """(True, "") when this machine can run ``backend``, else (False, what is missing and how to get it)."""
    if backend not in BACKENDS:
        return False, f"unknown backend {backend} (known: {', '.join(BACKENDS)})"
    spec = BACKENDS[backend]
    if importlib.util.find_spec(spec.module) is None:
        return False, f"{spec.label} is not installed (pip install 'snexport[{spec.extra}]')"
    if spec.needs_gpu and cuda_device_count() == 0:
        return False, f"{spec.label} needs a CUDA GPU and this machine has none"
    return True, ""


def default_target() -> str:
    """The profile for 'this machine': TensorRT on a CUDA GPU when both exist, else ONNX Runtime on the CPU."""
    return "cuda-gpu" if runtime_available("tensorrt")[0] else "x86-cpu"
