"""Check an exported ONNX file against its PyTorch reference (figures and gates: ``snexport.device.validate``)."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Optional, Sequence

from snexport.device.validate import CPU, FP16_GATES, FP32_GATES, compare_logits, onnx_session, run_onnx
from snexport.errors import ExportValidationError

__all__ = ["CPU", "FP16_GATES", "FP32_GATES", "compare_logits", "onnx_session", "reference_logits", "run_onnx",
           "torch_threads", "validate_onnx", "validate_fp16_onnx", "validate_outputs"]


def reference_logits(module: Any, inputs, batch_size: int = 16, threads: Optional[int] = None):
    """PyTorch logits of ``module`` (eval mode, CPU, float32) for a numpy batch (N, C, H, W); ``threads``: torch's
    intra-op threads meanwhile (None: as set)."""
    import numpy as np
    import torch

    was_training = module.training
    module.eval()
    outs = []
    try:
        with torch_threads(threads), torch.inference_mode():
            for start in range(0, len(inputs), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(inputs[start:start + batch_size], dtype=np.float32))
                outs.append(module(x).float().cpu().numpy())
    finally:
        module.train(was_training)
    return np.concatenate(outs, axis=0)


@contextlib.contextmanager
def torch_threads(threads: Optional[int]):
    """torch's intra-op thread count set to ``threads`` for the block (None: unchanged)."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        if threads:
            torch.set_num_threads(before)


def validate_onnx(
    onnx_path: str | os.PathLike,
    reference: Any,
    inputs,
    *,
    stitch_id: Optional[str] = None,
    rtol_scale: Optional[float] = FP32_GATES["rtol_scale"],
    min_cosine: float = FP32_GATES["min_cosine"],
    require_top1: float = FP32_GATES["require_top1"],
    providers: Sequence[str] = CPU,
    threads: Optional[int] = None,
) -> dict:
    """Compare ``onnx_path`` (a path, or the serialized model) with ``reference`` (an ``nn.Module`` or precomputed
    logits) on ``inputs``.

    Returns the figures (see module doc) plus ``provider``; raises ``ExportValidationError`` listing every failed
    gate. Pass precomputed logits (``reference_logits``) to validate several files of one stitch without running
    PyTorch each time.
    """
    return validate_outputs(onnx_path, reference, inputs, stitch_id=stitch_id, rtol_scale=rtol_scale,
                            min_cosine=min_cosine, require_top1=require_top1, providers=providers, threads=threads)[0]


def validate_outputs(onnx_path, reference, inputs, *, stitch_id: Optional[str] = None,
                     rtol_scale: Optional[float] = FP32_GATES["rtol_scale"],
                     min_cosine: float = FP32_GATES["min_cosine"], require_top1: float = FP32_GATES["require_top1"],
                     providers: Sequence[str] = CPU, threads: Optional[int] = None):
    """``validate_onnx`` that also returns the model's logits: ``(figures, logits)`` (to compare a file derived
    from this one, e.g. its int8 variant, without running it again)."""
    import numpy as np

    inputs = np.asarray(inputs, dtype=np.float32)
    if inputs.ndim != 4 or len(inputs) == 0:
        raise ValueError(f"validation inputs must be a non-empty (N, C, H, W) array, got shape {inputs.shape}")
    ref = reference if isinstance(reference, np.ndarray) else reference_logits(reference, inputs)
    actual = run_onnx(onnx_path, inputs, providers, threads=threads)
    figures, failures = compare_logits(ref, actual, rtol_scale=rtol_scale, min_cosine=min_cosine,
                                       require_top1=require_top1)
    figures["provider"] = list(providers)[0]
    if failures:
        label = stitch_id or ("model" if isinstance(onnx_path, bytes) else os.path.basename(os.fspath(onnx_path)))
        raise ExportValidationError(label, failures)
    return figures, actual


def validate_fp16_onnx(
    onnx_path: str | os.PathLike,
    reference: Any,
    inputs,
    *,
    stitch_id: Optional[str] = None,
    rtol_scale: Optional[float] = FP16_GATES["rtol_scale"],
    min_cosine: float = FP16_GATES["min_cosine"],
    require_top1: float = FP16_GATES["require_top1"],
    providers: Sequence[str] = CPU,
    threads: Optional[int] = None,
) -> dict:
    """``validate_onnx`` with the FP16 gates: an FP16 model against the FP32 PyTorch reference."""
    return validate_onnx(onnx_path, reference, inputs, stitch_id=stitch_id, rtol_scale=rtol_scale,
                         min_cosine=min_cosine, require_top1=require_top1, providers=providers, threads=threads)
