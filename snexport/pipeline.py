"""Stages after training: export the candidates, build device engines, write the manifest.

Each function reads its inputs from the build directory and writes its result there, so `snexport export`,
`snexport bench` and `snexport build` are thin wrappers and every stage can run alone or on another machine.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from snexport.errors import BackendUnavailableError, BuildDirError
from snexport.hashing import atomic_write_json, sha256_file
from snexport.records import Artifact

log = logging.getLogger("snexport")

ENGINES_FILE = "engines.json"  # TensorRT engines built on the device (exports.json holds the ONNX files)
DEPLOY_FILE = "deploy.json"  # the artifacts of the last export: what bench profiles and the manifest lists


def default_target() -> str:
    """The profile for 'this machine': TensorRT on a CUDA GPU when both exist, else ONNX Runtime on the CPU."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        try:
            import torch

            if torch.cuda.is_available():
                return "cuda-gpu"
        except ImportError:
            pass
    return "x86-cpu"


def runtime_available(backend: str) -> tuple[bool, str]:
    import importlib.util

    if backend == "onnxruntime":
        ok = importlib.util.find_spec("onnxruntime") is not None
        return ok, "" if ok else "onnxruntime is not installed (pip install onnxruntime)"
    if backend == "tensorrt":
        if importlib.util.find_spec("tensorrt") is None:
            return False, "TensorRT is not installed on this machine"
        import torch

        if not torch.cuda.is_available():
            return False, "TensorRT needs a CUDA GPU and this machine has none"
        return True, ""
    if backend == "torch":
        return True, ""
    return False, f"unknown backend {backend}"


def validation_images(build, count: int = 16):
    """A few real, preprocessed validation images when the build has a dataset (export checks real inputs too)."""
    import numpy as np

    data = build.info().get("data")
    if not data:
        return None
    from snexport.data import open_data

    spec0 = build.load_plan().anchors[0]
    splits = open_data(data, spec0.input_shape, spec0.num_classes, batch_size=count)
    x, _ = next(iter(splits.val))
    return np.ascontiguousarray(x[:count].numpy(), dtype=np.float32)


def resolve_stitches(build, choice: str | None) -> list:
    from snexport.selection import parse_stitch_choice, read_candidates, select_stage

    plan = build.load_plan()
    mode, ids = parse_stitch_choice(choice)
    if mode == "all":
        return list(plan.stitches)
    if mode == "ids":
        return [plan.get(i) for i in ids]
    try:
        doc = read_candidates(build)
        # Reuse only a FLOPs-Pareto selection made for these weights; anything else is selected afresh.
        if (doc.get("weights_hash") != build.weights_hash() or doc.get("mode") != "pareto"
                or doc.get("by") != "gflops"):
            raise BuildDirError("stale")
    except BuildDirError:
        doc = select_stage(build, by="gflops", stitches="pareto")
    return [plan.get(c["id"]) for c in doc["candidates"]]


def export_stage(build, stitches: str | None = "pareto", *, opset: int = 18, simplifier: str = "onnxsim",
                 batch: int = 1, exporter: str = "auto", fp16: bool = False, pack: bool = False,
                 show_progress: bool = True) -> list[Artifact]:
    """Standalone validated ONNX per stitch; with `pack`, also the portable shared-weight pack of them.

    Returns the standalone artifacts (exports.json); the pack's are in engines/pack/pack.json.
    """
    from snexport.export.stage import export_stitches
    from snexport.progress import progress_task

    chosen = resolve_stitches(build, stitches)
    net = build.load_snnet()
    spec0 = build.load_plan().anchors[0]
    formats = ("onnx", "onnx-fp16") if fp16 else ("onnx",)
    from snexport.export.stage import ExportStageError

    try:
        with progress_task("exporting ONNX", len(chosen), show_progress) as advance:
            arts = export_stitches(build.root, chosen, net.materialize, spec0.input_shape, validation_images(build),
                                   opset=opset, simplifier=simplifier, batch=batch, exporter=exporter,
                                   formats=formats, progress=advance, weights_hash=build.weights_hash())
    except ExportStageError as exc:
        write_deploy_set(build, exc.artifacts)  # what did export is deployable; the failures are reported
        raise
    write_deploy_set(build, arts)
    if pack:
        from snexport.export.pack import pack_stitches

        with progress_task("packing shared weights", len(arts), show_progress) as advance:
            pack_stitches(build.root, arts, progress=advance)
    return arts


