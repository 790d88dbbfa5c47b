"""The export stage: one validated ONNX file per stitch in ``<build>/engines/``, listed in ``<build>/exports.json``.

Decoupled from the SN-Net: the caller passes the stitch records and a ``materialize(stitch_id) -> nn.Module``
callable (``SNNet.materialize`` in the CLI, a dict lookup in tests).

Per stitch: export → simplify → validate against PyTorch (and, only if that fails, the exporter's own graph too,
to say which tool broke it) → write ``engines/<stem>.onnx``. A route of an SN-Net (``SNNet.materialize``) is not
traced whole: its graph is composed from its pieces' graphs (stem, blocks, stitching layer, head), each piece
traced and simplified once per run for all the stitches that share it (``compose.py``), and validated whole like a
traced one; a stitch whose pieces do not compose, or whose composed graph fails validation, is traced whole.
with ``"onnx-fp16"`` in ``formats`` also cast to FP16 → validate at the FP16 gates → ``engines/<stem>.fp16.onnx``;
with ``"onnx-int8"`` also quantize to static int8 QDQ (``snexport.export.int8``), calibrated on ``int8_calib`` →
validate against the FP32 file at the int8 gates → ``engines/<stem>.int8.onnx``. Validation inputs are
``num_random`` seeded random images plus the caller's real images (``calib_images``), if any. Four random images
by default: a graph that computes something else is off on any input, while each input costs two forward passes
of the stitch (PyTorch and ONNX Runtime: 0.5 s for an 18-GFLOP stitch on 2 cores).

Where the time goes, and why it is spent once (benchmarks/export_timing.py prints each phase): pieces are traced
and simplified once per run; the model stays in memory from exporter to file — exported, simplified (weights
kept out of the simplifier, see simplify.py), checked for TensorRT on its weightless skeleton, serialized once; ONNX Runtime validates the serialized bytes, which are
then written and hashed without reading the file back. What remains is the two passes the gates need (the
PyTorch reference and the simplified model; the exported graph is run only when that check fails) and the
exporter's trace (a forward pass of its own). Models of less than
``SMALL_GFLOPS`` (the demo family) run those passes on one thread: their ops take microseconds, so a second thread
only adds synchronisation, which on a busy host costs 10-40x (measured: 1.3 s vs 0.03 s for 24 demo images).

Resuming: every artifact records a hash of everything that determines its content (stitch record, input shape,
batch, opset, exporter and simplifier choice, weights hash, validation inputs and gates). A re-run skips an
artifact whose record matches the current settings hash *and* whose file still has the recorded sha256; it redoes
one whose file is missing or corrupt, or whose settings changed. Files only reach their final name complete
(temp + rename), ``exports.json`` is rewritten atomically after every stitch, and stale temp files of a killed run
are deleted at start — so a killed run keeps every finished stitch and never mistakes a half-written file for a
good one. One export stage per build directory at a time (the temp clean-up assumes it).

Failures: a stitch that fails (exporter error, validation gate, ...) is recorded and the remaining stitches are
still exported; a stitch is all or nothing, so all its records (any precision) are dropped from
``exports.json``. At the end, if anything failed, ``ExportStageError`` is raised carrying ``failures``
({stitch_id: message}) and the ``artifacts`` that did succeed; otherwise the artifacts of all requested stitches
are returned.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from snexport import buildfiles as files
from snexport.errors import ExportValidationError, SnexportError
from snexport.hashing import (TMP_SUFFIX, atomic_path, atomic_write_json, commit, sha256_bytes, sha256_file,
                              sha256_json, temp_path_for)
from snexport.records import Artifact, Stitch

log = logging.getLogger("snexport.export")

FORMATS = ("onnx", "onnx-fp16", "onnx-int8")
DERIVED = {"onnx-fp16": "fp16", "onnx-int8": "int8"}  # precisions made from the FP32 file, by format
ENGINES_DIR = files.ENGINES_DIR
EXPORTS_FILE = files.EXPORTS
# Bump when this stage starts producing different files for the same settings: forces a re-export.
STAGE_VERSION = 3  # 2: TorchScript exporter first, weights kept out of the simplifier; 3: composed from pieces
_SAFE = set("abcdefghijklmnopqrstuvwxyz0123456789_-")
SMALL_GFLOPS = 0.5  # below this a stitch's reference and validation passes run on one thread (module doc)
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


class ExportStageError(SnexportError):
    """Some stitches failed to export; ``failures`` says why, ``artifacts`` holds the ones that succeeded."""

    def __init__(self, failures: dict[str, str], artifacts: list[Artifact]):
        self.failures = dict(failures)
        self.artifacts = list(artifacts)
        first = "; ".join(f"{k}: {v}" for k, v in list(self.failures.items())[:3])
        more = f" (+{len(self.failures) - 3} more)" if len(self.failures) > 3 else ""
        super().__init__(f"{len(self.failures)} of {len(self.failures) + len({a.stitch_id for a in artifacts})} "
                         f"stitches failed to export: {first}{more}; the others are in {EXPORTS_FILE}")


def safe_file_stem(stitch_id: str) -> str:
    """Readable, filesystem-safe, collision-free file stem: ``deit_s:3>deit_b:4`` → ``deit_s.3+deit_b.4``.

    Injective by construction: lowercase letters, digits, ``_`` and ``-`` stay; ``:`` becomes ``.`` and ``>``
    becomes ``+``; every other character (including ``.``, ``+``, ``%`` and uppercase letters) becomes ``%XX`` per
    UTF-8 byte. Since ``.``, ``+`` and ``%`` only ever come from those rules, the stem decodes to exactly one id;
    since literal letters are all lowercase and escapes all uppercase hex, it stays unique on case-insensitive
    filesystems (macOS, Windows) too.
    """
    if not stitch_id:
        raise ValueError("stitch id must not be empty")
    out = []
    for ch in stitch_id:
        if ch in _SAFE:
            out.append(ch)
        elif ch == ":":
            out.append(".")
        elif ch == ">":
            out.append("+")
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
    stem = "".join(out)
    if stem.split(".")[0] in _WINDOWS_RESERVED:  # "nul.onnx" cannot be created on Windows
        stem = f"%{ord(stem[0]):02X}{stem[1:]}"
    return stem


def export_stitches(
    build_dir: str | os.PathLike,
    stitches: Sequence[Stitch],
    materialize: Callable[[str], Any],
    input_shape: Sequence[int],
    calib_images: Any = None,
    *,
    opset: int = 18,
    simplifier: str = "onnxsim",
    batch: int = 1,
    exporter: str = "auto",
    formats: Sequence[str] = ("onnx",),
    progress: Optional[Callable[..., None]] = None,
    weights_hash: str = "",
    num_random: int = 4,
    seed: int = 0,
    fp32_gates: Optional[dict] = None,
    fp16_gates: Optional[dict] = None,
    int8_calib: Any = None,
    int8_gates: Optional[dict] = None,
    compose: bool = True,
) -> list[Artifact]:
    """Export, validate and record every stitch; see the module doc for resuming and failure handling.

    ``input_shape`` is (C, H, W); ``calib_images`` an optional float32 (N, C, H, W) array of real, preprocessed
    images; ``weights_hash`` identifies the weights ``materialize`` uses (pass ``BuildDir.weights_hash()``) so a
    re-run after fine-tuning re-exports. ``progress`` is called once per stitch as ``progress(1, description=...)``
    (the ``advance`` of ``snexport.progress.progress_task`` fits). Gates override ``validate.FP32_GATES`` /
    ``FP16_GATES`` / ``int8.INT8_GATES``. ``int8_calib``: the float32 (N, C, H, W) images that calibrate the int8
    files (needed with ``"onnx-int8"``). ``compose``: build a route's graph from its pieces' graphs, each piece
    exported once for all the stitches (``compose.PieceGraphs``), where ``materialize`` gives routes of keyed
    pieces; otherwise, and for a stitch whose pieces do not compose or whose composed graph fails validation,
    the stitch is traced whole.
    """
    from snexport.export.compose import PieceGraphs
    from snexport.export.int8 import INT8_GATES, RECIPE
    from snexport.export.simplify import simplifier_version
    from snexport.export.validate import FP16_GATES, FP32_GATES

    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise SnexportError(f"unknown export format(s) {unknown}; choose from {', '.join(FORMATS)} "
                            "(TensorRT engines are built on the device: `snexport bench`)")
    simplifier_name = simplifier_version(simplifier)  # fail before any work if the tool is missing
    gates32 = {**FP32_GATES, **(fp32_gates or {})}
    gates16 = {**FP16_GATES, **(fp16_gates or {})}
    gates = {"fp32": gates32, "fp16": gates16, "int8": {**INT8_GATES, **(int8_gates or {})}}
    precisions = ["fp32"] + [DERIVED[f] for f in FORMATS if f in formats and f in DERIVED]  # made from the FP32 file
    if "int8" in precisions:
        if int8_calib is None or getattr(int8_calib, "ndim", 0) != 4 or len(int8_calib) == 0:
            raise SnexportError("int8 export needs calibration images (a non-empty (N, C, H, W) array); "
                                "export without int8 (--precision fp32)")

    build_dir = Path(build_dir)
    engines = build_dir / ENGINES_DIR
    engines.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(engines)
    exports_path = build_dir / EXPORTS_FILE
    records = _read_exports(exports_path)

    inputs = _validation_inputs(input_shape, calib_images, num_random, seed)
    common = {
        "stage_version": STAGE_VERSION,
        "input_shape": [int(d) for d in input_shape],
        "batch": int(batch),
        "opset": int(opset),
        "exporter": exporter,
        "simplifier": simplifier,
        "weights_hash": weights_hash,
        "validation_inputs": _array_digest(inputs),
    }
    inputs_info = {"random": int(num_random), "seed": int(seed), "images": len(inputs) - int(num_random)}
    extra = {"int8": {"recipe": RECIPE, "calibration": _array_digest(int8_calib)}} if "int8" in precisions else {}

    pieces = PieceGraphs(opset=opset, exporter=exporter, simplifier=simplifier) if compose else None
    results: list[Artifact] = []
    failures: dict[str, str] = {}
    for stitch in stitches:
        stem = safe_file_stem(stitch.id)
        wanted = {}
        for precision in precisions:
            settings = dict(common, stitch=stitch.to_dict(), precision=precision, gates=gates[precision],
                            **extra.get(precision, {}))
            suffix = "" if precision == "fp32" else f".{precision}"
            wanted[precision] = (sha256_json(settings), f"{ENGINES_DIR}/{stem}{suffix}.onnx")
        current = {p: _up_to_date(build_dir, records.get((stitch.id, p)), h) for p, (h, _) in wanted.items()}
        for derived in precisions[1:]:
            # FP16/int8 files are made from the FP32 one: current only if made from the current FP32 file.
            if current[derived]:
                current[derived] = current["fp32"] and (
                    records[(stitch.id, derived)].source_sha256 == records[(stitch.id, "fp32")].sha256)
        if all(current.values()):
            results.extend(records[(stitch.id, p)] for p in precisions)
            _tick(progress, stitch.id, "up to date")
            continue
        try:
            made = _export_one(build_dir, stitch, materialize, input_shape, inputs, inputs_info, wanted, current,
                               records, opset=opset, simplifier=simplifier, simplifier_name=simplifier_name,
                               batch=batch, exporter=exporter, gates=gates, int8_calib=int8_calib, pieces=pieces)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one stitch's failure must not stop the others
            refused = _disk_refusal(exc)
            if refused is not None:
                # ... except a full or read-only disk, which would fail every stitch after it. Files only ever
                # reach their names complete, so what is on disk (and in exports.json) stays valid as it is.
                raise files.storage_error(refused, build_dir, f"exporting {stitch.id} needs to write there "
                                          f"({len(results)} file(s) exported or up to date are kept)") from None
            if not isinstance(exc, SnexportError):
                log.exception("unexpected error exporting %s", stitch.id)  # keeps the traceback of a bug
            failures[stitch.id] = str(exc) if isinstance(exc, SnexportError) else f"{type(exc).__name__}: {exc}"
            for key in [k for k in records if k[0] == stitch.id]:  # a stitch is all or nothing
                del records[key]
            _write_exports(exports_path, records)
            _tick(progress, stitch.id, "failed")
            continue
        for art in made:
            records[(art.stitch_id, art.precision)] = art
        for derived in ("fp16", "int8"):
            old = records.get((stitch.id, derived))
            if derived not in precisions and old is not None and old.source_sha256 != made[0].sha256:
                del records[(stitch.id, derived)]  # made from an FP32 file that no longer exists
        try:
            _write_exports(exports_path, records)
        except OSError as exc:
            if _disk_refusal(exc) is None:
                raise
            # The old exports.json is intact (atomic write); the new file is found again by its hash on re-run.
            raise files.storage_error(exc, build_dir, f"recording the export of {stitch.id} needs to write there "
                                      f"({len(results)} earlier file(s) are kept)") from None
        results.extend(made)
        _tick(progress, stitch.id, "exported")

    if failures:
        raise ExportStageError(failures, results)
    return results


def _array_digest(array) -> str:
    return sha256_json([str(array.dtype), list(array.shape)])[:16] + sha256_bytes(array.tobytes())[:16]


def _export_one(build_dir, stitch, materialize, input_shape, inputs, inputs_info, wanted, current, records, *,
                opset, simplifier, simplifier_name, batch, exporter, gates, int8_calib=None,
                pieces=None) -> list[Artifact]:
    """Export one stitch's missing/stale artifacts; returns all of its artifacts (reused ones included)."""
    from snexport.export.validate import reference_logits

    threads = 1 if stitch.gflops < SMALL_GFLOPS else None
    clock = _Clock()
    with clock("materialize"):
        module = materialize(stitch.id)
    with clock("reference"):
        reference = reference_logits(module, inputs, threads=threads)
        shipped = write_reference(build_dir, stitch.id, inputs, reference)
    made: list[Artifact] = []
    hash32, rel32 = wanted["fp32"]
    if current["fp32"]:
        art32, bytes32, logits32 = records[(stitch.id, "fp32")], None, None
    else:
        art32, bytes32, logits32 = _export_fp32(build_dir, stitch, module, input_shape, inputs, inputs_info, reference,
                                                shipped, hash32, rel32, threads, clock, opset=opset,
                                                simplifier=simplifier, simplifier_name=simplifier_name, batch=batch,
                                                exporter=exporter, gates32=gates["fp32"], pieces=pieces)
    made.append(art32)
    del module
    for precision in ("fp16", "int8"):
        if precision not in wanted:
            continue
        if current[precision]:
            made.append(records[(stitch.id, precision)])
            continue
        clock = _Clock()
        if bytes32 is None:  # the FP32 file was current: its bytes (and, for int8, its logits) are read back once
            bytes32 = (build_dir / rel32).read_bytes()
        if precision == "fp16":
            made.append(_export_fp16(build_dir, stitch, art32, bytes32, reference, inputs, inputs_info, shipped,
                                     wanted["fp16"], threads, gates["fp16"], clock))
        else:
            if logits32 is None:
                from snexport.export.validate import run_onnx

                with clock("fp32_logits"):
                    logits32 = run_onnx(bytes32, inputs, threads=threads)
            # int8 is judged on inputs like those it was calibrated on: the real images when there are any (noise
            # outside the calibrated ranges is clipped, which says nothing about the file), else the noise.
            real = slice(inputs_info["random"], None) if inputs_info["images"] else slice(None)
            made.append(_export_int8(build_dir, stitch, art32, bytes32, logits32[real], reference[real],
                                     inputs[real], inputs_info, shipped, wanted["int8"], threads, gates["int8"],
                                     int8_calib, clock))
    return made


