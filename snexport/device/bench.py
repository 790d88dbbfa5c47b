"""`snexport bench`: profile a build's (or a bundle's) engines on the machine it runs on and update the manifest.

Per engine: cold load (file → first result), latency percentiles, memory, then the warm switch time from the
previous engine with every engine resident (what a preloading selector pays). Results go to profile.jsonl (this
device's lines replaced, others kept) and into manifest.json; the Pareto set is re-selected on measured
latency and memory, since FLOPs order is not latency order.

Several runtimes and thread counts per engine (issues 10, 13): on a CPU profile every installed CPU backend of the
table is measured (``backends``; `--backends ort,openvino`). Each engine's variants (each runtime, with one thread
and with every core unless the profile pins threads) are loaded one at a time, each load measured (cold load,
memory); a backend the export did not validate with (OpenVINO) is gated on the FP32 reference logits the host
shipped; then the variants are timed against each other in alternation (``screen_engines``), and the engine runs
on the fastest, preferring fewer threads within 5 % and the profile's own runtime within 10 %. Only that variant
(left loaded by the screening) is timed in the interleaved rounds: its manifest entry names that backend's file
and carries its numbers, runner settings and thread count, and the other runtimes' screening figures
(``by_backend``); the front is taken over engines on their chosen variants. One point per engine, not per (engine,
backend): the selector's unit is the engine, and a front holding one stitch on two runtimes would make a preloading
selector keep it twice for no accuracy gained.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from snexport import buildfiles as files
from snexport.buildfiles import read_jsonl
from snexport.errors import BackendUnavailableError, BuildDirError
from snexport.hashing import atomic_write_text

log = logging.getLogger("snexport")


def _runner_factory(build, art, profile, module_factory, backend: Optional[str] = None,
                    threads: Optional[int] = None):
    backend = backend or profile.backend
    if backend == "torch":
        from snexport.device.runtime.backends import cuda_device_count
        from snexport.device.runtime.torch_runner import TorchRunner

        device = "cuda" if cuda_device_count() else "cpu"
        module = module_factory(art.stitch_id)
        return lambda: TorchRunner(module, tuple(art.input_shape), device=device, cuda_graphs=device == "cuda")
    from snexport.device.runtime import open_runner

    options = profile.runner_options(backend)
    if threads is not None:
        options["threads"] = int(threads)
    return lambda: open_runner(build.root / art.file, backend=backend, **options)


def thread_candidates(profile, backend: str) -> list[int]:
    """The CPU thread counts `snexport bench` tries for an engine on ``backend``: none for a runtime that takes no
    thread count (TensorRT, torch); the profile's count where it pins one; else one thread and every core this
    process may use (``screen_engines`` picks per engine)."""
    from snexport.device.runtime.backends import BACKENDS
    from snexport.device.runtime.onnxruntime_runner import default_threads

    if backend not in BACKENDS or not BACKENDS[backend].takes_threads:
        return []
    if profile.threads is not None:
        return [int(profile.threads)]
    return sorted({1, default_threads()})


def previous_measurements(build, device_key: str) -> dict[str, dict]:
    """Engine id -> this device's measurement from the last bench, as the manifest holds it (empty if none)."""
    from snexport.device.manifest import engine_ids, read_manifest

    if not build.manifest_path.is_file():
        return {}
    doc = read_manifest(build.manifest_path)
    return {engine_id: entry["measurements"][device_key]
            for engine_id, entry in zip(engine_ids(doc["engines"]), doc["engines"])
            if entry["measurements"].get(device_key)}


def previous_choices(previous: dict[str, dict]) -> dict[str, tuple]:
    """Engine id -> (backend, threads) that the last bench chose (``previous_measurements``)."""
    return {e: (m["backend"], m.get("threads")) for e, m in previous.items() if m.get("backend")}


def previous_front(previous: dict[str, dict]) -> dict[str, bool]:
    """Engine id -> whether it was on the last bench's measured front (``previous_measurements``)."""
    return {e: bool(m.get("pareto")) for e, m in previous.items()}


# Seconds of warm-switch measurement per engine once 3 switches are timed (profiling.measure_switch).
SWITCH_BUDGET_S = 1.0
# Untimed runs after the first under the peak-RSS sampler (profiling.load_measured): the peak is reached by then
# (DeiT-B grew on ONNX Runtime's first two runs and OpenVINO's first, then not at all over four more), and 0.5 s of
# them per variant was 22 s of a 36-engine DeiT-S/B bench.
MEMORY_RUNS = 2


