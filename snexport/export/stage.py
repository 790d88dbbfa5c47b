"""The export stage: one validated ONNX file per stitch in ``<build>/engines/``, listed in ``<build>/exports.json``.

Decoupled from the SN-Net: the caller passes the stitch records and a ``materialize(stitch_id) -> nn.Module``
callable (``SNNet.materialize`` in the CLI, a dict lookup in tests).

Per stitch: export (temp file) → validate against PyTorch → simplify (temp file) → validate again → rename to
``engines/<stem>.onnx``; with ``"onnx-fp16"`` in ``formats`` also cast to FP16 → validate at the FP16 gates →
``engines/<stem>.fp16.onnx``. Validation inputs are ``num_random`` seeded random images plus the caller's real
images (``calib_images``), if any.

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

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from snexport import buildfiles as files
from snexport.errors import BuildDirError, SnexportError
from snexport.hashing import (TMP_SUFFIX, atomic_path, atomic_write_json, commit, sha256_bytes, sha256_file,
                              sha256_json, temp_path_for)
from snexport.records import Artifact, Stitch

log = logging.getLogger("snexport.export")

FORMATS = ("onnx", "onnx-fp16")
ENGINES_DIR = files.ENGINES_DIR
EXPORTS_FILE = files.EXPORTS
# Bump when this stage starts producing different files for the same settings: forces a re-export.
STAGE_VERSION = 1
_SAFE = set("abcdefghijklmnopqrstuvwxyz0123456789_-")
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
    num_random: int = 8,
    seed: int = 0,
    fp32_gates: Optional[dict] = None,
    fp16_gates: Optional[dict] = None,
) -> list[Artifact]:
    """Export, validate and record every stitch; see the module doc for resuming and failure handling.

    ``input_shape`` is (C, H, W); ``calib_images`` an optional float32 (N, C, H, W) array of real, preprocessed
    images; ``weights_hash`` identifies the weights ``materialize`` uses (pass ``BuildDir.weights_hash()``) so a
    re-run after fine-tuning re-exports. ``progress`` is called once per stitch as ``progress(1, description=...)``
    (the ``advance`` of ``snexport.progress.progress_task`` fits). Gates override ``validate.FP32_GATES`` /
    ``FP16_GATES``.
    """
    from snexport.export.simplify import simplifier_version
    from snexport.export.validate import FP16_GATES, FP32_GATES

    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise SnexportError(f"unknown export format(s) {unknown}; choose from {', '.join(FORMATS)} "
                            "(TensorRT engines are built on the device: `snexport bench`)")
    simplifier_name = simplifier_version(simplifier)  # fail before any work if the tool is missing
    gates32 = {**FP32_GATES, **(fp32_gates or {})}
    gates16 = {**FP16_GATES, **(fp16_gates or {})}
    precisions = ["fp32"] + (["fp16"] if "onnx-fp16" in formats else [])  # FP16 is cast from the FP32 file

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

    results: list[Artifact] = []
    failures: dict[str, str] = {}
    for stitch in stitches:
        stem = safe_file_stem(stitch.id)
        wanted = {}
        for precision in precisions:
            settings = dict(common, stitch=stitch.to_dict(), precision=precision,
                            gates=gates32 if precision == "fp32" else gates16)
            suffix = ".fp16" if precision == "fp16" else ""
            wanted[precision] = (sha256_json(settings), f"{ENGINES_DIR}/{stem}{suffix}.onnx")
        current = {p: _up_to_date(build_dir, records.get((stitch.id, p)), h) for p, (h, _) in wanted.items()}
        if current.get("fp16"):
            # The FP16 file is derived from the FP32 one: it is current only if cast from the current FP32 file.
            fp16, fp32 = records[(stitch.id, "fp16")], records[(stitch.id, "fp32")]
            current["fp16"] = current["fp32"] and fp16.source_sha256 == fp32.sha256
        if all(current.values()):
            results.extend(records[(stitch.id, p)] for p in precisions)
            _tick(progress, stitch.id, "up to date")
            continue
        try:
            made = _export_one(build_dir, stitch, materialize, input_shape, inputs, inputs_info, wanted, current,
                               records, opset=opset, simplifier=simplifier, simplifier_name=simplifier_name,
                               batch=batch, exporter=exporter, gates32=gates32, gates16=gates16)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one stitch's failure must not stop the others
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
        old16 = records.get((stitch.id, "fp16"))
        if "fp16" not in precisions and old16 is not None and old16.source_sha256 != made[0].sha256:
            del records[(stitch.id, "fp16")]  # cast from an FP32 file that no longer exists
        _write_exports(exports_path, records)
        results.extend(made)
        _tick(progress, stitch.id, "exported")

    if failures:
        raise ExportStageError(failures, results)
    return results


def _array_digest(array) -> str:
    return sha256_json([str(array.dtype), list(array.shape)])[:16] + sha256_bytes(array.tobytes())[:16]


def _export_one(build_dir, stitch, materialize, input_shape, inputs, inputs_info, wanted, current, records, *,
                opset, simplifier, simplifier_name, batch, exporter, gates32, gates16) -> list[Artifact]:
    """Export one stitch's missing/stale artifacts; returns all of its artifacts (reused ones included)."""
    from snexport.export.fp16 import cast_to_fp16
    from snexport.export.onnx_export import export_onnx
    from snexport.export.simplify import simplify
    from snexport.export.trt_compat import check_tensorrt_compat
    from snexport.export.validate import reference_logits, validate_fp16_onnx, validate_onnx

    module = materialize(stitch.id)
    reference = reference_logits(module, inputs)
    shipped = write_reference(build_dir, stitch.id, inputs, reference)
    made: list[Artifact] = []
    temps: list[Path] = []
    try:
        hash32, rel32 = wanted["fp32"]
        final32 = build_dir / rel32
        if current["fp32"]:
            art32 = records[(stitch.id, "fp32")]
        else:
            meta = _metadata(stitch, "fp32", hash32)
            raw = temp_path_for(final32)
            temps.append(raw)
            info = export_onnx(module, input_shape, raw, batch=batch, opset=opset, exporter=exporter, metadata=meta)
            raw_figures = validate_onnx(raw, reference, inputs, stitch_id=stitch.id, **gates32)
            simple = temp_path_for(final32)
            temps.append(simple)
            simplify(raw, simple, simplifier)
            figures = validate_onnx(simple, reference, inputs, stitch_id=stitch.id, **gates32)
            compat = check_tensorrt_compat(simple)
            commit(simple, final32)
            figures.update(
                raw_export=_strip(raw_figures),
                fallback_reason=info["fallback_reason"],
                tensorrt_compat={k: compat[k] for k in ("ok", "target", "unsupported", "warnings")},
                inputs=inputs_info,
            )
            art32 = _artifact(build_dir, stitch.id, rel32, "fp32", info, simplifier_name, figures, hash32, shipped)
        made.append(art32)

        if "fp16" in wanted:
            hash16, rel16 = wanted["fp16"]
            if current["fp16"]:
                made.append(records[(stitch.id, "fp16")])
            else:
                final16 = build_dir / rel16
                tmp16 = temp_path_for(final16)
                temps.append(tmp16)
                cast_to_fp16(final32, tmp16)
                _set_metadata_file(tmp16, _metadata(stitch, "fp16", hash16))
                figures16 = validate_fp16_onnx(tmp16, reference, inputs, stitch_id=stitch.id, **gates16)
                commit(tmp16, final16)
                info16 = {
                    "exporter": art32.exporter, "opset": art32.opset, "input_name": art32.input_name,
                    "input_shape": art32.input_shape, "output_name": art32.output_name,
                    "output_shape": art32.output_shape, "versions": dict(art32.versions),
                }
                figures16.update(source_onnx=rel32, inputs=inputs_info)
                made.append(_artifact(build_dir, stitch.id, rel16, "fp16", info16, art32.simplifier, figures16,
                                      hash16, shipped, source_sha256=art32.sha256))
        return made
    finally:
        for t in temps:
            t.unlink(missing_ok=True)


