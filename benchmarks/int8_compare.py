"""int8 (static QDQ) vs FP32 engines of the same stitches: latency side by side, and top-1 where the build has data.

For each chosen stitch, the FP32 and int8 ONNX files the export stage makes (``--precision fp32,int8``; made here
in a scratch directory unless the build's last export holds both) are loaded with snexport's ONNX Runtime runner
under the x86-cpu profile (its threads, no spinning) and timed in the profile's interleaved rounds
(``snexport.device.rounds``, the method of ``snexport bench``): every round runs every engine, in a fresh random
order, so both precisions see the same machine load. With data and trained weights, both files' top-1 is measured
on the validation split with ONNX Runtime (same runtime, same images), next to the PyTorch FP32 top-1 of eval.jsonl.

    python benchmarks/int8_compare.py --build BUILD                      # e.g. the demo build
    python benchmarks/int8_compare.py --anchors deit_s,deit_b --random-init --stitches 3   # latency only

Prints the table with the settings, the machine and the load average, and writes
benchmarks/results/int8_compare-<name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def int8_files(build, stitches, work: Path, calib_count: int) -> dict:
    """stitch id -> {"fp32": Artifact, "int8": Artifact}: the build's own export when it has both, else made here."""
    from snexport.device.deployset import deploy_records
    from snexport.export.deploy import validation_images
    from snexport.export.int8 import calibration_set
    from snexport.export.stage import export_stitches

    have = {(a.stitch_id, a.precision): a for a in deploy_records(build)} if build.deploy_path.is_file() else {}
    if all((s.id, p) in have for s in stitches for p in ("fp32", "int8")):
        return {s.id: {p: have[(s.id, p)] for p in ("fp32", "int8")} | {"root": build.root} for s in stitches}
    spec0 = build.load_plan().anchors[0]
    calib, source = calibration_set(build.info(), spec0.input_shape, spec0.num_classes, calib_count)
    print(f"exporting {len(stitches)} stitches at FP32 and int8 into {work} (int8 calibrated on {len(calib)} "
          f"{source} images)", flush=True)
    net = build.load_snnet()
    arts = export_stitches(work, stitches, net.materialize, spec0.input_shape, validation_images(build),
                           formats=("onnx", "onnx-int8"), int8_calib=calib, weights_hash=build.weights_hash())
    out: dict = {}
    for a in arts:
        out.setdefault(a.stitch_id, {"root": work})[a.precision] = a
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", help="an existing build directory (default: make one from --anchors)")
    ap.add_argument("--anchors", default="deit_s,deit_b")
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--stitches", default=None, help="N (spread over GFLOPs), 'exported' (default with --build), "
                    "'all' or comma-separated ids; default 3")
    ap.add_argument("--calib-images", type=int, default=None, help="int8 calibration images (default: the export's)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: the profile's)")
    ap.add_argument("--out", default=str(HERE / ".builds" / "int8_compare"))
    args = ap.parse_args()

    import numpy as np

    from snexport.device.profiles import load_profile
    from snexport.device.profiling import device_fingerprint
    from snexport.device.rounds import run_rounds
    from snexport.device.runtime import open_runner
    from snexport.export.int8 import DEFAULT_CALIB_IMAGES, onnx_top1

    sys.path.insert(0, str(HERE))
    from export_timing import choose, open_build  # the same build and stitch choice as the timing benchmark

    build, name = open_build(args)
    stitches = choose(build, args.stitches or ("exported" if args.build else "3"))
    files = int8_files(build, stitches, Path(args.out) / "files" / name, args.calib_images or DEFAULT_CALIB_IMAGES)

    profile = load_profile("x86-cpu")
    options = profile.runner_options()
    runners, inputs = {}, {}
    for sid, pair in files.items():
        for precision in ("fp32", "int8"):
            art = pair[precision]
            runner = open_runner(pair["root"] / art.file, **options)
            runner.load()
            runners[(sid, precision)] = runner
            inputs[(sid, precision)] = np.random.default_rng(0).standard_normal(tuple(art.input_shape)).astype(
                np.float32)
    settings = profile.measurement.round_settings(False)
    if args.rounds:
        import dataclasses

        settings = dataclasses.replace(settings, rounds=args.rounds)
    load_before = os.getloadavg()
    start = time.perf_counter()
    timing = run_rounds({f"{sid}|{p}": (lambda r=r, x=inputs[(sid, p)]: r.run(x)) for (sid, p), r in runners.items()},
                        settings)
    elapsed = time.perf_counter() - start
    load_after = os.getloadavg()
    for r in runners.values():
        r.close()

    accuracy_known = bool(build.info().get("data")) and build.accuracy_known
    splits = None
    if accuracy_known:
        from snexport.data import open_data

        spec0 = build.load_plan().anchors[0]
        splits = open_data(build.info()["data"], spec0.input_shape, spec0.num_classes, batch_size=256)
    pytorch = build.read_eval()
    rows = []
    for s in stitches:
        pair = files[s.id]
        row = {"stitch": s.id, "gflops": s.gflops}
        for p in ("fp32", "int8"):
            t = timing[f"{s.id}|{p}"]
            row[p] = {"p50_ms": round(t["p50_ms"], 3), "mean_ms": round(t["mean_ms"], 3),
                      "p50_ci_ms": [round(v, 3) for v in t.get("p50_ci_ms", [])],
                      "size_mb": round(pair[p].size_bytes / 1e6, 2)}
            if splits is not None:
                top1, n = onnx_top1(pair["root"] / pair[p].file, splits.val)
                row[p].update(top1_ort=round(top1, 2), samples=n)
        row["int8"]["cosine_vs_fp32"] = pair["int8"].validation.get("cosine")
        row["speedup"] = round(row["fp32"]["p50_ms"] / row["int8"]["p50_ms"], 2)
        ev = pytorch.get(s.id)
        row["fp32"]["top1_pytorch"] = None if ev is None else ev.top1
        rows.append(row)

    head = f"{'stitch':20s} {'GFLOPs':>7s} {'fp32 p50':>9s} {'int8 p50':>9s} {'speedup':>8s} {'MB fp32/int8':>13s}"
    if splits is not None:
        head += f" {'top-1 fp32':>10s} {'top-1 int8':>10s} {'Δ':>6s}"
    head += f" {'cos':>7s}"
    print(head)
    for r in rows:
        line = (f"{r['stitch']:20s} {r['gflops']:7.3f} {r['fp32']['p50_ms']:9.3f} {r['int8']['p50_ms']:9.3f} "
                f"{r['speedup']:7.2f}x {r['fp32']['size_mb']:6.1f}/{r['int8']['size_mb']:<6.1f}")
        if splits is not None:
            line += (f" {r['fp32']['top1_ort']:10.2f} {r['int8']['top1_ort']:10.2f} "
                     f"{r['int8']['top1_ort'] - r['fp32']['top1_ort']:+6.2f}")
        cos = r["int8"]["cosine_vs_fp32"]
        line += f" {cos:7.4f}" if cos is not None else ""
        print(line)
    result = {"settings": {"build": str(build.root), "profile": profile.name, "runner_options": options,
                           "rounds": settings.rounds, "method": settings.method(), "stitches": [s.id for s in stitches],
                           "accuracy": "top-1 with ONNX Runtime on " + (splits.name if splits else "- (unknown)")},
              "machine": device_fingerprint(), "load_average": {"before": load_before, "after": load_after},
              "timing_seconds": round(elapsed, 1), "rows": rows}
    (HERE / "results").mkdir(exist_ok=True)
    out = HERE / "results" / f"int8_compare-{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    cpu = result["machine"]["cpu"]
    print(f"latency: p50 ms over {settings.rounds} interleaved rounds, {profile.name} runner options {options}; "
          f"top-1: {result['settings']['accuracy']}\nmachine: {cpu.get('model')} ({cpu.get('logical_cores')} "
          f"logical cores), load average {load_before[0]:.2f} -> {load_after[0]:.2f} (shared box)\nwritten: {out}")


if __name__ == "__main__":
    main()