def front_method(rebench: bool) -> dict:
    """How the measured front was taken, stored with the numbers (``pareto.noise_aware_front``)."""
    from snexport.device.pareto import FRONT_STICKY_MARGIN, LATENCY_RESOLUTION, MEMORY_RESOLUTION_MB

    return {"rule": "dropped only when another engine is at least as accurate, faster beyond its p50 interval and "
                    "by more than the latency resolution, and no bigger in memory beyond the memory resolution",
            "latency_resolution": LATENCY_RESOLUTION, "memory_resolution_mb": MEMORY_RESOLUTION_MB,
            "rebench_margin": FRONT_STICKY_MARGIN if rebench else None}


@dataclass
class Screening:
    """What ``screen_engines`` found: per run key its thread count, per engine its runtime, the screening figures
    of each key's chosen thread count, the refused keys (why) and reference checks, and the load and memory
    figures of every variant it loaded ((key, threads) -> ``profiling.load_measured`` fields)."""

    threads: dict
    chosen: dict
    screened: dict
    refused: dict
    checks: dict
    measured: dict
    kept: dict  # run key -> its chosen variant's runner, still loaded (``keep``); the caller closes them


def screen_engines(keyed: dict, make_factory: Callable, candidates: dict, preference: Sequence[str],
                   show_progress: bool = True, previous: Optional[dict] = None,
                   check: Optional[Callable] = None, sizes: Optional[dict] = None,
                   measure: Optional[Callable] = None, keep: bool = False) -> Screening:
    """How each engine runs: per runtime its thread count, then the runtime (``rounds.screen_variants``, paired).

    ``keyed``: run key -> (engine, backend, file); ``make_factory(key, threads)`` -> runner factory;
    ``candidates``: run key -> thread counts to try ([] for a runtime that takes none). Per engine, every
    (runtime, threads) variant is loaded side by side and timed in alternation, then closed (but see ``keep``).
    Per runtime the fewest threads within ``SCREEN_TOLERANCE`` of its fastest win; of the runtimes, the first of
    ``preference`` within ``RUNTIME_TOLERANCE`` of the fastest. An engine with a single variant is not timed here.

    ``check(key, runner)`` -> (figures, why refused or None), for the run keys whose runtime the export did not
    validate with (``ReferenceCheck``): it runs on the first loaded variant of that key, before any timing, and a
    refused key is neither timed nor chosen. Checking here, on runners the screening loads anyway, spares a load
    of its own per engine (an OpenVINO compile) and its runs warm the runner up.

    ``sizes`` (engine -> GFLOPs): engines are screened smallest first, and once a runtime's fewest threads run more
    than ``SCREEN_DROP_ABOVE`` times slower than its fastest thread count on an engine (that variant was dropped),
    bigger engines of that runtime and precision are screened without that thread count: more work per operator
    only lets more threads gain more. On 2 cores one thread ran DeiT-S 1.5x slower, and screening it on the
    35 bigger engines of a DeiT-S/B build cost 90 s.

    ``previous`` (engine -> (backend, threads), ``previous_choices``): what this device's last bench chose. A
    re-bench keeps it unless another variant is faster by more than the tolerance plus ``STICKY_MARGIN``, so two
    runs measure the same variant of an engine whose runtimes sit near the threshold instead of flipping.

    ``measure(factory)`` -> (loaded runner, fields): how each variant is loaded (``profiling.load_measured``: cold
    load and memory, one variant at a time, before any timing); its runs warm the variant up for the screening.
    Loading alone and loading beside the engine's other variants gave the same RSS growth within 1.4 MB (DeiT-S/B
    on ONNX Runtime and OpenVINO), so no variant is loaded again for a memory pass of its own.

    ``keep``: each engine's chosen variant stays loaded (``Screening.kept``) for the rounds, which keep every
    engine resident anyway; loading and first-running 36 DeiT-S/B engines again took 22 s.
    """
    import numpy as np

    from snexport.device.rounds import screen_variants
    from snexport.progress import progress_task

    per_engine: dict[str, list[str]] = {}
    for k, (e, _, _) in keyed.items():
        per_engine.setdefault(e, []).append(k)
    found = Screening(threads={k: (candidates[k][0] if candidates[k] else None) for k in keyed}, chosen={},
                      screened={}, refused={}, checks={}, measured={}, kept={})
    to_check = {k for k in keyed if check is not None and check.needed(k)}
    candidates = dict(candidates)  # a bigger engine's runtime may lose its fewest threads (outgrown, below)

    def ways_to_run(e: str) -> int:  # engine e's (runtime, threads) variants still to try
        return sum(max(1, len(candidates[k])) for k in per_engine[e])

    todo = [e for e in per_engine if ways_to_run(e) > 1 or to_check & set(per_engine[e])]
    todo.sort(key=lambda e: (sizes or {}).get(e) or 0.0)
    outgrown: set[tuple] = set()  # (backend, precision) whose fewest threads lost clearly on a smaller engine
    if todo:
        label = "choosing runtime and threads" if any(ways_to_run(e) > 1 for e in todo) else "checking"
        with progress_task(f"{label} for {len(todo)} engines", len(todo), show_progress) as advance:
            for e in todo:
                for k in per_engine[e]:
                    if (keyed[k][1], keyed[k][2].precision) in outgrown and len(candidates[k]) > 1:
                        candidates[k] = candidates[k][1:]
                        found.threads[k] = candidates[k][0]
                if ways_to_run(e) == 1 and not to_check & set(per_engine[e]):
                    advance()
                    continue  # one way left to run it: nothing to choose or check
                runners: dict[tuple, Any] = {}
                try:
                    warm = _load_variants(per_engine[e], keyed, candidates, make_factory, measure, check, to_check,
                                          runners, found)
                    if len(runners) > 1:
                        x = np.random.default_rng(0).standard_normal(
                            tuple(keyed[per_engine[e][0]][2].input_shape)).astype(np.float32)
                        figures = screen_variants({v: (lambda r=r: r.run(x)) for v, r in runners.items()}, warm=warm)
                        found.chosen[e] = _choose(e, [k for k in per_engine[e] if k not in found.refused], keyed,
                                                  figures, found.threads, found.screened, preference, previous)
                        fewest = {k: figures.get((k, candidates[k][0]), {}) for k in per_engine[e]
                                  if len(candidates[k]) > 1}
                        outgrown |= {(keyed[k][1], keyed[k][2].precision) for k, f in fewest.items()
                                     if f.get("dropped")}
                    if keep and runners:
                        backend = found.chosen.get(e) or next(keyed[k][1] for k, _ in runners)
                        key = next(k for k in per_engine[e] if keyed[k][1] == backend)
                        if (key, found.threads[key]) in runners:
                            found.kept[key] = runners.pop((key, found.threads[key]))
                finally:
                    for r in runners.values():
                        r.close()
                advance()
    for e, ks in per_engine.items():  # engines not timed here: their one (unrefused) runtime
        ok = [k for k in ks if k not in found.refused]
        if ok and e not in found.chosen:
            found.chosen[e] = keyed[ok[0]][1]
    return found