def _export_fp32(build_dir, stitch, module, input_shape, inputs, inputs_info, reference, shipped, hash32, rel32,
                 threads, clock, *, opset, simplifier, simplifier_name, batch, exporter, gates32, pieces=None):
    """Export (composed from pieces, else traced whole) → simplify → validate → TensorRT check → write; returns
    (artifact, bytes, ORT logits)."""
    from snexport.export.compose import NotComposable, composable
    from snexport.export.int8 import FLOAT_WEIGHTS_KEY, stitch_layer_weights
    from snexport.export.onnx_export import export_model
    from snexport.export.simplify import simplify_model
    from snexport.export.trt_compat import check_tensorrt_compat
    from snexport.export.validate import torch_threads, validate_onnx, validate_outputs

    model = raw = composed = None
    with clock("export"), torch_threads(threads):
        if pieces is not None and composable(module):
            try:
                # Its pieces were simplified when they were first exported (compose.py).
                composed, info = pieces.compose(module, input_shape, batch=batch,
                                                metadata=_metadata(stitch, "fp32", hash32))
                clock.add("trace_pieces", info["pieces_traced_s"])  # shared work, shown apart from this stitch's
                model = composed.skeleton()
            except NotComposable as exc:
                log.info("%s is traced whole: %s", stitch.id, exc)
        if model is None:
            # raw: the exporter's own bytes of the graph (no metadata yet): validated as they are, not re-serialized.
            model, info, raw = export_model(module, input_shape, batch=batch, opset=opset, exporter=exporter,
                                            metadata=_metadata(stitch, "fp32", hash32), with_bytes=True)
        # Named while node names still carry module scopes (simplifiers rename what they fuse; composed graphs
        # name each piece's nodes by its place in the route): what an int8 variant keeps float, read from this
        # file's metadata whenever one is made (int8.py).
        float_weights = {FLOAT_WEIGHTS_KEY: json.dumps(stitch_layer_weights(model))}
        _set_metadata(model, float_weights)
    with clock("simplify"):
        if composed is not None:
            _set_metadata(composed.model, float_weights)
            data = composed.serialize()  # spliced from the pieces' serialized weights (compose.py)
            del composed
        else:
            model = simplify_model(model, simplifier, label=stitch.id)
            data = model.SerializeToString()
    writer = _WriteBehind(build_dir / rel32, data)  # written and hashed while it is validated
    with clock("validate_simplified"):
        try:
            figures, logits = validate_outputs(data, reference, inputs, stitch_id=stitch.id, threads=threads,
                                               **gates32)
        except BaseException as exc:
            writer.abandon()
            if not isinstance(exc, ExportValidationError):
                raise
            if raw is None:  # composed: the whole-stitch trace is the reference way; it says what broke, if anything
                log.warning("%s: the graph composed from its pieces failed validation (%s); tracing it whole",
                            stitch.id, exc)
                del model, data
                return _export_fp32(build_dir, stitch, module, input_shape, inputs, inputs_info, reference, shipped,
                                    hash32, rel32, threads, clock, opset=opset, simplifier=simplifier,
                                    simplifier_name=simplifier_name, batch=batch, exporter=exporter,
                                    gates32=gates32, pieces=None)
            # Only a failing file pays for a run of the exporter's own graph: it says which tool broke the model.
            # (Validating it first, always, cost a third full pass per stitch: 14.5 of 57 s for an 18-GFLOP one.)
            validate_onnx(raw, reference, inputs, stitch_id=f"{stitch.id} (as exported, before simplifying)",
                          threads=threads, **gates32)
            raise ExportValidationError(f"{stitch.id} (the exported graph passed; {simplifier} broke it: retry "
                                        "with another --simplifier)", exc.failures) from None
    del raw
    try:
        with clock("tensorrt_check"):
            compat = check_tensorrt_compat(_to_skeleton(model))
    except BaseException:
        writer.abandon()
        raise
    del model
    with clock("write_and_hash"):
        sha = writer.finish()
        # This file's own ONNX Runtime outputs on the shipped inputs: what its packed copies must reproduce, so the
        # packs check against them instead of loading the file again (device/pack.py).
        shipped = dict(shipped, **write_onnx_logits(build_dir, stitch.id, "fp32", logits))
        figures.update(
            fallback_reason=info["fallback_reason"],
            tensorrt_compat={k: compat[k] for k in ("ok", "target", "unsupported", "warnings")},
            inputs=inputs_info,
        )
        if "composed_from" in info:
            figures["composed_from_pieces"] = info["composed_from"]
            figures["pieces_traced"] = info["pieces_traced"]
        art = _artifact(build_dir, stitch.id, rel32, "fp32", info, simplifier_name, figures, hash32, shipped,
                        data=data, sha256=sha)
    art.validation["seconds"] = clock.seconds  # per phase (benchmarks/export_timing.py); not part of any hash
    return art, data, logits


