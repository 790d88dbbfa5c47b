"""Where the FP32 export of a stitch spends its time, now and before issue 13, in one run.

Three ways over the same stitches, in one process:
- "traced": the export stage run over all the stitches at once, every stitch traced whole (``compose=False``: the
  stage before stitches were composed from pieces);
- "new": the export stage as `snexport export` runs it: one run over all the stitches, each stitch's graph composed
  from its pieces' graphs, every piece traced and simplified once (the first stitches that meet a piece pay for
  it, in their "export" phase), four random validation inputs (plus the build's images);
- "baseline": per stitch, the stage's pre-issue-13 sequence, re-enacted phase by phase with the same library calls
  it made: ``exporter="auto"`` meant dynamo first (``torch.onnx.export(dynamo=True)`` to a file, loaded, renamed,
  saved), ONNX Runtime sessions with default options on the files, onnxsim on the whole model (weights included)
  from file to file, the TensorRT check loading the file with its weights, sha256 read back from disk, the
  reference and validation passes on torch's/ORT's default thread counts, and 8 random validation inputs.
Each artifact records the seconds of its phases (materialize, reference, export, simplify, validate_simplified,
tensorrt_check, write_and_hash; "simplify" is the serialization for a composed stitch, whose pieces were
simplified when first traced, and "write_and_hash" what is left of a write that ran during validation).

    python benchmarks/export_timing.py --anchors deit_s,deit_b --random-init --stitches 5
    python benchmarks/export_timing.py --build BUILD            # the stitches BUILD's last export chose (the demo)
    python benchmarks/export_timing.py --build BUILD --no-baseline

Prints a phase table per stitch (baseline | traced | new) and the totals of each whole run, with the settings, the
machine and the load average (the build box may be shared: compare only numbers taken in the same run), and writes
benchmarks/results/export_timing-<name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PHASES = ("materialize", "reference", "trace_pieces", "export", "validate_export", "simplify", "validate_simplified",
          "tensorrt_check", "write_and_hash")


def baseline_export(build, net, stitch, inputs, work: Path, simplifier: str) -> dict:
    """The pre-issue-13 ``_export_one`` FP32 path, phase by phase (see the module doc); returns seconds per phase."""
    import onnx
    import onnxruntime as ort

    from snexport.export.onnx_export import INPUT_NAME, OUTPUT_NAME
    from snexport.export.trt_compat import check_tensorrt_compat
    from snexport.export.validate import FP32_GATES, compare_logits, reference_logits
    from snexport.hashing import sha256_file

    seconds = {}

    def phase(name, fn):
        start = time.perf_counter()
        out = fn()
        seconds[name] = round(time.perf_counter() - start, 3)
        return out

    def ort_run(path):  # the old run_onnx: default session options (spinning on, default threads), batch chunks
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return [session.run(None, {INPUT_NAME: inputs[i:i + 1]})[0] for i in range(len(inputs))]

    def check(path, reference):
        import numpy as np

        figures, failures = compare_logits(reference, np.concatenate(ort_run(path)), **FP32_GATES)
        assert not failures, failures
        return figures

    def export(path):
        import contextlib
        import io
        import warnings

        import torch

        module.eval()
        example = torch.randn(1, *stitch_shape)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=18,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], external_data=False,
                                  optimize=True, verbose=False)
            kind = "dynamo"
        except Exception:  # noqa: BLE001 - the old "auto" fell back to TorchScript
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=18,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True)
            kind = "torchscript"
        model = onnx.load(str(path))  # the old export_onnx: load, name I/O, set metadata, save again
        onnx.save(model, str(path))
        return kind

    def simplify(src, dst):
        model = onnx.load(str(src))
        if simplifier == "onnxsim":
            import onnxsim

            model, ok = onnxsim.simplify(model)
            assert ok
        elif simplifier == "onnxslim":
            import onnxslim

            model = onnxslim.slim(model)
        onnx.save(model, str(dst))

    stitch_shape = tuple(build.load_plan().anchors[0].input_shape)
    raw, simple = work / "baseline.raw.onnx", work / "baseline.onnx"
    module = phase("materialize", lambda: net.materialize(stitch.id))
    reference = phase("reference", lambda: reference_logits(module, inputs))
    kind = phase("export", lambda: export(raw))
    phase("validate_export", lambda: check(raw, reference))
    phase("simplify", lambda: simplify(raw, simple))
    phase("validate_simplified", lambda: check(simple, reference))
    phase("tensorrt_check", lambda: check_tensorrt_compat(simple))
    phase("write_and_hash", lambda: (sha256_file(simple), simple.stat().st_size))
    return {"seconds": seconds, "exporter": kind, "size_mb": round(simple.stat().st_size / 1e6, 1)}


def stage_export(build, net, stitches, calib_images, work: Path, simplifier: str, compose: bool) -> dict:
    """The export stage on all ``stitches`` in one run into a scratch directory (as `snexport export` runs it);
    per stitch, the seconds its artifact recorded, and the run's wall time. ``compose``: stitch graphs composed
    from per-piece graphs (the pieces' traces are paid by the first stitches that meet them); without it, every
    stitch is traced whole (the stage before composition)."""
    from snexport.export.stage import export_stitches

    out = work / ("composed" if compose else "traced")
    shutil.rmtree(out, ignore_errors=True)
    spec0 = build.load_plan().anchors[0]
    start = time.perf_counter()
    arts = export_stitches(out, stitches, net.materialize, spec0.input_shape, calib_images,
                           simplifier=simplifier, weights_hash=build.weights_hash(), compose=compose)
    wall = time.perf_counter() - start
    per = {a.stitch_id: {"seconds": dict(a.validation["seconds"]),
                         "wall_s": round(sum(a.validation["seconds"].values()), 3), "exporter": a.exporter,
                         "size_mb": round(a.size_bytes / 1e6, 1),
                         "composed_from_pieces": a.validation.get("composed_from_pieces"),
                         "pieces_traced": a.validation.get("pieces_traced")}
           for a in arts if a.precision == "fp32"}
    shutil.rmtree(out, ignore_errors=True)
    return {"per_stitch": per, "wall_s": round(wall, 2)}


def choose(build, how: str) -> list:
    plan = build.load_plan()
    if how == "exported":
        from snexport.device.deployset import deploy_records

        ids = sorted({a.stitch_id for a in deploy_records(build)})
        return [plan.get(i) for i in ids]
    if how == "all":
        return list(plan.stitches)
    if "," in how or not how.isdigit():
        return [plan.get(i) for i in how.split(",")]
    n = int(how)
    by_cost = sorted(plan.stitches, key=lambda s: s.gflops)
    picks = {round(i * (len(by_cost) - 1) / max(1, n - 1)) for i in range(n)}
    return [by_cost[i] for i in sorted(picks)]


def open_build(args) -> tuple:
    """(build, name): ``--build`` as it is, else a stitched build of ``--anchors`` under ``--out`` (made once)."""
    from snexport.stitching.stage import stitch_stage
    from snexport.stitching.store import BuildDir

    if args.build:
        return BuildDir(args.build).require(), Path(args.build).name
    names = args.anchors.split(",")
    name = "-".join(names) + ("-random" if args.random_init else "")
    build, _ = stitch_stage(Path(args.out) / name, names, random_init=args.random_init, show_progress=False)
    return build, name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", help="an existing build directory (default: make one from --anchors)")
    ap.add_argument("--anchors", default="deit_s,deit_b")
    ap.add_argument("--random-init", action="store_true", help="random anchor weights (timing does not depend on them)")
    ap.add_argument("--stitches", default=None, help="N (spread over GFLOPs), 'all', 'exported' (default with --build: "
                    "what the build's last export chose), or comma-separated ids; default 3")
    ap.add_argument("--simplifier", default="onnxsim")
    ap.add_argument("--no-baseline", action="store_true", help="time only the current export stage")
    ap.add_argument("--out", default=str(HERE / ".builds" / "export_timing"))
    args = ap.parse_args()

    import torch

    from snexport.device.profiling import device_fingerprint
    from snexport.export.deploy import validation_images
    from snexport.export.stage import _validation_inputs

    build, name = open_build(args)
    how = args.stitches or ("exported" if args.build else "3")
    stitches = choose(build, how)
    net = build.load_snnet()
    spec0 = build.load_plan().anchors[0]
    calib = validation_images(build)
    inputs = _validation_inputs(spec0.input_shape, calib, 8, 0)
    work = Path(args.out) / "files" / name
    work.mkdir(parents=True, exist_ok=True)

    # The stage's two ways over all the stitches (traced whole first, then composed: the composed run cannot
    # profit from the traced one's work), then the pre-issue-13 sequence per stitch.
    load_before = os.getloadavg()
    runs = {"traced": stage_export(build, net, stitches, calib, work, args.simplifier, compose=False),
            "new": stage_export(build, net, stitches, calib, work, args.simplifier, compose=True)}
    rows = []
    for s in stitches:
        row = {"stitch": s.id, "gflops": s.gflops, "traced": runs["traced"]["per_stitch"][s.id],
               "new": runs["new"]["per_stitch"][s.id]}
        if not args.no_baseline:
            start = time.perf_counter()
            row["baseline"] = baseline_export(build, net, s, inputs, work, args.simplifier)
            row["baseline"]["wall_s"] = round(time.perf_counter() - start, 3)
        rows.append(row)
        print(f"\n{s.id} ({s.gflops:.3g} GFLOPs, {row['new']['size_mb']} MB; composed from "
              f"{row['new']['composed_from_pieces']} pieces)", flush=True)
        print(f"  {'phase':22s} {'baseline s':>11s} {'traced s':>9s} {'new s':>8s}")
        for p in PHASES:
            cells = [row.get(k, {}).get("seconds", {}).get(p) for k in ("baseline", "traced", "new")]
            print(f"  {p:22s} " + " ".join(f"{'' if c is None else f'{c:.2f}':>{w}s}"
                                           for c, w in zip(cells, (11, 9, 8))))
        walls = [row.get(k, {}).get("wall_s") for k in ("baseline", "traced", "new")]
        print(f"  {'total':22s} " + " ".join(f"{'' if c is None else f'{c:.2f}':>{w}s}"
                                            for c, w in zip(walls, (11, 9, 8))), flush=True)
        row["new"]["own_s"] = round(row["new"]["wall_s"] - row["new"]["seconds"].get("trace_pieces", 0.0), 3)
        print(f"  {'total less piece traces':22s} {'':>11s} {'':>9s} {row['new']['own_s']:8.2f}   (pieces traced "
              f"for it: {row['new']['pieces_traced']})", flush=True)
    load_after = os.getloadavg()
    total_base = None if args.no_baseline else sum(r["baseline"]["wall_s"] for r in rows)
    print(f"\n{len(rows)} stitches in one export run: composed {runs['new']['wall_s']:.1f} s, traced whole "
          f"{runs['traced']['wall_s']:.1f} s" + ("" if total_base is None else f", baseline {total_base:.1f} s")
          + f" (load {load_before[0]:.1f} -> {load_after[0]:.1f})")
    total_new = runs["new"]["wall_s"]
    traces = sum(r["new"]["seconds"].get("trace_pieces", 0.0) for r in rows)
    print(f"composed run: {traces:.1f} s tracing {sum(r['new']['pieces_traced'] or 0 for r in rows)} pieces once, "
          f"{sum(r['new']['own_s'] for r in rows):.1f} s for the stitches themselves")
    result = {"settings": vars(args) | {"stitches_chosen": how, "torch_threads": torch.get_num_threads(),
                                        "baseline_validation_inputs": len(inputs)},
              "machine": device_fingerprint(), "rows": rows,
              "load_average": {"before": load_before, "after": load_after},
              "totals": {"new_s": round(total_new, 2), "traced_s": runs["traced"]["wall_s"],
                         "baseline_s": None if total_base is None else round(total_base, 2)}}
    (HERE / "results").mkdir(exist_ok=True)
    out = HERE / "results" / f"export_timing-{name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    cpu = result["machine"]["cpu"]
    print(f"settings: {result['settings']}\nmachine: {cpu.get('model')} ({cpu.get('logical_cores')} logical cores), "
          f"shared with other jobs: see the load averages per stitch\nwritten: {out}")


if __name__ == "__main__":
    main()