def _load_variants(keys: list, keyed: dict, candidates: dict, make_factory: Callable, measure: Optional[Callable],
                   check, to_check: set, runners: dict, found: Screening) -> list:
    """Load every (key, threads) variant of one engine into ``runners``, most threads first, measuring each load
    (``measure``) and checking each key in ``to_check`` on its first runner. A key whose runtime refuses the file or
    fails the check goes into ``found.refused`` and its runners are closed. Returns the variants that have run since
    their load (measured or checked): the screening's first block warms those up with one run."""
    from snexport.errors import SnexportError

    warm = []
    for k in keys:
        for t in (candidates[k] or [None])[::-1]:  # every core first: the check runs on it
            try:
                if measure is not None:
                    runner, found.measured[(k, t)] = measure(make_factory(k, t))
                else:
                    runner = make_factory(k, t)()
                    try:
                        runner.load()
                    except BaseException:
                        runner.close()
                        raise
            except SnexportError as exc:  # a file this runtime refuses, an op it lacks
                if k not in to_check:
                    raise
                found.refused[k] = check.refusal(k, exc)
                break
            runners[(k, t)] = runner
            if measure is not None:
                warm.append((k, t))
            if k in to_check and k not in found.checks:
                found.checks[k], why = check(k, runner)
                warm.append((k, t))
                if why:
                    found.refused[k] = why
                    break
    for v in [v for v in runners if v[0] in found.refused]:
        runners.pop(v).close()
    return [v for v in warm if v in runners]


