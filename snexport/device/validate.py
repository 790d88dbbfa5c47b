"""Compare an engine's outputs with reference logits, reporting every failed check at once (numpy only).

The host validates each ONNX file against PyTorch (``snexport.export.validate``); the device validates the engines
it builds (TensorRT, the ONNX Runtime-optimized pack) against the FP32 logits the host shipped with them.

Figures (all over the validation set, logits compared per sample):
- ``max_abs``: largest absolute logit difference;
- ``rel_max_abs``: ``max_abs / max |reference logit|``, i.e. the error relative to the logits' scale, so one gate
  works for a random-init ViT (logits ~1) and a trained one (logits ~10-20);
- ``cosine``: the *worst* per-sample cosine similarity between exported and reference logits;
- ``top1_agreement``: fraction of samples whose exported argmax is the reference argmax. A disagreement where the
  reference itself has a near-tie (the exported class's reference logit within the ``max_abs`` tolerance of the
  top one) counts as agreement: float reordering may legitimately flip such ties, and a gate that fails on them
  would be flaky rather than strict.

FP32 gates default to ``rel_max_abs ≤ 1e-4``, cosine ≥ 0.99999, top-1 agreement 100 %. FP16 models get looser gates
(cosine ≥ 0.999, top-1 ≥ 0.99, no max-abs gate) — naive FP16 ViTs fail even those (cosine ~0.14, deployment notes).

ONNX Runtime is driven through a plain ``InferenceSession`` on CPU by default, so validation runs on any host.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

CPU = ("CPUExecutionProvider",)
FP32_GATES = {"rtol_scale": 1e-4, "min_cosine": 0.99999, "require_top1": 1.0}
FP16_GATES = {"rtol_scale": None, "min_cosine": 0.999, "require_top1": 0.99}


def run_onnx(onnx_path: str | os.PathLike | bytes, inputs, providers: Sequence[str] = CPU,
             threads: Optional[int] = None):
    """Run an ONNX model (a path, or the serialized model) over ``inputs`` (N, C, H, W) float32 in chunks of its
    static batch; returns (N, ...). ``threads``: ONNX Runtime's intra-op threads (None: its default)."""
    return onnx_session(onnx_path, providers, threads)(inputs)


