"""`snexport bench`: profile a build's (or a bundle's) engines on the machine it runs on and update the manifest.

Per engine: cold load (file → first result), latency percentiles, memory, then the warm switch time from the
previous engine with every engine resident (what a preloading selector pays). Results go to profile.jsonl (this
device's lines replaced, others kept) and into manifest.json; the Pareto set is re-selected on measured
latency and memory, since FLOPs order is not latency order.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Optional

from snexport import buildfiles as files
from snexport.buildfiles import read_jsonl
from snexport.errors import BackendUnavailableError, BuildDirError
from snexport.hashing import atomic_write_text

log = logging.getLogger("snexport")


def _runner_factory(build, art, profile, module_factory):
    if profile.backend == "torch":
        from snexport.device.runtime.backends import cuda_device_count
        from snexport.device.runtime.torch_runner import TorchRunner

        device = "cuda" if cuda_device_count() else "cpu"
        module = module_factory(art.stitch_id)
        return lambda: TorchRunner(module, tuple(art.input_shape), device=device, cuda_graphs=device == "cuda")
    from snexport.device.runtime import open_runner

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


def prepare_pack(build, profile, show_progress: bool = True) -> list:
    """The device step for ONNX Runtime packs: optimize the current portable pack for this CPU and ORT version."""
    from snexport.device import deployset
    from snexport.device.pack import optimize_pack
    from snexport.progress import progress_task

    if profile.backend != "onnxruntime":
        return []
    portable = deployset.complete_pack(build, files.PACK_DIR, deployset.onnx_for(build, profile.precision))
    if not portable:
        if build.path(files.PACK_DIR).is_dir():
            log.warning("the shared-weight pack does not match the current export (file missing, altered or from "
                        "an earlier export); profiling the standalone files. Re-run `snexport export` to repack")
        return []
    with progress_task("optimizing the weight pack for this device", len(portable), show_progress) as advance:
        return optimize_pack(build.root, portable, progress=advance)


def bundle_target(build) -> Optional[str]:
    """The profile a bundle was made for: its own copy of the TOML, else the name the manifest records."""
    if build.path(files.DEVICE_PROFILE).is_file():
        return str(build.path(files.DEVICE_PROFILE))
    if build.manifest_path.is_file():
        from snexport.device.manifest import read_manifest

        return read_manifest(build.manifest_path)["build"].get("target_profile")
    return None


def host_facts(build) -> dict[str, dict]:
    """stitch id -> the host's facts of it (route, accuracy, cost), from the manifest `snexport export` wrote."""
    from snexport.device.manifest import STATIC_ENGINE_FIELDS, read_manifest

    if not build.manifest_path.is_file():
        raise BuildDirError(f"{build.root} has no {files.MANIFEST}; run `snexport export` on the host (it writes the "
                            "manifest the device fills in) and copy the build or bundle again")
    doc = read_manifest(build.manifest_path)
    return {e["stitch_id"]: {k: e[k] for k in STATIC_ENGINE_FIELDS} for e in doc["engines"]}


