"""The export stage over a build directory: validated ONNX per chosen stitch, the deploy set, the pack, and the
manifest the device starts from (`snexport export`).

The manifest written here holds every deployed engine with the host's facts (route, accuracy, cost) and no
measurements yet; `snexport bench` on the device (``snexport.device.bench``) adds its measurements, and the
files it builds there (TensorRT engines, the ONNX Runtime-optimized pack), keeping these facts.
"""

from __future__ import annotations

from typing import Optional, Sequence

from snexport import __version__
from snexport.device import deployset
from snexport.device.manifest import assemble_manifest, engine_entry as manifest_entry, utc_now, write_manifest
from snexport.errors import BuildDirError
from snexport.hashing import atomic_write_json
from snexport.records import Artifact


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
    from snexport.selection.select import parse_stitch_choice, read_candidates, select_stage

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


PRECISIONS = ("fp32", "fp16", "int8")  # of exported ONNX files; FP32 is always made (the others come from it)


def parse_precisions(text: str | Sequence[str] | None, fp16: bool = False) -> tuple[str, ...]:
    """``"fp32,int8"`` → ("fp32", "int8"): FP32 first and always, known names only, ``fp16`` adds FP16."""
    from snexport.errors import SettingsError

    names = [p.strip().lower() for p in (text.split(",") if isinstance(text, str) else (text or ())) if p.strip()]
    unknown = [p for p in names if p not in PRECISIONS]
    if unknown:
        raise SettingsError(f"unknown precision(s) {', '.join(unknown)}; choose from {', '.join(PRECISIONS)} "
                            "(comma-separated, e.g. --precision fp32,int8)")
    wanted = set(names) | {"fp32"} | ({"fp16"} if fp16 else set())
    return tuple(p for p in PRECISIONS if p in wanted)


def export_stage(build, stitches: str | None = "pareto", *, opset: int = 18, simplifier: str = "onnxsim",
                 batch: int = 1, exporter: str = "auto", fp16: bool = False, pack: bool = False,
                 profile=None, show_progress: bool = True, precisions: Sequence[str] = ("fp32",),
                 int8_calib_images: Optional[int] = None) -> list[Artifact]:
    """Standalone validated ONNX per stitch; with `pack`, also the portable shared-weight pack of them; then the
    manifest for ``profile`` (a DeviceProfile; default: the build's target, else x86-cpu).

    ``precisions``: of the files, besides FP32 (``fp16=True`` adds "fp16"). int8 files are calibrated on the
    build's calibration images (at most ``int8_calib_images``, default ``int8.DEFAULT_CALIB_IMAGES``) and their
    top-1 is measured on the validation split (``measure_int8_accuracy``). Returns the standalone artifacts
    (exports.json); the pack's are in engines/pack/pack.json.
    """
    from snexport.buildfiles import require_writable
    from snexport.export.stage import ExportStageError, export_stitches
    from snexport.progress import progress_task

    require_writable(build.root, "snexport export")  # before minutes of exporting, not after them
    precisions = parse_precisions(precisions, fp16)
    chosen = resolve_stitches(build, stitches)
    net = build.load_snnet()
    spec0 = build.load_plan().anchors[0]
    formats = ("onnx",) + tuple(f"onnx-{p}" for p in precisions if p != "fp32")
    calib = None
    if "int8" in precisions:
        from snexport.export.int8 import DEFAULT_CALIB_IMAGES, calibration_set

        count = DEFAULT_CALIB_IMAGES if int8_calib_images is None else int8_calib_images
        calib, _ = calibration_set(build.info(), spec0.input_shape, spec0.num_classes, count)
    try:
        with progress_task("exporting ONNX", len(chosen), show_progress) as advance:
            arts = export_stitches(build.root, chosen, net.materialize, spec0.input_shape, validation_images(build),
                                   opset=opset, simplifier=simplifier, batch=batch, exporter=exporter,
                                   formats=formats, progress=advance, weights_hash=build.weights_hash(),
                                   int8_calib=calib)
    except ExportStageError as exc:
        write_deploy_set(build, exc.artifacts)  # what did export is deployable; the failures are reported
        raise
    write_deploy_set(build, arts)
    measure_int8_accuracy(build, arts, show_progress)
    if pack:
        from snexport.export.pack import pack_stitches

        with progress_task("packing shared weights", len(arts), show_progress) as advance:
            # export_stitches hashed every file against its record just now (written, or checked up to date).
            pack_stitches(build.root, arts, progress=advance, verified=True)
    if profile is None:
        from snexport.device.profiles import load_profile

        profile = load_profile(build.info().get("target") or "x86-cpu")
    write_export_manifest(build, profile)
    return arts