def write_deploy_set(build, arts: list[Artifact]) -> None:
    """What the last export chose: exports.json keeps every file ever exported, this names the current ones."""
    atomic_write_json(build.root / DEPLOY_FILE, {
        "weights_hash": build.weights_hash(),
        "artifacts": [{"stitch_id": a.stitch_id, "precision": a.precision, "sha256": a.sha256} for a in arts],
    })


def current_exports(build) -> list[Artifact]:
    """The exported files of the last `export` for the current weights, verified on disk."""
    path = build.root / DEPLOY_FILE
    try:
        doc = json.loads(path.read_text())
        wanted = {(d["stitch_id"], d["precision"], d["sha256"]) for d in doc["artifacts"]}
        weights_hash = doc["weights_hash"]
    except FileNotFoundError:
        raise BuildDirError(f"{build.root} has no export yet; run `snexport export {build.root}`") from None
    except (ValueError, KeyError, TypeError):
        raise BuildDirError(f"{path} is corrupt; re-run `snexport export {build.root}`") from None
    if weights_hash != build.weights_hash():
        raise BuildDirError(f"the SN-Net weights changed since the last export (trained or re-stitched); re-run "
                            f"`snexport export {build.root}`")
    return verified(build, [a for a in read_exports(build) if (a.stitch_id, a.precision, a.sha256) in wanted])


def packed_artifacts(build, pack_dir: str) -> list[Artifact]:
    from snexport.export.pack import read_pack_index

    doc = read_pack_index(build.root, pack_dir) or {}
    return [Artifact.from_dict(d) for d in doc.get("artifacts", [])]


def read_exports(build) -> list[Artifact]:
    if not build.exports_path.is_file():
        raise BuildDirError(f"{build.root} has no exports.json; run `snexport export {build.root}` first")
    try:
        doc = json.loads(build.exports_path.read_text())
        if not isinstance(doc, list):
            raise TypeError("expected a list of artifacts")
        return [Artifact.from_dict(d) for d in doc]
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise BuildDirError(f"{build.exports_path} is corrupt ({exc}); re-run `snexport export {build.root}`") from None


def verified(build, artifacts: list[Artifact]) -> list[Artifact]:
    """Artifacts whose file exists with the recorded hash; others are reported and left out."""
    good = []
    for a in artifacts:
        path = build.root / a.file
        if not path.is_file():
            log.warning("%s: %s is missing; re-run `snexport export`", a.stitch_id, a.file)
        elif sha256_file(path) != a.sha256:
            log.warning("%s: %s does not match its recorded hash; re-run `snexport export`", a.stitch_id, a.file)
        else:
            good.append(a)
    return good


