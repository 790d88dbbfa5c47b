"""Which engine files a device runs: the last export's set (deploy.json), verified on disk, in the form the
device's profile wants (TensorRT engines built here, the ONNX Runtime-optimized pack, the portable pack, or the
standalone ONNX files).

The host writes exports.json, deploy.json and the portable pack (``snexport export``); the device adds
engines.json (TensorRT engines) and engines/pack-ort (``snexport bench``). Works on a build directory and on a
bundle alike: only these JSON files and the engine files are read.
"""

from __future__ import annotations

import logging
from pathlib import Path

from snexport import buildfiles as files
from snexport.buildfiles import BuildFiles, read_json, record_from_json
from snexport.errors import BuildDirError
from snexport.hashing import sha256_file
from snexport.records import Artifact

log = logging.getLogger("snexport")


def read_artifact_list(path: Path, fix: str) -> list[Artifact]:
    """exports.json / engines.json: a list of Artifact records (BuildDirError with ``fix`` when corrupt)."""
    doc = read_json(path, "artifact list", fix)
    try:
        if not isinstance(doc, list):
            raise TypeError("expected a list of artifacts")
        return [record_from_json(Artifact, d) for d in doc]
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise BuildDirError(f"{path} is corrupt ({exc}); {fix}") from None


def read_exports(build: BuildFiles) -> list[Artifact]:
    if not build.exports_path.is_file():
        raise BuildDirError(f"{build.root} has no {files.EXPORTS}; run `snexport export {build.root}` first")
    return read_artifact_list(build.exports_path, f"re-run `snexport export {build.root}`")


def deploy_set(build: BuildFiles) -> dict:
    """deploy.json: the weights hash of the last export and the (stitch_id, precision, sha256) it chose."""
    if not build.deploy_path.is_file():
        raise BuildDirError(f"{build.root} has no export yet; run `snexport export {build.root}`")
    doc = read_json(build.deploy_path, "the deploy set", f"re-run `snexport export {build.root}`")
    try:
        wanted = {(d["stitch_id"], d["precision"], d["sha256"]) for d in doc["artifacts"]}
        if not all(isinstance(v, str) for key in wanted for v in key) or not isinstance(doc["weights_hash"], str):
            raise TypeError("expected strings")
        return {"weights_hash": doc["weights_hash"], "wanted": wanted}
    except (KeyError, TypeError):
        raise BuildDirError(f"{build.deploy_path} is corrupt; re-run `snexport export {build.root}`") from None


def deploy_records(build: BuildFiles) -> list[Artifact]:
    """The exports.json records of the last `export` for the current weights, their files not yet checked.

    In a build directory the SN-Net weights must still be those that were exported; a bundle carries no weights,
    so its deploy set is current by construction. A pack made from these records stands for them by hash, which
    is why they are not verified here: a bundle ships the pack without the standalone files (`snexport bundle`).
    """
    chosen = deploy_set(build)
    if build.snnet_path.is_file() and chosen["weights_hash"] != build.weights_hash():
        raise BuildDirError(f"the SN-Net weights changed since the last export (trained or re-stitched); re-run "
                            f"`snexport export {build.root}`")
    return [a for a in read_exports(build) if (a.stitch_id, a.precision, a.sha256) in chosen["wanted"]]


def current_exports(build: BuildFiles) -> list[Artifact]:
    """The exported files of the last `export` for the current weights, verified on disk."""
    return verified(build, deploy_records(build))


def verified(build: BuildFiles, artifacts: list[Artifact]) -> list[Artifact]:
    """Artifacts whose file exists with the recorded hash; others are reported and left out."""
    good = []
    root = build.root.resolve()
    for a in artifacts:
        problem = "missing"
        try:
            path = build.root / a.file
            # A build directory travels: only files inside it are opened (no absolute paths, '..' or links out).
            if root not in path.resolve().parents:
                problem = "outside the build directory (an absolute path, '..' or a link out)"
            elif path.is_file():
                problem = "" if sha256_file(path) == a.sha256 else "does not match its recorded hash"
        except (OSError, ValueError, RuntimeError) as exc:  # too long a name, a NUL, a symlink loop
            problem = f"unreadable ({type(exc).__name__})"
        if problem:
            log.warning("%s: %s is %s; re-run `snexport export`", a.stitch_id, a.file[:200], problem)
        else:
            good.append(a)
    return good