def _choose(engine: str, ks: list, keyed: dict, figures: dict, threads: dict, screened: dict,
            preference: Sequence[str], previous: Optional[dict]) -> str:
    """One engine's thread count per runtime (into ``threads``, ``screened``) and its runtime (returned), from its
    screening ``figures`` (``screen_engines``)."""
    from snexport.device.rounds import RUNTIME_TOLERANCE, SCREEN_TOLERANCE, STICKY_MARGIN, pick_within

    kept_backend, kept_threads = (previous or {}).get(engine, (None, None))
    for k in ks:
        mine = {t: figures[(k, t)]["paired_ms"] for (kk, t) in figures if kk == k}
        order, tolerance = sorted(mine, key=lambda t: (t is not None, t or 0)), SCREEN_TOLERANCE
        if keyed[k][1] == kept_backend and kept_threads in mine:
            order, tolerance = [kept_threads] + order, SCREEN_TOLERANCE + STICKY_MARGIN
        threads[k] = pick_within(mine, order, tolerance)
        screened[k] = dict(figures[(k, threads[k])], by_threads={str(t): round(float(v), 6)
                                                                  for t, v in mine.items() if t is not None})
    backend_of = {keyed[k][1]: k for k in ks}
    order, tolerance = list(preference), RUNTIME_TOLERANCE
    if kept_backend in backend_of:
        order, tolerance = [kept_backend] + order, RUNTIME_TOLERANCE + STICKY_MARGIN
    return pick_within({b: screened[k]["paired_ms"] for b, k in backend_of.items()}, order, tolerance)


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
            "rss_peak_mb": round(max(0, (mem.get("rss_peak_during_runs_bytes") or 0)
                                     - (mem.get("rss_before_load_bytes") or 0)) / 1e6, 3),
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
    if stats.get("threads") is not None:
        out["threads"] = int(stats["threads"])
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


def choice_method(profile, backends: Sequence[str], screened: dict) -> dict:
    """How each engine's runtime and CPU thread count were chosen, for the stored method."""
    from snexport.device.rounds import RUNTIME_TOLERANCE, SCREEN_DROP_ABOVE, SCREEN_TOLERANCE, STICKY_MARGIN

    out = {}
    if profile.threads is not None:
        out["threads"] = f"{profile.threads} for every engine (the profile pins it)"
    if screened:
        out["choice"] = (f"per engine, its variants ({', '.join(backends)}; one thread and every core unless the "
                         "profile pins threads) timed in alternation before the rounds: up to 10 passes of ~15 ms "
                         "blocks (3 for slow engines), each variant figured by its block medians relative to their "
                         "pass's mean; per runtime "
                         f"the fewest threads within {SCREEN_TOLERANCE:.0%} of its fastest, then the first runtime in "
                         f"the order {', '.join(backends)} within {RUNTIME_TOLERANCE:.0%} of the fastest. Only the "
                         "chosen variant is timed in the rounds; by_backend holds the others' screening figures. "
                         f"A variant {SCREEN_DROP_ABOVE:g}x slower than the fastest in the first pass is timed no "
                         "further; engines are screened smallest (GFLOPs) first, and once one thread was that much "
                         "slower on a runtime, bigger engines on it are screened with every core only. "
                         "A re-bench keeps this device's previous choice unless another variant is faster by "
                         f"{STICKY_MARGIN:.0%} more than those tolerances")
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
    from snexport.device.energy import open_energy_sensor
    from snexport.device.manifest import device_key as make_device_key
    from snexport.device.manifest import engine_ids
    from snexport.device.profiling import device_fingerprint, load_measured
    from snexport.device.runtime.backends import BACKENDS
    from snexport.device.tensorrt_build import engines_stage
    from snexport.errors import SnexportError

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
            except SnexportError:  # a runtime that cannot run this file: ReferenceCheck says so per engine
                if BACKENDS[backend].validated_where_made:
                    raise
    # 1. How each engine runs: per runtime the faster of one thread and every core (where the profile leaves
    # threads out), then the runtime, by timing the variants of one engine in alternation (screen_engines); a
    # runtime the export did not validate with is first checked on the reference logits (ReferenceCheck).
    candidates = {k: thread_candidates(profile, b) for k, (_, b, _) in keyed.items()}

    def make_factory(k, threads):
        return _runner_factory(build, keyed[k][2], profile, module_factory, keyed[k][1], threads=threads)

    previous = previous_measurements(build, key)  # read before this bench rewrites the manifest
    was_on_front = previous_front(previous)
    found = screen_engines(
        keyed, make_factory, candidates, backends, show_progress, previous=previous_choices(previous),
        check=ReferenceCheck(build, keyed),
        sizes={e: facts_for(facts, next(iter(per.values()))).get("gflops") for e, per in engines.items()},
        measure=lambda factory: load_measured(factory, profile, time_latency=False, memory_runs=MEMORY_RUNS),
        keep=True)
    runners: dict[str, Any] = dict(found.kept)  # chosen variants the screening left loaded, for the rounds
    try:
        return _measure_and_write(build, profile, backends, facts, engines, keyed, found, runners, sensor, rounds,
                                  fingerprint, key, was_on_front, make_factory, switch_repeats, quick, many,
                                  show_progress)
    finally:
        for r in runners.values():
            r.close()
        sensor.close()