def _derived_info(art32: Artifact) -> dict:
    return {"exporter": art32.exporter, "opset": art32.opset, "input_name": art32.input_name,
            "input_shape": art32.input_shape, "output_name": art32.output_name,
            "output_shape": art32.output_shape, "versions": dict(art32.versions)}


def _export_fp16(build_dir, stitch, art32, bytes32, reference, inputs, inputs_info, shipped, wanted16, threads,
                 gates16, clock) -> Artifact:
    import onnx

    from snexport.export.fp16 import cast_model_to_fp16
    from snexport.export.validate import validate_fp16_onnx

    hash16, rel16 = wanted16
    with clock("cast"):
        model = cast_model_to_fp16(onnx.load_from_string(bytes32), label=stitch.id)
        _set_metadata(model, _metadata(stitch, "fp16", hash16))
        data = model.SerializeToString()
    del model
    with clock("validate"):
        figures16 = validate_fp16_onnx(data, reference, inputs, stitch_id=stitch.id, threads=threads, **gates16)
    with clock("write_and_hash"):
        _write_file(build_dir / rel16, data)
        figures16.update(source_onnx=art32.file, inputs=inputs_info, seconds=clock.seconds)
        return _artifact(build_dir, stitch.id, rel16, "fp16", _derived_info(art32), art32.simplifier, figures16,
                         hash16, shipped, source_sha256=art32.sha256, data=data)


