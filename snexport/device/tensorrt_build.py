"""ONNX → TensorRT engine, on the device that will run it (engines are tied to one GPU and TensorRT version).

Precision across TensorRT generations (deployment notes):
- TensorRT 10.x is weakly typed by default: FP16 is ``BuilderFlag.FP16`` on the FP32 ONNX. We additionally pin
  normalization and softmax layers to FP32 (``layer.precision`` + ``OBEY_PRECISION_CONSTRAINTS``) — a plain FP16
  flag lets TensorRT run LayerNorm in FP16, which overflows in ViTs.
- TensorRT ≥ 11 builds every network strongly typed and has no FP16 flag: the FP16 must already be in the ONNX
  (``export.fp16.cast_to_fp16``: FP16 weights/compute, LayerNorm/Softmax in FP32, FP32 I/O). That strongly typed
  ONNX also builds on 10.x (``strongly_typed=True``).
- FP32 engines: TF32 is on by default in TensorRT for FP32 matmuls/convs on Ampere+; we clear it unless asked, so
  an "fp32" engine computes what its name says and validates against PyTorch at the FP32 gates.

One timing cache per device (``timing_cache_path``) is loaded before and saved after every build: all stitches
reuse the same block shapes, so later builds skip most tactic timing. A cache is only valid for one GPU model and
TensorRT version; a mismatching cache is ignored (logged) and replaced.

API names are those of the TensorRT 10/11 Python docs: ``Builder``, ``create_network``, ``OnnxParser.parse_from_file``,
``create_builder_config``, ``set_memory_pool_limit(MemoryPoolType.WORKSPACE, …)``, ``create_timing_cache``,
``set_timing_cache``, ``ITimingCache.serialize/combine``, ``build_serialized_network``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

from snexport.errors import BackendUnavailableError, ExportValidationError, SnexportError
from snexport.hashing import atomic_write_bytes, atomic_write_json, sha256_file

log = logging.getLogger("snexport.export")

PRECISIONS = ("fp32", "fp16")
_NOT_INSTALLED = ("TensorRT is not installed here ({reason}); the ONNX artifacts are valid; "
                  "run `snexport bench` on the device")


def import_tensorrt():
    """``import tensorrt`` or a one-line BackendUnavailableError saying what to do instead."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(_NOT_INSTALLED.format(reason=f"import tensorrt failed: {exc}")) from exc
    return trt


def tensorrt_major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError as exc:
        raise BackendUnavailableError(f"cannot read the TensorRT version '{version}'") from exc


def plan_build(
    trt_version: str,
    precision: str,
    onnx_path: str | os.PathLike,
    fp16_onnx_path: Optional[str | os.PathLike] = None,
    strongly_typed: Optional[bool] = None,
) -> dict:
    """Decide, without TensorRT, which ONNX to parse and which typing mode and flags to use.

    Returns ``{"onnx": path, "strongly_typed": bool, "fp16_flag": bool, "pin_fp32_layers": bool}``.
    ``strongly_typed=None`` means the generation's default (10.x: weak, ≥ 11: strong, which is the only mode).
    """
    if precision not in PRECISIONS:
        raise SnexportError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
    major = tensorrt_major(trt_version)
    if major < 10:
        raise BackendUnavailableError(f"TensorRT {trt_version} is too old; snexport needs TensorRT 10 or newer")
    strong = major >= 11 if strongly_typed is None else bool(strongly_typed)
    if major >= 11 and not strong:
        raise SnexportError(f"TensorRT {trt_version} builds every network strongly typed; strongly_typed=False "
                            "is not available")
    if precision == "fp32":
        return {"onnx": Path(onnx_path), "strongly_typed": strong, "fp16_flag": False, "pin_fp32_layers": False}
    if strong:
        if fp16_onnx_path is None:
            raise SnexportError(
                f"an FP16 engine on TensorRT {trt_version} (strongly typed) needs the FP16 ONNX: export it with "
                "precision fp16 (export.fp16.cast_to_fp16) and pass fp16_onnx_path"
            )
        return {"onnx": Path(fp16_onnx_path), "strongly_typed": True, "fp16_flag": False, "pin_fp32_layers": False}
    return {"onnx": Path(onnx_path), "strongly_typed": False, "fp16_flag": True, "pin_fp32_layers": True}


