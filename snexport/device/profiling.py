"""Measurement discipline: device fingerprint, latency statistics, memory, cold load and warm switch.

Every number leaves this module together with the settings and the device that produced it (DESIGN.md,
"Honest measurement"; deployment-notes.md: trtexec defaults changed between releases, Jetson latency depends
on power mode, clocks and temperature).

Standard library only at import time: the selector and `snexport bench` import this on devices where torch or
numpy may be missing; the few helpers that need them import them inside the function.
"""

from __future__ import annotations

import datetime as _dt
import glob
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from snexport.errors import ProfileError

SCHEMA_VERSION = 1

# -------------------------------------------------------------------------------------------------------------
# Device fingerprint
# -------------------------------------------------------------------------------------------------------------

# Distribution names whose versions matter for a measurement. TensorRT ships under several names (pip
# `tensorrt`, `tensorrt-cu12`, `tensorrt-cu13`; JetPack's apt package registers as `tensorrt` too).
_VERSIONED = {
    "torch": ("torch",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "openvino": ("openvino",),  # recorded; not part of the device key (measurements carry it in their runner)
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt_cu13", "tensorrt_cu12"),
    "onnx": ("onnx",),
    "numpy": ("numpy",),
    "timm": ("timm",),
    "snexport": ("snexport",),
}


def _safe(fn: Callable[[], Any]) -> Any:
    """Run a probe; any failure means "unknown" (None), because a fingerprint must never stop a benchmark."""
    try:
        return fn()
    except Exception:
        return None


def _read(path: str) -> Optional[str]:
    return _safe(lambda: Path(path).read_text(errors="replace").strip())


def _meminfo() -> dict[str, int]:
    """/proc/meminfo as bytes per field (the file states kB)."""
    out = {}
    for line in (_read("/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def _cpu_model() -> Optional[str]:
    text = _read("/proc/cpuinfo") or ""
    # x86 says "model name"; many ARM kernels (Jetson included) say neither, so the board model is kept too.
    for key in ("model name", "Hardware", "Model", "cpu model"):
        for line in text.splitlines():
            if line.split(":")[0].strip() == key:
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _physical_cores() -> Optional[int]:
    cores = set()
    physical = None
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "physical id":
            physical = value
        elif key == "core id":
            cores.add((physical, value))
    if cores:
        return len(cores)
    # ARM cpuinfo has no core ids (and no SMT): fall back to psutil, which reads sysfs topology.
    import psutil

    return psutil.cpu_count(logical=False)


def _version(dists: Iterable[str]) -> Optional[str]:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _run(cmd: Sequence[str], timeout: float = 3.0) -> Optional[str]:
    def call():
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=True)
        return done.stdout.strip() or None

    return _safe(call)


def gpu_info() -> dict:
    """GPU name, memory, compute capability, CUDA and driver versions.

    torch is asked only when it is already imported (a GPU benchmark has loaded it anyway); importing it just
    for a fingerprint costs seconds and hundreds of MB, which would distort the RSS numbers we are about to
    take. Otherwise ``nvidia-smi`` and the kernel driver's /proc file give the same facts cheaply.
    """
    info = {"name": None, "memory_total_bytes": None, "compute_capability": None, "cuda": None, "driver": None}
    torch = sys.modules.get("torch")
    if torch is not None and _safe(torch.cuda.is_available):
        props = _safe(lambda: torch.cuda.get_device_properties(torch.cuda.current_device()))
        if props is not None:
            info["name"] = props.name
            info["memory_total_bytes"] = int(props.total_memory)
            info["compute_capability"] = f"{props.major}.{props.minor}"
        info["cuda"] = _safe(lambda: torch.version.cuda)
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"])
    if smi:
        fields = [f.strip() for f in smi.splitlines()[0].split(",")]
        info["name"] = info["name"] or fields[0]
        info["driver"] = fields[1] if len(fields) > 1 else None
        # On Jetson (unified memory) nvidia-smi reports memory as "[N/A]": keep None rather than a wrong number.
        if info["memory_total_bytes"] is None and len(fields) > 2 and fields[2].isdigit():
            info["memory_total_bytes"] = int(fields[2]) * 1024 * 1024
    if info["driver"] is None:
        text = _read("/proc/driver/nvidia/version") or ""
        for token in text.split():
            if token.count(".") >= 1 and token.replace(".", "").isdigit():
                info["driver"] = token
                break
    return info


def _thermal_c() -> Optional[dict]:
    """Temperatures in °C per thermal zone type (the zone names on Jetson are e.g. "gpu-thermal")."""
    zones = {}
    for zone in sorted(glob.glob("/sys/class/thermal/thermal_zone*")):
        kind, temp = _read(f"{zone}/type"), _read(f"{zone}/temp")
        if kind and temp and temp.lstrip("-").isdigit():
            zones[kind] = int(temp) / 1000.0
    return zones or None


def _gpu_cur_freq_hz() -> Optional[int]:
    # Orin's integrated GPU is a devfreq device named after its bus address (17000000.ga10b / 17000000.gpu).
    for path in sorted(glob.glob("/sys/class/devfreq/*/cur_freq")):
        if "gpu" in path or "ga10b" in path or "gv11b" in path:
            value = _read(path)
            if value and value.isdigit():
                return int(value)
    return None


def _power_mode() -> Optional[str]:
    out = _run(["nvpmodel", "-q"])
    if not out:
        return None
    # "NV Power Mode: MAXN\n0": name and mode id.
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    name = next((line.split(":", 1)[1].strip() for line in lines if "Power Mode" in line), None)
    mode_id = next((line for line in lines if line.isdigit()), None)
    return f"{name} ({mode_id})" if name and mode_id else name or out


def _jetson_clocks_pinned() -> Optional[bool]:
    from snexport.device.energy import query_jetson_clocks

    return query_jetson_clocks().get("clocks_pinned")


def device_fingerprint() -> dict:
    """What a latency number depends on, as JSON types; any field that cannot be read is None."""
    meminfo = _meminfo()
    affinity = _safe(lambda: len(os.sched_getaffinity(0)))
    cpu_khz = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")
    tegra = _read("/etc/nv_tegra_release")
    return {
        "hostname": _safe(platform.node),
        "board": _safe(lambda: (_read("/proc/device-tree/model") or "").rstrip("\x00") or None),
        "cpu": {
            "model": _safe(_cpu_model),
            "arch": _safe(platform.machine),
            "logical_cores": _safe(os.cpu_count),
            "physical_cores": _safe(_physical_cores),
            "usable_cores": affinity,
            "cur_freq_khz": int(cpu_khz) if cpu_khz and cpu_khz.isdigit() else None,
            "governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        },
        "memory_total_bytes": meminfo.get("MemTotal"),
        "os": {
            "system": _safe(platform.system),
            "kernel": _safe(platform.release),
            "platform": _safe(platform.platform),
        },
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation()},
        "versions": {name: _safe(lambda d=dists: _version(d)) for name, dists in _VERSIONED.items()},
        "gpu": _safe(gpu_info),
        "jetson": {
            "l4t_release": tegra.splitlines()[0] if tegra else None,
            "power_mode": _safe(_power_mode) if tegra else None,
            # jetson_clocks pins clocks to their maximum: numbers with and without it are different devices.
            "clocks_pinned": _safe(_jetson_clocks_pinned) if tegra else None,
            "gpu_cur_freq_hz": _safe(_gpu_cur_freq_hz),
            "nvmap_used_bytes": meminfo.get("NvMapMemUsed"),
        },
        "thermal_c": _safe(_thermal_c),
    }


# -------------------------------------------------------------------------------------------------------------
# Latency
# -------------------------------------------------------------------------------------------------------------

DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on already sorted values."""
    if not sorted_values:
        raise ProfileError("no samples to take a percentile of; measure at least one iteration")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _pkey(q: float) -> str:
    return f"p{q:g}"


def summarize_ms(samples_ms: Sequence[float], percentiles: Iterable[float] = DEFAULT_PERCENTILES) -> dict:
    """mean/std/min/percentiles/max of latencies in milliseconds (std is the sample standard deviation)."""
    values = sorted(samples_ms)
    out = {
        "mean_ms": statistics.fmean(values) if values else None,
        "std_ms": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min_ms": values[0] if values else None,
    }
    for q in sorted(set(float(q) for q in percentiles)):
        out[_pkey(q) + "_ms"] = percentile(values, q)
    out["max_ms"] = values[-1] if values else None
    return out


def measure_latency(
    run_fn: Callable[[], Any],
    *,
    warmup: int = 10,
    iterations: int = 100,
    min_duration_s: float = 1.0,
    max_duration_s: float = 30.0,
    batch_size: int = 1,
    percentiles: Iterable[float] = DEFAULT_PERCENTILES,
    clock: Callable[[], int] = time.perf_counter_ns,
) -> dict:
    """Time ``run_fn`` after ``warmup`` untimed calls.

    Runs until both ``iterations`` calls and ``min_duration_s`` of timed work are done, so fast engines get
    enough samples for a stable p99; stops early at ``max_duration_s`` (``capped`` is then True and
    ``iterations`` says how many were taken). ``run_fn`` must return only when the result is ready (runners
    return host arrays, which synchronises the GPU). ``clock`` returns nanoseconds; tests pass a fake one.
    """
    if iterations < 1 or warmup < 0 or batch_size < 1:
        raise ProfileError("measurement needs iterations >= 1, warmup >= 0 and batch_size >= 1; fix the settings")
    if max_duration_s < min_duration_s:
        raise ProfileError(f"max_duration_s ({max_duration_s}) is below min_duration_s ({min_duration_s}); raise it")
    for _ in range(warmup):
        run_fn()
    samples_ns: list[int] = []
    min_ns, max_ns = int(min_duration_s * 1e9), int(max_duration_s * 1e9)
    capped = False
    start = clock()
    while True:
        t0 = clock()
        run_fn()
        t1 = clock()
        samples_ns.append(t1 - t0)
        elapsed = t1 - start
        if elapsed >= max_ns:
            capped = len(samples_ns) < iterations or elapsed < min_ns
            break
        if len(samples_ns) >= iterations and elapsed >= min_ns:
            break
    samples_ms = [s / 1e6 for s in samples_ns]
    busy_s = sum(samples_ns) / 1e9
    stats = summarize_ms(samples_ms, percentiles)
    stats.update(
        {
            "iterations": len(samples_ms),
            "warmup": warmup,
            "batch_size": batch_size,
            "total_s": (clock() - start) / 1e9,
            # Serial throughput: one request in flight, as the selector drives an engine.
            "throughput_per_s": batch_size * len(samples_ms) / busy_s if busy_s > 0 else None,
            "capped": capped,
        }
    )
    return stats


# -------------------------------------------------------------------------------------------------------------
# Memory
# -------------------------------------------------------------------------------------------------------------


def process_rss_bytes() -> Optional[int]:
    """Current resident set size of this process, or None where it cannot be read."""
    statm = _read("/proc/self/statm")
    if statm:
        # Second field: resident pages. Reading statm is cheap enough to sample every millisecond.
        return int(statm.split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def via_psutil():
        import psutil

        return int(psutil.Process().memory_info().rss)

    return _safe(via_psutil)


def nvmap_used_bytes() -> Optional[int]:
    """Jetson only: memory the GPU driver holds through NvMap (unified memory: it is system RAM), else None."""
    return _meminfo().get("NvMapMemUsed")


class PeakRSSSampler:
    """Peak RSS over a ``with`` block, sampled by a background thread every ``interval_s``.

    ``resource.getrusage().ru_maxrss`` is not enough: it is the high-water mark of the whole process lifetime
    and cannot be reset, so after loading a big engine every later phase reports the same peak. Sampling
    /proc/self/statm bounds the peak of *this* block (a spike shorter than the interval can be missed; the
    first and last samples are taken synchronously so the block's own end state always counts). Runtimes
    release the GIL while computing, so the thread keeps sampling during inference.
    """

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = float(interval_s)
        self.start_bytes: Optional[int] = None
        self.peak_bytes: Optional[int] = None
        self.end_bytes: Optional[int] = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _sample(self) -> None:
        rss = process_rss_bytes()
        if rss is not None:
            self.peak_bytes = rss if self.peak_bytes is None else max(self.peak_bytes, rss)
            self.samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "PeakRSSSampler":
        self.start_bytes = process_rss_bytes()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="snexport-rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self.end_bytes = process_rss_bytes()

    def to_dict(self) -> dict:
        delta = None if self.peak_bytes is None or self.start_bytes is None else self.peak_bytes - self.start_bytes
        return {
            "rss_start_bytes": self.start_bytes,
            "rss_peak_bytes": self.peak_bytes,
            "rss_end_bytes": self.end_bytes,
            "rss_peak_delta_bytes": delta,
            "samples": self.samples,
            "interval_s": self.interval_s,
        }


class CudaMemoryDelta:
    """Device memory taken during a ``with`` block, from the CUDA runtime's free bytes before/after
    (``cudaMemGetInfo`` through cuda-python, or ``torch.cuda.mem_get_info`` on a host that has torch).

    It counts every allocation on the device, including TensorRT's and other processes', which is the point:
    the torch allocator's own counters miss memory TensorRT allocates itself. Only active when cuda-python or
    torch is already imported and sees CUDA; otherwise every field stays None. On Jetson this is system memory
    (unified).
    """

    def __init__(self, device: int = 0):
        self.device = device
        self.free_before: Optional[int] = None
        self.free_after: Optional[int] = None
        self.total: Optional[int] = None

    def _free_total(self):
        cudart = _cudart_if_imported()  # a TensorRT device: cuda-python, no torch
        if cudart is not None:
            def ask():
                if int(cudart.cudaSetDevice(self.device)[0]) or int(cudart.cudaDeviceSynchronize()[0]):
                    return None
                err, free, total = cudart.cudaMemGetInfo()
                return (int(free), int(total)) if int(err) == 0 else None

            info = _safe(ask)
            if info:
                return info
        torch = sys.modules.get("torch")
        if torch is None or not _safe(torch.cuda.is_available):
            return None
        return _safe(lambda: (torch.cuda.synchronize(self.device), torch.cuda.mem_get_info(self.device))[1])

    def start(self) -> "CudaMemoryDelta":
        info = self._free_total()
        if info:
            self.free_before, self.total = info
        return self

    def stop(self) -> None:
        info = self._free_total()
        if info:
            self.free_after = info[0]

    def __enter__(self) -> "CudaMemoryDelta":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def used_delta_bytes(self) -> Optional[int]:
        if self.free_before is None or self.free_after is None:
            return None
        return self.free_before - self.free_after


# -------------------------------------------------------------------------------------------------------------
# Engine profiling: cold load, latency, memory; warm switch
# -------------------------------------------------------------------------------------------------------------

DEFAULT_SETTINGS = {
    "warmup": 10,
    "iterations": 100,
    "min_duration_s": 1.0,
    "max_duration_s": 30.0,
    "percentiles": list(DEFAULT_PERCENTILES),
    "batch_size": 1,
    # Drop the file from the page cache before the cold load, so "cold" includes reading it from storage.
    "evict_page_cache": True,
    "rss_sample_interval_s": 0.002,
    "seed": 0,
    # Interleaved rounds (snexport.device.rounds): used by bench's latency pass, ignored by profile_engine.
    "rounds": 5,
    "ci_level": 0.95,
    "budget_s": 0.0,
    "min_rounds": 5,
}


def resolve_settings(settings: Any = None) -> dict:
    """Defaults overlaid with ``settings`` (a mapping, or a DeviceProfile/MeasurementSettings with to_dict).

    A DeviceProfile contributes its ``measurement`` table. Unknown keys are refused: a typo would otherwise
    silently measure with a default and the stored settings would lie.
    """
    if settings is None:
        given: dict = {}
    elif hasattr(settings, "measurement"):
        given = settings.measurement.to_dict()
    elif hasattr(settings, "to_dict"):
        given = settings.to_dict()
    else:
        given = dict(settings)
    unknown = sorted(set(given) - set(DEFAULT_SETTINGS))
    if unknown:
        raise ProfileError(
            f"unknown measurement setting(s) {', '.join(unknown)}; valid: {', '.join(DEFAULT_SETTINGS)}"
        )
    merged = {**DEFAULT_SETTINGS, **given}
    merged["percentiles"] = [float(q) for q in merged["percentiles"]]
    return merged


def _evict_page_cache(path: Path) -> bool:
    """Ask the kernel to drop a file's clean cached pages (no root needed); False where unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False

    def evict():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True

    return bool(_safe(evict))


def _preimport_runtime(backend: Optional[str]) -> None:
    """Import the backend's library before the cold-load clock starts.

    The first engine opened in a process would otherwise also pay for importing onnxruntime or tensorrt
    (hundreds of ms and tens of MB), and only that engine; a deployed selector imports it once at start-up.
    A missing library is left for the runner to report with its own message.
    """
    # The TensorRT runner keeps its buffers with cuda-python (either module layout), so that is part of its runtime.
    modules = {"onnxruntime": ("numpy", "onnxruntime"), "openvino": ("numpy", "openvino"),
               "tensorrt": ("numpy", "tensorrt", "cuda.bindings.runtime", "cuda.cudart")}
    for module in modules.get(backend or "", ()):
        _safe(lambda: __import__(module))
    cudart = _cudart_if_imported()
    if backend == "tensorrt" and cudart is not None:
        # Creating the CUDA context is also a once-per-process cost, not part of loading one engine (cudaFree(0) is
        # the CUDA runtime's idiom for "initialise now").
        _safe(lambda: cudart.cudaFree(0))


def _cudart_if_imported():
    """cuda-python's runtime module when something (the TensorRT runner) has imported it, else None."""
    return sys.modules.get("cuda.bindings.runtime") or sys.modules.get("cuda.cudart")


def _make_input(runner: Any, seed: int):
    import numpy as np

    shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in runner.input_shape)
    dtype = getattr(runner, "input_dtype", "") or "float32"
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def return_freed_heap() -> None:
    """Give the C heap's free pages back to the OS after loading engines (glibc ``malloc_trim``; best effort).

    Creating an ONNX Runtime session allocates and frees large temporaries (graph copies; for a device-optimized
    pack, the prepacked weights it checks against the pack's copies). glibc keeps such freed pages resident, by
    chance more or less of them: 49 to 158 MB across identical preloads of 8 DeiT-S/B engines (docs/packs.md),
    about 1 ms to release. Elsewhere (macOS, musl) there is no such call and nothing is done.

    The memory pass calls it around each load as well, so that an engine's RSS growth is the same whatever was
    loaded and freed before it (bench screens several sessions per engine first; their freed pages would otherwise
    absorb the next load and make it look smaller).
    """
    import ctypes

    if not sys.platform.startswith("linux"):
        return
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library this process already runs on
    except (OSError, AttributeError):
        return
    trim(0)


def profile_engine(
    target: str | os.PathLike | Callable[[], Any],
    settings: Any = None,
    *,
    runner_options: Optional[Mapping[str, Any]] = None,
    x: Any = None,
    time_latency: bool = True,
    memory_runs: int = 20,
    memory_budget_s: float = 0.5,
) -> dict:
    """Measure one engine: file size, cold load, RSS around load, latency, peak RSS while running.

    With ``time_latency=False`` this is the *memory pass* of `snexport bench`: the peak-RSS sampler thread runs
    over ``memory_runs`` untimed runs after the first (fewer, at least 2, past ``memory_budget_s``) and no latency
    is taken (``latency`` is None); latency is timed separately,
    with nothing of ours beside it, in interleaved rounds (``snexport.device.rounds``).

    ``target`` is a file (opened with ``snexport.device.runtime.open_runner(path, **runner_options)``) or a factory
    returning a Runner (loaded or not), e.g. ``lambda: TorchRunner(module, shape)``. The cold load time is
    construct + load + first result, since that is what a device waits for when an engine is not resident.
    The runner is closed before returning. ``x`` defaults to a seeded random input of the runner's shape.
    """
    cfg = resolve_settings(settings)
    path = None if callable(target) else Path(target)
    record = memory_record({}, cfg)
    if path is not None:
        from snexport.device.runtime import backend_for_path, open_runner

        record["file"], record["file_size_bytes"] = str(path), _safe(lambda: path.stat().st_size)
        record["page_cache_evicted"] = _evict_page_cache(path) if cfg["evict_page_cache"] else False
        options = dict(runner_options or {})
        _preimport_runtime(options.get("backend") or _safe(lambda: backend_for_path(path)))

        def factory():
            return open_runner(path, **options)

    else:
        factory = target
    runner, measured = load_measured(factory, cfg, x=x, time_latency=time_latency, memory_runs=memory_runs,
                                     memory_budget_s=memory_budget_s)  # closes the runner itself on an error
    runner.close()
    record.update(measured)
    return record


def memory_record(measured: Mapping[str, Any], settings: Any = None) -> dict:
    """The record ``profile_engine`` returns for a runner factory, from ``load_measured``'s fields (with none, the
    record's head, which ``profile_engine`` fills in)."""
    return {"schema": SCHEMA_VERSION, "settings": resolve_settings(settings), "file": None, "file_size_bytes": None,
            **measured}


def load_measured(factory: Callable[[], Any], settings: Any = None, *, x: Any = None, time_latency: bool = False,
                  memory_runs: int = 20, memory_budget_s: float = 0.5) -> tuple[Any, dict]:
    """``profile_engine`` on a runner factory, leaving the runner loaded: (runner, the record's runner, load, memory
    and latency fields). The caller closes the runner; on an error it is closed here. `snexport bench` measures
    each variant it screens this way and then times it, instead of loading every variant again for a memory pass
    of its own: the memory runs warm it up for the screening."""
    cfg = resolve_settings(settings)
    return_freed_heap()
    rss_before, nvmap_before = process_rss_bytes(), nvmap_used_bytes()
    cuda_load = CudaMemoryDelta().start()
    t0 = time.perf_counter_ns()
    runner = factory()
    try:
        runner.load()
        t1 = time.perf_counter_ns()
        x = _make_input(runner, cfg["seed"]) if x is None else x
        t2_start = time.perf_counter_ns()
        runner.run(x)
        t2 = time.perf_counter_ns()
        cuda_load.stop()
        return_freed_heap()  # what stays resident, as a preloading selector sees it (it trims after loading)
        rss_loaded = process_rss_bytes()
        with PeakRSSSampler(cfg["rss_sample_interval_s"]) as sampler:
            if time_latency:
                latency = measure_latency(
                    lambda: runner.run(x),
                    warmup=cfg["warmup"],
                    iterations=cfg["iterations"],
                    min_duration_s=cfg["min_duration_s"],
                    max_duration_s=cfg["max_duration_s"],
                    batch_size=cfg["batch_size"],
                    percentiles=cfg["percentiles"],
                )
            else:
                # Peak RSS is reached in the first runs (arenas grow once): DeiT-B on ONNX Runtime grew 10 MB on
                # its first run and 13 MB on its second, then not at all over four more; on OpenVINO only on the
                # first. So a slow engine stops after ``memory_budget_s`` once 2 runs follow the first (20
                # DeiT-B runs were 5 s per engine and runtime).
                latency = None
                stop = time.perf_counter() + float(memory_budget_s)
                for i in range(int(memory_runs)):
                    if i >= 2 and time.perf_counter() > stop:
                        break
                    runner.run(x)
        measured = {
            "backend": runner.backend,
            "input_name": runner.input_name,
            "input_shape": list(runner.input_shape),
            "output_name": runner.output_name,
            "runner_settings": getattr(runner, "settings", None),
            "load": {
                "construct_load_ms": (t1 - t0) / 1e6,
                "first_run_ms": (t2 - t2_start) / 1e6,
                # Input generation between load and first run is excluded.
                "cold_load_ms": (t1 - t0 + t2 - t2_start) / 1e6,
            },
            "memory": {
                "rss_before_load_bytes": rss_before,
                "rss_after_load_bytes": rss_loaded,
                "rss_load_delta_bytes": None if None in (rss_before, rss_loaded) else rss_loaded - rss_before,
                "rss_peak_during_runs_bytes": sampler.peak_bytes,
                "rss_after_runs_bytes": sampler.end_bytes,
                "cuda_load_delta_bytes": cuda_load.used_delta_bytes,
                "nvmap_before_bytes": nvmap_before,
                "nvmap_after_load_bytes": nvmap_used_bytes(),
            },
            "latency": latency,
        }
    except BaseException:
        runner.close()
        raise
    return runner, measured


def measure_switch(runner_a: Any, runner_b: Any, x: Any, repeats: int = 20, *, x_b: Any = None,
                   percentiles: Iterable[float] = DEFAULT_PERCENTILES, budget_s: Optional[float] = None,
                   min_repeats: int = 3, primed: bool = False, steady: Optional[Mapping[str, Any]] = None) -> dict:
    """Warm switch cost: time from switching to ``runner_b`` until its first result, after ``runner_a`` ran.

    Both runners are already loaded (the selector keeps candidates resident). Each repeat runs A, then times
    B's next call; B's steady-state latency (B right after B) is measured the same way, so
    ``switch_overhead_p50_ms`` isolates what the switch itself costs (cold caches, clocks, allocator).
    ``budget_s``: stop after that many seconds once ``min_repeats`` are done (a repeat is three runs: 20 of
    them cost 15 s per DeiT engine, 9 min for a 36-engine build, for an overhead lost in the runs' own noise).
    ``primed``: both runners have run since they were loaded (bench's rounds), so no first runs are needed.
    ``steady``: B's steady-state statistics measured elsewhere (bench's interleaved rounds, each block after a
    warm-up run, many more samples than a few repeats give); B's runs right after B are then not taken, which makes
    a repeat two runs instead of three (18 s of a 36-engine DeiT-S/B bench).
    """
    if repeats < 1:
        raise ProfileError("measure_switch needs repeats >= 1")
    deadline = None if budget_s is None else time.perf_counter() + float(budget_s)
    x_b = x if x_b is None else x_b
    if not primed:  # make sure both have done their one-time first-run work
        runner_a.run(x)
        runner_b.run(x_b)
    switch_ms, steady_ms = [], []
    for i in range(repeats):
        if deadline is not None and i >= min_repeats and time.perf_counter() > deadline:
            break
        runner_a.run(x)
        t0 = time.perf_counter_ns()
        runner_b.run(x_b)
        t1 = time.perf_counter_ns()
        switch_ms.append((t1 - t0) / 1e6)
        if steady is None:
            runner_b.run(x_b)
            steady_ms.append((time.perf_counter_ns() - t1) / 1e6)
    switch = summarize_ms(switch_ms, percentiles)
    steady = dict(summarize_ms(steady_ms, percentiles), source="right after itself") if steady is None else dict(
        steady)
    return {
        "repeats": len(switch_ms),
        "switch": switch,
        "steady": steady,
        "switch_overhead_p50_ms": switch["p50_ms"] - steady["p50_ms"] if "p50_ms" in switch else None,
        "from_backend": getattr(runner_a, "backend", None),
        "to_backend": getattr(runner_b, "backend", None),
    }


def measurement_record(
    stitch_id: str,
    artifact_file: str,
    backend: str,
    stats: Mapping[str, Any],
    fingerprint: Mapping[str, Any],
    settings: Mapping[str, Any],
) -> dict:
    """One line of ``<build>/profile.jsonl``: the numbers with the device and settings that produced them."""
    return {
        "schema": SCHEMA_VERSION,
        "stitch_id": stitch_id,
        "file": artifact_file,
        "backend": backend,
        "measured_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "stats": dict(stats),
        "settings": dict(settings),
        "device": dict(fingerprint),
    }
