"""Export stage: stitch modules → validated ONNX (FP32, optional FP16) → TensorRT engines on the device.

Importing this package is cheap: every submodule imports torch, onnx, onnxruntime and tensorrt inside the
functions that need them, so ``snexport --help`` and the device-side tools stay fast and torch-free.
"""

from snexport.export.fp16 import cast_to_fp16
from snexport.export.onnx_export import INPUT_NAME, MIN_OPSET, OUTPUT_NAME, export_onnx, read_metadata
from snexport.export.simplify import simplifier_version, simplify
from snexport.export.stage import ExportStageError, export_stitches, safe_file_stem
from snexport.device.tensorrt_build import build_engine, validate_engine
from snexport.export.trt_compat import check_tensorrt_compat
from snexport.export.validate import FP16_GATES, FP32_GATES, validate_fp16_onnx, validate_onnx

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "MIN_OPSET",
    "FP32_GATES",
    "FP16_GATES",
    "ExportStageError",
    "build_engine",
    "cast_to_fp16",
    "check_tensorrt_compat",
    "export_onnx",
    "export_stitches",
    "read_metadata",
    "safe_file_stem",
    "simplifier_version",
    "simplify",
    "validate_engine",
    "validate_fp16_onnx",
    "validate_onnx",
]