def _measure_and_write(build, profile, backends, facts, engines, keyed, found, runners, sensor, rounds, fingerprint,
                       key, was_on_front, make_factory, switch_repeats, quick, many, show_progress) -> dict:
    """``bench_stage`` after the screening: memory of what it did not load, the interleaved rounds, warm switches,
    the front, profile.jsonl and the manifest. ``runners`` (run key -> loaded runner) gains every runner it loads;
    the caller closes them."""
    import numpy as np

    from snexport.device.manifest import assemble_manifest, engine_entry, engine_memory_mb, merge_measurements
    from snexport.device.manifest import read_manifest, write_manifest
    from snexport.device.pareto import noise_aware_front
    from snexport.device.profiling import measure_switch, measurement_record, memory_record, profile_engine
    from snexport.device.rounds import plan_rounds, run_rounds
    from snexport.progress import progress_task

    threads, chosen, screened, refused, checks = (found.threads, found.chosen, found.screened, found.refused,
                                                  found.checks)
    refusals = {keyed[k][:2]: why for k, why in refused.items()}  # (engine, backend) -> why
    for k in refused:
        del keyed[k]
    unrun = [e for e in engines if not any(e == ke for ke, _, _ in keyed.values())]
    if unrun:
        reasons = "; ".join(why for (e, _), why in refusals.items() if e == unrun[0])
        raise BackendUnavailableError(f"no measured backend runs {unrun[0]} correctly ({reasons}); measure it with "
                                      f"{profile.backend} (`snexport bench --backends {profile.backend}`)")
    factories = {k: make_factory(k, threads[k]) for k in keyed}
    picked = {e: next(k for k, (ke, b, _) in keyed.items() if ke == e and b == chosen[e]) for e in engines}
    # 2. Cold load and memory, one engine at a time (the RSS sampler thread runs here, never beside the clock):
    # taken as the screening loaded each variant, else (a variant nothing chose between) measured here.
    stats: dict[str, dict] = {k: memory_record(found.measured[(k, threads[k])], profile) for k in keyed
                              if (k, threads[k]) in found.measured}
    rest = [k for k in keyed if k not in stats]
    with progress_task(f"cold load and memory of {len(rest)} engines", len(rest), show_progress and bool(rest)) \
            as advance:
        for k in rest:
            stats[k] = profile_engine(factories[k], profile, time_latency=False, memory_runs=MEMORY_RUNS)
            advance()
    for k, (_, _, a) in keyed.items():
        stats[k]["file_size_bytes"] = a.size_bytes
        if threads[k] is not None:
            stats[k]["threads"] = threads[k]
        if k in screened:
            stats[k]["screen"] = {"p50_ms": screened[k]["p50_ms"], "p50_ci_ms": screened[k]["p50_ci_ms"],
                                  "paired_ms": screened[k]["paired_ms"], "by_threads": screened[k]["by_threads"]}
    switches: dict[str, dict] = {}
    # 3. Latency in interleaved rounds of the chosen way to run each engine, every engine resident (as a
    # preloading selector keeps them). A runtime not chosen keeps its screening figures (by_backend).
    for k in picked.values():
        if k not in runners:
            runners[k] = factories[k]()
            runners[k].load()
    inputs = {k: np.random.default_rng(0).standard_normal(tuple(keyed[k][2].input_shape)).astype(np.float32)
              for k in runners}
    runs = {k: (lambda r=r, x=inputs[k]: r.run(x)) for k, r in runners.items()}
    counter = sensor if sensor.available and not sensor.samples_during_window else None
    # Screened engines are sized from their screening figures: calibrating 36 DeiT-S/B engines again took 70 s.
    counts, n_rounds = plan_rounds(runs, rounds, estimates={k: screened[k]["p50_ms"] / 1e3 for k in runs
                                                            if k in screened})
    with progress_task(f"timing {len(runs)} engines in {n_rounds} interleaved rounds ({profile.name})",
                       n_rounds * len(runs), show_progress) as advance:
        timing = run_rounds(runs, rounds, counts=counts, rounds=n_rounds, energy=counter, progress=advance)
    energy = {k: t.pop("energy") for k, t in timing.items() if "energy" in t}
    if sensor.available and sensor.samples_during_window:
        energy = energy_rounds(runs, sensor, rounds, show_progress)
    for k in stats:
        if k in timing:
            stats[k]["latency"] = dict(timing[k], source="interleaved rounds")
            stats[k]["energy"] = energy.get(k) or {"energy_mj_per_inference": None, "mean_power_w": None,
                                                   "reason": sensor.reason or "no energy reading"}
        else:
            figures = {n: v for n, v in screened[k].items() if n not in ("by_threads", "paired_ms")}
            stats[k]["latency"] = dict(figures, source="screening (runtime not chosen)")
            stats[k]["energy"] = {"energy_mj_per_inference": None, "mean_power_w": None,
                                  "reason": "runtime not chosen for this engine: only screened, not in the rounds"}
    # 4. Warm switches with the chosen engines resident, in latency order: previous engine -> this one.
    order = sorted(engines, key=lambda e: stats[picked[e]]["latency"]["p50_ms"])
    with progress_task("measuring warm switches", len(order), show_progress) as advance:
        for i, e in enumerate(order):
            prev = runners[picked[order[i - 1]]] if i else runners[picked[order[-1]]]
            if prev is not runners[picked[e]]:
                lat = stats[picked[e]]["latency"]
                switches[e] = measure_switch(prev, runners[picked[e]], inputs[picked[e]], repeats=switch_repeats,
                                             budget_s=SWITCH_BUDGET_S, primed=True,
                                             steady={"p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"],
                                                     "source": "interleaved rounds"})
            advance()
    runner_settings = {}
    for k, (_, b, _) in keyed.items():
        runner_settings.setdefault(b, stats[k].get("runner_settings"))
    settings = {"profile": profile.name, "backend": profile.backend, "backends": list(backends),
                "precision": profile.precision, "threads": profile.threads,
                "measurement": profile.measurement.to_dict(),
                "method": dict(rounds.method(), quick=bool(quick), **choice_method(profile, backends, screened),
                               front=front_method(bool(was_on_front))),
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
             "memory_mb": engine_memory_mb(measurements[e])} for e, a in arts.items()]
    front = noise_aware_front(rows, previous=was_on_front)
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