def _export_int8(build_dir, stitch, art32, bytes32, logits32, reference, inputs, inputs_info, shipped, wanted8,
                 threads, gates8, calib, clock) -> Artifact:
    """Quantize the FP32 file; gate its logits against the FP32 file's (``int8.INT8_GATES``) and report them
    against PyTorch too (no gate: the FP32 file already passed those)."""
    from snexport.export.int8 import RECIPE, quantize_int8
    from snexport.export.validate import compare_logits, validate_outputs

    hash8, rel8 = wanted8
    on_images = bool(inputs_info["images"]) and len(inputs) == inputs_info["images"]
    inputs_info = dict(inputs_info, used="images" if on_images else "random")
    if not on_images:  # an untrained model's top-1 on noise is a near tie: reported, not gated (int8.py)
        gates8 = dict(gates8, require_top1=0.0)
    with clock("quantize"):
        model = quantize_int8(bytes32, calib, build_dir / ENGINES_DIR, label=stitch.id)
        _set_metadata(model, _metadata(stitch, "int8", hash8))
        data = model.SerializeToString()
    del model
    with clock("validate"):
        figures8, logits8 = validate_outputs(data, logits32, inputs, stitch_id=f"{stitch.id} (int8 vs FP32)",
                                             threads=threads, **gates8)
    vs_reference, _ = compare_logits(reference, logits8, rtol_scale=None, min_cosine=-1.0, require_top1=0.0)
    with clock("write_and_hash"):
        _write_file(build_dir / rel8, data)
        figures8.update(compared_with="fp32 onnx", source_onnx=art32.file, inputs=inputs_info, seconds=clock.seconds,
                        vs_pytorch=_strip(vs_reference),
                        quantization=dict(RECIPE, calibration_images=int(len(calib))))
        return _artifact(build_dir, stitch.id, rel8, "int8", _derived_info(art32), art32.simplifier, figures8, hash8,
                         shipped, source_sha256=art32.sha256, data=data)


