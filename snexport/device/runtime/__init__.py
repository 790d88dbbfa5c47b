"""Runners: one load/run/close contract over ONNX Runtime, TensorRT and PyTorch (``backends.py`` is the table).

Importing this package imports no runtime: each backend imports onnxruntime / tensorrt / torch / numpy inside
``load`` and ``run``, so the on-device selector can import it on a box that has only one of them.
"""

from __future__ import annotations

from snexport.device.runtime.backends import BACKENDS, backend_for_path, open_runner, runtime_available
from snexport.device.runtime.base import Runner

__all__ = ["BACKENDS", "Runner", "backend_for_path", "open_runner", "runtime_available"]