def gpu_name(device: int = 0) -> Optional[str]:
    """Name of the CUDA device (from the device fingerprint: nvidia-smi / the driver), or None without one."""
    from snexport.device.profiling import gpu_info

    try:
        return gpu_info().get("name")
    except Exception:  # noqa: BLE001 - a device fingerprint is informative, never a reason to fail a build
        return None


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    precision: str = "fp32",
    workspace_mb: int = 1024,
    timing_cache_path: Optional[str | os.PathLike] = None,
    fp16_onnx_path: Optional[str | os.PathLike] = None,
    strongly_typed: Optional[bool] = None,
    allow_tf32: bool = False,
) -> dict:
    """Build a serialized engine from ``onnx_path`` (or ``fp16_onnx_path``, see ``plan_build``) into ``engine_path``.

    Returns ``{"tensorrt", "gpu", "precision", "strongly_typed", "fp16_flag", "tf32", "source_onnx",
    "source_sha256", "workspace_mb", "timing_cache", "timing_cache_loaded", "build_seconds", "size_bytes",
    "sha256"}``. Parser errors are raised together, one per failing node.
    """
    trt = import_tensorrt()
    plan = plan_build(trt.__version__, precision, onnx_path, fp16_onnx_path, strongly_typed)
    source = plan["onnx"]
    if not source.is_file():
        raise SnexportError(f"no ONNX file at {source}; run the export stage first")

    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    strong_flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if plan["strongly_typed"] and strong_flag is not None:
        # Required for strong typing on 10.x; deprecated and ignored in 11.x, where every network is strongly typed
        # (a later release may drop the name, hence the getattr).
        flags |= 1 << int(strong_flag)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = [_format_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise SnexportError(f"TensorRT {trt.__version__} could not parse {source.name}: "
                            + " | ".join(errors or logger.errors))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if plan["fp16_flag"]:
        config.set_flag(trt.BuilderFlag.FP16)
    if plan["pin_fp32_layers"]:
        _pin_fp32_layers(trt, network, config)
    tf32_flag = getattr(trt.BuilderFlag, "TF32", None)
    if tf32_flag is not None and not allow_tf32:
        config.clear_flag(tf32_flag)  # FP32 tensors compute in FP32, not TF32's 10-bit mantissa

    cache_loaded = _attach_timing_cache(config, timing_cache_path)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    if serialized is None:
        raise SnexportError(f"TensorRT {trt.__version__} failed to build {source.name}: "
                            + (" | ".join(logger.errors) or "no error message; rerun with a larger workspace_mb"))
    atomic_write_bytes(engine_path, bytes(memoryview(serialized)))
    if timing_cache_path is not None:
        _save_timing_cache(config, Path(timing_cache_path))

    return {
        "tensorrt": trt.__version__,
        "gpu": gpu_name(),
        "precision": precision,
        "strongly_typed": plan["strongly_typed"],
        "fp16_flag": plan["fp16_flag"],
        "tf32": bool(allow_tf32),
        "source_onnx": str(source),
        "source_sha256": sha256_file(source),
        "workspace_mb": int(workspace_mb),
        "timing_cache": str(timing_cache_path) if timing_cache_path is not None else None,
        "timing_cache_loaded": cache_loaded,
        "build_seconds": round(seconds, 3),
        "size_bytes": Path(engine_path).stat().st_size,
        "sha256": sha256_file(engine_path),
    }


def _make_logger(trt):
    """A ``trt.ILogger`` that forwards to Python logging and keeps errors for the exception message.

    Defined inside a function because its base class lives in the lazily imported ``tensorrt`` module.
    """

    class CollectingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(str(msg))
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return CollectingLogger()


def _format_parser_error(err: Any) -> str:
    parts = [f"{err.code()}: {err.desc()}"]
    node_name = getattr(err, "node_name", None)
    node_op = getattr(err, "node_operator", None)
    if callable(node_name) and node_name():
        parts.append(f"node '{node_name()}'" + (f" ({node_op()})" if callable(node_op) and node_op() else ""))
    elif err.node() >= 0:
        parts.append(f"node #{err.node()}")
    return " ".join(parts)


def _pin_fp32_layers(trt, network, config) -> None:
    """Weakly typed FP16: keep normalization and softmax layers in FP32 (ViT LayerNorm overflows in FP16)."""
    pinned = {trt.LayerType.SOFTMAX}
    if hasattr(trt.LayerType, "NORMALIZATION"):
        pinned.add(trt.LayerType.NORMALIZATION)
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in pinned:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)