def _to_skeleton(model):
    """Turn ``model`` (already serialized, not needed whole again) into its skeleton, in place: every large
    initializer becomes a stub pointing at external data that is never read. That is all a check of ops, dtypes
    and shapes needs, and shape inference on it does not copy the weights twice."""
    from snexport.export.compose import SPLICE_MIN_BYTES, weightless_stub

    g = model.graph
    big = [t for t in g.initializer if len(t.raw_data) >= SPLICE_MIN_BYTES]
    small = [t for t in g.initializer if len(t.raw_data) < SPLICE_MIN_BYTES]
    del g.initializer[:]
    g.initializer.extend(small)
    g.initializer.extend(weightless_stub(t) for t in big)
    return model


class _Clock:
    """Seconds per named phase (``with clock("export"): ...``), recorded in each artifact's validation figures."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._inner = 0.0

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        self._inner = 0.0
        try:
            yield
        finally:
            spent = time.perf_counter() - start - self._inner
            self.seconds[phase] = round(self.seconds.get(phase, 0.0) + spent, 3)

    def add(self, phase: str, seconds: float) -> None:
        """Book ``seconds`` spent inside the running phase to ``phase`` instead."""
        self._inner += seconds
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + seconds, 3)


class _WriteBehind:
    """Writes ``data`` to a temp file next to ``final`` and hashes it in a thread, while the caller validates the
    same bytes (file I/O and sha256 release the GIL: 0.7-1 s of a 350 MB stitch's export hidden behind ONNX
    Runtime). ``finish()`` puts the file at its name, complete (fsync, rename), and returns its sha256;
    ``abandon()`` deletes it. The file only ever reaches ``final`` through ``finish``."""

    def __init__(self, final: Path, data: bytes):
        import threading

        self.final, self.tmp = final, temp_path_for(final)
        self._error: Optional[BaseException] = None
        self._sha: Optional[str] = None
        self._thread = threading.Thread(target=self._run, args=(data,), name="snexport-write", daemon=True)
        self._thread.start()

    def _run(self, data: bytes) -> None:
        try:
            with open(self.tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self._sha = sha256_bytes(data)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread by finish()
            self._error = exc

    def finish(self) -> str:
        self._thread.join()
        try:
            if self._error is not None:
                raise self._error
            commit(self.tmp, self.final)
        finally:
            self.tmp.unlink(missing_ok=True)
        return self._sha

    def abandon(self) -> None:
        self._thread.join()
        self.tmp.unlink(missing_ok=True)


def _write_file(final: Path, data: bytes) -> None:
    """``data`` at ``final``, complete or not at all (temp file, fsync, rename)."""
    tmp = temp_path_for(final)
    try:
        tmp.write_bytes(data)
        commit(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_reference(build_dir: Path, stitch_id: str, inputs, logits) -> dict:
    """Ship the validation inputs (one file per input set, shared by every stitch) and this stitch's FP32 PyTorch
    logits, so a device validates the engines it builds without torch (snexport.device.tensorrt_build)."""
    ref_dir = build_dir / files.REFERENCE_DIR
    ref_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for key, rel, array in (
        ("inputs", f"{files.REFERENCE_DIR}/inputs-{_array_digest(inputs)}.npy", inputs),
        ("logits", f"{files.REFERENCE_DIR}/{safe_file_stem(stitch_id)}.logits.npy", logits),
    ):
        path = build_dir / rel
        if not (key == "inputs" and path.is_file()):  # the shared inputs file is content-named: written once
            _save_float32(path, array)
        out[key], out[f"{key}_sha256"] = rel, sha256_file(path)
    return out


def write_onnx_logits(build_dir: Path, stitch_id: str, precision: str, logits) -> dict:
    """Ship an exported file's ONNX Runtime logits on the reference inputs (next to ``write_reference``'s files):
    ``{"onnx_logits": path, "onnx_logits_sha256": ...}`` for the artifact's ``reference``."""
    rel = f"{files.REFERENCE_DIR}/{safe_file_stem(stitch_id)}.{precision}.onnx-logits.npy"
    path = build_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_float32(path, logits)
    return {"onnx_logits": rel, "onnx_logits_sha256": sha256_file(path)}


