"""Engine pack (one shared weights file) vs standalone ONNX files, side by side, on this machine (issue 5).

    uv run python benchmarks/pack_vs_standalone.py                      # deit_s + deit_b, random init
    uv run python benchmarks/pack_vs_standalone.py --family demo --quick  # seconds

Builds (or reuses) the SN-Net build directory through the library (``stitch_stage`` → ``load_snnet`` →
``export_stitches``), packs the chosen stitches' ONNX files (``snexport.export.pack.pack_stitches``) and measures
three ways of holding every chosen engine in one process:

- ``standalone``: one self-contained ONNX file per stitch, ONNX Runtime defaults (weight prepacking on);
- ``pack``: the pack as the selector runs it — the weights file mapped once, every session given views of it
  (``shared_initializers``), prepacking off, no per-session activation arena (``selector.PACK_RUNNER_DEFAULTS``;
  every pack configuration runs without that arena);
- ``pack+prepack``: the same views with prepacking on, i.e. ONNX Runtime copies every MatMul weight into a
  private packed buffer per session: what the other choice of the prepacking decision would cost and save;
- ``pack-ort``: the device-optimized pack (``optimize_pack``): ORT's optimized graphs with their prepacked
  weights serialized and deduplicated into one file that ORT maps itself in every session;
- ``ov-standalone`` / ``ov-pack`` (where OpenVINO is installed): the standalone files, and the portable pack's files,
  through ``OpenVinoRunner`` (what `snexport bench` measures and the selector opens for an engine whose
  ``measurement.backend`` is openvino). OpenVINO maps external weights (ENABLE_MMAP), so engines of the pack share
  the weights file's page cache; each compiled model still holds its own repacked copy of its weights. The two
  configurations side by side say what that sharing is worth.

Memory is reported as RSS and as PSS (``/proc/self/smaps_rollup``): ONNX Runtime maps the ``pack-ort`` file once
per session, and RSS counts a page once per mapping while PSS counts it once — PSS is the physical cost there.

Measured:
- bytes on disk (ONNX files + weights file) and the pack's dedup facts (distinct vs standalone tensor bytes);
- per engine alone (``snexport.device.profiling.profile_engine`` in a fresh process per engine, as ``snexport bench``):
  RSS growth of load + first run, which goes into the manifest the selector reads;
- RSS with all engines loaded and run once, and the time to load them all, through the real ``Selector``
  (``mode="preload"``), each configuration in its own fresh subprocess so that none pollutes another's RSS;
  the selector's own prediction for that set (``memory_cost_mb``) is stored next to it;
- warm switch among the preloaded engines: the ``Selector.switch`` call itself, and the first result after a
  switch minus the engine's steady latency (cold caches), p50/p99 over random switches;
- per-engine latency (median, p90): one more subprocess holding all configurations (plus ``standalone`` with
  prepacking off, which separates the cost of turning prepacking off from any cost of the pack itself) and
  interleaving them engine by engine and round by round, so a noisy shared machine hits all of them alike;
  ``pack-ort+arena`` (the optimized pack with ORT's per-session arena back on) prices the arena choice.

Stitch choice: with random-init anchors accuracy is unknown, so there is no accuracy Pareto set; the default is
every anchor plus 6 stitches evenly spaced in GFLOPs (the same rule as runtime_compare.py). ``--stitches all`` or
``--stitches ID,ID`` overrides it. The build cache is shared with runtime_compare.py (same plan, same export
settings), so do not run both on one ``--out`` at the same time.

Prints a table and writes ``<results>/pack_vs_standalone-<family>.json`` with the settings, the machine
(``device_fingerprint``), library versions and load averages. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SCHEMA_VERSION = 1
FAMILIES = {"demo": (["demo_s", "demo_m", "demo_l"], False), "deit": (["deit_s", "deit_b"], True)}
EVEN_SPACED = 6
# Same export settings as runtime_compare.py, so both scripts share one exported build.
EXPORT = {"opset": 18, "simplifier": "onnxsim", "batch": 1, "exporter": "torchscript"}
CONFIGS = {
    "standalone": {"files": "standalone", "runner": {"disable_prepacking": False}},
    "pack": {"files": "pack", "runner": {"disable_prepacking": True}},
    "pack+prepack": {"files": "pack", "runner": {"disable_prepacking": False}},
    "pack-ort": {"files": "pack-ort", "runner": {"disable_prepacking": False}},
    # OpenVINO (its runner's defaults: LATENCY hint, 1 stream, f32 precision hint, weights mapped)
    "ov-standalone": {"files": "standalone", "runner": {}, "backend": "openvino"},
    "ov-pack": {"files": "pack", "runner": {}, "backend": "openvino"},
}
# Only in the latency phase: isolates what turning prepacking off costs, with or without a pack.
LATENCY_ONLY = {
    "standalone-noprepack": {"files": "standalone", "runner": {"disable_prepacking": True}},
    # Packs run without a per-session activation arena (selector.PACK_RUNNER_DEFAULTS); this prices that choice.
    "pack-ort+arena": {"files": "pack-ort", "runner": {"disable_prepacking": False, "cpu_mem_arena": True}},
}
DEFAULTS = {
    # DeiT-B takes ~0.4 s per image on 2 shared cores: few rounds keep the run at a few minutes.
    "deit": {"rounds": 5, "per_round": 2, "switches": 30, "profile_iterations": 3},
    "demo": {"rounds": 20, "per_round": 10, "switches": 200, "profile_iterations": 20},
}
QUICK = {"rounds": 2, "per_round": 2, "switches": 10, "profile_iterations": 2}
DEVICE = "bench-pack"


# -------------------------------------------------------------------------------------------------------------
# Build, export, pack (parent process)
# -------------------------------------------------------------------------------------------------------------


def evenly_spaced(stitches: Sequence[Any], n: int = EVEN_SPACED) -> list:
    """Anchors plus ``n`` other stitches at equal GFLOPs steps from the cheapest to the dearest (inclusive);
    each step takes the nearest stitch not yet taken (ties: lower GFLOPs, then id)."""
    anchors = [s for s in stitches if s.is_anchor]
    pool = sorted((s for s in stitches if not s.is_anchor), key=lambda s: (s.gflops, s.id))
    chosen: list = []
    if len(pool) <= n:
        chosen = pool
    else:
        low, high = pool[0].gflops, pool[-1].gflops
        for i in range(n):
            target = low + (high - low) * (i / (n - 1) if n > 1 else 0.5)
            left = [s for s in pool if s not in chosen]
            chosen.append(min(left, key=lambda s: (abs(s.gflops - target), s.gflops, s.id)))
    return sorted(anchors + chosen, key=lambda s: (s.gflops, s.id))


def prepare(family: str, build_root: Path, choice: Optional[str], log) -> dict:
    from snexport.device.pack import ORT_PACK_DIR, optimize_pack, read_pack_index
    from snexport.export.pack import pack_stitches
    from snexport.export.stage import export_stitches
    from snexport.stitching.stage import stitch_stage

    names, random_init = FAMILIES[family]
    log(f"[{family}] stitch stage in {build_root}")
    build, _ = stitch_stage(build_root, names, random_init=random_init, show_progress=False)
    plan = build.load_plan()
    if choice in (None, "", "default"):
        stitches = evenly_spaced(plan.stitches)
        rule = f"anchors + {EVEN_SPACED} stitches evenly spaced in GFLOPs (random-init: no accuracy Pareto set)"
    elif choice == "all":
        stitches, rule = sorted(plan.stitches, key=lambda s: (s.gflops, s.id)), "all"
    else:
        stitches = [plan.get(i.strip()) for i in choice.split(",") if i.strip()]
        rule = "explicit"
    log(f"[{family}] {len(stitches)} stitches: {', '.join(s.id for s in stitches)}")
    net = build.load_snnet().eval()
    started = time.perf_counter()
    standalone = export_stitches(build.root, stitches, net.materialize, plan.anchors[0].input_shape,
                                 weights_hash=build.weights_hash(), **EXPORT)
    export_s = time.perf_counter() - started
    del net
    log(f"[{family}] pack (export took {export_s:.1f} s, up-to-date files skipped)")
    started = time.perf_counter()
    packed = pack_stitches(build.root, standalone)
    pack_s = time.perf_counter() - started
    log(f"[{family}] device-optimized pack (optimize_pack)")
    started = time.perf_counter()
    optimized = optimize_pack(build.root, standalone)
    optimize_s = time.perf_counter() - started
    return {"build": build, "plan": plan, "stitches": stitches, "rule": rule, "standalone": standalone,
            "packed": packed, "optimized": optimized,
            "pack_summary": read_pack_index(build.root)["weights"]["fp32"],
            "ort_pack_summary": read_pack_index(build.root, ORT_PACK_DIR)["weights"]["fp32"],
            "export_s": export_s, "pack_s": pack_s, "optimize_s": optimize_s}


def write_manifest_for(build_root: Path, plan, arts, name: str, alone: dict, fingerprint: dict,
                       backend: str = "onnxruntime") -> Path:
    """A manifest with the per-engine numbers measured alone (latency, memory), as `snexport bench` writes; each
    measurement names ``backend``, which the selector opens the engine with."""
    from snexport.device.bench import measurement_for_manifest
    from snexport.device.manifest import write_manifest
    from snexport.export.deploy import engine_entry

    engines = []
    for a in arts:
        entry = engine_entry(a, plan, {})
        entry["measurements"] = {DEVICE: dict(measurement_for_manifest(alone[a.stitch_id], None), pareto=True,
                                              backend=backend)}
        engines.append(entry)
    anchors = [{"name": x.name, "timm_name": x.timm_name, "depth": x.depth, "width": x.width, "gflops": x.gflops,
                "params": x.params} for x in plan.anchors]
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    data = {
        "schema_version": 1,
        "build": {"anchors": anchors, "plan": {"window": plan.settings.window, "stride": plan.settings.stride,
                                                "nearest": plan.settings.nearest, "two_way": plan.settings.two_way,
                                                "hash": plan.hash},
                  "snexport_version": _version("snexport") or "dev", "created_at": now},
        "devices": {DEVICE: {"profile": "x86-cpu", "fingerprint": fingerprint, "settings": {"bench": name},
                             "measured_at": now}},
        "engines": engines,
    }
    return write_manifest(build_root / f"bench-pack-{name}.manifest.json", data)


# -------------------------------------------------------------------------------------------------------------
# Fresh-process workers (no torch imported: their RSS is what a device app would have)
# -------------------------------------------------------------------------------------------------------------


def _status_bytes() -> dict:
    """RSS and PSS of this process, split into file-backed (the packs' weights) and anonymous (private copies)."""
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Rss", "Pss", "Pss_Anon", "Pss_File", "Anonymous"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _open(entry: dict, root: Path, runner: dict, threads: int, weights_maps: dict, backend: str = "onnxruntime"):
    from snexport.device.runtime.onnxruntime_runner import WeightsFileMap
    from snexport.device.selector import default_runner_factory

    def weights_map(path):
        key = Path(path).resolve()
        return weights_maps.setdefault(key, WeightsFileMap(key))

    return default_runner_factory(entry, root, weights_map=weights_map, backend=backend, threads=threads, **runner)


def _start_runtime(backend: str = "onnxruntime", threads: int = 1) -> None:
    """Create the runtime's process-wide environment with a throwaway one-node model.

    The first session of a process also sets up logging, allocators and the environment (tens of MB; OpenVINO also
    loads its CPU plugin, ~60 MB); a running app has paid that once, so it must not be charged to the first engine
    measured. A one-node model made here does it without touching any engine file (whose pages would then already
    be resident).
    """
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "warm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    session.run(None, {"x": np.zeros(1, np.float32)})
    onnx.load  # noqa: B018 - imported here so the runner's own import is not charged either
    if backend == "openvino":
        import tempfile

        from snexport.device.runtime.openvino_runner import OpenVinoRunner

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "warm.onnx"
            onnx.save(model, str(path))
            with OpenVinoRunner(path, threads=threads) as warm:  # its thread pool is sized by the first use
                warm.run(np.zeros(1, np.float32))


def worker_alone(spec: dict) -> dict:
    """One engine alone in a fresh process, through the library's profiler (what `snexport bench` stores)."""
    from snexport.device.profiling import profile_engine

    _start_runtime(spec["backend"], spec["threads"])
    maps: dict = {}
    root = Path(spec["root"])
    record = profile_engine(lambda: _open(spec["entry"], root, spec["runner"], spec["threads"], maps, spec["backend"]),
                            spec["settings"])
    record["file_size_bytes"] = spec["file_bytes"]
    return record


def worker_resident(spec: dict) -> dict:
    """All engines of one configuration preloaded by the Selector; RSS, load time, switches, prediction."""
    import numpy as np

    from snexport.device.profiling import process_rss_bytes, summarize_ms
    from snexport.device.selector import Selector

    _start_runtime(spec["backend"], spec["threads"])
    base, base_status = process_rss_bytes(), _status_bytes()
    t0 = time.perf_counter()
    sel = Selector(spec["manifest"], mode="preload", runner_options={"threads": spec["threads"], **spec["runner"]})
    load_all_s = time.perf_counter() - t0
    loaded = process_rss_bytes()
    ids = [e.id for e in sel.engines]
    x = {i: np.random.default_rng(0).standard_normal(sel.info(i).input_shape).astype(np.float32) for i in ids}
    for i in ids:  # first runs allocate arenas and touch every weight page
        sel.switch(i)
        sel.run(x[i])
    ran, ran_status = process_rss_bytes(), _status_bytes()

    rng = random.Random(0)
    switch_ms, first_ms, steady_ms = [], [], []
    current = sel.active.id
    for _ in range(spec["switches"]):
        target = rng.choice([i for i in ids if i != current])
        a = time.perf_counter_ns()
        sel.switch(target)
        b = time.perf_counter_ns()
        sel.run(x[target])
        c = time.perf_counter_ns()
        sel.run(x[target])
        d = time.perf_counter_ns()
        switch_ms.append((b - a) / 1e6)
        first_ms.append((c - b) / 1e6)
        steady_ms.append((d - c) / 1e6)
        current = target
    overhead = sorted(f - s for f, s in zip(first_ms, steady_ms))
    predicted = sel.memory_cost_mb(ids)
    shared = sel.shared_weights()
    sel.close()
    return {
        "engines": ids, "load_all_s": load_all_s,
        "rss_baseline_bytes": base, "rss_after_load_bytes": loaded, "rss_after_first_runs_bytes": ran,
        "rss_growth_bytes": ran - base,
        "pss_growth_bytes": ran_status["Pss"] - base_status["Pss"],
        "status_baseline": base_status, "status_after_first_runs": ran_status,
        "predicted_memory_cost_mb": predicted, "shared_weights": shared,
        "switch_call": summarize_ms(switch_ms), "first_run_after_switch": summarize_ms(first_ms),
        "first_run_overhead_ms": {"p50": overhead[len(overhead) // 2], "p99": overhead[int(0.99 * (len(overhead) - 1))]},
        "switches": len(switch_ms),
    }


def worker_latency(spec: dict) -> dict:
    """Every configuration resident at once; runs interleaved so machine drift hits all of them alike."""
    import numpy as np
    import onnxruntime  # noqa: F401

    from snexport.device.profiling import summarize_ms

    root = Path(spec["root"])
    maps: dict = {}
    runners = {}
    for cfg, entries in spec["entries"].items():
        for sid, entry in entries.items():
            c = spec["configs"][cfg]
            runners[(cfg, sid)] = _open(entry, root, c["runner"], spec["threads"], maps,
                                        c.get("backend", "onnxruntime"))
    samples: dict = {k: [] for k in runners}
    # One input for all: every stitch of a family takes the same image shape.
    x = np.random.default_rng(0).standard_normal(next(iter(runners.values())).input_shape).astype(np.float32)
    for runner in runners.values():
        runner.run(x)  # warm-up: first runs allocate arenas
    order = list(runners)
    rng = random.Random(1)
    for _ in range(spec["rounds"]):
        rng.shuffle(order)
        for key in order:
            for _ in range(spec["per_round"]):
                t0 = time.perf_counter_ns()
                runners[key].run(x)
                samples[key].append((time.perf_counter_ns() - t0) / 1e6)
    out: dict = {}
    for (cfg, sid), values in samples.items():
        out.setdefault(cfg, {})[sid] = summarize_ms(values)
    return out


WORKERS = {"alone": worker_alone, "resident": worker_resident, "latency": worker_latency}


def run_worker(kind: str, spec: dict) -> dict:
    """Run a worker in a fresh interpreter; it prints its JSON result as the last line of stdout."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", kind],
                          input=json.dumps(spec), capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------------------------------
# Orchestration and report
# -------------------------------------------------------------------------------------------------------------


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _entries(arts) -> dict:
    """Manifest-like entries (what ``default_runner_factory`` reads) for the workers that skip the selector."""
    from snexport.device.manifest import artifact_fields

    return {a.stitch_id: artifact_fields(a) for a in arts}


def run(family: str, cfg: dict, out_root: Path, results_dir: Path, choice: Optional[str], log) -> dict:
    from snexport.device.profiling import device_fingerprint

    load_before = os.getloadavg()
    started = time.perf_counter()
    prep = prepare(family, out_root / family, choice, log)
    build, plan = prep["build"], prep["plan"]
    root = build.root
    arts = {"standalone": [a for a in prep["standalone"] if a.precision == "fp32"],
            "pack": [a for a in prep["packed"] if a.precision == "fp32"],
            "pack-ort": [a for a in prep["optimized"] if a.precision == "fp32"]}
    fingerprint = device_fingerprint()
    threads = cfg["threads"]

    disk = {name: sum(a.size_bytes for a in files) + (files[0].weights_size_bytes or 0)
            for name, files in arts.items()}
    summary = prep["pack_summary"]

    # 1. Each engine alone, fresh process each: the manifest's per-engine numbers.
    prof = {"warmup": 1, "iterations": cfg["profile_iterations"], "min_duration_s": 0.0, "max_duration_s": 30.0,
            "evict_page_cache": False}
    configs = {name: CONFIGS[name] for name in cfg["configs"]}
    alone: dict = {}
    for cfg_name, c in configs.items():
        alone[cfg_name] = {}
        for a in arts[c["files"]]:
            log(f"[{family}] alone: {cfg_name} {a.stitch_id}")
            entry = _entries([a])[a.stitch_id]
            file_bytes = a.size_bytes + (a.weights_used_bytes or 0)
            alone[cfg_name][a.stitch_id] = run_worker("alone", {
                "root": str(root), "entry": entry, "runner": c["runner"], "threads": threads,
                "settings": prof, "file_bytes": file_bytes, "backend": c.get("backend", "onnxruntime")})
    manifests = {name: write_manifest_for(root, plan, arts[c["files"]], name, alone[name], fingerprint,
                                          c.get("backend", "onnxruntime"))
                 for name, c in configs.items()}

    # 2. All engines resident through the Selector, one fresh process per configuration.
    resident = {}
    for name, c in configs.items():
        log(f"[{family}] resident: {name}")
        resident[name] = run_worker("resident", {"manifest": str(manifests[name]), "threads": threads,
                                                 "runner": c["runner"], "switches": cfg["switches"],
                                                 "backend": c.get("backend", "onnxruntime")})

    # 3. Latency, all configurations in one process, interleaved.
    log(f"[{family}] latency, interleaved")
    lat_configs = {**configs, **LATENCY_ONLY}
    latency = run_worker("latency", {
        "root": str(root), "threads": threads, "rounds": cfg["rounds"], "per_round": cfg["per_round"],
        "configs": lat_configs,
        "entries": {name: _entries(arts[c["files"]]) for name, c in lat_configs.items()},
    })

    ids = [a.stitch_id for a in arts["standalone"]]
    doc = {
        "schema": SCHEMA_VERSION,
        "benchmark": "pack_vs_standalone",
        "family": family,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {**{k: v for k, v in cfg.items()}, "export": EXPORT, "configs": configs,
                     "latency_only_configs": LATENCY_ONLY, "profile_alone": prof, "stitch_rule": prep["rule"],
                     "align": summary["align"]},
        "machine": fingerprint,
        "versions": {d: _version(d) for d in ("onnxruntime", "openvino", "onnx", "numpy", "torch", "timm", "onnxsim")},
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "stitches": ids,
        "export_s": prep["export_s"], "pack_s": prep["pack_s"], "optimize_s": prep["optimize_s"],
        "pack": summary, "ort_pack": prep["ort_pack_summary"],
        "disk_bytes": disk,
        "alone": {n: {sid: {"rss_load_delta_bytes": r["memory"]["rss_load_delta_bytes"],
                            "cold_load_ms": r["load"]["cold_load_ms"]} for sid, r in rows.items()}
                  for n, rows in alone.items()},
        "resident": resident,
        "latency": latency,
        "total_s": time.perf_counter() - started,
    }
    doc["ratios"] = ratios(doc)
    results_dir.mkdir(parents=True, exist_ok=True)
    out = results_dir / f"pack_vs_standalone-{family}.json"
    from snexport.hashing import atomic_write_json

    atomic_write_json(out, doc)
    doc["results_file"] = str(out)
    return doc


def ratios(doc: dict) -> dict:
    distinct = doc["pack"]["distinct_bytes"]
    res, lat = doc["resident"], doc["latency"]
    out = {"disk_pack_over_standalone": doc["disk_bytes"]["pack"] / doc["disk_bytes"]["standalone"]}
    for name in res:
        out[f"pss_{name}_over_distinct_weights"] = res[name]["pss_growth_bytes"] / distinct
        out[f"rss_{name}_over_distinct_weights"] = res[name]["rss_growth_bytes"] / distinct
        out[f"rss_{name}_over_standalone"] = res[name]["rss_growth_bytes"] / res["standalone"]["rss_growth_bytes"]
        out[f"load_all_{name}_over_standalone"] = res[name]["load_all_s"] / res["standalone"]["load_all_s"]
    for name in lat:
        per = [lat[name][sid]["p50_ms"] / lat["standalone"][sid]["p50_ms"] for sid in doc["stitches"]]
        out[f"latency_p50_{name}_over_standalone"] = {"min": min(per), "max": max(per),
                                                      "geomean": _geomean(per)}
    return out


def _geomean(values: Sequence[float]) -> float:
    import math

    return math.exp(sum(math.log(v) for v in values) / len(values))


def print_report(doc: dict) -> None:
    mb = 1e6
    res, lat, r = doc["resident"], doc["latency"], doc["ratios"]
    p = doc["pack"]
    print(f"\npack vs standalone — {doc['family']}: {len(doc['stitches'])} engines ({doc['settings']['stitch_rule']})")
    cpu = doc["machine"].get("cpu") or {}
    print(f"machine: {cpu.get('model')} | {cpu.get('usable_cores')} usable cores | ORT {doc['versions']['onnxruntime']}"
          f" | threads {doc['settings']['threads']} | load avg {doc['load_average']['before'][0]:.1f}"
          f"→{doc['load_average']['after'][0]:.1f}")
    print(f"weights: distinct {p['distinct_bytes'] / mb:.1f} MB, in the standalone files {p['standalone_tensor_bytes'] / mb:.1f} MB "
          f"(dedup ×{p['dedup_ratio']:.2f}), padding {p['padding_bytes'] / 1e3:.0f} kB at {p['align'] // 1024} KiB alignment")
    o = doc["ort_pack"]
    print(f"pack-ort file: {o['weights_size_bytes'] / mb:.1f} MB = distinct weights + ORT's prepacked blobs "
          f"(dedup ×{o['dedup_ratio']:.2f}); pack {doc['pack_s']:.1f} s, optimize_pack {doc['optimize_s']:.1f} s")
    names = list(res)
    head = f"{'':36}" + "".join(f"{n:>15}" for n in names)
    print(head)

    def row(label, values, fmt):
        print(f"{label:36}" + "".join(f"{fmt(v):>15}" for v in values))

    disk = [doc["disk_bytes"][CONFIGS[n]["files"]] for n in names]
    row("bytes on disk (MB)", disk, lambda v: f"{v / mb:.1f}")
    row("RSS all loaded + run (MB)", [res[n]["rss_growth_bytes"] for n in names], lambda v: f"{v / mb:.1f}")
    row("PSS all loaded + run (MB)", [res[n]["pss_growth_bytes"] for n in names], lambda v: f"{v / mb:.1f}")
    row("  PSS ÷ distinct weights", [r[f"pss_{n}_over_distinct_weights"] for n in names], lambda v: f"{v:.2f}×")

    def split(n):
        after, before = res[n]["status_after_first_runs"], res[n]["status_baseline"]
        return after["Pss_File"] - before["Pss_File"], after["Pss_Anon"] - before["Pss_Anon"]

    row("  PSS file-backed / anon (MB)", [split(n) for n in names], lambda v: f"{v[0] / mb:.0f}/{v[1] / mb:.0f}")
    row("selector's predicted cost (MB)", [res[n]["predicted_memory_cost_mb"] for n in names], lambda v: f"{v:.1f}")
    row("time to load all (s)", [res[n]["load_all_s"] for n in names], lambda v: f"{v:.2f}")
    row("switch call p50/p99 (ms)", [res[n]["switch_call"] for n in names],
        lambda v: f"{v['p50_ms']:.3f}/{v['p99_ms']:.3f}")
    row("1st run after switch −steady p50/p99", [res[n]["first_run_overhead_ms"] for n in names],
        lambda v: f"{v['p50']:.1f}/{v['p99']:.1f}")
    print("\nlatency p50 (ms), interleaved in one process; ratio to standalone")
    lat_names = list(lat)
    print(f"{'stitch':22}" + "".join(f"{n:>21}" for n in lat_names))
    for sid in doc["stitches"]:
        base = lat["standalone"][sid]["p50_ms"]
        print(f"{sid:22}" + "".join(
            f"{lat[n][sid]['p50_ms']:>12.1f} ({lat[n][sid]['p50_ms'] / base:4.2f}×)" for n in lat_names))
    print(f"{'geomean ratio':22}" + "".join(f"{r[f'latency_p50_{n}_over_standalone']['geomean']:>20.3f}×"
                                            for n in lat_names))
    print(f"\nresults: {doc.get('results_file')}  (total {doc['total_s']:.0f} s)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=sorted(FAMILIES), default="deit")
    p.add_argument("--stitches", default=None, help="default | all | ID,ID (default: anchors + 6 evenly spaced)")
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: usable cores)")
    p.add_argument("--rounds", type=int, default=None, help="latency rounds (each runs every engine of every config)")
    p.add_argument("--per-round", type=int, default=None, help="timed runs per engine per round")
    p.add_argument("--switches", type=int, default=None, help="random warm switches timed per configuration")
    p.add_argument("--profile-iterations", type=int, default=None, help="timed runs per engine alone")
    p.add_argument("--quick", action="store_true", help="minimal iterations (smoke test)")
    p.add_argument("--configs", default=None,
                   help=f"comma-separated, of {', '.join(CONFIGS)} (default: all; the OpenVINO ones where it is "
                        "installed); standalone is always measured (the ratios' base)")
    p.add_argument("--out", type=Path, default=HERE / ".builds", help="build-dir cache root (OUT/<family>)")
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        result = WORKERS[args.worker](json.loads(sys.stdin.read()))
        print(json.dumps(result, default=str))
        return 0

    from snexport.device.runtime.onnxruntime_runner import default_threads

    cfg = dict(DEFAULTS[args.family], **(QUICK if args.quick else {}))
    for key in ("rounds", "per_round", "switches", "profile_iterations"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    cfg["threads"] = args.threads or default_threads()
    cfg["quick"] = bool(args.quick)
    from snexport.device.runtime.backends import runtime_available

    wanted = [c.strip() for c in (args.configs or ",".join(CONFIGS)).split(",") if c.strip()]
    unknown = [c for c in wanted if c not in CONFIGS]
    if unknown:
        p.error(f"unknown --configs {', '.join(unknown)}; use some of {', '.join(CONFIGS)}")
    missing = {c: runtime_available(CONFIGS[c]["backend"])[1] for c in wanted
               if "backend" in CONFIGS[c] and not runtime_available(CONFIGS[c]["backend"])[0]}
    if missing and args.configs:
        p.error(f"cannot measure {', '.join(missing)}: {next(iter(missing.values()))}")
    cfg["configs"] = [c for c in CONFIGS if c == "standalone" or (c in wanted and c not in missing)]
    cfg["skipped_configs"] = missing

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    doc = run(args.family, cfg, args.out, args.results, args.stitches, log)
    print_report(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
