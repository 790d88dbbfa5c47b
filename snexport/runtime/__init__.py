"""Runners: one load/run/close contract over ONNX Runtime, TensorRT and PyTorch.

Importing this package imports no runtime: each backend imports onnxruntime / tensorrt / torch / numpy inside
``load`` and ``run``, so the on-device selector can import it on a box that has only one of them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from snexport.errors import BackendUnavailableError
from snexport.runtime.base import Runner
from snexport.runtime.onnxruntime_runner import OnnxRuntimeRunner
from snexport.runtime.tensorrt_runner import TensorRTRunner, check_engine_version
from snexport.runtime.torch_runner import TorchRunner

__all__ = [
    "Runner",
    "OnnxRuntimeRunner",
    "TensorRTRunner",
    "TorchRunner",
    "open_runner",
    "backend_for_path",
    "check_engine_version",
]

_BACKEND_BY_SUFFIX = {".onnx": "onnxruntime", ".engine": "tensorrt", ".plan": "tensorrt", ".trt": "tensorrt"}
_RUNNERS = {"onnxruntime": OnnxRuntimeRunner, "tensorrt": TensorRTRunner}


def backend_for_path(path: str | os.PathLike) -> str:
    """The backend that runs a file, from its suffix (.onnx -> onnxruntime, .engine/.plan -> tensorrt)."""
    suffix = Path(path).suffix.lower()
    if suffix not in _BACKEND_BY_SUFFIX:
        raise BackendUnavailableError(
            f"no runtime for '{suffix or Path(path).name}' files; "
            f"pass backend='onnxruntime' or 'tensorrt' (known suffixes: {', '.join(_BACKEND_BY_SUFFIX)})"
        )
    return _BACKEND_BY_SUFFIX[suffix]


def open_runner(path: str | os.PathLike, backend: Optional[str] = None, **options) -> Runner:
    """Build the runner for ``path`` and load it; ``options`` go to the backend's constructor.

    Loading here (not lazily at the first ``run``) keeps the expensive part where callers expect it: the
    selector opens engines ahead of a switch, and cold-load profiling times this call.
    """
    backend = backend or backend_for_path(path)
    if backend == "torch":
        raise BackendUnavailableError(
            "the torch backend runs an in-memory module, not a file; use TorchRunner(module, input_shape)"
        )
    if backend not in _RUNNERS:
        raise BackendUnavailableError(f"unknown backend '{backend}'; use one of {', '.join(sorted(_RUNNERS))}")
    runner = _RUNNERS[backend](path, **options)
    runner.load()
    return runner
