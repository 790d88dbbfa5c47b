"""`snexport bench`: profile a build's (or a bundle's) engines on the machine it runs on and update the manifest.

Per engine: cold load (file → first result), latency percentiles, memory, then the warm switch time from the
previous engine with every engine resident (what a preloading selector pays). Results go to profile.jsonl (this
device's lines replaced, others kept) and into manifest.json; the Pareto set is re-selected on measured
latency and memory, since FLOPs order is not latency order.

Several runtimes per engine (issue 13): on a CPU profile every installed CPU backend of the table is measured
(``backends``; `--backends ort,openvino`), each engine on each, all in the same interleaved rounds. A backend the
export did not validate with (OpenVINO) is first gated on the FP32 reference logits the host shipped. Each engine
then runs on its best backend (``pareto.best_backend``: fastest beyond the noise, ties to the smaller in memory):
its manifest entry names that backend's file and carries that backend's numbers, runner settings and the others'
figures (``by_backend``); the front is taken over engines on their chosen backends. One point per engine, not per
(engine, backend): the selector's unit is the engine, and a front holding one stitch on two runtimes would make
a preloading selector keep it twice for no accuracy gained.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Optional, Sequence

from snexport import buildfiles as files
from snexport.buildfiles import read_jsonl
from snexport.errors import BackendUnavailableError, BuildDirError
from snexport.hashing import atomic_write_text

log = logging.getLogger("snexport")


def _runner_factory(build, art, profile, module_factory, backend: Optional[str] = None):
    backend = backend or profile.backend
    if backend == "torch":
        from snexport.device.runtime.backends import cuda_device_count
        from snexport.device.runtime.torch_runner import TorchRunner

        device = "cuda" if cuda_device_count() else "cpu"
        module = module_factory(art.stitch_id)
        return lambda: TorchRunner(module, tuple(art.input_shape), device=device, cuda_graphs=device == "cuda")
    from snexport.device.runtime import open_runner

    options = profile.runner_options(backend)
    return lambda: open_runner(build.root / art.file, backend=backend, **options)


def bench_backends(profile, requested: Optional[Sequence[str]] = None) -> list[str]:
    """The backends `snexport bench` measures under ``profile``: ``requested`` (names or aliases), else the
    profile's ``backends`` (both checked installed), else every installed CPU backend of the table for a CPU
    profile, else the profile's backend."""
    from snexport.device.runtime.backends import BACKENDS, cpu_backends, resolve_backend, runtime_available

    own = BACKENDS[profile.backend]
    requested = requested or getattr(profile, "backends", ())
    if requested:
        names = list(dict.fromkeys(resolve_backend(n) for n in requested))
        others = [n for n in names if n != profile.backend and not (own.cpu and BACKENDS[n].cpu)]
        if others:
            allowed = ", ".join(cpu_backends(installed_only=False)) if own.cpu else profile.backend
            raise BackendUnavailableError(f"profile {profile.name} runs {own.label}; it can be measured with "
                                          f"{allowed}, not {', '.join(others)}")
        for name in names:
            ok, why = runtime_available(name)
            if not ok:
                raise BackendUnavailableError(f"cannot profile with {BACKENDS[name].label}: {why}")
        return names
    if own.cpu:
        found = cpu_backends()
        if found:
            return sorted(found, key=lambda n: n != profile.backend)  # the profile's own first
    ok, why = runtime_available(profile.backend)
    if not ok:
        raise BackendUnavailableError(f"cannot profile for {profile.name}: {why}; run `snexport bench` on the "
                                      "target device (the ONNX files are ready)")
    return [profile.backend]