def engines_stage(build, profile, show_progress: bool = True) -> list[Artifact]:
    """Build one TensorRT engine per exported stitch on this device, sharing one timing cache; FP16 is gated."""
    from snexport.export.stage import safe_file_stem
    from snexport.export.tensorrt_build import build_engine, gpu_name, import_tensorrt, validate_engine
    from snexport.progress import progress_task

    ok, why = runtime_available("tensorrt")
    if not ok:
        raise BackendUnavailableError(f"{why}; the ONNX files in {build.engines_dir} are valid: copy the build to "
                                      "the device and run `snexport bench` there")
    trt = import_tensorrt()
    onnx = {(a.stitch_id, a.precision): a for a in current_exports(build) if a.format == "onnx"}
    fp32 = [a for (sid, p), a in onnx.items() if p == "fp32"]
    gpu = (gpu_name() or "gpu").replace(" ", "_")
    cache = build.engines_dir / f"timing-cache-{gpu}-trt{trt.__version__}.bin"
    engines_path = build.root / ENGINES_FILE
    done = {}
    if engines_path.is_file():
        done = {a.stitch_id: a for a in _read_artifact_list(engines_path)}
    images = validation_images(build)
    net = None
    out = []
    with progress_task(f"building TensorRT {profile.precision} engines", len(fp32), show_progress) as advance:
        for a in fp32:
            rel = f"engines/{safe_file_stem(a.stitch_id)}.{profile.precision}.engine"
            old = done.get(a.stitch_id)
            if (old and old.source_sha256 == a.sha256 and old.versions.get("tensorrt") == trt.__version__
                    and (build.root / rel).is_file() and sha256_file(build.root / rel) == old.sha256):
                out.append(old)
                advance()
                continue
            fp16_onnx = onnx.get((a.stitch_id, "fp16"))
            info = build_engine(build.root / a.file, build.root / rel, precision=profile.precision,
                                workspace_mb=profile.workspace_mb or 1024, timing_cache_path=cache,
                                fp16_onnx_path=(build.root / fp16_onnx.file) if fp16_onnx else None)
            net = net or build.load_snnet()
            import numpy as np

            inputs = np.random.default_rng(0).standard_normal((8, *a.input_shape[1:])).astype(np.float32)
            if images is not None:
                inputs = np.concatenate([inputs, images])
            figures = validate_engine(build.root / rel, net.materialize(a.stitch_id), inputs,
                                      precision=profile.precision, stitch_id=a.stitch_id)
            path = build.root / rel
            art = Artifact(a.stitch_id, rel, "tensorrt", profile.precision, path.stat().st_size, sha256_file(path),
                           a.input_name, a.input_shape, a.input_dtype, a.output_name, a.output_shape, a.opset,
                           a.exporter, a.simplifier, versions=dict(info), validation=figures, source_sha256=a.sha256)
            out.append(art)
            done[a.stitch_id] = art
            atomic_write_json(engines_path, [x.to_dict() for x in done.values()])
            advance()
    return out


def _read_artifact_list(path: Path) -> list[Artifact]:
    try:
        return [Artifact.from_dict(d) for d in json.loads(path.read_text())]
    except (ValueError, TypeError, AttributeError, KeyError):
        raise BuildDirError(f"{path} is corrupt; delete it and re-run `snexport bench`") from None


def complete_pack(build, pack_dir: str, sources: list[Artifact]) -> list[Artifact]:
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


def deployable(build, profile) -> list[Artifact]:
    """The files this profile runs, for the current export: TensorRT engines, or ONNX at the profile's precision."""
    current = current_exports(build)
    if profile.backend == "tensorrt":
        path = build.root / ENGINES_FILE
        fp32 = {a.sha256 for a in current if a.precision == "fp32"}
        engines = _read_artifact_list(path) if path.is_file() else []
        return verified(build, [a for a in engines if a.precision == profile.precision and a.source_sha256 in fp32])
    want = profile.precision if profile.backend == "onnxruntime" else "fp32"
    onnx = [a for a in current if a.precision == want and a.format == "onnx"]
    if profile.backend == "onnxruntime":
        from snexport.export.pack import ORT_PACK_DIR, PACK_DIR

        # Device-optimized pack (bench's prepare_pack made it from the portable pack on this machine): prepacked
        # weights shared by all sessions, ~1 copy of the distinct weights (docs/packs.md); else the portable one.
        portable = complete_pack(build, PACK_DIR, onnx)
        for packed in (complete_pack(build, ORT_PACK_DIR, portable), portable):
            if packed:
                return packed
    return onnx


