"""ONNX Runtime vs PyTorch eager on this machine, per stitch: latency, cold load vs warm switch, memory.

    uv run python benchmarks/runtime_compare.py                   # demo family, then deit_s+deit_b (random init)
    uv run python benchmarks/runtime_compare.py --family demo --quick

For each family it builds (or reuses) an SN-Net build directory, selects the stitches, exports each as ONNX through
the project's export stage, and measures with ``snexport.device.profiling`` (DESIGN.md, "Honest measurement"):

- latency of the ONNX file in ``OnnxRuntimeRunner`` and of the materialised module in ``TorchRunner`` (eager, no
  autograd), same seeded input, same thread count, the two backends interleaved stitch by stitch so that drift of
  a noisy machine hits both alike; p50/p90 and the ratio ORT/eager of the p50s;
- cold load: ``profile_engine`` on the file (page cache evicted first) = session construction + first result;
- warm switch: all ORT sessions resident; ``measure_switch`` times stitch i's first result right after stitch
  i-1 ran (the selector's switch), next to its steady latency;
- RSS with all engines loaded, in a *fresh* subprocess per backend (this process has imported torch, built
  SN-Nets and run everything above, so its RSS says nothing): ORT loads every file and runs it once (first runs
  allocate arenas), reporting RSS before and after each; eager loads the SN-Net (one model serving every stitch),
  then materialises each stitch as a standalone copy.

Selection: with accuracy known (demo family) the stitches are the accuracy/GFLOPs Pareto front from
``snexport.device.pareto.select_candidates``. With random-init anchors (deit) accuracy is unknown, so no accuracy front
exists; the default is then every anchor plus 6 stitches evenly spaced in GFLOPs (targets at equal steps between
the cheapest and the dearest stitch, each taking the nearest stitch not yet taken; ties by GFLOPs then id) — the
same rule as benchmarks/pack_vs_standalone.py. ``--stitches all`` or ``--stitches ID,ID`` overrides it.

Writes ``<results>/runtime_compare-<family>.json`` with the settings, the machine (``device_fingerprint``), library
versions, load average before/after, and one row per stitch. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Sequence

HERE = Path(__file__).resolve().parent
SCHEMA_VERSION = 1
FAMILIES = {
    # family: (anchor names, random_init)
    "demo": (["demo_s", "demo_m", "demo_l"], False),
    "deit": (["deit_s", "deit_b"], True),
}
EVEN_SPACED = 6  # stitches picked by the default rule when accuracy is unknown

# Per-family defaults; a CLI option that is given overrides them, an unset one never does. DeiT-B on 2 cores takes
# ~0.2-0.5 s per image, so its settings keep the whole family to a few minutes; the tiny demo models get many
# iterations, bounded by min_duration_s anyway.
DEFAULTS = {
    "demo": {"warmup": 20, "iterations": 200, "min_duration_s": 1.0, "max_duration_s": 30.0, "switch_repeats": 50},
    "deit": {"warmup": 3, "iterations": 20, "min_duration_s": 1.0, "max_duration_s": 20.0, "switch_repeats": 8},
}
QUICK = {"warmup": 1, "iterations": 3, "min_duration_s": 0.0, "max_duration_s": 5.0, "switch_repeats": 2}
EXPORT = {"opset": 18, "simplifier": "onnxsim", "batch": 1, "exporter": "torchscript"}
VERSIONED = ("torch", "onnxruntime", "onnx", "onnxsim", "numpy", "timm", "psutil", "snexport")


# -------------------------------------------------------------------------------------------------------------
# Selection
# -------------------------------------------------------------------------------------------------------------


def evenly_spaced(stitches: Sequence[Any], n: int = EVEN_SPACED) -> list:
    """Every anchor plus ``n`` non-anchor stitches evenly spaced in GFLOPs, sorted by GFLOPs.

    Targets are ``n`` equal steps from the cheapest to the dearest stitch (both ends included); each takes the
    nearest stitch not yet taken (ties: lower GFLOPs, then id), so the result is deterministic.
    """
    anchors = [s for s in stitches if s.is_anchor]
    others = sorted((s for s in stitches if not s.is_anchor), key=lambda s: (s.gflops, s.id))
    if len(others) <= n:
        picked = others
    else:
        lo, hi = others[0].gflops, others[-1].gflops
        picked, taken = [], set()
        for i in range(n):
            target = lo + (hi - lo) * i / (n - 1) if n > 1 else (lo + hi) / 2
            best = min((s for s in others if s.id not in taken),
                       key=lambda s: (abs(s.gflops - target), s.gflops, s.id))
            picked.append(best)
            taken.add(best.id)
    return sorted(anchors + picked, key=lambda s: (s.gflops, s.id))


def select_stitches(build, choice: Optional[str]) -> tuple[list, dict]:
    """The stitches to measure and a description of how they were chosen (stored in the JSON)."""
    from snexport.evaluation.evaluate import evaluate_build
    from snexport.device.pareto import select_candidates

    plan = build.load_plan()
    if choice and choice != "pareto":
        if choice == "all":
            return sorted(plan.stitches, key=lambda s: (s.gflops, s.id)), {"rule": "all"}
        ids = [i.strip() for i in choice.split(",") if i.strip()]
        return [plan.get(i) for i in ids], {"rule": "explicit", "ids": ids}
    results = evaluate_build(build, show_progress=False)
    if any(r.top1 is not None for r in results):
        picked = select_candidates(results, by="gflops", accuracy_key="top1")
        top1 = {p["record"].stitch_id: p["record"].top1 for p in picked}
        chosen = sorted((plan.get(i) for i in top1), key=lambda s: (s.gflops, s.id))
        return chosen, {"rule": "pareto", "by": "gflops", "accuracy_key": "top1",
                        "dataset": results[0].dataset, "top1": top1, "evaluated": len(results)}
    return evenly_spaced(plan.stitches), {
        "rule": f"accuracy unknown (random-init anchors): anchors + {EVEN_SPACED} stitches evenly spaced in GFLOPs",
        "evaluated": len(results)}


# -------------------------------------------------------------------------------------------------------------
# Fresh-process memory workers
# -------------------------------------------------------------------------------------------------------------


def _rss_worker_ort(threads: int, paths: Sequence[str]) -> dict:
    """Runs in a fresh process: RSS before/after loading (and running once) every ONNX file."""
    import numpy as np
    import onnxruntime  # noqa: F401 - imported before the baseline: a deployed selector has it loaded

    from snexport.device.profiling import process_rss_bytes
    from snexport.device.runtime.onnxruntime_runner import OnnxRuntimeRunner

    base = process_rss_bytes()
    rows, keep, prev = [], [], base
    for path in paths:
        runner = OnnxRuntimeRunner(path, threads=threads)
        runner.load()
        loaded = process_rss_bytes()
        shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in runner.input_shape)
        runner.run(np.zeros(shape, dtype=np.float32))
        ran = process_rss_bytes()
        rows.append({"file": path, "rss_after_load_bytes": loaded, "rss_after_first_run_bytes": ran,
                     "delta_bytes": ran - prev})
        keep.append(runner)
        prev = ran
    return {"backend": "onnxruntime", "rss_baseline_bytes": base, "rss_all_loaded_bytes": prev,
            "rss_all_loaded_delta_bytes": prev - base, "engines": rows,
            "note": "baseline after importing numpy+onnxruntime; the first engine's delta also holds ORT's "
                    "once-per-process environment and thread pools"}


def _rss_worker_eager(threads: int, build_dir: str, ids: Sequence[str]) -> dict:
    """Runs in a fresh process: RSS of the SN-Net serving every stitch, then of standalone materialised copies."""
    import torch

    from snexport.stitching.store import BuildDir
    from snexport.device.profiling import process_rss_bytes

    torch.set_num_threads(threads)
    # Baseline after the imports and one tiny forward through the op kinds a ViT uses: torch's lazy kernel and
    # thread-pool set-up (hundreds of MB) is once per process, not the SN-Net's.
    import timm  # noqa: F401
    import snexport.stitching.snnet  # noqa: F401

    with torch.inference_mode():
        warm = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 2, 2), torch.nn.Flatten(2), torch.nn.LayerNorm(4),
                                   torch.nn.Linear(4, 4), torch.nn.GELU(), torch.nn.Softmax(-1))
        warm(torch.zeros(1, 3, 4, 4))
    base = process_rss_bytes()
    build = BuildDir(build_dir)
    net = build.load_snnet().eval()
    shape = (1, *build.load_plan().anchors[0].input_shape)
    x = torch.zeros(shape)
    with torch.inference_mode():
        for sid in ids:
            net(x, sid)
    snnet = process_rss_bytes()
    rows, keep, prev = [], [], snnet
    with torch.inference_mode():
        for sid in ids:
            module = net.materialize(sid)
            module(x)
            now = process_rss_bytes()
            rows.append({"stitch_id": sid, "delta_bytes": now - prev})
            keep.append(module)
            prev = now
    return {"backend": "torch", "rss_baseline_bytes": base, "rss_snnet_all_stitches_bytes": snnet,
            "rss_snnet_delta_bytes": snnet - base, "rss_snnet_plus_standalone_bytes": prev,
            "standalone": rows}


def _fresh_process(args: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker failed ({' '.join(args[:2])}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------------------------------
# Measurement
# -------------------------------------------------------------------------------------------------------------


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for dist in VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def run_family(family: str, cfg: dict, build_root: Path, results_dir: Path, choice: Optional[str], log) -> dict:
    import torch

    from snexport.export.stage import export_stitches
    from snexport.device.profiling import device_fingerprint, measure_switch, profile_engine
    from snexport.device.runtime import open_runner
    from snexport.device.runtime.onnxruntime_runner import OnnxRuntimeRunner
    from snexport.device.runtime.torch_runner import TorchRunner
    from snexport.stitching.stage import stitch_stage

    names, random_init = FAMILIES[family]
    threads = cfg["threads"]
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    started = time.perf_counter()

    log(f"[{family}] build (stitch stage) in {build_root}")
    build, _ = stitch_stage(build_root, names, random_init=random_init, show_progress=False)
    stitches, selection = select_stitches(build, choice)
    log(f"[{family}] {len(stitches)} stitches: {', '.join(s.id for s in stitches)}")
    net = build.load_snnet().eval()
    input_shape = tuple(build.load_plan().anchors[0].input_shape)

    t0 = time.perf_counter()
    log(f"[{family}] export (skips files that are up to date)")
    artifacts = export_stitches(build.root, stitches, net.materialize, input_shape, calib_images=None,
                                weights_hash=build.weights_hash(), **EXPORT)
    export_s = time.perf_counter() - t0
    files = {a.stitch_id: build.root / a.file for a in artifacts if a.precision == "fp32"}

    prof_settings = {k: cfg[k] for k in ("warmup", "iterations", "min_duration_s", "max_duration_s")}
    prof_settings["evict_page_cache"] = True
    ort_opts = {"threads": threads}

    # The first session of a process also pays for ORT's environment (logging, thread pools); a deployed
    # selector pays that once at start-up, so one throwaway session keeps it out of the first cold load.
    OnnxRuntimeRunner(files[stitches[0].id], **ort_opts).load()

    rows = []
    for s in stitches:
        log(f"[{family}] measure {s.id}")
        load_1m = os.getloadavg()[0]  # the machine is shared: keep how busy it was next to each row
        ort = profile_engine(files[s.id], prof_settings, runner_options=ort_opts)
        eager = profile_engine(lambda sid=s.id: TorchRunner(net.materialize(sid), (1, *input_shape)), prof_settings)
        p50_ratio = ort["latency"]["p50_ms"] / eager["latency"]["p50_ms"]
        p90_ratio = ort["latency"]["p90_ms"] / eager["latency"]["p90_ms"]
        rows.append({
            "stitch_id": s.id, "is_anchor": s.is_anchor, "gflops": s.gflops, "params": s.params,
            "top1": selection.get("top1", {}).get(s.id),
            "file": str(files[s.id].relative_to(build.root)), "file_size_bytes": ort["file_size_bytes"],
            "onnxruntime": {"latency": ort["latency"], "load": ort["load"], "memory": ort["memory"],
                            "page_cache_evicted": ort.get("page_cache_evicted"),
                            "runner_settings": ort["runner_settings"]},
            # eager "load" = deepcopy out of the SN-Net + first run: not a file load, kept for completeness.
            "eager": {"latency": eager["latency"], "load": eager["load"], "memory": eager["memory"],
                      "runner_settings": eager["runner_settings"], "torch_threads": torch.get_num_threads()},
            "ort_over_eager_p50": p50_ratio, "ort_over_eager_p90": p90_ratio,
            "load_average_1m": {"before": load_1m, "after": os.getloadavg()[0]},
        })

    # Warm switch: every session resident, as the selector keeps its candidates.
    if len(stitches) > 1:
        log(f"[{family}] warm switch ({cfg['switch_repeats']} repeats per stitch)")
        runners = [open_runner(files[s.id], **ort_opts) for s in stitches]
        import numpy as np

        x = np.random.default_rng(0).standard_normal((1, *input_shape)).astype(np.float32)
        for i, row in enumerate(rows):
            sw = measure_switch(runners[i - 1], runners[i], x, repeats=cfg["switch_repeats"])
            row["onnxruntime"]["warm_switch"] = dict(sw, from_stitch=stitches[i - 1].id)
        for r in runners:
            r.close()
        del runners

    log(f"[{family}] memory in fresh processes")
    mem_ort = _fresh_process(["--rss-worker-ort", str(threads), *[str(files[s.id]) for s in stitches]])
    mem_eager = _fresh_process(["--rss-worker-eager", str(threads), str(build.root), *[s.id for s in stitches]])
    for row, e, t in zip(rows, mem_ort["engines"], mem_eager["standalone"]):
        row["onnxruntime"]["fresh_process_rss_delta_bytes"] = e["delta_bytes"]
        row["eager"]["fresh_process_standalone_rss_delta_bytes"] = t["delta_bytes"]

    doc = {
        "schema": SCHEMA_VERSION,
        "benchmark": "runtime_compare",
        "family": family,
        "anchors": names,
        "random_init": random_init,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {
            "threads": threads, "torch_threads": torch.get_num_threads(), **prof_settings,
            "switch_repeats": cfg["switch_repeats"], "quick": cfg["quick"], "export": dict(EXPORT),
            "input_shape": [1, *input_shape], "input": "seeded standard normal (seed 0), same for both backends",
        },
        "selection": dict(selection, ids=[s.id for s in stitches]),
        "machine": device_fingerprint(),
        "versions": versions(),
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "build_dir": str(build.root),
        "export_seconds": export_s,
        "total_seconds": time.perf_counter() - started,
        "memory": {"onnxruntime": mem_ort, "eager": mem_eager},
        "rows": rows,
    }
    from snexport.hashing import atomic_write_json

    results_dir.mkdir(parents=True, exist_ok=True)
    out = results_dir / f"runtime_compare-{family}.json"
    atomic_write_json(out, doc)
    doc["_path"] = str(out)
    return doc


# -------------------------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------------------------


def _mb(b: Optional[int]) -> str:
    return "–" if b is None else f"{b / 2**20:.1f}"


def _ms(v: Optional[float]) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def print_table(doc: dict, console) -> None:
    from rich.table import Table

    s = doc["settings"]
    t = Table(title=f"runtime_compare — {doc['family']} ({', '.join(doc['anchors'])}), {s['threads']} threads, "
                    f"warmup {s['warmup']}, ≥{s['iterations']} it & ≥{s['min_duration_s']} s; ms unless noted")
    cols = ["stitch", "GFLOPs", "file MB", "ORT p50", "ORT p90", "eager p50", "eager p90", "ORT/eager p50",
            "cold load", "warm switch p50", "steady p50", "ORT RSS Δ MB", "eager copy Δ MB"]
    for c in cols:
        t.add_column(c, justify="left" if c == "stitch" else "right")
    for r in doc["rows"]:
        o, e = r["onnxruntime"], r["eager"]
        sw = o.get("warm_switch")
        ratio = r["ort_over_eager_p50"]
        ratio_s = f"[red]{ratio:.2f}[/]" if ratio > 1 else f"{ratio:.2f}"
        name = f"[bold]{r['stitch_id']}[/]" if r["is_anchor"] else r["stitch_id"]
        t.add_row(name, f"{r['gflops']:.4g}", _mb(r["file_size_bytes"]),
                  _ms(o["latency"]["p50_ms"]), _ms(o["latency"]["p90_ms"]),
                  _ms(e["latency"]["p50_ms"]), _ms(e["latency"]["p90_ms"]), ratio_s,
                  _ms(o["load"]["cold_load_ms"]),
                  _ms(sw["switch"]["p50_ms"]) if sw else "–", _ms(sw["steady"]["p50_ms"]) if sw else "–",
                  _mb(o.get("fresh_process_rss_delta_bytes")), _mb(e.get("fresh_process_standalone_rss_delta_bytes")))
    console.print(t)
    mo, me = doc["memory"]["onnxruntime"], doc["memory"]["eager"]
    console.print(f"RSS, fresh process: ORT {_mb(mo['rss_baseline_bytes'])} MB after import → "
                  f"{_mb(mo['rss_all_loaded_bytes'])} MB with all {len(mo['engines'])} sessions loaded "
                  f"(+{_mb(mo['rss_all_loaded_delta_bytes'])} MB; files total "
                  f"{_mb(sum(r['file_size_bytes'] or 0 for r in doc['rows']))} MB); eager {_mb(me['rss_baseline_bytes'])} "
                  f"MB → SN-Net serving all {_mb(me['rss_snnet_all_stitches_bytes'])} MB "
                  f"(+{_mb(me['rss_snnet_delta_bytes'])}) → + standalone copies {_mb(me['rss_snnet_plus_standalone_bytes'])} MB")
    la = doc["load_average"]
    console.print(f"selection: {doc['selection']['rule']}; load average before/after "
                  f"{la['before'][0]:.2f}/{la['after'][0]:.2f}; wrote {doc.get('_path')}")


# -------------------------------------------------------------------------------------------------------------
# CLI
# -------------------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=[*FAMILIES, "both"], default="both", help="default: both, demo first")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for ORT and torch (default: all usable cores)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iterations", type=int, default=None, help="minimum timed iterations")
    p.add_argument("--min-duration-s", type=float, default=None, help="minimum timed seconds per measurement")
    p.add_argument("--max-duration-s", type=float, default=None, help="cap per measurement")
    p.add_argument("--switch-repeats", type=int, default=None, help="warm-switch repeats per stitch")
    p.add_argument("--stitches", default=None,
                   help="'pareto' (default: accuracy front, or anchors + 6 evenly spaced when accuracy is unknown), "
                        "'all', or comma-separated ids")
    p.add_argument("--out", type=Path, default=HERE / ".builds", help="build-dir cache root; builds go to OUT/<family>")
    p.add_argument("--results", type=Path, default=HERE / "results", help="where the JSON goes")
    p.add_argument("--quick", action="store_true", help="tiny settings (smoke test); numbers are meaningless")
    return p.parse_args(argv)


def family_settings(family: str, args: argparse.Namespace) -> dict:
    from snexport.device.runtime.onnxruntime_runner import default_threads

    cfg = dict(QUICK if args.quick else DEFAULTS[family])
    for key in ("warmup", "iterations", "min_duration_s", "max_duration_s", "switch_repeats"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    cfg["max_duration_s"] = max(cfg["max_duration_s"], cfg["min_duration_s"])
    cfg["threads"] = args.threads or default_threads()
    cfg["quick"] = bool(args.quick)
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--rss-worker-ort":
        print(json.dumps(_rss_worker_ort(int(argv[1]), argv[2:])))
        return 0
    if argv and argv[0] == "--rss-worker-eager":
        print(json.dumps(_rss_worker_eager(int(argv[1]), argv[2], argv[3:])))
        return 0
    args = parse_args(argv)
    from rich.console import Console

    # Redirected output would otherwise be wrapped at 80 columns, which shreds a 13-column table.
    console = Console() if sys.stdout.isatty() else Console(width=200)
    err = Console(stderr=True)
    families = list(FAMILIES) if args.family == "both" else [args.family]
    for family in families:
        cfg = family_settings(family, args)
        doc = run_family(family, cfg, args.out / family, args.results, args.stitches,
                         lambda msg: err.print(f"[dim]{msg}[/]"))
        print_table(doc, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
