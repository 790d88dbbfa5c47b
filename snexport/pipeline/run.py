"""`snexport build`: every stage in order, each skipped when its inputs are unchanged.

anchors → stitch plan + LS init → fine-tune → evaluate → Pareto by FLOPs → ONNX export → (on a machine with the
target's runtime) engines + profile → manifest → report; then a selector demonstration under two budgets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

# Joint fine-tuning of the demo family, measured on the digits val set (anchors ~72/80/91%): right after LS init
# 29 of 32 stitches sit below the smallest anchor; after 30 epochs at lr 2e-3 (14 s on 2 idle cores) only 4 do,
# and the stitches fill the gaps between the anchors -- the interpolation SN-Net promises.
DEMO_EPOCHS = 30
DEMO_TRAIN = {"lr": 2e-3, "batch_size": 64}
# The CNN demo family (demo_cnn: three tiny ResNets on the digits, snexport.families.demo). Measured on 2 shared
# cores: LS init gives stitches 18-58% (median 25%), 10 epochs 36-85% (median 66%) with the anchors at
# 83.3/90.8/97.8%; the stitches stay below the anchor they start from, so the FLOPs-Pareto export is the anchors.
DEMO_CNN_EPOCHS = 10
DEMO_CNN_TRAIN = {"lr": 2e-3, "batch_size": 64}


@dataclass
class BuildOptions:
    out: Path
    anchors: list[str]
    target: str
    weights: dict = field(default_factory=dict)
    random_init: bool = False
    data: Optional[str] = None
    epochs: Optional[int] = None  # None: DEMO_EPOCHS for the demo family / --data builds, else no training
    stitches: str = "pareto"
    calib_images: int = 100
    fp16: Optional[bool] = None  # None: as the target profile says
    precisions: Optional[tuple] = None  # of the exported files, e.g. ("fp32", "int8"); None: the profile's precision
    pack: Optional[bool] = None  # None: a shared-weight pack for ONNX Runtime targets
    settings: Any = None  # PlanSettings (SN-Netv2 two-way, LoRA rank, conventions); None: the defaults


def run_build(opts: BuildOptions, say: Callable[[str], None] = print, show_progress: bool = True) -> dict:
    from snexport.device.profiles import load_profile
    from snexport.device.runtime.backends import runtime_available
    from snexport.evaluation.evaluate import evaluate_build
    from snexport.export.deploy import export_stage
    from snexport.families.demo import DEMO_CNN_FAMILY
    from snexport.families.registry import is_demo_family
    from snexport.selection.select import select_stage
    from snexport.stitching.stage import stitch_stage
    from snexport.training.train import TrainSettings, train_build

    profile = load_profile(opts.target)
    precisions = tuple(opts.precisions or (profile.precision,))
    if "int8" in precisions and profile.backend != "onnxruntime":  # before any stage runs
        from snexport.errors import SettingsError

        raise SettingsError(f"int8 engines are made for ONNX Runtime targets; {profile.name} runs {profile.backend}. "
                            "Drop int8 from --precision or pick an ONNX Runtime target (e.g. --target x86-cpu)")
    from snexport.stitching.plan import PlanSettings

    build, info = stitch_stage(opts.out, opts.anchors, opts.weights, opts.random_init,
                               settings=opts.settings or PlanSettings(), calib_images=opts.calib_images,
                               data=opts.data, show_progress=show_progress)
    build.update_info(target=opts.target)  # as given (a profile name or a TOML path), so later stages load it
    ls = info["ls_init"]
    plan = build.load_plan()
    say(f"[1/6] stitch: {len(plan.stitches)} configurations, LS init of {ls['layers']} layers from "
        f"{ls['calibration_images']} {ls['source']} images in {ls['total_seconds']:.2f} s"
        + (" (unchanged, skipped)" if info.get("skipped") else ""))

    data = build.info().get("data")
    is_demo = is_demo_family(a.name for a in plan.anchors)
    is_cnn_demo = is_demo and all(a.name in DEMO_CNN_FAMILY for a in plan.anchors)
    demo_epochs, demo_train = (DEMO_CNN_EPOCHS, DEMO_CNN_TRAIN) if is_cnn_demo else (DEMO_EPOCHS, DEMO_TRAIN)
    default_epochs = (demo_epochs if is_demo else 5) if data and not opts.random_init else 0
    epochs = opts.epochs if opts.epochs is not None else default_epochs
    done = build.info().get("trained_epochs", 0)
    if epochs and not data:
        from snexport.errors import DataError

        raise DataError("training needs data: pass --data DIR (ImageFolder with train/ and val/), or --epochs 0")
    if epochs and done < epochs:
        recipe = demo_train if is_demo else {}
        # resume=True: continue any checkpoint there is (after a kill, plan.json's count can lag the checkpoint).
        summary = train_build(build, TrainSettings(epochs=epochs, data=data or "", **recipe), resume=True,
                              show_progress=show_progress, log=say)
        say(f"[2/6] train: {summary['epochs_done']}/{epochs} epochs in {summary['seconds']} s")
    else:
        say(f"[2/6] train: {'skipped (' + str(done) + ' epochs done)' if epochs else 'skipped (no data / --epochs 0)'}")

    if data or not build.accuracy_known:
        results = evaluate_build(build, show_progress=show_progress)
    else:
        results = []
    known = [r for r in results if r.top1 is not None]
    say(f"[3/6] evaluate: {len(known)} configurations on {known[0].dataset}" if known else
        "[3/6] evaluate: accuracy unknown (random-init anchors or no --data)")

    if results:
        cand = select_stage(build, by="gflops", stitches=opts.stitches)
    else:
        cand = select_stage(build, by="gflops", stitches="all" if opts.stitches == "pareto" else opts.stitches)
    say(f"[4/6] select: {len(cand['candidates'])} of {cand['considered']} configurations "
        f"({'Pareto by FLOPs' if cand['mode'] == 'pareto' else cand['mode']})")

    fp16 = opts.fp16 if opts.fp16 is not None else profile.precision == "fp16"
    pack = profile.backend == "onnxruntime" if opts.pack is None else opts.pack
    arts = export_stage(build, opts.stitches if cand["mode"] != "pareto" else "pareto", fp16=fp16, pack=pack,
                        profile=profile, show_progress=show_progress, precisions=precisions)
    int8 = sum(a.precision == "int8" for a in arts)
    say(f"[5/6] export: {len(arts)} validated ONNX files in {build.engines_dir}"
        + (f" ({int8} static int8, top-1 measured with ONNX Runtime)" if int8 else "")
        + (" + a shared-weight pack (engines/pack)" if pack else ""))

    ok, why = runtime_available(profile.backend)
    result = {"build": build, "profile": profile, "profiled": ok, "candidates": cand}
    if not ok:
        from snexport.device.manifest import read_manifest

        manifest = read_manifest(build.manifest_path)  # written by the export: engines not yet profiled
        say(f"[6/6] profile: not on this machine ({why}). Copy {build.root} to the {profile.name} device and run "
            f"`snexport bench {build.root}` there; the manifest marks engines as not yet profiled.")
        result.update(manifest=manifest, device_key=None)
        return result
    from snexport.device.bench import bench_stage

    bench = bench_stage(build, profile, show_progress=show_progress, module_factory=module_factory(build, profile))
    say(f"[6/6] profile: {bench['engines']} engines measured on {bench['device_key']}; "
        f"{len(bench['pareto'])} on the measured Pareto front")
    result.update(manifest=bench["manifest"], device_key=bench["device_key"], bench=bench)
    return result


def module_factory(build, profile):
    """For the torch backend only: stitch id -> the materialised PyTorch module that bench profiles."""
    if profile.backend != "torch":
        return None
    net = build.load_snnet()
    return net.materialize


def selector_demo(build, budgets: Optional[list[float]] = None, say: Callable[[str], None] = print) -> list[dict]:
    """Show the on-device selector switching engines as the latency budget moves (real runs on real inputs)."""
    import numpy as np

    from snexport.device.selector import Selector
    from snexport.export.deploy import validation_images

    images = validation_images(build, 8)
    with Selector(build.manifest_path, mode="preload") as sel:
        lat = sorted(e.latency_ms for e in sel.engines if e.latency_ms is not None)
        if not lat:
            return []
        if budgets is None:
            # Tight (just above the fastest engine), middle, and loose (admits the slowest): the app's budget moves.
            budgets = [round(lat[0] * 1.05, 4), round(lat[len(lat) // 2] * 1.02, 4), round(lat[-1] * 1.05, 4)]
        shown = []
        for budget in budgets:
            info = sel.choose(latency_ms=budget)
            sel.switch(info)
            x = images[:1] if images is not None else np.random.default_rng(0).standard_normal(
                (1, *info.input_shape[1:])).astype(np.float32)
            logits = sel.run(x)
            row = {"budget_ms": budget, "engine": info.stitch_id, "top1": info.top1, "p90_ms": info.latency_ms,
                   "prediction": int(np.argmax(logits))}
            shown.append(row)
            acc = "unknown" if info.top1 is None else f"{info.top1:.1f}%"
            say(f"  budget {budget:.3f} ms -> {info.stitch_id} (top-1 {acc}, p90 {info.latency_ms:.3f} ms); "
                f"predicted class {row['prediction']}")
        return shown