def _attach_timing_cache(config, path: Optional[str | os.PathLike]) -> bool:
    """Load the device's timing cache into ``config``; returns whether an existing cache was accepted."""
    data = b""
    if path is not None and Path(path).is_file():
        data = Path(path).read_bytes()
    try:
        cache = config.create_timing_cache(data)
    except Exception:  # noqa: BLE001 - an unreadable cache (truncated copy, other version) is just a cold start
        cache = None
    if cache is not None and config.set_timing_cache(cache, False):
        return bool(data)
    # Built by another TensorRT version or GPU: start empty; the file is overwritten after this build.
    log.warning("timing cache %s does not match this TensorRT/GPU; starting a new one", path)
    config.set_timing_cache(config.create_timing_cache(b""), False)
    return False


def _save_timing_cache(config, path: Path) -> None:
    cache = config.get_timing_cache()
    if path.is_file():
        # Another build of this device may have saved entries since we loaded: merge them, never drop them.
        try:
            cache.combine(config.create_timing_cache(path.read_bytes()), False)
        except Exception:  # noqa: BLE001 - a cache from another TensorRT/GPU is replaced, not merged
            log.warning("could not merge the timing cache at %s; replacing it", path)
    atomic_write_bytes(path, bytes(memoryview(cache.serialize())))


def validate_engine(
    engine_path: str | os.PathLike,
    reference: Any,
    inputs,
    *,
    precision: str = "fp16",
    stitch_id: Optional[str] = None,
    expected_trt_version: Optional[str] = None,
    **gates: Any,
) -> dict:
    """Gate an engine on agreement with the FP32 reference logits the host shipped (``engines/reference``).

    FP16 engines get the FP16 gates (cosine ≥ 0.999, top-1 ≥ 0.99), FP32 engines the FP32 ones; ``gates``
    overrides them (``rtol_scale``, ``min_cosine``, ``require_top1``). Runs through
    ``snexport.device.runtime.tensorrt_runner.TensorRTRunner`` (the project's one TensorRT runner), in chunks of the
    engine's static batch.
    """
    import numpy as np

    from snexport.device.validate import FP16_GATES, FP32_GATES, compare_logits
    from snexport.device.runtime.tensorrt_runner import TensorRTRunner

    import_tensorrt()
    chosen = dict(FP16_GATES if precision == "fp16" else FP32_GATES)
    unknown = set(gates) - set(chosen)
    if unknown:
        raise TypeError(f"unknown gate(s) {sorted(unknown)}; valid: {sorted(chosen)}")
    chosen.update(gates)
    inputs = np.asarray(inputs, dtype=np.float32)
    ref = np.asarray(reference, dtype=np.float32)

    runner = TensorRTRunner(engine_path, expected_trt_version=expected_trt_version)
    runner.load()
    try:
        batch = runner.input_shape[0]
        outs = []
        for start in range(0, len(inputs), batch):
            chunk = inputs[start:start + batch]
            n = len(chunk)
            if n < batch:
                chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), np.float32)])
            outs.append(np.asarray(runner.run(chunk), dtype=np.float32).reshape(batch, -1)[:n])
    finally:
        runner.close()
    figures, failures = compare_logits(ref, np.concatenate(outs), **chosen)
    figures["provider"] = "tensorrt"
    if failures:
        raise ExportValidationError(stitch_id or Path(engine_path).name, failures)
    return figures