def measurement_for_manifest(stats: dict, switch: Optional[dict]) -> dict:
    """One engine's profile.jsonl statistics as the manifest's measurement (schema: $defs/measurement)."""
    lat = stats["latency"]
    mem = stats["memory"]
    cuda = mem.get("cuda_load_delta_bytes")
    out = {
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
    if "p50_ci_ms" in lat:
        out["latency_noise"] = {"p50_ci": [round(float(v), 6) for v in lat["p50_ci_ms"]],
                                "ci_level": float(lat["ci_level"]), "rounds": int(lat["rounds"]),
                                "round_p50_spread": round(float(lat["round_p50_spread_ms"]), 6)}
    if "energy" in stats:
        e = stats["energy"]
        out["energy"] = {"mj_per_inference": _round(e.get("energy_mj_per_inference"), 6),
                         "mean_power_w": _round(e.get("mean_power_w"), 4), "source": e.get("source"),
                         "reason": e.get("reason")}
    return out


def _round(value, digits: int):
    return None if value is None else round(float(value), digits)


def prepare_pack(build, profile, show_progress: bool = True, backends: Optional[Sequence[str]] = None) -> list:
    """The device step for ONNX Runtime packs: optimize the current portable pack for this CPU and ORT version."""
    from snexport.device import deployset
    from snexport.device.pack import optimize_pack
    from snexport.progress import progress_task

    if "onnxruntime" not in (backends or [profile.backend]):
        return []
    # One pack per precision (the profile's, and int8 when exported); optimize those that are complete.
    packs = [deployset.complete_pack(build, files.PACK_DIR, deployset.onnx_records(build, p))
             for p in deployset.ort_precisions(build, profile)]
    portable = [a for pack in packs for a in pack]
    if not all(packs):
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
    # The FP32 entry's facts when a stitch has several files (an int8 file's accuracy is its own: engine_facts).
    ordered = sorted(doc["engines"], key=lambda e: e["precision"] != "fp32")
    facts: dict[str, dict] = {}
    for e in ordered:
        facts.setdefault(e["stitch_id"], {k: e[k] for k in STATIC_ENGINE_FIELDS})
    return facts


def engine_facts(build) -> dict[tuple[str, str], dict]:
    """(stitch id, precision) -> the host's facts of that file (``facts_for`` picks one for an engine file)."""
    from snexport.device.manifest import STATIC_ENGINE_FIELDS, read_manifest

    host_facts(build)  # the same clear error when there is no manifest
    doc = read_manifest(build.manifest_path)
    return {(e["stitch_id"], e["precision"]): {k: e[k] for k in STATIC_ENGINE_FIELDS} for e in doc["engines"]}


def facts_for(facts: dict[tuple[str, str], dict], art) -> Optional[dict]:
    """The host's facts for an engine file: those of its own precision (an int8 file's measured accuracy), else the
    FP32 file's it was built from (a TensorRT engine of the FP32 ONNX), else None."""
    return facts.get((art.stitch_id, art.precision)) or facts.get((art.stitch_id, "fp32"))


def bench_stage(build, profile, show_progress: bool = True, switch_repeats: int = 20,
                module_factory: Optional[Callable[[str], Any]] = None, quick: bool = False,
                backends: Optional[Sequence[str]] = None) -> dict:
    """Profile the engines of a build directory or bundle (``BuildFiles``) for ``profile`` and update the manifest.

    ``module_factory(stitch_id) -> nn.Module`` is needed only for the torch backend (profiling PyTorch itself),
    which the host passes; every other backend runs engine files and needs nothing of the host. ``backends``:
    the runtimes to measure each engine on (``bench_backends``; default: every installed CPU backend on a CPU
    profile, else the profile's own).
    """
    from snexport.device import deployset
    from snexport.device.manifest import (assemble_manifest, engine_entry, engine_ids, engine_memory_mb,
                                          merge_measurements)
    from snexport.device.manifest import device_key as make_device_key
    from snexport.device.manifest import read_manifest, write_manifest
    from snexport.device.energy import open_energy_sensor
    from snexport.device.pareto import best_backend, memory_for_pareto, noise_aware_front
    from snexport.device.profiling import device_fingerprint, measure_switch, measurement_record, profile_engine
    from snexport.device.rounds import run_rounds
    from snexport.device.runtime.backends import BACKENDS
    from snexport.device.tensorrt_build import engines_stage
    from snexport.errors import SnexportError
    from snexport.progress import progress_task

    backends = bench_backends(profile, backends)
    if "torch" in backends and module_factory is None:
        raise BackendUnavailableError("the torch backend profiles PyTorch modules, which needs the build's SN-Net "
                                      "weights and the host toolchain (pip install 'snexport[build]')")
    facts = engine_facts(build)
    if "tensorrt" in backends:
        engines_stage(build, profile, show_progress)
    prepare_pack(build, profile, show_progress, backends)
    # One engine per (stitch, format, precision); each backend that runs it (its own file: ONNX Runtime's
    # optimized pack, OpenVINO's portable one) is a way to run that engine.
    variants: dict[tuple, dict[str, Any]] = {}
    for backend in backends:
        for a in deployset.backend_files(build, profile, backend):
            variants.setdefault((a.stitch_id, a.format, a.precision), {})[backend] = a
    if not variants:
        raise BackendUnavailableError(f"{build.root} has no valid engine files for {profile.name}; run "
                                      f"`snexport export {build.root}` first")
    missing = [kind[0] for kind, per in variants.items() if facts_for(facts, next(iter(per.values()))) is None]
    if missing:
        raise BuildDirError(f"{build.manifest_path} does not list {', '.join(missing[:3])}; re-run `snexport export` "
                            "on the host so the manifest matches the engines")
    fingerprint = device_fingerprint()
    key = make_device_key(fingerprint, profile.name)
    rounds = profile.measurement.round_settings(quick)
    sensor = open_energy_sensor(profile.energy_sensor)
    # Each file is an engine of its own (two precisions of one stitch: "stitch#onnx-int8", manifest.engine_ids).
    engines = dict(zip(engine_ids([next(iter(v.values())) for v in variants.values()]), variants.values()))
    many = len(backends) > 1
    # What is timed: one runner per (engine, backend), "engine@backend" when several backends are measured.
    keyed = {(f"{e}@{b}" if many else e): (e, b, a) for e, per in engines.items() for b, a in per.items()}
    factories = {k: _runner_factory(build, a, profile, module_factory, b) for k, (e, b, a) in keyed.items()}

    # One throwaway load per runtime first: its once-per-process setup (thread pools, allocators, plugins) must
    # not be billed to whichever engine happens to be measured first.
    for backend in backends:
        first = next((k for k, (_, b, _) in keyed.items() if b == backend), None)
        if first is not None:
            try:
                warm = factories[first]()
                warm.load()
                warm.close()
            except SnexportError:  # a runtime that cannot run this file: check_backends says so per engine
                if BACKENDS[backend].validated_where_made:
                    raise
    refused, checks = check_backends(build, profile, keyed, factories, show_progress)
    refusals = {keyed[k][:2]: why for k, why in refused.items()}  # (engine, backend) -> why
    for k in refused:
        del keyed[k]
    unrun = [e for e in engines if not any(e == ke for ke, _, _ in keyed.values())]
    if unrun:
        reasons = "; ".join(why for (e, _), why in refusals.items() if e == unrun[0])
        raise BackendUnavailableError(f"no measured backend runs {unrun[0]} correctly ({reasons}); measure it with "
                                      f"{profile.backend} (`snexport bench --backends {profile.backend}`)")
    # 1. Cold load and memory, one engine at a time (the RSS sampler thread runs here, never beside the clock).
    stats: dict[str, dict] = {}
    with progress_task(f"cold load and memory of {len(keyed)} engines", len(keyed), show_progress) as advance:
        for k, (_, _, a) in keyed.items():
            stats[k] = profile_engine(factories[k], profile, time_latency=False)
            stats[k]["file_size_bytes"] = a.size_bytes
            advance()
    runners: dict[str, Any] = {}
    switches: dict[str, dict] = {}
    chosen: dict[str, str] = {}
    try:
        # 2. Latency in interleaved rounds, every engine resident (as a preloading selector keeps them); every
        # backend's runners in the same rounds, so the machine's drift hits each runtime alike.
        import numpy as np

        for k in keyed:
            runners[k] = factories[k]()
            runners[k].load()
        inputs = {k: np.random.default_rng(0).standard_normal(tuple(a.input_shape)).astype(np.float32)
                  for k, (_, _, a) in keyed.items()}
        runs = {k: (lambda r=r, x=inputs[k]: r.run(x)) for k, r in runners.items()}
        counter = sensor if sensor.available and not sensor.samples_during_window else None
        blocks = rounds.rounds * len(keyed)
        with progress_task(f"timing {len(keyed)} engines in {rounds.rounds} interleaved rounds ({profile.name})",
                           blocks, show_progress) as advance:
            timing = run_rounds(runs, rounds, energy=counter, progress=advance)
        energy = {k: t.pop("energy") for k, t in timing.items() if "energy" in t}
        if sensor.available and sensor.samples_during_window:
            energy = energy_rounds(runs, sensor, rounds, show_progress)
        for k in stats:
            stats[k]["latency"] = timing[k]
            stats[k]["energy"] = energy.get(k) or {"energy_mj_per_inference": None, "mean_power_w": None,
                                                   "reason": sensor.reason or "no energy reading"}
        # The backend each engine runs on: the fastest beyond the noise (pareto.best_backend).
        for e in engines:
            measured = {b: {"latency_p50_ms": stats[k]["latency"]["p50_ms"],
                            "latency_ci_ms": stats[k]["latency"]["p50_ci_ms"],
                            "memory_mb": memory_for_pareto(engine_memory_mb(measurement_for_manifest(stats[k], None)))}
                        for k, (ke, b, _) in keyed.items() if ke == e}
            chosen[e] = best_backend(measured, preference=backends)
        picked = {e: next(k for k, (ke, b, _) in keyed.items() if ke == e and b == chosen[e]) for e in engines}
        for k in [k for k in runners if k not in picked.values()]:  # the selector keeps only the chosen ones
            runners.pop(k).close()
        # 3. Warm switches with the chosen engines resident, in latency order: previous engine -> this one.
        order = sorted(engines, key=lambda e: stats[picked[e]]["latency"]["p50_ms"])
        with progress_task("measuring warm switches", len(order), show_progress) as advance:
            for i, e in enumerate(order):
                prev = runners[picked[order[i - 1]]] if i else runners[picked[order[-1]]]
                if prev is not runners[picked[e]]:
                    switches[e] = measure_switch(prev, runners[picked[e]], inputs[picked[e]], repeats=switch_repeats)
                advance()
    finally:
        for r in runners.values():
            r.close()
        sensor.close()
    runner_settings = {}
    for k, (_, b, _) in keyed.items():
        runner_settings.setdefault(b, stats[k].get("runner_settings"))
    settings = {"profile": profile.name, "backend": profile.backend, "backends": list(backends),
                "precision": profile.precision, "threads": profile.threads,
                "measurement": profile.measurement.to_dict(),
                "method": dict(rounds.method(), quick=bool(quick)),
                "runner": runner_settings.get(profile.backend) or next(iter(runner_settings.values())),
                "runners": runner_settings,
                "energy_sensor": sensor.describe() if sensor.available else {"kind": profile.energy_sensor,
                                                                             "available": False,
                                                                             "reason": sensor.reason}}

    measurements = {}
    for e, k in picked.items():
        m = measurement_for_manifest(stats[k], switches.get(e))
        m["backend"], m["runner"] = chosen[e], stats[k].get("runner_settings") or {}
        if many:
            m["by_backend"] = backend_figures(e, keyed, stats, refusals, checks, engines[e])
        measurements[e] = m
    # Every engine on its own numbers: an int8 file's own measured accuracy and latency, never its FP32 source's.
    arts = {e: engines[e][chosen[e]] for e in engines}
    rows = [{"id": e, "top1": facts_for(facts, a)["accuracy"]["top1"],
             "latency_p50_ms": measurements[e]["latency_ms"]["p50"],
             "latency_ci_ms": measurements[e]["latency_noise"]["p50_ci"],
             "memory_mb": memory_for_pareto(engine_memory_mb(measurements[e]))} for e, a in arts.items()]
    front = noise_aware_front(rows)
    pareto = set(front["front"])
    for sid, others in front["tied"].items():
        measurements[sid]["tied_with"] = sorted(others)

    # profile.jsonl: replace this device's lines, keep the others; one line per (engine, backend) measured.
    kept = [json.dumps(row) for row in read_jsonl(build.profile_path) if row.get("device_key") != key]
    for k, (e, b, a) in keyed.items():
        rec = measurement_record(a.stitch_id, a.file, b, dict(stats[k], switch=switches.get(e) if k == picked[e]
                                                              else None), fingerprint, settings)
        rec["device_key"] = key
        rec["engine_id"], rec["precision"], rec["chosen"] = e, a.precision, k == picked[e]
        if k in checks:
            rec["validation"] = checks[k]
        kept.append(json.dumps(rec))
    atomic_write_text(build.profile_path, "\n".join(kept) + "\n")

    section = read_manifest(build.manifest_path)["build"]
    doc = assemble_manifest(build.manifest_path, section, [engine_entry(facts_for(facts, a), a) for a in arts.values()])
    device_info = {"profile": profile.name, "fingerprint": fingerprint, "settings": settings}
    manifest = merge_measurements(doc, key, device_info, measurements, sorted(pareto))
    write_manifest(build.manifest_path, manifest)
    return {"device_key": key, "engines": len(arts), "pareto": sorted(pareto), "measurements": measurements,
            "manifest": manifest, "rows": rows, "tied": front["tied"], "dominated_by": front["dominated_by"],
            "backends": list(backends), "chosen": chosen,
            "refused": {f"{e}@{b}": why for (e, b), why in refusals.items()}}


def check_backends(build, profile, keyed: dict, factories: dict, show_progress: bool = True) -> tuple[dict, dict]:
    """Gate each runner of a backend whose outputs nothing validated where its files were made (the backend
    table's ``validated_where_made``: OpenVINO) on the FP32 reference logits the host shipped: an engine's
    accuracy stands for a runtime only if that runtime computes what the exported file computes.
    Returns ({run key: why refused}, {run key: validation figures})."""
    from snexport.device.runtime.backends import BACKENDS
    from snexport.device.tensorrt_build import read_reference
    from snexport.device.validate import validate_runner
    from snexport.errors import SnexportError
    from snexport.progress import progress_task

    todo = [k for k, (_, b, _) in keyed.items() if not BACKENDS[b].validated_where_made]
    refused: dict[str, str] = {}
    checks: dict[str, dict] = {}
    if not todo:
        return refused, checks
    with progress_task(f"checking {len(todo)} engines against the reference logits", len(todo),
                       show_progress) as advance:
        for k in todo:
            e, b, a = keyed[k]
            label = BACKENDS[b].label
            runner = None
            try:
                inputs, logits = read_reference(build, a)
                runner = factories[k]()
                runner.load()
                figures, failures = validate_runner(runner, logits, inputs)
                checks[k] = figures
                if failures:
                    refused[k] = f"{label} disagrees with the reference: {'; '.join(failures)}"
            except SnexportError as exc:  # no reference shipped, a file the runtime refuses, an op it lacks
                refused[k] = f"{label}: {exc}"
            finally:
                if runner is not None:
                    runner.close()
            if k in refused:
                log.warning("%s is not measured on %s: %s", e, label, refused[k])
            advance()
    return refused, checks


def backend_figures(engine: str, keyed: dict, stats: dict, refusals: dict, checks: dict, per_backend: dict) -> dict:
    """The manifest's ``by_backend`` of one engine: each backend's p50, interval, memory and file, or why it was
    not measured — the side-by-side that the choice of backend was made on.

    Each measured backend also carries its percentiles, cold load, energy and its file's hashes: a device where the
    chosen runtime is not installed (a copy of this build on a twin machine without OpenVINO) can then run the
    engine on another measured runtime, with that runtime's own numbers and its own verified file (the selector's
    fallback), instead of on figures that belong to another runtime."""
    from snexport.device.manifest import BY_BACKEND_FILE_FIELDS, artifact_fields, engine_memory_mb

    out = {}
    for k, (e, b, a) in keyed.items():
        if e != engine:
            continue
        lat = stats[k]["latency"]
        m = measurement_for_manifest(stats[k], None)
        fields = artifact_fields(a)
        out[b] = {"latency_p50_ms": round(float(lat["p50_ms"]), 6),
                  "p50_ci_ms": [round(float(v), 6) for v in lat["p50_ci_ms"]],
                  "memory_mb": round(engine_memory_mb(m), 3),
                  "latency_ms": m["latency_ms"], "load_cold_ms": m["load_ms"]["cold"],
                  "energy_mj": (m.get("energy") or {}).get("mj_per_inference"),
                  **{f: fields[f] for f in BY_BACKEND_FILE_FIELDS}}
        if k in checks:
            out[b]["cosine_vs_reference"] = round(float(checks[k]["cosine"]), 8)
    for b, a in per_backend.items():
        if b not in out:
            out[b] = {"refused": refusals.get((engine, b), "not measured"), "file": a.file}
    return out


def energy_rounds(runs: dict, sensor, rounds, show_progress: bool = True) -> dict:
    """Energy per inference for a sensor that samples beside the work (INA3221): rounds of their own, after the
    latency rounds, so its thread never runs beside the clock. Each engine runs for at least
    max(1 s, the sensor's reliable window) per round, in the same interleaved random orders."""
    import random
    import time

    from snexport.device.rounds import combine_energy
    from snexport.progress import progress_task

    rng = random.Random(rounds.seed + 1)
    window = max(1.0, float(getattr(sensor, "min_reliable_seconds", 0.0)))
    parts: dict[str, list] = {sid: [] for sid in runs}
    with progress_task("measuring energy", rounds.rounds * len(runs), show_progress) as advance:
        for _ in range(rounds.rounds):
            order = list(runs)
            rng.shuffle(order)
            for sid in order:
                run = runs[sid]
                run()
                with sensor.measure() as meter:
                    n, started = 0, time.perf_counter()
                    while time.perf_counter() - started < window:
                        run()
                        n += 1
                parts[sid].append((meter, n))
                advance()
    return {sid: combine_energy(p) for sid, p in parts.items()}