def bench_stage(build, profile, show_progress: bool = True, switch_repeats: int = 20,
                module_factory: Optional[Callable[[str], Any]] = None) -> dict:
    """Profile the engines of a build directory or bundle (``BuildFiles``) for ``profile`` and update the manifest.

    ``module_factory(stitch_id) -> nn.Module`` is needed only for the torch backend (profiling PyTorch itself),
    which the host passes; every other backend runs engine files and needs nothing of the host.
    """
    from snexport.device import deployset
    from snexport.device.manifest import assemble_manifest, engine_entry, engine_memory_mb, merge_measurements
    from snexport.device.manifest import device_key as make_device_key
    from snexport.device.manifest import read_manifest, write_manifest
    from snexport.device.pareto import measured_front, memory_for_pareto
    from snexport.device.profiling import device_fingerprint, measure_switch, measurement_record, profile_engine
    from snexport.device.runtime.backends import runtime_available
    from snexport.device.tensorrt_build import engines_stage
    from snexport.progress import progress_task

    ok, why = runtime_available(profile.backend)
    if not ok:
        raise BackendUnavailableError(f"cannot profile for {profile.name}: {why}; run `snexport bench` on the "
                                      "target device (the ONNX files are ready)")
    if profile.backend == "torch" and module_factory is None:
        raise BackendUnavailableError("the torch backend profiles PyTorch modules, which needs the build's SN-Net "
                                      "weights and the host toolchain (pip install 'snexport[build]')")
    facts = host_facts(build)
    if profile.backend == "tensorrt":
        engines_stage(build, profile, show_progress)
    prepare_pack(build, profile, show_progress)
    arts = deployset.deployable(build, profile)
    if not arts:
        raise BackendUnavailableError(f"{build.root} has no valid engine files for {profile.name}; run "
                                      f"`snexport export {build.root}` first")
    missing = [a.stitch_id for a in arts if a.stitch_id not in facts]
    if missing:
        raise BuildDirError(f"{build.manifest_path} does not list {', '.join(missing[:3])}; re-run `snexport export` "
                            "on the host so the manifest matches the engines")
    fingerprint = device_fingerprint()
    key = make_device_key(fingerprint, profile.name)
    settings = {"profile": profile.name, "backend": profile.backend, "precision": profile.precision,
                "threads": profile.threads, "measurement": profile.measurement.to_dict()}

    # One throwaway load first: the runtime's once-per-process setup (thread pools, allocators) must not be
    # billed to whichever engine happens to be measured first.
    warm = _runner_factory(build, arts[0], profile, module_factory)()
    warm.load()
    warm.close()
    stats: dict[str, dict] = {}
    with progress_task(f"profiling {len(arts)} engines ({profile.name})", len(arts), show_progress) as advance:
        for a in arts:
            stats[a.stitch_id] = profile_engine(_runner_factory(build, a, profile, module_factory), profile)
            stats[a.stitch_id]["file_size_bytes"] = a.size_bytes
            advance()
    # Warm switches with every engine resident, in latency order: previous engine -> this one.
    switches: dict[str, dict] = {}
    runners = []
    try:
        order = sorted(arts, key=lambda a: stats[a.stitch_id]["latency"]["p50_ms"])
        with progress_task("measuring warm switches", len(order), show_progress) as advance:
            for a in order:
                r = _runner_factory(build, a, profile, module_factory)()
                r.load()
                runners.append((a, r))
            import numpy as np

            x = np.random.default_rng(0).standard_normal(tuple(order[0].input_shape)).astype(np.float32)
            for i, (a, r) in enumerate(runners):
                prev = runners[i - 1][1] if i else runners[-1][1]
                if prev is not r:
                    switches[a.stitch_id] = measure_switch(prev, r, x, repeats=switch_repeats)
                advance()
    finally:
        for _, r in runners:
            r.close()

    measurements = {a.stitch_id: measurement_for_manifest(stats[a.stitch_id], switches.get(a.stitch_id)) for a in arts}
    rows = [{"id": a.stitch_id, "top1": facts[a.stitch_id]["accuracy"]["top1"],
             "latency_p50_ms": measurements[a.stitch_id]["latency_ms"]["p50"],
             "memory_mb": memory_for_pareto(engine_memory_mb(measurements[a.stitch_id]))} for a in arts]
    pareto = set(measured_front(rows))

    # profile.jsonl: replace this device's lines, keep the others.
    kept = [json.dumps(row) for row in read_jsonl(build.profile_path) if row.get("device_key") != key]
    for a in arts:
        rec = measurement_record(a.stitch_id, a.file, profile.backend, dict(stats[a.stitch_id],
                                 switch=switches.get(a.stitch_id)), fingerprint, settings)
        rec["device_key"] = key
        kept.append(json.dumps(rec))
    atomic_write_text(build.profile_path, "\n".join(kept) + "\n")

    section = read_manifest(build.manifest_path)["build"]
    doc = assemble_manifest(build.manifest_path, section, [engine_entry(facts[a.stitch_id], a) for a in arts])
    device_info = {"profile": profile.name, "fingerprint": fingerprint, "settings": settings}
    manifest = merge_measurements(doc, key, device_info, measurements, sorted(pareto))
    write_manifest(build.manifest_path, manifest)
    return {"device_key": key, "engines": len(arts), "pareto": sorted(pareto), "measurements": measurements,
            "manifest": manifest, "rows": rows}