def prepare_pack(build, profile, show_progress: bool = True) -> list[Artifact]:
    """The device step for ONNX Runtime packs: optimize the current portable pack for this CPU and ORT version."""
    from snexport.export.pack import PACK_DIR, optimize_pack
    from snexport.progress import progress_task

    if profile.backend != "onnxruntime":
        return []
    onnx = [a for a in current_exports(build) if a.precision == profile.precision and a.format == "onnx"]
    portable = complete_pack(build, PACK_DIR, onnx)
    if not portable:
        if (build.root / PACK_DIR).is_dir():
            log.warning("the shared-weight pack does not match the current export (file missing, altered or from "
                        "an earlier export); profiling the standalone files. Re-run `snexport export` to repack")
        return []
    with progress_task("optimizing the weight pack for this device", len(portable), show_progress) as advance:
        return optimize_pack(build.root, portable, progress=advance)


# ------------------------------------------------------------------------------------------------ manifest


def engine_entry(art: Artifact, plan, evals) -> dict:
    """The manifest entry of one deployed file, not yet measured on any device."""
    from snexport.export.pack import manifest_fields

    s = plan.get(art.stitch_id)
    ev = evals.get(s.id)
    known = ev is not None and ev.top1 is not None and ev.samples > 0
    return {
        "stitch_id": s.id,
        "route": {"front": s.front, "back": s.back, "cut": s.cut, "resume": s.resume, "layer": s.layer,
                  "blocks": s.blocks},
        "file": art.file,
        "format": art.format,
        "precision": art.precision,
        "sha256": art.sha256,
        "size_bytes": art.size_bytes,
        "input": {"name": art.input_name, "shape": list(art.input_shape), "dtype": art.input_dtype},
        "output": {"name": art.output_name, "shape": list(art.output_shape)},
        "accuracy": {"top1": ev.top1, "source": {"dataset": ev.dataset, "samples": ev.samples}} if known
        else {"top1": None, "source": "unknown"},
        "gflops": s.gflops,
        "params": s.params,
        **manifest_fields(art),
        "versions": dict(art.versions),
        "measurements": {},
    }


def write_manifest_for(build, artifacts: list[Artifact], profile_name: str, measurements: Optional[dict] = None,
                       device_key: Optional[str] = None, device_info: Optional[dict] = None,
                       pareto_ids=()) -> dict:
    """One entry per deployed stitch. Measurements of other devices are kept while the file is unchanged."""
    from snexport import __version__
    from snexport.errors import ManifestError
    from snexport.manifest import SCHEMA_VERSION, merge_measurements, read_manifest, utc_now, write_manifest

    plan, evals = build.load_plan(), build.read_eval()
    old = {}
    created = utc_now()
    devices = {}
    if build.manifest_path.is_file():
        try:
            prev = read_manifest(build.manifest_path)
            old = {e["stitch_id"]: e for e in prev["engines"]}
            created = prev["build"].get("created_at", created)
            devices = prev.get("devices", {})
        except ManifestError as exc:
            log.warning("replacing unreadable manifest: %s", exc)
    entries = []
    for art in artifacts:
        entry = engine_entry(art, plan, evals)
        if art.stitch_id in old and old[art.stitch_id]["sha256"] == art.sha256:
            entry["measurements"] = old[art.stitch_id].get("measurements", {})
        entries.append(entry)
    used = {k for e in entries for k in e["measurements"]}
    doc = {
        "schema_version": SCHEMA_VERSION,
        "build": {
            "anchors": [{"name": a.name, "timm_name": a.timm_name, "depth": a.depth, "width": a.width,
                         "gflops": a.gflops, "params": a.params} for a in plan.anchors],
            "plan": dict(plan.settings.to_dict(), hash=plan.hash),
            "snexport_version": __version__,
            "created_at": created,
            "target_profile": profile_name,
            "weights_hash": build.weights_hash(),
        },
        "devices": {k: v for k, v in devices.items() if k in used},
        "engines": entries,
    }
    if measurements is not None:
        doc = merge_measurements(doc, device_key, device_info, measurements, pareto_ids)
    write_manifest(build.manifest_path, doc)
    return doc