def onnx_session(onnx_path: str | os.PathLike | bytes, providers: Sequence[str] = CPU,
                 threads: Optional[int] = None):
    """One ONNX Runtime session as a function ``inputs (N, C, H, W) -> outputs (N, ...)`` (see ``run_onnx``)."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # warnings about unused initializers etc. are noise here
    # No spin-waiting: a validation session runs a few inputs and ends; spinning threads would only take cores from
    # whatever else runs on a busy host (the next stitch's PyTorch reference, other jobs).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = int(threads)
    source = onnx_path if isinstance(onnx_path, bytes) else os.fspath(onnx_path)
    session = ort.InferenceSession(source, sess_options=opts, providers=list(providers))
    inp = session.get_inputs()[0]
    out_name = session.get_outputs()[0].name
    static = isinstance(inp.shape[0], int) and inp.shape[0] > 0

    def run(inputs):
        batch = inp.shape[0] if static else len(inputs)
        outs = []
        for start in range(0, len(inputs), batch):
            chunk = np.ascontiguousarray(inputs[start:start + batch], dtype=np.float32)
            n = len(chunk)
            if n < batch:  # a static-batch model needs full batches: pad with zeros, keep the real rows
                chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), np.float32)])
            outs.append(np.asarray(session.run([out_name], {inp.name: chunk})[0])[:n])
        return np.concatenate(outs, axis=0).astype(np.float32)

    return run


def compare_logits(
    reference,
    actual,
    *,
    rtol_scale: Optional[float] = FP32_GATES["rtol_scale"],
    min_cosine: float = FP32_GATES["min_cosine"],
    require_top1: float = FP32_GATES["require_top1"],
) -> tuple[dict, list[str]]:
    """Figures and the list of failed gates (empty when all pass). ``rtol_scale=None`` disables the max-abs gate."""
    import numpy as np

    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    act = np.asarray(actual, dtype=np.float64).reshape(len(actual), -1)
    gates = {"rtol_scale": rtol_scale, "min_cosine": min_cosine, "require_top1": require_top1}
    if ref.shape != act.shape:
        return {"samples": len(ref), "gates": gates}, [f"output shape {act.shape} differs from reference {ref.shape}"]
    failures = []
    if not np.isfinite(act).all():
        bad = int((~np.isfinite(act).all(axis=1)).sum())
        failures.append(f"non-finite outputs (NaN/Inf) in {bad} of {len(act)} samples")
        act = np.nan_to_num(act, nan=0.0, posinf=0.0, neginf=0.0)  # so the other figures can still be reported

    diff = np.abs(act - ref)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))

    dots = (act * ref).sum(axis=1)
    norms = np.linalg.norm(act, axis=1) * np.linalg.norm(ref, axis=1)
    both_zero = (np.linalg.norm(act, axis=1) == 0) & (np.linalg.norm(ref, axis=1) == 0)
    cos = np.where(both_zero, 1.0, dots / np.where(norms == 0, 1.0, norms))
    worst = int(cos.argmin()) if len(cos) else 0
    cosine = float(cos.min()) if len(cos) else 1.0

    tie_tol = rtol_scale * scale if rtol_scale is not None else 0.0
    ref_top, act_top = ref.argmax(axis=1), act.argmax(axis=1)
    tied = ref[np.arange(len(ref)), act_top] >= ref.max(axis=1) - tie_tol
    agree = (ref_top == act_top) | tied
    top1 = float(agree.mean()) if len(agree) else 1.0

    figures = {
        "max_abs": max_abs,
        "rel_max_abs": rel,
        "logit_scale": scale,
        "cosine": cosine,
        "top1_agreement": top1,
        "samples": int(len(ref)),
        "gates": gates,
    }
    if rtol_scale is not None and not rel <= rtol_scale:
        failures.append(f"max abs error {max_abs:.3g} is {rel:.3g} of the logits' scale {scale:.3g} (limit {rtol_scale:g})")
    if not cosine >= min_cosine:
        failures.append(f"cosine similarity {cosine:.6f} < {min_cosine} (worst sample {worst})")
    if not top1 >= require_top1:
        failures.append(f"top-1 agreement {top1:.4f} < {require_top1} ({int((~agree).sum())} of {len(agree)} samples differ)")
    return figures, failures


def run_runner(runner, inputs):
    """Run a loaded runner (``snexport.device.runtime``) over ``inputs`` (N, ...) in chunks of its static batch
    (a dynamic batch dimension takes one sample at a time); returns (N, ...) float32."""
    import numpy as np

    inputs = np.asarray(inputs, dtype=np.float32)
    first = runner.input_shape[0] if runner.input_shape else 1
    batch = first if isinstance(first, int) and first > 0 else 1
    outs = []
    for start in range(0, len(inputs), batch):
        chunk = inputs[start:start + batch]
        n = len(chunk)
        if n < batch:  # a static-batch engine needs full batches: pad with zeros, keep the real rows
            chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), np.float32)])
        outs.append(np.asarray(runner.run(chunk), dtype=np.float32).reshape(batch, -1)[:n])
    return np.concatenate(outs, axis=0)


def validate_runner(runner, reference, inputs, gates: Optional[dict] = None) -> tuple[dict, list[str]]:
    """A loaded runner's outputs on ``inputs`` against ``reference`` logits: (figures, failed gates), FP32 gates
    unless ``gates`` says otherwise. How `snexport bench` admits a runtime the export did not validate with
    (OpenVINO on the portable ONNX) before its numbers may stand for the engine."""
    figures, failures = compare_logits(reference, run_runner(runner, inputs), **dict(gates or FP32_GATES))
    figures["provider"] = getattr(runner, "backend", None)
    return figures, failures
