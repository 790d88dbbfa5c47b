"""Least-squares init of the stitching layers against the anchors' own forward pass, and against the old pinv path.

Issue 13's target: LS init in at most 1.2x the time the anchors take to run the calibration images. Per family, in
one process, with the same anchors, images and batches, repeated with the order rotated each round:
- "forward": each anchor's full forward (``model(batch)``, no grad, eval) over the calibration images — the floor,
  since the init needs those features;
- "pinv (before)": the pre-issue-13 path, re-enacted here: every needed feature map kept (concatenated over the
  images), then per front position ``pinv_with_bias`` (float64 SVD of the (N·T) × (C+1) matrix) and per target
  ``least_squares_solution``, a shared layer the mean of its targets' solutions;
- "new": ``SNNet.init_stitching_layers`` itself (normal equations summed per batch, one Gram matrix per front
  position, Cholesky or truncated eigh; see snexport/stitching/layers.py), with its own forward/solve split.
It also prints how far the new layers are from the pinv solutions (relative Frobenius error, max over layers).

    python benchmarks/ls_init_timing.py                      # demo (trained anchors, digits) then DeiT-S/B
    python benchmarks/ls_init_timing.py --family deit --images 100 --rounds 1
    python benchmarks/ls_init_timing.py --family demo --rounds 3

DeiT-S/B use random-init anchors and seeded Gaussian images (what ``snexport build --random-init`` does). The box
is shared: the load average is printed before and after every measurement; compare only numbers from one run.
Writes benchmarks/results/ls_init_timing-<family>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAMILIES = {"demo": ["demo_s", "demo_m", "demo_l"], "deit": ["deit_s", "deit_b"]}


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def anchors_forward(net, images, batch_size: int) -> float:
    """Seconds for every anchor's full forward over the images, in the init's batches."""
    import torch

    started = time.perf_counter()
    with torch.no_grad():
        for model in net.anchors:
            for start in range(0, images.shape[0], batch_size):
                model(images[start:start + batch_size])
    return time.perf_counter() - started


def pinv_baseline(net, images, batch_size: int) -> tuple[dict, dict]:
    """The pre-issue-13 ``init_stitching_layers``: keep the features, pinv per front position, mean per layer.
    Returns ({layer key: (weight, bias) float64}, seconds {collect, solve, total})."""
    import torch

    from snexport.families.registry import family_of
    from snexport.stitching.layers import least_squares_solution, pinv_with_bias

    plan, index = net.plan, net._index
    targets = plan.ls_targets()
    started = time.perf_counter()
    needed: list[set[int]] = [set() for _ in plan.anchors]
    for t in targets:
        needed[index[t.front]].add(t.cut + 1)
        needed[index[t.back]].add(t.resume)
    acts = []
    with torch.no_grad():
        for spec, model, wanted in zip(plan.anchors, net.anchors, needed):
            family = family_of(spec)
            stem, units = family.stem(model), family.units(model)
            chunks: dict[int, list] = {i: [] for i in wanted}
            for start in range(0, images.shape[0], batch_size):
                x = stem(images[start:start + batch_size])
                if 0 in chunks:
                    chunks[0].append(x)
                for b, unit in enumerate(units[:max(wanted, default=0)]):
                    x = unit(x)
                    if b + 1 in chunks:
                        chunks[b + 1].append(x)
            acts.append({i: torch.cat(c) for i, c in chunks.items()})
    collected = time.perf_counter()
    solutions: dict[str, list] = {}
    pinv_cache: dict = {}
    for t in targets:
        fi, bi = index[t.front], index[t.back]
        if (fi, t.cut) not in pinv_cache:
            pinv_cache[(fi, t.cut)] = pinv_with_bias(acts[fi][t.cut + 1], plan.anchors[fi].stage_layout[t.stage])
        solutions.setdefault(net._key(t.front, t.back, t.layer), []).append(
            least_squares_solution(pinv_cache[(fi, t.cut)], acts[bi][t.resume], plan.anchors[bi].stage_layout[t.stage]))
    means = {k: (sum(w for w, _ in s) / len(s), sum(b for _, b in s) / len(s)) for k, s in solutions.items()}
    done = time.perf_counter()
    return means, {"collect": collected - started, "solve": done - collected, "total": done - started}


def max_relative_error(net, reference: dict) -> float:
    import torch

    worst = 0.0
    for key, (w_ref, b_ref) in reference.items():
        layer = net.stitch_layers[key]
        got = torch.cat([layer.weight.detach().reshape(layer.weight.shape[0], -1), layer.bias.detach()[:, None]], 1)
        want = torch.cat([w_ref, b_ref[:, None]], 1)
        worst = max(worst, float(torch.linalg.norm(got.double() - want) / torch.linalg.norm(want)))
    return worst


def setup(family: str, count: int):
    from snexport.families.registry import describe_anchors, load_anchor
    from snexport.stitching.plan import plan_stitches
    from snexport.stitching.snnet import SNNet
    from snexport.stitching.stage import calibration_images

    names = FAMILIES[family]
    plan = plan_stitches(describe_anchors(names))
    random_init = family == "deit"
    anchors = [load_anchor(n, random_init=random_init, seed=i) for i, n in enumerate(names)]
    spec = plan.anchors[0]
    images, source = calibration_images("digits" if family == "demo" else None, spec.input_shape, spec.num_classes,
                                        count)
    return SNNet(plan, anchors).eval(), images, source


def run_family(family: str, count: int, rounds: int, batch_size: int) -> dict:
    import torch

    net, images, source = setup(family, count)
    targets = net.plan.ls_targets()
    print(f"\n== {family}: anchors {', '.join(a.name for a in net.plan.anchors)}; {count} calibration images "
          f"({source}), batch {batch_size}; {len(targets)} LS targets, {net.plan.num_layers} layers; "
          f"torch threads {torch.get_num_threads()}")
    kinds = ["forward", "pinv", "new"]
    samples: dict[str, list] = {k: [] for k in kinds}
    error = None
    for r in range(rounds):
        order = kinds[r % 3:] + kinds[:r % 3]
        for kind in order:
            before, cpu_started = load_average(), time.process_time()
            if kind == "forward":
                row = {"total": anchors_forward(net, images, batch_size)}
            elif kind == "pinv":
                reference, row = pinv_baseline(net, images, batch_size)
            else:
                info = net.init_stitching_layers(images, batch_size=batch_size)
                row = {"total": info["total_seconds"], "forward": info["collect_seconds"],
                       "solve": info["solve_seconds"], "solved_by": info["solved_by"]}
            row.update(round=r, cpu=time.process_time() - cpu_started, load_before=before, load_after=load_average())
            samples[kind].append(row)
            print(f"  round {r} {kind:8s} {row['total']:8.2f} s (cpu {row['cpu']:8.2f} s)   load {before} -> "
                  f"{row['load_after']}"
                  + (f"   (collect {row['collect']:.2f} + solve {row['solve']:.2f})" if kind == "pinv" else "")
                  + (f"   (forward {row['forward']:.2f} + solve {row['solve']:.2f}; {row['solved_by']})"
                     if kind == "new" else ""))
        if samples["pinv"] and samples["new"] and error is None:
            error = max_relative_error(net, reference)

    def best(kind, field="total"):
        return min(s[field] for s in samples[kind])

    fwd = best("forward")
    print(f"  -- best of {rounds}: forward {fwd:.2f} s | pinv (before) {best('pinv'):.2f} s = "
          f"{best('pinv') / fwd:.2f}x forward (solve {best('pinv', 'solve'):.2f} s) | new {best('new'):.2f} s = "
          f"{best('new') / fwd:.2f}x forward (solve {best('new', 'solve'):.2f} s) | target <= 1.20x")
    cpu_fwd = best("forward", "cpu")
    print(f"  -- cpu seconds (process time, steadier on a shared box), best of {rounds}: forward {cpu_fwd:.2f} | "
          f"pinv {best('pinv', 'cpu'):.2f} = {best('pinv', 'cpu') / cpu_fwd:.2f}x | new {best('new', 'cpu'):.2f} = "
          f"{best('new', 'cpu') / cpu_fwd:.2f}x")
    print(f"  -- new vs pinv solutions: max relative error {error:.2e} (test bound 1e-5)")
    return {"family": family, "anchors": [a.name for a in net.plan.anchors], "images": count, "source": source,
            "batch_size": batch_size, "targets": len(targets), "layers": net.plan.num_layers, "rounds": rounds,
            "samples": samples, "best_seconds": {k: best(k) for k in kinds},
            "ratio_to_forward": {k: best(k) / fwd for k in ("pinv", "new")},
            "cpu_ratio_to_forward": {k: best(k, "cpu") / cpu_fwd for k in ("pinv", "new")},
            "max_relative_error": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["demo", "deit", "both"], default="both")
    parser.add_argument("--images", type=int, default=100, help="calibration images (default 100, the build's)")
    parser.add_argument("--rounds", type=int, default=None, help="rotated repetitions (default: demo 3, deit 1)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own, what a build uses)")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()

    import platform

    import torch

    from snexport.device.profiling import device_fingerprint

    if args.threads:
        torch.set_num_threads(args.threads)
    machine = device_fingerprint()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"load average {load_average()}")
    args.results.mkdir(parents=True, exist_ok=True)
    for family in (["demo", "deit"] if args.family == "both" else [args.family]):
        rounds = args.rounds or (3 if family == "demo" else 1)
        result = run_family(family, args.images, rounds, args.batch_size)
        result.update(machine=machine, torch=torch.__version__)
        suffix = f"-{args.threads}threads" if args.threads else ""
        out = args.results / f"ls_init_timing-{family}{suffix}.json"
        out.write_text(json.dumps(result, indent=1, default=str))
        print(f"  wrote {out}")


if __name__ == "__main__":
    main()