def packed_artifacts(build: BuildFiles, pack_dir: str) -> list[Artifact]:
    from snexport.device.pack import read_pack_index

    doc = read_pack_index(build.root, pack_dir) or {}
    try:
        return [record_from_json(Artifact, d) for d in doc.get("artifacts", [])]
    except (TypeError, ValueError, AttributeError):
        return []  # a corrupt index: the pack is not used (the caller falls back to the standalone files)


def complete_pack(build: BuildFiles, pack_dir: str, sources: list[Artifact]) -> list[Artifact]:
    """The pack's artifacts made from exactly `sources`, all verified on disk; [] if anything is missing.

    A pack left over from an earlier export, or with a file missing or altered, is not used: the standalone
    files (or a repack) are, so no engine silently drops out of the deployment.
    """
    shas = {a.sha256 for a in sources}
    packed = [a for a in packed_artifacts(build, pack_dir) if a.source_sha256 in shas]
    if not sources or {a.source_sha256 for a in packed} != shas:
        return []
    good = verified(build, packed)
    return good if len(good) == len(packed) else []


def trt_engines(build: BuildFiles) -> list[Artifact]:
    if not build.trt_engines_path.is_file():
        return []
    return read_artifact_list(build.trt_engines_path, f"delete {build.trt_engines_path} and re-run `snexport bench`")


def onnx_records(build: BuildFiles, precision: str) -> list[Artifact]:
    """The deploy set's ONNX records at ``precision`` (files not checked: what a pack is matched against)."""
    return [a for a in deploy_records(build) if a.precision == precision and a.format == "onnx"]


def onnx_for(build: BuildFiles, precision: str) -> list[Artifact]:
    return verified(build, onnx_records(build, precision))


def deployable(build: BuildFiles, profile) -> list[Artifact]:
    """The files this profile runs, for the current export: TensorRT engines, or ONNX at the profile's precision."""
    return backend_files(build, profile, profile.backend)


def backend_files(build: BuildFiles, profile, backend: str) -> list[Artifact]:
    """The files ``backend`` runs under ``profile`` for the current export, in the form it reads best.

    TensorRT: the engines built on this device. An ONNX runtime: per precision it may run (the backend table's
    ``precisions``, of those the device runs: ``ort_precisions``), the first complete pack of its ``packs``
    (ONNX Runtime: its optimized pack, then the portable one; OpenVINO: the portable one), else the standalone
    files. Several backends of one (stitch, precision) are one engine measured on each of them.
    """
    from snexport.device.runtime.backends import BACKENDS

    if backend == "tensorrt":
        fp32 = {a.sha256 for a in current_exports(build) if a.precision == "fp32"}
        return verified(build, [a for a in trt_engines(build)
                                if a.precision == profile.precision and a.source_sha256 in fp32])
    spec = BACKENDS[backend]
    if spec.packs:
        return [a for precision in ort_precisions(build, profile) if precision in spec.precisions
                for a in _onnx_files(build, precision, spec.packs)]
    return onnx_for(build, "fp32")


def ort_precisions(build: BuildFiles, profile) -> list[str]:
    """What an ONNX Runtime device runs: the profile's precision, plus the int8 files when the export made them
    (each (stitch, precision) file is an engine of its own, measured and chosen on its own numbers)."""
    exported = {a.precision for a in deploy_records(build) if a.format == "onnx"}
    return [profile.precision] + (["int8"] if "int8" in exported and profile.precision != "int8" else [])


def _onnx_files(build: BuildFiles, precision: str, packs: tuple) -> list[Artifact]:
    # The portable pack is made from the exported files (host); a device pack (ONNX Runtime's optimized one,
    # made by bench's prepare_pack on this machine: prepacked weights shared by all sessions, ~1 copy of the
    # distinct weights, docs/packs.md) from the portable pack, so each is matched against its own sources.
    # One pack per precision: matched, and falling back to the standalone files, per precision.
    portable = complete_pack(build, files.PACK_DIR, onnx_records(build, precision))
    for pack_dir in packs:
        packed = portable if pack_dir == files.PACK_DIR else complete_pack(build, pack_dir, portable)
        if packed:
            return packed
    return onnx_for(build, precision)