def _save_float32(path: Path, array) -> None:
    """Write ``array`` as a float32 .npy file atomically (a reader never sees half a file)."""
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)


def _strip(figures: dict) -> dict:
    return {k: v for k, v in figures.items() if k not in ("gates", "provider")}


def _metadata(stitch: Stitch, precision: str, settings_hash: str) -> dict:
    route = {k: v for k, v in stitch.to_dict().items() if k in ("front", "back", "cut", "resume", "layer")}
    return {
        "snexport.stitch_id": stitch.id,
        "snexport.route": json.dumps(route, sort_keys=True),
        "snexport.precision": precision,
        "snexport.settings_hash": settings_hash,
    }


def _set_metadata(model, metadata: dict) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for key, value in metadata.items():
        if key in existing:
            existing[key].value = value
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value


def _artifact(build_dir, stitch_id, rel, precision, info, simplifier_name, figures, settings_hash, reference: dict,
              source_sha256: str = "", data: Optional[bytes] = None, sha256: Optional[str] = None) -> Artifact:
    """The record of the file at ``rel``; ``data``: its bytes as just written (hashed here instead of re-read,
    unless ``sha256`` is given too)."""
    import onnxruntime

    path = build_dir / rel
    versions = dict(info["versions"], onnxruntime=onnxruntime.__version__, settings_hash=settings_hash)
    if simplifier_name != "none":
        tool, _, version = simplifier_name.partition(" ")
        versions[tool] = version
    return Artifact(
        stitch_id=stitch_id,
        file=rel,
        format="onnx",
        precision=precision,
        size_bytes=len(data) if data is not None else path.stat().st_size,
        sha256=sha256 or (sha256_bytes(data) if data is not None else sha256_file(path)),
        input_name=info["input_name"],
        input_shape=tuple(info["input_shape"]),
        input_dtype="float32",  # FP16 models keep FP32 I/O (see fp16.py)
        output_name=info["output_name"],
        output_shape=tuple(info["output_shape"]),
        opset=info["opset"],
        exporter=info["exporter"],
        simplifier=simplifier_name,
        versions=versions,
        validation=figures,
        source_sha256=source_sha256,
        reference=dict(reference),
    )