def measure_int8_accuracy(build, arts: list[Artifact], show_progress: bool = True) -> list:
    """Top-1 of every int8 file on the build's validation split, measured with ONNX Runtime, appended to eval.jsonl
    (``precision="int8"``, the file's sha256); files already measured are skipped. Nothing for a build without
    data or whose accuracy is unknown (random-init anchors): their int8 accuracy is as unknown as the FP32's."""
    import onnxruntime

    from snexport.export.int8 import onnx_top1
    from snexport.progress import progress_task
    from snexport.records import EvalResult

    data = build.info().get("data")
    todo_all = [a for a in arts if a.precision == "int8"]
    if not todo_all or not data or not build.accuracy_known:
        return []
    weights_hash = build.weights_hash()
    done = build.read_eval(weights_hash, precision="int8")
    todo = [a for a in todo_all if done.get(a.stitch_id) is None or done[a.stitch_id].engine_sha256 != a.sha256]
    if not todo:
        return []
    from snexport.data import open_data

    plan = build.load_plan()
    spec0 = plan.anchors[0]
    splits = open_data(data, spec0.input_shape, spec0.num_classes, batch_size=256)
    results = []
    with progress_task("int8 top-1 on the validation split (ONNX Runtime)", len(todo), show_progress) as advance:
        for a in todo:
            s = plan.get(a.stitch_id)
            top1, samples = onnx_top1(build.root / a.file, splits.val,
                                      threads=1 if s.gflops < 0.5 else None)
            rec = EvalResult(stitch_id=s.id, top1=top1, gflops=s.gflops, params=s.params, samples=samples,
                             dataset=splits.name, weights_hash=weights_hash, precision="int8",
                             engine_sha256=a.sha256)
            build.append_eval(rec)
            results.append(rec)
            advance(1, description=f"int8 {s.id}: {top1:.2f}% (onnxruntime {onnxruntime.__version__})")
    return results


def write_deploy_set(build, arts: list[Artifact]) -> None:
    """What the last export chose: exports.json keeps every file ever exported, this names the current ones."""
    atomic_write_json(build.deploy_path, {
        "weights_hash": build.weights_hash(),
        "artifacts": [{"stitch_id": a.stitch_id, "precision": a.precision, "sha256": a.sha256} for a in arts],
    })


# ------------------------------------------------------------------------------------------------ manifest


def stitch_facts(stitch, ev, runtime: str = "") -> dict:
    """What the host alone knows of a stitch: its route, its accuracy (or that it is unknown), its cost.
    ``runtime``: set when ``ev`` was measured on the engine file itself (int8), not on the PyTorch model."""
    known = ev is not None and ev.top1 is not None and ev.samples > 0
    source = {"dataset": ev.dataset, "samples": ev.samples} if known else "unknown"
    if known and runtime:
        source["runtime"] = runtime
    route = {"front": stitch.front, "back": stitch.back, "cut": stitch.cut, "resume": stitch.resume,
             "layer": stitch.layer, "blocks": stitch.blocks}
    if stitch.is_multi_hop:  # SN-Netv2 round trips, v1 three-anchor routes: every hop and junction layer
        route.update(hops=[list(h) for h in stitch.route], layers=list(stitch.junction_layers))
    return {
        "stitch_id": stitch.id,
        "route": route,
        "accuracy": {"top1": ev.top1, "source": source} if known else {"top1": None, "source": "unknown"},
        "gflops": stitch.gflops,
        "params": stitch.params,
    }


def engine_entry(art: Artifact, plan, evals, int8_evals: Optional[dict] = None) -> dict:
    """The manifest entry of one deployed file, not yet measured on any device.

    An int8 file carries its own accuracy (``int8_evals``, measured on that very file), never the FP32 model's; FP32
    and FP16 files carry the PyTorch model's (FP16 is gated at cosine 0.999 and 99 % top-1 agreement against it).
    """
    s = plan.get(art.stitch_id)
    if art.precision == "int8":
        ev = (int8_evals or {}).get(s.id)
        # Measured on the standalone int8 file: that is this file, or the one this packed file was made from.
        ev = ev if ev is not None and ev.engine_sha256 in (art.sha256, art.source_sha256) else None
        return manifest_entry(stitch_facts(s, ev, runtime=f"onnxruntime {art.versions.get('onnxruntime', '')}".strip()),
                              art)
    return manifest_entry(stitch_facts(s, evals.get(s.id)), art)


def build_section(build, profile_name: str) -> dict:
    plan = build.load_plan()
    return {
        "anchors": [{"name": a.name, "timm_name": a.timm_name, "depth": a.depth, "width": a.width,
                     "gflops": a.gflops, "params": a.params} for a in plan.anchors],
        "plan": dict(plan.settings.to_dict(), hash=plan.hash),
        "snexport_version": __version__,
        "created_at": utc_now(),
        "target_profile": profile_name,
        "weights_hash": build.weights_hash(),
    }


def write_export_manifest(build, profile) -> dict:
    """The manifest of the current export for ``profile``: every deployable file of the last export, with the
    host's facts; measurements of files that did not change are kept."""
    plan, evals, int8_evals = build.load_plan(), build.read_eval(), build.read_eval(precision="int8")
    arts = deployset.deployable(build, profile)
    if not arts:
        # A TensorRT target before the device built its engines: the manifest lists the ONNX files they come from.
        arts = deployset.onnx_for(build, "fp32")
    doc = assemble_manifest(build.manifest_path, build_section(build, profile.name),
                            [engine_entry(a, plan, evals, int8_evals) for a in arts])
    write_manifest(build.manifest_path, doc)
    return doc
