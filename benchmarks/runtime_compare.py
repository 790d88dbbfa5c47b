"""ONNX Runtime vs OpenVINO on this machine, per stitch, with PyTorch eager as the baseline (issue 13).

    uv run python benchmarks/runtime_compare.py                   # demo family, then deit_s+deit_b (random init)
    uv run python benchmarks/runtime_compare.py --family demo --quick

For each family it builds (or reuses) an SN-Net build directory, selects the stitches, exports each as ONNX through
the project's export stage, and measures with the device half's own tools (DESIGN.md, "Honest measurement"):

- latency: every runtime of every stitch resident in this one process — the ONNX file in ``OnnxRuntimeRunner``
  (spinning off, prepacking on), the same file in ``OpenVinoRunner`` (LATENCY hint, 1 stream, f32 precision
  hint, no pinning) and the materialised module in ``TorchRunner`` (eager, no autograd) — timed in interleaved
  rounds (``snexport.device.rounds.run_rounds``, what `snexport bench` uses): each round times every
  (stitch, runtime) once in a fresh random order after its own warm-up, so drift of a shared machine hits all
  runtimes alike; p50 with its bootstrap-over-rounds interval, p90, and the ratios OV/ORT and ORT/eager;
  same seeded input and the same thread count everywhere;
- cold load: ``profile_engine(time_latency=False)`` per file and runtime (page cache evicted first) = construction
  + first result; nothing else runs then;
- warm switch: all sessions of one runtime resident; ``measure_switch`` times stitch i's first result right after
  stitch i-1 ran (the selector's switch), next to its steady latency; for ORT and OpenVINO;
- RSS with all engines loaded, in a *fresh* subprocess per runtime (this process has imported torch, built
  SN-Nets and run everything above, so its RSS says nothing): ORT and OpenVINO each load every file and run it
  once, reporting RSS before and after each; eager loads the SN-Net (one model serving every stitch), then
  materialises each stitch as a standalone copy. (OpenVINO's sharing of a pack's weights file, through the
  selector, is measured in benchmarks/pack_vs_standalone.py.)

Selection: with accuracy known (demo family) the stitches are the accuracy/GFLOPs Pareto front from
``snexport.device.pareto.select_candidates``. With random-init anchors (deit) accuracy is unknown, so no accuracy front
exists; the default is then every anchor plus 6 stitches evenly spaced in GFLOPs (targets at equal steps between
the cheapest and the dearest stitch, each taking the nearest stitch not yet taken; ties by GFLOPs then id) — the
same rule as benchmarks/pack_vs_standalone.py. ``--stitches all`` or ``--stitches ID,ID`` overrides it.
``--runtimes`` picks runtimes (e.g. ``onnxruntime,openvino`` without eager); OpenVINO is left out, saying so,
where it is not installed.

Writes ``<results>/runtime_compare-<family>.json`` with the settings, the machine (``device_fingerprint``), library
versions, load average before/during/after, and one row per stitch. Nothing here asserts on time.
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
    "demo": {"rounds": 7, "warmup": 20, "iterations": 100, "min_duration_s": 0.3, "max_duration_s": 5.0,
             "switch_repeats": 50},
    "deit": {"rounds": 5, "warmup": 2, "iterations": 5, "min_duration_s": 0.5, "max_duration_s": 5.0,
             "switch_repeats": 8},
}
QUICK = {"rounds": 2, "warmup": 1, "iterations": 3, "min_duration_s": 0.0, "max_duration_s": 5.0, "switch_repeats": 2}
EXPORT = {"opset": 18, "simplifier": "onnxsim", "batch": 1, "exporter": "torchscript"}
VERSIONED = ("torch", "onnxruntime", "openvino", "onnx", "onnxsim", "numpy", "timm", "psutil", "snexport")
RUNTIMES = ("onnxruntime", "openvino", "eager")  # column order; the two file runtimes first


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


def _rss_worker_files(backend: str, threads: int, paths: Sequence[str]) -> dict:
    """Runs in a fresh process: RSS before/after loading (and running once) every ONNX file with ``backend``."""
    import importlib

    import numpy as np

    from snexport.device.profiling import process_rss_bytes
    from snexport.device.runtime import open_runner

    importlib.import_module(backend)  # imported before the baseline: a deployed selector has it loaded
    base = process_rss_bytes()
    rows, keep, prev = [], [], base
    for path in paths:
        runner = open_runner(path, backend=backend, threads=threads)
        loaded = process_rss_bytes()
        shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in runner.input_shape)
        runner.run(np.zeros(shape, dtype=np.float32))
        ran = process_rss_bytes()
        rows.append({"file": path, "rss_after_load_bytes": loaded, "rss_after_first_run_bytes": ran,
                     "delta_bytes": ran - prev})
        keep.append(runner)
        prev = ran
    return {"backend": backend, "rss_baseline_bytes": base, "rss_all_loaded_bytes": prev,
            "rss_all_loaded_delta_bytes": prev - base, "engines": rows,
            "note": f"baseline after importing numpy+{backend}; the first engine's delta also holds the runtime's "
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
    import numpy as np
    import torch

    from snexport.export.stage import export_stitches
    from snexport.device.profiling import device_fingerprint, measure_switch, profile_engine
    from snexport.device.rounds import RoundSettings, run_rounds
    from snexport.device.runtime import open_runner
    from snexport.device.runtime.torch_runner import TorchRunner
    from snexport.stitching.stage import stitch_stage

    names, random_init = FAMILIES[family]
    threads = cfg["threads"]
    runtimes = cfg["runtimes"]
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
    file_runtimes = [r for r in runtimes if r != "eager"]
    # Each runtime with the options the device half gives it: explicit threads, nothing else changed.
    options = {r: {"threads": threads} for r in file_runtimes}

    # The first session of a process also pays for the runtime's environment (thread pools, plugins); a deployed
    # selector pays that once at start-up, so one throwaway session per runtime keeps it out of the first load.
    for r in file_runtimes:
        open_runner(files[stitches[0].id], backend=r, **options[r]).close()

    # 1. Cold load per file and runtime (page cache evicted), one at a time, nothing else running.
    prof_settings = {"warmup": 0, "iterations": 1, "min_duration_s": 0.0, "max_duration_s": 1.0,
                     "evict_page_cache": True}
    cold: dict = {r: {} for r in file_runtimes}
    for s in stitches:
        for r in file_runtimes:
            log(f"[{family}] cold load {s.id} ({r})")
            cold[r][s.id] = profile_engine(files[s.id], prof_settings, runner_options=dict(options[r], backend=r),
                                           time_latency=False, memory_runs=1)

    # 2. Latency: every (stitch, runtime) resident, interleaved rounds.
    log(f"[{family}] latency: {len(stitches)} stitches x {len(runtimes)} runtimes, {cfg['rounds']} interleaved rounds")
    x = np.random.default_rng(0).standard_normal((1, *input_shape)).astype(np.float32)
    xt = torch.from_numpy(x)
    runners: dict = {}
    for s in stitches:
        for r in file_runtimes:
            runners[(s.id, r)] = open_runner(files[s.id], backend=r, **options[r])
        if "eager" in runtimes:
            runners[(s.id, "eager")] = TorchRunner(net.materialize(s.id), (1, *input_shape))
            runners[(s.id, "eager")].load()
    del net
    runs = {f"{sid}@{r}": (lambda rn=rn, inp=(xt if r == "eager" else x): rn.run(inp))
            for (sid, r), rn in runners.items()}
    rounds = RoundSettings(rounds=cfg["rounds"], warmup=cfg["warmup"], iterations=cfg["iterations"],
                           min_duration_s=cfg["min_duration_s"], max_duration_s=cfg["max_duration_s"]).check()
    load_rounds = os.getloadavg()[0]
    timing = run_rounds(runs, rounds)
    load_after_rounds = os.getloadavg()[0]
    settings_of = {r: runners[(stitches[0].id, r)].settings for r in file_runtimes}

    # 3. Warm switch per file runtime: all of its sessions resident (as the selector keeps its candidates).
    switches: dict = {r: {} for r in file_runtimes}
    if len(stitches) > 1:
        for r in file_runtimes:
            log(f"[{family}] warm switch {r} ({cfg['switch_repeats']} repeats per stitch)")
            for i, s in enumerate(stitches):
                prev = stitches[i - 1].id
                sw = measure_switch(runners[(prev, r)], runners[(s.id, r)], x, repeats=cfg["switch_repeats"])
                switches[r][s.id] = dict(sw, from_stitch=prev)
    for rn in runners.values():
        rn.close()
    runners.clear()

    log(f"[{family}] memory in fresh processes")
    memory = {r: _fresh_process([f"--rss-worker-{r}", str(threads), *[str(files[s.id]) for s in stitches]])
              for r in file_runtimes}
    if "eager" in runtimes:
        memory["eager"] = _fresh_process(["--rss-worker-eager", str(threads), str(build.root),
                                          *[s.id for s in stitches]])

    rows = []
    for i, s in enumerate(stitches):
        row = {"stitch_id": s.id, "is_anchor": s.is_anchor, "gflops": s.gflops, "params": s.params,
               "top1": selection.get("top1", {}).get(s.id),
               "file": str(files[s.id].relative_to(build.root)), "file_size_bytes": files[s.id].stat().st_size}
        for r in runtimes:
            entry = {"latency": timing[f"{s.id}@{r}"]}
            if r in file_runtimes:
                c = cold[r][s.id]
                entry.update(load=c["load"], memory=c["memory"], page_cache_evicted=c.get("page_cache_evicted"),
                             runner_settings=c["runner_settings"],
                             fresh_process_rss_delta_bytes=memory[r]["engines"][i]["delta_bytes"])
                if s.id in switches[r]:
                    entry["warm_switch"] = switches[r][s.id]
            else:
                entry.update(torch_threads=torch.get_num_threads(),
                             fresh_process_standalone_rss_delta_bytes=memory["eager"]["standalone"][i]["delta_bytes"])
            row[r] = entry
        p50 = {r: row[r]["latency"]["p50_ms"] for r in runtimes}
        if "onnxruntime" in p50 and "openvino" in p50:
            row["ov_over_ort_p50"] = p50["openvino"] / p50["onnxruntime"]
        if "onnxruntime" in p50 and "eager" in p50:
            row["ort_over_eager_p50"] = p50["onnxruntime"] / p50["eager"]
            row["ort_over_eager_p90"] = row["onnxruntime"]["latency"]["p90_ms"] / row["eager"]["latency"]["p90_ms"]
        row["fastest"] = min(p50, key=p50.get)
        # Faster beyond the noise only when its p50 interval lies wholly below every other runtime's (the rule
        # `snexport bench` chooses a backend by, pareto.best_backend); otherwise the others are tied with it.
        ci = {r: row[r]["latency"]["p50_ci_ms"] for r in runtimes}
        row["tied_with_fastest"] = [r for r in runtimes if r != row["fastest"] and ci[r][0] <= ci[row["fastest"]][1]]
        rows.append(row)

    doc = {
        "schema": SCHEMA_VERSION,
        "benchmark": "runtime_compare",
        "family": family,
        "anchors": names,
        "random_init": random_init,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "runtimes": list(runtimes),
        "skipped_runtimes": cfg.get("skipped", {}),
        "settings": {
            "threads": threads, "torch_threads": torch.get_num_threads(), "rounds": cfg["rounds"],
            "warmup": cfg["warmup"], "iterations": cfg["iterations"], "min_duration_s": cfg["min_duration_s"],
            "max_duration_s": cfg["max_duration_s"], "method": rounds.method(),
            "cold_load": prof_settings, "switch_repeats": cfg["switch_repeats"], "quick": cfg["quick"],
            "export": dict(EXPORT), "runner_settings": settings_of,
            "input_shape": [1, *input_shape], "input": "seeded standard normal (seed 0), same for every runtime",
        },
        "selection": dict(selection, ids=[s.id for s in stitches]),
        "machine": device_fingerprint(),
        "versions": versions(),
        "load_average": {"before": list(load_before), "after": list(os.getloadavg()),
                         "latency_rounds_1m": {"before": load_rounds, "after": load_after_rounds}},
        "build_dir": str(build.root),
        "export_seconds": export_s,
        "total_seconds": time.perf_counter() - started,
        "memory": memory,
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
    runtimes = doc["runtimes"]
    short = {"onnxruntime": "ORT", "openvino": "OV", "eager": "eager"}
    t = Table(title=f"runtime_compare — {doc['family']} ({', '.join(doc['anchors'])}), batch 1, "
                    f"{s['threads']} threads, "
                    f"{s['rounds']} interleaved rounds (warmup {s['warmup']}, ≥{s['iterations']} it & "
                    f"≥{s['min_duration_s']} s per round); ms unless noted; ±: half-width of the p50's 95% CI")
    cols = ["stitch", "GFLOPs"]
    cols += [f"{short[r]} p50 ±CI" for r in runtimes]
    if "ov_over_ort_p50" in doc["rows"][0]:
        cols.append("OV/ORT p50")
    if "ort_over_eager_p50" in doc["rows"][0]:
        cols.append("ORT/eager p50")
    cols.append("fastest")
    files = [r for r in runtimes if r != "eager"]
    cols += [f"{short[r]} cold load" for r in files] + [f"{short[r]} RSS Δ MB" for r in files]
    if "eager" in runtimes:
        cols.append("eager copy Δ MB")
    for c in cols:
        t.add_column(c, justify="left" if c == "stitch" else "right")
    for r in doc["rows"]:
        lat = {k: r[k]["latency"] for k in runtimes}
        cells = [f"[bold]{r['stitch_id']}[/]" if r["is_anchor"] else r["stitch_id"], f"{r['gflops']:.4g}"]
        # The p50 and the half-width of its 95% interval (bootstrap over rounds; the JSON has both ends and p90).
        cells += [f"{_ms(lat[k]['p50_ms'])} ±{_ms((lat[k]['p50_ci_ms'][1] - lat[k]['p50_ci_ms'][0]) / 2)}"
                  for k in runtimes]
        for key in ("ov_over_ort_p50", "ort_over_eager_p50"):
            if key in r:
                cells.append(f"[red]{r[key]:.2f}[/]" if r[key] > 1 else f"{r[key]:.2f}")
        tied = r.get("tied_with_fastest") or []
        cells.append(short[r["fastest"]] + (f" (≈{','.join(short[k] for k in tied)})" if tied else ""))
        cells += [_ms(r[k]["load"]["cold_load_ms"]) for k in files]
        cells += [_mb(r[k].get("fresh_process_rss_delta_bytes")) for k in files]
        if "eager" in runtimes:
            cells.append(_mb(r["eager"].get("fresh_process_standalone_rss_delta_bytes")))
        t.add_row(*cells)
    console.print(t)
    total_file = sum(r["file_size_bytes"] or 0 for r in doc["rows"])
    for k in files:
        m = doc["memory"][k]
        console.print(f"RSS, fresh process, {short[k]}: {_mb(m['rss_baseline_bytes'])} MB after import → "
                      f"{_mb(m['rss_all_loaded_bytes'])} MB with all {len(m['engines'])} engines loaded "
                      f"(+{_mb(m['rss_all_loaded_delta_bytes'])} MB; files total {_mb(total_file)} MB)")
    if "eager" in runtimes:
        me = doc["memory"]["eager"]
        console.print(f"RSS, fresh process, eager: {_mb(me['rss_baseline_bytes'])} MB → SN-Net serving all "
                      f"{_mb(me['rss_snnet_all_stitches_bytes'])} MB (+{_mb(me['rss_snnet_delta_bytes'])}) → + "
                      f"standalone copies {_mb(me['rss_snnet_plus_standalone_bytes'])} MB")
    for k in files:
        rs = s["runner_settings"][k]
        shown = {key: rs[key] for key in ("intra_op_num_threads", "allow_spinning", "disable_prepacking", "threads",
                                          "performance_hint", "num_streams", "precision_hint", "cpu_pinning")
                 if key in rs}
        console.print(f"{short[k]} settings: {shown}", markup=False)
    la = doc["load_average"]
    cpu = doc["machine"].get("cpu") or {}
    v = doc["versions"]
    console.print(f"machine: {cpu.get('model')}, {cpu.get('usable_cores')} usable cores; ORT {v.get('onnxruntime')}, "
                  f"OpenVINO {v.get('openvino')}, torch {v.get('torch')}; load average (1 min) before/during/after "
                  f"{la['before'][0]:.2f}/{la['latency_rounds_1m']['before']:.2f}–"
                  f"{la['latency_rounds_1m']['after']:.2f}/{la['after'][0]:.2f}")
    if doc.get("skipped_runtimes"):
        console.print(f"skipped: {doc['skipped_runtimes']}", markup=False)
    console.print(f"selection: {doc['selection']['rule']}; wrote {doc.get('_path')}")


# -------------------------------------------------------------------------------------------------------------
# CLI
# -------------------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=[*FAMILIES, "both"], default="both", help="default: both, demo first")
    p.add_argument("--threads", type=int, default=None,
                   help="inference threads for ORT, OpenVINO and torch (default: all usable cores)")
    p.add_argument("--runtimes", default=",".join(RUNTIMES),
                   help=f"comma-separated, of {', '.join(RUNTIMES)} (default: all; OpenVINO only where installed)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (each times every stitch x runtime)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per stitch x runtime per round")
    p.add_argument("--iterations", type=int, default=None, help="minimum timed runs per stitch x runtime per round")
    p.add_argument("--min-duration-s", type=float, default=None, help="minimum timed seconds per block")
    p.add_argument("--max-duration-s", type=float, default=None, help="cap per block")
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

    from snexport.device.runtime.backends import runtime_available

    cfg = dict(QUICK if args.quick else DEFAULTS[family])
    for key in ("rounds", "warmup", "iterations", "min_duration_s", "max_duration_s", "switch_repeats"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    cfg["max_duration_s"] = max(cfg["max_duration_s"], cfg["min_duration_s"])
    cfg["threads"] = args.threads or default_threads()
    cfg["quick"] = bool(args.quick)
    wanted = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    unknown = [r for r in wanted if r not in RUNTIMES]
    if unknown or not wanted:
        raise SystemExit(f"--runtimes takes {', '.join(RUNTIMES)}; got {args.runtimes!r}")
    cfg["skipped"] = {r: runtime_available(r)[1] for r in wanted if r != "eager" and not runtime_available(r)[0]}
    cfg["runtimes"] = [r for r in RUNTIMES if r in wanted and r not in cfg["skipped"]]
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for backend in ("onnxruntime", "openvino"):
        if argv and argv[0] == f"--rss-worker-{backend}":
            print(json.dumps(_rss_worker_files(backend, int(argv[1]), argv[2:])))
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
