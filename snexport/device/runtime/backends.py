"""The one backend table: which runtimes exist, which files they run, how to tell they are installed.

Adding a backend = one runner module + one entry here; profiles, bench, the selector and the manifest take their
backend names from this table, and everything else they need to know of a backend is a field of its entry: which
engine files it reads (``packs``), which precisions it may run without changing the engine's measured accuracy,
whether `snexport bench` measures it on a CPU profile (``cpu``), whether its runner takes a thread count, and
whether its outputs were already validated where its files were made. Standard library only: runner classes are
imported when a runner is built, and availability checks look for the runtime without importing it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from snexport.buildfiles import ORT_PACK_DIR, PACK_DIR
from snexport.errors import BackendUnavailableError, BuildDirError


@dataclass(frozen=True)
class Backend:
    name: str
    label: str  # how people call it, for messages
    runner: str  # "module:Class" of its runner (imported on use)
    suffixes: tuple  # engine file suffixes it runs; () for in-memory modules
    module: str  # the Python package of the runtime, to check it is installed
    extra: str  # the pip extra of snexport that installs it
    needs_gpu: bool = False
    aliases: tuple = ()  # short names accepted on the command line (`snexport bench --backends ort,ov`)
    # Runs engine files on the CPU: `snexport bench` on a CPU profile measures every installed one per engine.
    cpu: bool = False
    # Engine precisions it runs with the engine's recorded accuracy still holding (an int8 file's top-1 was
    # measured under ONNX Runtime's int8 kernels; another runtime's int8 arithmetic is another engine).
    precisions: tuple = ("fp32",)
    # Pack directories whose files it reads, most preferred first; standalone files when none is complete.
    packs: tuple = ()
    takes_threads: bool = False  # its runner takes the CPU thread count as `threads=` (profiles, the selector)
    # Its outputs are gated where its files are made (the host's export validates every ONNX file with ONNX
    # Runtime; the device's TensorRT build validates each engine); any other runtime is gated by `snexport bench`
    # on the shipped reference logits before its numbers may stand for an engine.
    validated_where_made: bool = False
    runner_defaults: Mapping = field(default_factory=dict, hash=False)  # options every profile run gets


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        # First of the .onnx runtimes: the one a bare .onnx path opens with (backend_for_path).
        Backend("onnxruntime", "ONNX Runtime", "snexport.device.runtime.onnxruntime_runner:OnnxRuntimeRunner", (".onnx",),
                "onnxruntime", "ort", aliases=("ort",), cpu=True, precisions=("fp32", "fp16", "int8"),
                packs=(ORT_PACK_DIR, PACK_DIR), takes_threads=True, runner_defaults={"providers": ["cpu"]},
                validated_where_made=True),
        # The portable ONNX only: the ORT-optimized pack holds ONNX Runtime's own prepacked blobs.
        Backend("openvino", "OpenVINO", "snexport.device.runtime.openvino_runner:OpenVinoRunner", (".onnx",),
                "openvino", "openvino", aliases=("ov",), cpu=True, precisions=("fp32",), packs=(PACK_DIR,),
                takes_threads=True),
        Backend("tensorrt", "TensorRT", "snexport.device.runtime.tensorrt_runner:TensorRTRunner", (".engine", ".plan", ".trt"),
                "tensorrt", "tensorrt", needs_gpu=True, aliases=("trt",), precisions=("fp32", "fp16"),
                validated_where_made=True),
        # Runs a materialised stitch in PyTorch (the reference, and the CUDA-graph baseline): host toolchain only.
        Backend("torch", "PyTorch", "snexport.device.runtime.torch_runner:TorchRunner", (), "torch", "build",
                validated_where_made=True),  # it is the reference
    )
}


def resolve_backend(name: str) -> str:
    """A backend's table name from its name or alias (``ort`` -> ``onnxruntime``); a clear error otherwise."""
    key = name.strip().lower()
    for backend in BACKENDS.values():
        if key == backend.name or key in backend.aliases:
            return backend.name
    known = ", ".join(f"{b.name} ({', '.join(b.aliases)})" if b.aliases else b.name for b in BACKENDS.values())
    raise BackendUnavailableError(f"unknown backend '{name}'; use one of {known}")


def cpu_backends(installed_only: bool = True) -> list[str]:
    """The backends that run engine files on the CPU (table order), those installed here by default."""
    return [b.name for b in BACKENDS.values() if b.cpu and (not installed_only or runtime_available(b.name)[0])]


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
    try:
        runner.load()
    except Exception as exc:  # noqa: BLE001 - only the runtime's own errors are translated (is_runtime_error)
        if not is_runtime_error(exc):
            raise
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        raise BuildDirError(f"{BACKENDS[backend].label} cannot open {path} ({type(exc).__name__}: {first_line}); "
                            f"it is not a valid {Path(path).suffix or backend} engine for this runtime: re-run "
                            "`snexport export` (or `snexport bench` on the device), or copy the build directory "
                            "again") from None
    return runner


def is_runtime_error(exc: BaseException) -> bool:
    """An error an inference runtime or the ONNX reader raises on a file it cannot use. Build directories come
    from other machines, so such a file is bad input, not a bug; onnxruntime's exception types derive from
    Exception directly, so they are recognised by the package they come from."""
    module = type(exc).__module__ or ""
    runtimes = {b.module for b in BACKENDS.values() if b.suffixes}
    return module.split(".")[0] in runtimes | {"onnx", "google"} or module == "snexport.device.onnxproto"


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