def _up_to_date(build_dir: Path, record: Optional[Artifact], settings_hash: str) -> bool:
    if record is None or record.versions.get("settings_hash") != settings_hash:
        return False
    path = build_dir / record.file
    return path.is_file() and path.stat().st_size == record.size_bytes and sha256_file(path) == record.sha256


def _validation_inputs(input_shape, calib_images, num_random: int, seed: int):
    import numpy as np

    shape = tuple(int(d) for d in input_shape)
    rng = np.random.default_rng(seed)
    parts = [rng.standard_normal((int(num_random), *shape)).astype(np.float32)]
    if calib_images is not None:
        images = np.asarray(calib_images, dtype=np.float32)
        if images.ndim != 4 or tuple(images.shape[1:]) != shape:
            raise SnexportError(f"calibration images have shape {images.shape}; expected (N, {', '.join(map(str, shape))})")
        parts.append(images)
    inputs = np.concatenate(parts)
    if len(inputs) == 0:
        raise SnexportError("no validation inputs: set num_random > 0 or pass calibration images")
    return inputs


def _read_exports(path: Path) -> dict[tuple[str, str], Artifact]:
    from snexport.device.deployset import read_artifact_list

    if not path.is_file():
        return {}
    arts = read_artifact_list(path, "delete it to re-export every stitch")
    return {(a.stitch_id, a.precision): a for a in arts}


_DISK_REFUSED = files.STORAGE_ERRNOS


def _disk_refusal(exc: BaseException) -> Optional[OSError]:
    """The OSError behind ``exc`` when the disk refused a write (full, over quota, read-only), else None.

    Exporters and simplifiers re-raise I/O errors as their own types, so the cause chain is searched.
    """
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, OSError) and exc.errno in _DISK_REFUSED:
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _write_exports(path: Path, records: dict) -> None:
    atomic_write_json(path, [a.to_dict() for a in records.values()])


def _remove_stale_temps(engines: Path) -> None:
    import shutil

    for stale in engines.glob(f".*{TMP_SUFFIX}"):
        log.info("removing %s left by an interrupted export", stale.name)
        if stale.is_dir():  # the int8 quantizer's work directory
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    for stale in engines.glob(f".*{TMP_SUFFIX}.data"):
        stale.unlink(missing_ok=True)


def _tick(progress, stitch_id: str, status: str) -> None:
    if progress is not None:
        progress(1, description=f"export {stitch_id}: {status}")