class ReferenceCheck:
    """Gates each runner of a backend whose outputs nothing validated where its files were made (the backend
    table's ``validated_where_made``: OpenVINO) on the FP32 reference logits the host shipped: an engine's accuracy
    stands for a runtime only if that runtime computes what the exported file computes. ``screen_engines`` calls
    it on the first runner it loads of such a key; ``check(key, runner)`` -> (figures, why refused or None)."""

    def __init__(self, build, keyed: dict):
        self.build, self.keyed = build, keyed

    def needed(self, key: str) -> bool:
        from snexport.device.runtime.backends import BACKENDS

        return not BACKENDS[self.keyed[key][1]].validated_where_made

    def refusal(self, key: str, exc: object, disagrees: bool = False) -> str:
        """Why ``key`` is refused (logged): the runtime's error ``exc``, or with ``disagrees`` its failed gates."""
        from snexport.device.runtime.backends import BACKENDS

        engine, backend, _ = self.keyed[key]
        label = BACKENDS[backend].label
        why = f"{label} disagrees with the reference: {exc}" if disagrees else f"{label}: {exc}"
        log.warning("%s is not measured on %s: %s", engine, label, why)
        return why

    def __call__(self, key: str, runner) -> tuple[dict, Optional[str]]:
        from snexport.device.tensorrt_build import read_reference
        from snexport.device.validate import validate_runner
        from snexport.errors import SnexportError

        try:
            inputs, logits = read_reference(self.build, self.keyed[key][2])
            figures, failures = validate_runner(runner, logits, inputs)
        except SnexportError as exc:  # no reference shipped, an op that fails at run time
            return {}, self.refusal(key, exc)
        if failures:
            return figures, self.refusal(key, "; ".join(failures), disagrees=True)
        return figures, None


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
                  "energy_mj": (m.get("energy") or {}).get("mj_per_inference"), "threads": m.get("threads"),
                  "latency_source": lat.get("source"),
                  "screen_ms": _round((stats[k].get("screen") or {}).get("paired_ms"), 6),
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
