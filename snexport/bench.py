"""`snexport bench`: profile a build's engines on the machine it runs on and update the manifest.

Per engine: cold load (file → first result), latency percentiles, memory, then the warm switch time from the
previous engine with every engine resident (what a preloading selector pays). Results go to profile.jsonl (this
device's lines replaced, others kept) and into manifest.json; the Pareto set is re-selected on measured
latency and memory, since FLOPs order is not latency order.
"""

from __future__ import annotations

import json
from typing import Optional

from snexport.errors import BackendUnavailableError
from snexport.hashing import atomic_write_text


def _runner_factory(build, art, profile, net):
    from snexport.runtime import open_runner

    if profile.backend == "torch":
        import torch

        from snexport.runtime.torch_runner import TorchRunner

        device = "cuda" if torch.cuda.is_available() else "cpu"
        module = net.materialize(art.stitch_id)
        return lambda: TorchRunner(module, tuple(art.input_shape), device=device, cuda_graphs=device == "cuda")
    options = profile.runner_options()
    return lambda: open_runner(build.root / art.file, **options)


def measurement_for_manifest(stats: dict, switch: Optional[dict]) -> dict:
    lat = stats["latency"]
    mem = stats["memory"]
    cuda = mem.get("cuda_load_delta_bytes")
    return {
        "latency_ms": {k: round(float(lat[f"{k}_ms"]), 6) for k in ("mean", "std", "min", "p50", "p90", "p99", "max")}
        | {"iterations": int(lat["iterations"])},
        "throughput_ips": round(float(lat["throughput_per_s"]), 3),
        "memory": {
            "rss_load_delta_mb": round((mem.get("rss_load_delta_bytes") or 0) / 1e6, 3),
            "rss_peak_mb": round((mem.get("rss_peak_during_runs_bytes") or 0) / 1e6, 3),
            "file_mb": round((stats.get("file_size_bytes") or 0) / 1e6, 3),
            "device_delta_mb": None if cuda is None else round(cuda / 1e6, 3),
        },
        "load_ms": {
            "cold": round(float(stats["load"]["cold_load_ms"]), 3),
            "switch_p50": None if switch is None else round(float(switch["switch"]["p50_ms"]), 4),
            "switch_p99": None if switch is None else round(float(switch["switch"]["p99_ms"]), 4),
        },
        "pareto": False,
    }


def bench_stage(build, profile, show_progress: bool = True, switch_repeats: int = 20) -> dict:
    from snexport.manifest import device_key as make_device_key
    from snexport.pareto import select_candidates
    from snexport.selection import memory_for_pareto
    from snexport.pipeline import deployable, engines_stage, prepare_pack, runtime_available, write_manifest_for
    from snexport.profiling import device_fingerprint, measure_switch, measurement_record, profile_engine
    from snexport.progress import progress_task

    ok, why = runtime_available(profile.backend)
    if not ok:
        raise BackendUnavailableError(f"cannot profile for {profile.name}: {why}; run `snexport bench` on the "
                                      "target device (the ONNX files are ready)")
    if profile.backend == "tensorrt":
        engines_stage(build, profile, show_progress)
    prepare_pack(build, profile, show_progress)
    arts = deployable(build, profile)
    if not arts:
        raise BackendUnavailableError(f"{build.root} has no valid engine files for {profile.name}; run "
                                      f"`snexport export {build.root}` first")
    net = build.load_snnet() if profile.backend == "torch" else None
    fingerprint = device_fingerprint()
    key = make_device_key(fingerprint, profile.name)
    settings = {"profile": profile.name, "backend": profile.backend, "precision": profile.precision,
                "threads": profile.threads, "measurement": profile.measurement.to_dict()}

    # One throwaway load first: the runtime's once-per-process setup (thread pools, allocators) must not be
    # billed to whichever engine happens to be measured first.
    warm = _runner_factory(build, arts[0], profile, net)()
    warm.load()
    warm.close()
    stats: dict[str, dict] = {}
    with progress_task(f"profiling {len(arts)} engines ({profile.name})", len(arts), show_progress) as advance:
        for a in arts:
            stats[a.stitch_id] = profile_engine(_runner_factory(build, a, profile, net), profile)
            stats[a.stitch_id]["file_size_bytes"] = a.size_bytes
            advance()
    # Warm switches with every engine resident, in latency order: previous engine -> this one.
    switches: dict[str, dict] = {}
    runners = []
    try:
        order = sorted(arts, key=lambda a: stats[a.stitch_id]["latency"]["p50_ms"])
        with progress_task("measuring warm switches", len(order), show_progress) as advance:
            for a in order:
                r = _runner_factory(build, a, profile, net)()
                r.load()
                runners.append((a, r))
            import numpy as np

            x = np.random.default_rng(0).standard_normal(tuple(order[0].input_shape)).astype(np.float32)
            if profile.backend == "torch":
                import torch

                x = torch.from_numpy(x)
            for i, (a, r) in enumerate(runners):
                prev = runners[i - 1][1] if i else runners[-1][1]
                if prev is not r:
                    switches[a.stitch_id] = measure_switch(prev, r, x, repeats=switch_repeats)
                advance()
    finally:
        for _, r in runners:
            r.close()

    evals = build.read_eval()
    rows = []
    for a in arts:
        top1 = evals[a.stitch_id].top1 if a.stitch_id in evals else None
        lat = stats[a.stitch_id]["latency"]
        rows.append({"id": a.stitch_id, "top1": top1, "latency_p50_ms": lat["p50_ms"],
                     "memory_mb": memory_for_pareto(stats[a.stitch_id]["memory"].get("rss_load_delta_bytes"))})
    chosen = select_candidates(rows, by=["latency_p50_ms", "memory_mb"], accuracy_key="top1")
    pareto = {c["record"]["id"] for c in chosen}
    if not all(r["top1"] is not None for r in rows):
        # Unknown accuracy: "Pareto" degenerates to every engine; flag only the latency/memory front instead.
        from snexport.pareto import pareto_front

        pareto = {r["id"] for r in pareto_front(rows, {"latency_p50_ms": "min", "memory_mb": "min"})}

    # profile.jsonl: replace this device's lines, keep the others.
    kept = []
    if build.profile_path.is_file():
        for line in build.profile_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if isinstance(row, dict) and row.get("device_key") != key:
                kept.append(line)
    for a in arts:
        rec = measurement_record(a.stitch_id, a.file, profile.backend, dict(stats[a.stitch_id],
                                 switch=switches.get(a.stitch_id)), fingerprint, settings)
        rec["device_key"] = key
        kept.append(json.dumps(rec))
    atomic_write_text(build.profile_path, "\n".join(kept) + "\n")

    measurements = {a.stitch_id: measurement_for_manifest(stats[a.stitch_id], switches.get(a.stitch_id)) for a in arts}
    device_info = {"profile": profile.name, "fingerprint": fingerprint, "settings": settings}
    manifest = write_manifest_for(build, arts, profile.name, measurements, key, device_info, sorted(pareto))
    return {"device_key": key, "engines": len(arts), "pareto": sorted(pareto), "measurements": measurements,
            "manifest": manifest, "rows": rows}