def write_reference(build_dir: Path, stitch_id: str, inputs, logits) -> dict:
    """Ship the validation inputs (one file per input set, shared by every stitch) and this stitch's FP32 PyTorch
    logits, so a device validates the engines it builds without torch (snexport.device.tensorrt_build)."""
    import numpy as np

    ref_dir = build_dir / files.REFERENCE_DIR
    ref_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for key, rel, array in (
        ("inputs", f"{files.REFERENCE_DIR}/inputs-{_array_digest(inputs)}.npy", inputs),
        ("logits", f"{files.REFERENCE_DIR}/{safe_file_stem(stitch_id)}.logits.npy", logits),
    ):
        path = build_dir / rel
        array = np.ascontiguousarray(array, dtype=np.float32)
        if not (key == "inputs" and path.is_file()):  # the shared inputs file is content-named: written once
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, array, allow_pickle=False)
        out[key], out[f"{key}_sha256"] = rel, sha256_file(path)
    return out


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


def _set_metadata_file(path: Path, metadata: dict) -> None:
    import onnx

    model = onnx.load(str(path))
    existing = {p.key: p for p in model.metadata_props}
    for key, value in metadata.items():
        if key in existing:
            existing[key].value = value
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
    onnx.save(model, str(path))  # path is still a private temp file: rewriting it in place is safe


def _artifact(build_dir, stitch_id, rel, precision, info, simplifier_name, figures, settings_hash, reference: dict,
              source_sha256: str = "") -> Artifact:
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
        size_bytes=path.stat().st_size,
        sha256=sha256_file(path),
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
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
        arts = [Artifact.from_dict(d) for d in doc]
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise BuildDirError(f"{path} is not a valid exports list ({exc}); delete it to re-export every stitch") from None
    return {(a.stitch_id, a.precision): a for a in arts}


def _write_exports(path: Path, records: dict) -> None:
    atomic_write_json(path, [a.to_dict() for a in records.values()])


def _remove_stale_temps(engines: Path) -> None:
    for stale in engines.glob(f".*{TMP_SUFFIX}"):
        log.info("removing %s left by an interrupted export", stale.name)
        stale.unlink(missing_ok=True)
    for stale in engines.glob(f".*{TMP_SUFFIX}.data"):
        stale.unlink(missing_ok=True)


def _tick(progress, stitch_id: str, status: str) -> None:
    if progress is not None:
        progress(1, description=f"export {stitch_id}: {status}")
