"""Time per stitch of ONNX export, simplification and validation for full-size anchors (issue: export).

Builds deit_s,deit_b with random-init weights (architecture-only: timing does not depend on the values), picks a
few stitches spread over the FLOPs range, and times each phase separately for both exporters:

    uv run python benchmarks/export_timing.py [--anchors deit_s,deit_b] [--stitches 4] [--images 8]

Prints a table and writes benchmarks/results/export_timing-<anchors>.json with the settings and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anchors", default="deit_s,deit_b")
    ap.add_argument("--stitches", type=int, default=4, help="how many configurations, spread over GFLOPs")
    ap.add_argument("--images", type=int, default=8, help="validation inputs per stitch")
    ap.add_argument("--exporters", default="torchscript,dynamo")
    ap.add_argument("--simplifier", default="onnxsim")
    ap.add_argument("--out", default=str(HERE / ".builds" / "export_timing"))
    args = ap.parse_args()

    import numpy as np
    import torch

    from snexport.export.onnx_export import export_onnx
    from snexport.export.simplify import simplify
    from snexport.export.validate import reference_logits, validate_onnx
    from snexport.device.profiling import device_fingerprint
    from snexport.stitching.stage import stitch_stage

    names = args.anchors.split(",")
    build, _ = stitch_stage(Path(args.out) / "-".join(names), names, random_init=True, show_progress=False)
    net = build.load_snnet()
    stitches = sorted(build.load_plan().stitches, key=lambda s: s.gflops)
    step = max(1, (len(stitches) - 1) // max(1, args.stitches - 1))
    chosen = stitches[::step][: args.stitches - 1] + [stitches[-1]]
    shape = build.load_plan().anchors[0].input_shape
    x = np.random.default_rng(0).standard_normal((args.images, *shape)).astype(np.float32)
    work = Path(args.out) / "files"
    work.mkdir(parents=True, exist_ok=True)

    rows = []
    for s in chosen:
        module = net.materialize(s.id)
        ref, t_ref = timed(lambda: reference_logits(module, x))
        for exporter in args.exporters.split(","):
            raw, simp = work / f"{exporter}.onnx", work / f"{exporter}.{args.simplifier}.onnx"
            info, t_export = timed(lambda: export_onnx(module, shape, raw, exporter=exporter))
            _, t_val_raw = timed(lambda: validate_onnx(raw, ref, x, stitch_id=s.id))
            _, t_simp = timed(lambda: simplify(raw, simp, args.simplifier))
            fig, t_val = timed(lambda: validate_onnx(simp, ref, x, stitch_id=s.id))
            rows.append({"stitch": s.id, "gflops": s.gflops, "exporter": info["exporter"],
                         "size_mb": round(simp.stat().st_size / 1e6, 1), "torch_reference_s": round(t_ref, 2),
                         "export_s": round(t_export, 2), "validate_raw_s": round(t_val_raw, 2),
                         "simplify_s": round(t_simp, 2), "validate_s": round(t_val, 2),
                         "total_s": round(t_ref + t_export + t_val_raw + t_simp + t_val, 2),
                         "rel_max_abs": fig["rel_max_abs"], "cosine": fig["cosine"]})
            r = rows[-1]
            print(f"{s.id:22s} {r['exporter'][:28]:28s} {r['size_mb']:7.1f} MB  export {r['export_s']:6.2f} s  "
                  f"simplify {r['simplify_s']:6.2f} s  validate {r['validate_raw_s']:5.2f}+{r['validate_s']:5.2f} s  "
                  f"total {r['total_s']:6.2f} s  rel err {r['rel_max_abs']:.1e}", flush=True)

    result = {"settings": vars(args) | {"torch_threads": torch.get_num_threads()},
              "machine": device_fingerprint(), "load_average": os.getloadavg(), "rows": rows}
    out = HERE / "results" / f"export_timing-{'-'.join(names)}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"settings: {result['settings']}\nmachine: {result['machine']['cpu'].get('model')} "
          f"({result['machine']['cpu'].get('logical_cores')} logical cores), load average {result['load_average']}\n"
          f"written: {out}")


if __name__ == "__main__":
    main()
