"""The export stage over a build directory: validated ONNX per chosen stitch, the deploy set, the pack, and the
manifest the device starts from (`snexport export`).

The manifest written here holds every deployed engine with the host's facts (route, accuracy, cost) and no
measurements yet; `snexport bench` on the device (``snexport.device.bench``) adds its measurements, and the
files it builds there (TensorRT engines, the ONNX Runtime-optimized pack), keeping these facts.
"""

from __future__ import annotations

from typing import Optional

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


def export_stage(build, stitches: str | None = "pareto", *, opset: int = 18, simplifier: str = "onnxsim",
                 batch: int = 1, exporter: str = "auto", fp16: bool = False, pack: bool = False,
                 profile=None, show_progress: bool = True) -> list[Artifact]:
    """Standalone validated ONNX per stitch; with `pack`, also the portable shared-weight pack of them; then the
    manifest for ``profile`` (a DeviceProfile; default: the build's target, else x86-cpu).

    Returns the standalone artifacts (exports.json); the pack's are in engines/pack/pack.json.
    """
    from snexport.export.stage import ExportStageError, export_stitches
    from snexport.progress import progress_task

    chosen = resolve_stitches(build, stitches)
    net = build.load_snnet()
    spec0 = build.load_plan().anchors[0]
    formats = ("onnx", "onnx-fp16") if fp16 else ("onnx",)
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
    if profile is None:
        from snexport.device.profiles import load_profile

        profile = load_profile(build.info().get("target") or "x86-cpu")
    write_export_manifest(build, profile)
    return arts


def write_deploy_set(build, arts: list[Artifact]) -> None:
    """What the last export chose: exports.json keeps every file ever exported, this names the current ones."""
    atomic_write_json(build.deploy_path, {
        "weights_hash": build.weights_hash(),
        "artifacts": [{"stitch_id": a.stitch_id, "precision": a.precision, "sha256": a.sha256} for a in arts],
    })


# ------------------------------------------------------------------------------------------------ manifest


def stitch_facts(stitch, ev) -> dict:
    """What the host alone knows of a stitch: its route, its accuracy (or that it is unknown), its cost."""
    known = ev is not None and ev.top1 is not None and ev.samples > 0
    return {
        "stitch_id": stitch.id,
        "route": {"front": stitch.front, "back": stitch.back, "cut": stitch.cut, "resume": stitch.resume,
                  "layer": stitch.layer, "blocks": stitch.blocks},
        "accuracy": {"top1": ev.top1, "source": {"dataset": ev.dataset, "samples": ev.samples}} if known
        else {"top1": None, "source": "unknown"},
        "gflops": stitch.gflops,
        "params": stitch.params,
    }


def engine_entry(art: Artifact, plan, evals) -> dict:
    """The manifest entry of one deployed file, not yet measured on any device."""
    s = plan.get(art.stitch_id)
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
    plan, evals = build.load_plan(), build.read_eval()
    arts = deployset.deployable(build, profile)
    if not arts:
        # A TensorRT target before the device built its engines: the manifest lists the ONNX files they come from.
        arts = deployset.onnx_for(build, "fp32")
    doc = assemble_manifest(build.manifest_path, build_section(build, profile.name),
                            [engine_entry(a, plan, evals) for a in arts])
    write_manifest(build.manifest_path, doc)
    return doc