# ---------------------------------------------------------------------------------------------------------------
# The device stage: one engine per exported stitch of a build directory or bundle


def engines_stage(build, profile, show_progress: bool = True) -> list:
    """Build one TensorRT engine per exported stitch on this device, sharing one timing cache; every engine is
    gated on agreement with the FP32 PyTorch logits the host shipped (``engines/reference``), so no torch here."""
    from snexport.device import deployset
    from snexport.device.runtime.backends import runtime_available
    from snexport.progress import progress_task
    from snexport.records import Artifact

    ok, why = runtime_available("tensorrt")
    if not ok:
        raise BackendUnavailableError(f"{why}; the ONNX files in {build.engines_dir} are valid: copy the build to "
                                      "the device and run `snexport bench` there")
    trt = import_tensorrt()
    onnx = {(a.stitch_id, a.precision): a for a in deployset.current_exports(build) if a.format == "onnx"}
    fp32 = [a for (sid, p), a in onnx.items() if p == "fp32"]
    gpu = (gpu_name() or "gpu").replace(" ", "_")
    cache = build.engines_dir / f"timing-cache-{gpu}-trt{trt.__version__}.bin"
    done = {a.stitch_id: a for a in deployset.trt_engines(build)}
    out = []
    with progress_task(f"building TensorRT {profile.precision} engines", len(fp32), show_progress) as advance:
        for a in fp32:
            rel = f"{Path(a.file).parent.as_posix()}/{Path(a.file).stem}.{profile.precision}.engine"
            old = done.get(a.stitch_id)
            if (old and old.source_sha256 == a.sha256 and old.versions.get("tensorrt") == trt.__version__
                    and (build.root / rel).is_file() and sha256_file(build.root / rel) == old.sha256):
                out.append(old)
                advance()
                continue
            inputs, logits = read_reference(build, a)
            fp16_onnx = onnx.get((a.stitch_id, "fp16"))
            info = build_engine(build.root / a.file, build.root / rel, precision=profile.precision,
                                workspace_mb=profile.workspace_mb or 1024, timing_cache_path=cache,
                                fp16_onnx_path=(build.root / fp16_onnx.file) if fp16_onnx else None)
            figures = validate_engine(build.root / rel, logits, inputs, precision=profile.precision,
                                      stitch_id=a.stitch_id)
            path = build.root / rel
            art = Artifact(a.stitch_id, rel, "tensorrt", profile.precision, path.stat().st_size, sha256_file(path),
                           a.input_name, a.input_shape, a.input_dtype, a.output_name, a.output_shape, a.opset,
                           a.exporter, a.simplifier, versions=dict(info), validation=figures, source_sha256=a.sha256,
                           reference=dict(a.reference))
            out.append(art)
            done[a.stitch_id] = art
            atomic_write_json(build.trt_engines_path, [x.to_dict() for x in done.values()])
            advance()
    return out


def read_reference(build, art) -> tuple:
    """(inputs, FP32 logits) the host shipped for ``art``, checked against their recorded hashes."""
    import numpy as np

    ref = art.reference or {}
    if not ref.get("inputs") or not ref.get("logits"):
        raise SnexportError(f"{art.stitch_id} has no reference outputs to validate a device-built engine against; "
                            "re-run `snexport export` on the host (it ships engines/reference) and copy the build again")
    arrays = []
    for key in ("inputs", "logits"):
        path = build.root / ref[key]
        if not path.is_file() or sha256_file(path) != ref[f"{key}_sha256"]:
            raise SnexportError(f"{path} is missing or altered; copy the build's engines/reference again or re-run "
                                "`snexport export` on the host")
        arrays.append(np.load(path, allow_pickle=False))
    return arrays[0], arrays[1]
