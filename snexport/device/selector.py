"""On-device selector: pick and switch stitched engines as the app's latency/memory budget changes.

Reads a manifest (``manifest.json`` written by ``snexport build``/``bench``), checks the engine files against their
hashes, and drives engines through the runner contract (``snexport.device.runtime``). Standard library only at import time:
the runtime (onnxruntime, OpenVINO, TensorRT) is imported by the runner factory when the first engine loads, so this
runs on a device with Python and ``pip install "snexport[ort]"`` (or ``[ort,openvino]``, ``[tensorrt]``): the core
plus its runtime. Each engine is opened with the runtime it was measured with (``measurement.backend``).

Ranking (``choose``): among engines profiled on the device that fit the budget, the most accurate wins and ties go
to the faster. When any candidate's accuracy is unknown (random-init anchors, no evaluation), accuracies are not
comparable, so every candidate is ranked by GFLOPs instead (more compute in the same ViT family is more accuracy,
SN-Net paper Fig. 4), ties again to the faster. Latency is the measured percentile the selector was built with.

Threading: ``run`` takes a reference to the active runner under a lock and runs outside it, so a switch never
changes the engine of a run in flight, and a runner evicted or closed while in use is closed by its last run.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

from snexport.errors import (BackendUnavailableError, BudgetError, BuildDirError, ManifestError, SettingsError,
                             SnexportError, UnknownStitchError)
from snexport.hashing import PathLike, sha256_file
from snexport.device.profiling import return_freed_heap as _return_freed_heap
from snexport.device.manifest import (BY_BACKEND_FILE_FIELDS, MANIFEST_NAME, _relpath_problem, engine_ids,
                                      engine_memory_mb, latest_device, read_manifest)

log = logging.getLogger(__name__)

PERCENTILES = ("min", "p50", "mean", "p90", "p99", "max")
MODES = ("preload", "on_demand")
_UNSET: Any = object()


class SelectorWarning(UserWarning):
    """An engine left out of selection, or a budget that no engine meets."""


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """One engine as the selector sees it on its device."""

    id: str  # stitch_id; "stitch_id#format-precision" when the manifest holds several files of that stitch
    stitch_id: str
    file: Path  # absolute
    format: str
    precision: str
    top1: Optional[float]  # percent; None when unknown
    gflops: float
    params: int
    input_name: str
    input_shape: tuple
    input_dtype: str
    latency_ms: Optional[float]  # at the selector's percentile on its device; None: not profiled there
    memory_mb: Optional[float]  # RSS growth + accelerator memory of keeping it loaded; None: not profiled
    cold_load_ms: Optional[float]
    energy_mj: Optional[float]  # measured energy per inference on its device; None: no sensor there (never guessed)
    pareto: bool
    backend: Optional[str] = None  # the runtime it was measured with on its device, and is opened with

    @property
    def profiled(self) -> bool:
        return self.latency_ms is not None


@dataclasses.dataclass(frozen=True)
class SwitchEvent:
    seq: int
    at: float  # time.monotonic() when the switch completed
    from_id: Optional[str]
    to_id: str
    reason: str  # "initial" | "budget" | "manual" | "slowdown" | "recovered"
    observed_ms: Optional[float]  # recent latency percentile behind a feedback switch
    budget_ms: Optional[float]
    load_ms: float  # time to make the engine ready; 0.0 when it was already loaded


@dataclasses.dataclass(frozen=True)
class FeedbackConfig:
    """Closed-loop settings (see ``Selector.observe``). Counts are observations (inferences)."""

    window: int = 16  # recent latencies kept; their percentile is compared with the budget
    down_after: int = 8  # observations on an engine before it may be judged too slow
    up_after: int = 32  # observations on an engine before a more accurate one is tried
    hysteresis: float = 0.1  # a step up needs predicted latency <= budget * (1 - hysteresis)
    backoff: float = 2.0  # up_after is multiplied by this when a step up had to be undone
    max_up_after: int = 1024
    time_runs: bool = True  # run() feeds its own wall time to observe()

    def __post_init__(self):
        if not (1 <= self.down_after <= self.window) or self.up_after < 1 or not (0 <= self.hysteresis < 1):
            raise SettingsError(f"invalid FeedbackConfig {self}: need 1 <= down_after <= window, up_after >= 1, "
                             "0 <= hysteresis < 1")


# Runner options for engines of a pack (snexport.export.pack) unless the caller sets them; numbers in
# docs/packs.md (benchmarks/pack_vs_standalone.py). Portable pack: ONNX Runtime's CPU prepacking would copy every
# MatMul weight into a private, re-laid-out buffer per session and undo the sharing, so it is off (that costs
# GEMM speed; a device-optimized pack keeps it). Both: no per-session activation arena, which would otherwise
# keep each resident session's peak activations allocated (~20 MB per DeiT-B session).
PACK_RUNNER_DEFAULTS: Mapping[str, Any] = {"disable_prepacking": True, "cpu_mem_arena": False}
OPTIMIZED_PACK_RUNNER_DEFAULTS: Mapping[str, Any] = {"cpu_mem_arena": False}


def default_runner_factory(entry: Mapping[str, Any], manifest_dir: Path,
                           weights_map: Optional[Callable[[Path], Any]] = None, backend: Optional[str] = None,
                           **options: Any):
    """Open an engine with snexport's runtime; imported here so import stays light.

    ``backend`` is the runtime the engine was measured with (the manifest's ``measurement.backend``; the selector
    passes it), default: the one the file's suffix names (ONNX Runtime for .onnx). Every backend but ONNX Runtime
    opens the file through the backend table (``open_runner``); OpenVINO maps a pack's weights file itself.

    An ONNX engine of a portable pack (``weights_file`` set) gets its initializers as views of the pack's weights
    file, mapped once per file by ``weights_map(path)`` (a ``WeightsFileMap``; the selector passes its own
    cache), with ``PACK_RUNNER_DEFAULTS`` under the caller's options. Without ``weights_map`` ONNX Runtime reads
    the weights file itself. An engine of a device-optimized pack (prepacked weights inside, checked against this
    machine's ONNX Runtime and CPU) is opened plainly: ORT maps the shared file and uses the prepacked blobs.
    """
    from snexport.device.runtime import backend_for_path, open_runner

    path = manifest_dir / entry["file"]
    backend = backend or backend_for_path(path)
    if backend != "onnxruntime":
        return open_runner(path, backend=backend, **options)
    if entry.get("weights_file") and entry.get("format") == "onnx":
        from snexport.device.runtime.onnxruntime_runner import check_ort_pack

        if check_ort_pack(path) is not None:
            # A pack optimized on this device (export.pack.optimize_pack): ONNX Runtime maps the weights file
            # itself and takes its prepacked blobs from it, so the pages are shared without handing buffers over.
            return open_runner(path, **{**OPTIMIZED_PACK_RUNNER_DEFAULTS, **options})
        if weights_map is not None and "shared_initializers" not in options:
            mapped = weights_map(manifest_dir / entry["weights_file"])
            options = {**PACK_RUNNER_DEFAULTS, **options, "shared_initializers": mapped.initializers(path)}
    return open_runner(path, **options)


@dataclasses.dataclass(eq=False)
class _Slot:
    """A loaded runner plus the bookkeeping that lets it be closed only when no run is using it."""

    info: EngineInfo
    runner: Any
    refs: int = 0
    retired: bool = False  # evicted or selector closed: close when refs reaches 0
    closed: bool = False


class Selector:
    """Chooses among a build's engines on one device and runs the active one (see module docstring).

    ``mode="preload"`` loads every candidate at start (switching costs nothing, memory is the sum, see
    ``memory_cost_mb``; ``cache_size`` is ignored); ``"on_demand"`` keeps at most ``cache_size`` runners in an
    LRU cache. ``candidates``
    limits selection to those ids; by default the engines marked Pareto-optimal on the device, or all profiled ones
    when none is marked. Candidates' files (and shared weights files) are checked against the manifest's sha256 at
    start; a missing or altered file is left out with a ``SelectorWarning``. Other engines are checked when
    ``switch`` first loads them.

    Engine packs (``snexport.export.pack``): engines that name the same ``weights_file`` share it. The selector
    maps a portable pack's file once and gives every session views of it (``mapped_weights``); ONNX Runtime maps
    a device-optimized pack itself. ``shared_weights`` says which engines share which file, and
    ``memory_cost_mb`` counts a shared file once, so the cost of any preload set is known before loading it.
    """

    def __init__(
        self,
        manifest_path: PathLike,
        device: Optional[str] = None,
        percentile: str = "p90",
        mode: str = "preload",
        cache_size: int = 2,
        runner_factory: Optional[Callable[[dict, Path], Any]] = None,
        verify_hashes: bool = True,
        feedback: Optional[FeedbackConfig] = None,
        *,
        latency_ms: Optional[float] = None,
        memory_mb: Optional[float] = None,
        energy_mj: Optional[float] = None,
        candidates: Optional[Iterable[str]] = None,
        runner_options: Optional[Mapping[str, Any]] = None,
        on_switch: Optional[Callable[[SwitchEvent], None]] = None,
    ):
        if percentile not in PERCENTILES:
            raise SettingsError(f"percentile must be one of {', '.join(PERCENTILES)}, got {percentile!r}")
        if mode not in MODES:
            raise SettingsError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not _is_int(cache_size) or cache_size < 1:
            raise SettingsError(f"cache_size must be an integer >= 1, got {cache_size!r}")
        _check_budget(latency_ms, memory_mb, energy_mj)
        path = Path(manifest_path)
        self.manifest_path = path / MANIFEST_NAME if path.is_dir() else path
        self.manifest_dir = self.manifest_path.parent.resolve()
        self.manifest = read_manifest(self.manifest_path)
        self.percentile, self.mode, self.cache_size = percentile, mode, cache_size
        self.verify_hashes = verify_hashes
        self.feedback = feedback
        # Engine packs: one read-only map per shared weights file, created on first use, dropped on close.
        self._weights_maps: dict[Path, Any] = {}
        self._maps_lock = threading.Lock()
        self._on_switch = on_switch
        self.device = self._resolve_device(device)
        # Engines run as they were measured: each engine's recorded thread count (else the device's) unless the
        # caller overrides it.
        options = dict(runner_options or {})
        if "threads" not in options:
            options.update(self._measured_runner_options())
            engine_threads = self._engine_threads
        else:
            if options["threads"] is not None:
                _check_threads(options["threads"], SettingsError, "runner_options threads")
            engine_threads = lambda entry: {}  # noqa: E731 - the caller's count wins
        self._factory = runner_factory or (
            lambda entry, root: default_runner_factory(entry, root, weights_map=self._weights_map,
                                                       backend=self._engine_backend(entry),
                                                       **{**options, **engine_threads(entry)})
        )

        self._entries: dict[str, dict] = {}
        self._infos: dict[str, EngineInfo] = {}
        self._available: dict[str, tuple[bool, str]] = {}  # backend -> runtime_available(backend), asked once
        self._custom_factory = runner_factory is not None
        self._index_engines()
        self._hash_cache: dict[Path, str] = {}
        self._verified: set[str] = set()
        self._pool = self._build_pool(candidates)
        self._by_accuracy = all(self._infos[i].top1 is not None for i in self._pool)

        self._lock = threading.Lock()  # guards _slots, _active, _closed and slot refcounts
        self._switch_lock = threading.Lock()  # one switch (load) at a time; runs go on meanwhile
        self._fb_lock = threading.Lock()  # guards the feedback state below
        self._slots: "collections.OrderedDict[str, _Slot]" = collections.OrderedDict()
        self._active: Optional[str] = None
        self._closed = False
        self._events: "collections.deque[SwitchEvent]" = collections.deque(maxlen=1000)
        self._seq = 0
        self._budget_latency = latency_ms
        self._budget_memory = memory_mb
        self._budget_energy = energy_mj
        self._fb_window: "collections.deque[float]" = collections.deque(maxlen=feedback.window if feedback else 1)
        self._fb_count = 0
        self._fb_up_after = feedback.up_after if feedback else 0
        self._fb_probe = False  # active engine came from a feedback step up that has not yet held
        self._fb_floor_logged = False

        try:
            if mode == "preload":
                cost = self.memory_cost_mb(self._pool)
                if memory_mb is not None and cost > memory_mb:
                    _warn(f"preloading {len(self._pool)} engines costs {cost:.0f} MB, over the {memory_mb:g} MB "
                          "budget; use mode='on_demand' or fewer candidates")
                for engine_id in sorted(self._pool, key=lambda i: self._infos[i].latency_ms):
                    self._slots[engine_id] = self._load(self._infos[engine_id])
                _return_freed_heap()
            first = self.choose(latency_ms, memory_mb, energy_mj=energy_mj)
            self._switch_to(first.id, "initial")
        except BaseException:
            self.close()
            raise

    # -- manifest -> engines ---------------------------------------------------------------------------------

    def _measured_runner_options(self) -> dict:
        from snexport.device.runtime.backends import BACKENDS

        settings = self.manifest["devices"][self.device]["settings"]
        threads = settings.get("threads")  # the schema makes it a JSON integer >= 1 or null
        measured = {settings.get("backend"), *(settings.get("backends") or ())}
        if threads is None or not any(b in BACKENDS and BACKENDS[b].takes_threads for b in measured):
            return {}
        threads = int(threads)  # 4.0 is a JSON integer too
        _check_threads(threads, ManifestError, f"devices[{self.device!r}].settings.threads in {self.manifest_path}")
        return {"threads": threads}

    def _engine_threads(self, entry: Mapping[str, Any]) -> dict:
        """{"threads": n} when bench chose this engine's thread count on this device (measurement.threads)."""
        from snexport.device.runtime.backends import BACKENDS

        threads = (entry["measurements"].get(self.device) or {}).get("threads")
        backend = self._engine_backend(entry)
        if threads is None or backend not in BACKENDS or not BACKENDS[backend].takes_threads:
            return {}
        _check_threads(threads, ManifestError, f"threads of {entry.get('stitch_id')!r} in {self.manifest_path}")
        return {"threads": int(threads)}

    def _engine_backend(self, entry: Mapping[str, Any]) -> Optional[str]:
        """The runtime an engine was measured with on this device (None: the file's suffix decides)."""
        from snexport.device.runtime.backends import BACKENDS

        measured = (entry["measurements"].get(self.device) or {}).get("backend")
        if measured:
            return measured  # an unknown name is refused by open_runner, naming the backends this snexport has
        # Manifests from before per-engine backends: the device's backend, where it runs this kind of file.
        backend = self.manifest["devices"][self.device]["settings"].get("backend")
        suffix = Path(entry["file"]).suffix.lower()
        return backend if backend in BACKENDS and suffix in BACKENDS[backend].suffixes else None

    def _runnable_here(self, engine_id: str, entry: dict, m: Mapping[str, Any]) -> tuple[dict, Mapping[str, Any]]:
        """The engine as this machine can run it: as measured when its runtime is installed here; else re-pointed at
        the best other runtime measured for it (``by_backend``: that runtime's own file, verified like any engine
        file, and its own numbers: the figures of one runtime never stand for another); else as measured, listed
        in ``_unrunnable`` with the reason (it stays out of the pool)."""
        from snexport.device.pareto import best_backend, memory_for_pareto
        from snexport.device.runtime.backends import BACKENDS

        backend = self._engine_backend(entry)
        # None: the file's suffix decides; unknown: open_runner refuses, naming it. A caller's own runner factory
        # opens engines its own way: which runtimes are installed is then its business.
        if backend not in BACKENDS or self._custom_factory:
            return entry, m
        ok, why = self._backend_available(backend)
        if ok:
            return entry, m
        measured = m.get("by_backend")
        usable = {b: f for b, f in (measured.items() if isinstance(measured, Mapping) else ())
                  if b != backend and b in BACKENDS and self._usable_figures(f) and self._backend_available(b)[0]}
        if not usable:
            self._unrunnable[engine_id] = why
            return entry, m
        settings = self.manifest["devices"][self.device]["settings"]
        order = [b for b in (settings.get("backends") or ()) if isinstance(b, str)]
        pick = best_backend({b: {"latency_p50_ms": f["latency_p50_ms"], "latency_ci_ms": f["p50_ci_ms"],
                                 "memory_mb": memory_for_pareto(f["memory_mb"])} for b, f in usable.items()}, order)
        f = usable[pick]
        view = {k: v for k, v in m.items() if k not in ("latency_noise", "tied_with", "by_backend", "threads")}
        if f.get("threads") is not None:  # that runtime's own thread count, as measured
            view["threads"] = f["threads"]
        view.update(backend=pick, latency_ms=dict(f["latency_ms"]),
                    runner=(settings.get("runners") or {}).get(pick) or {},
                    memory=dict(m["memory"], rss_load_delta_mb=float(f["memory_mb"]), device_delta_mb=None),
                    # Cold load as that runtime measured it; its warm switch was not measured (bench times switches
                    # among the chosen runtimes only).
                    load_ms=dict(m["load_ms"], cold=f.get("load_cold_ms"), switch_p50=None, switch_p99=None))
        if m.get("energy"):
            view["energy"] = dict(m["energy"], mj_per_inference=f.get("energy_mj"))
        self._fallbacks[engine_id] = (backend, pick)
        entry = dict(entry, **{k: f.get(k) for k in BY_BACKEND_FILE_FIELDS},
                     measurements=dict(entry["measurements"], **{self.device: view}))
        return entry, view

    def _backend_available(self, backend: str) -> tuple[bool, str]:
        from snexport.device.runtime.backends import runtime_available

        if backend not in self._available:
            self._available[backend] = runtime_available(backend)
        return self._available[backend]

    def _usable_figures(self, figures: Any) -> bool:
        """A ``by_backend`` entry holds what running the engine on that runtime needs (bench writes these since
        the selector's fallback exists; older or hand-made ones are not used). The manifest is untrusted input:
        types and paths are checked here, the file's bytes against ``sha256`` when it is opened."""
        if not isinstance(figures, Mapping) or "refused" in figures:
            return False
        latency, ci = figures.get("latency_ms"), figures.get("p50_ci_ms")
        files_ok = all(isinstance(figures.get(k), str) and figures[k] and not _relpath_problem(figures[k])
                       for k in ("file", "sha256")) and (
            figures.get("weights_file") is None or (isinstance(figures["weights_file"], str)
                                                    and isinstance(figures.get("weights_sha256"), str)
                                                    and not _relpath_problem(figures["weights_file"])))
        numbers_ok = (isinstance(latency, Mapping) and all(_is_number(latency.get(p)) for p in ("p50", self.percentile))
                      and isinstance(ci, list) and len(ci) == 2 and all(map(_is_number, ci))
                      and all(_is_number(figures.get(k)) for k in ("latency_p50_ms", "memory_mb"))
                      and all(figures.get(k) is None or _is_number(figures[k])
                              for k in ("load_cold_ms", "energy_mj", "size_bytes", "weights_size_bytes",
                                        "weights_used_bytes")))
        return files_ok and numbers_ok

    def _resolve_device(self, device: Optional[str]) -> str:
        devices = self.manifest["devices"]
        if device is None:
            latest = latest_device(self.manifest)
            if latest is None:
                raise ManifestError(
                    f"no engine in {self.manifest_path} has been profiled on any device yet; run `snexport bench` "
                    "on this device to add measurements"
                )
            if len(devices) > 1:
                log.info("manifest has %d devices; using the latest measured, %s", len(devices), latest)
            return latest
        if device not in devices:
            known = ", ".join(sorted(devices)) or "none"
            raise ManifestError(
                f"device '{device}' has no measurements in {self.manifest_path} (measured devices: {known}); "
                "run `snexport bench` on it or pass one of those keys"
            )
        return device

    def _index_engines(self) -> None:
        entries = self.manifest["engines"]
        # Engines whose measured runtime is missing here: run on another measured one, or left out (and why).
        self._fallbacks: dict[str, tuple[str, str]] = {}  # engine id -> (measured backend, backend used here)
        self._unrunnable: dict[str, str] = {}  # engine id -> why it cannot run on this machine
        for entry, engine_id in zip(entries, engine_ids(entries)):
            sid = entry["stitch_id"]
            m = entry["measurements"].get(self.device)
            if m:
                entry, m = self._runnable_here(engine_id, entry, m)
            self._entries[engine_id] = entry
            self._infos[engine_id] = EngineInfo(
                id=engine_id,
                stitch_id=sid,
                file=self.manifest_dir / entry["file"],
                format=entry["format"],
                precision=entry["precision"],
                top1=entry["accuracy"]["top1"],
                gflops=float(entry["gflops"]),
                params=int(entry["params"]),
                input_name=entry["input"]["name"],
                input_shape=tuple(entry["input"]["shape"]),
                input_dtype=entry["input"]["dtype"],
                latency_ms=float(m["latency_ms"][self.percentile]) if m else None,
                memory_mb=engine_memory_mb(m) if m else None,
                cold_load_ms=m["load_ms"]["cold"] if m else None,
                energy_mj=_energy_mj(m),
                pareto=bool(m and m["pareto"]),
                backend=self._engine_backend(entry) if m else None,
            )

    def _build_pool(self, candidates: Optional[Iterable[str]]) -> list[str]:
        profiled = [i for i, info in self._infos.items() if info.profiled]
        if not profiled:
            raise ManifestError(
                f"no engine in {self.manifest_path} is profiled on device '{self.device}', so none can be chosen "
                "by latency; run `snexport bench` on this device"
            )
        self._explain_fallbacks(candidates)
        if candidates is None:
            runnable = [i for i in profiled if i not in self._unrunnable]
            if not runnable:
                raise BackendUnavailableError(
                    f"no engine profiled on device '{self.device}' can run here: "
                    f"{next(iter(self._unrunnable.values()))}, and no other runtime was measured for them; install "
                    "it, or run `snexport bench` on this device to measure the runtimes it has")
            # The recorded front was taken on the measured runtimes' numbers; once some engines run on another
            # runtime it no longer holds, so every runnable engine competes on the numbers it runs with here.
            front = [] if self._fallbacks else [i for i in runnable if self._infos[i].pareto]
            wanted = front or runnable
        else:
            if isinstance(candidates, (str, EngineInfo)):
                raise SettingsError(f"candidates must be a list of engine ids, got {candidates!r}; pass [{candidates!r}]")
            wanted = [self._resolve(c).id for c in candidates]
            if not wanted:
                raise SettingsError("candidates is empty; pass at least one engine id, or None for the device's "
                                    "Pareto set")
            unprofiled = [i for i in wanted if not self._infos[i].profiled]
            if unprofiled:
                raise ManifestError(
                    f"candidates {', '.join(unprofiled)} are not profiled on device '{self.device}'; "
                    "run `snexport bench` on this device or leave them out"
                )
            stuck = [i for i in wanted if i in self._unrunnable]
            if stuck:
                raise BackendUnavailableError(
                    f"candidate {stuck[0]} cannot run here: {self._unrunnable[stuck[0]]}, and no other runtime was "
                    "measured for it; install it, leave it out, or run `snexport bench` on this device")
        pool, problems = [], []
        for engine_id in wanted:
            problem = self._file_problem(engine_id)
            if problem:
                problems.append(problem)
                _warn(f"engine {engine_id} left out: {problem}; re-run `snexport build` (or copy the build "
                      "directory to the device again) to restore it")
            else:
                pool.append(engine_id)
        if not pool:
            # Engines of one pack fail together when their shared weights file is bad: say which file it was.
            common = f" ({problems[0]})" if len(set(problems)) == 1 else f" (first: {problems[0]})"
            raise ManifestError(
                f"every candidate engine in {self.manifest_path} is missing or altered{common}; re-run "
                "`snexport build` or copy the build directory to the device again"
            )
        return pool

    def _explain_fallbacks(self, candidates: Optional[Iterable[str]]) -> None:
        """One warning per missing runtime: which engines now run on which other measured runtime, which are left
        out, and what restores the measured choice."""
        from snexport.device.runtime.backends import BACKENDS

        missing: dict[str, dict[str, list]] = {}
        for engine_id, (measured, used) in self._fallbacks.items():
            missing.setdefault(measured, {}).setdefault(used, []).append(engine_id)
        for engine_id in self._unrunnable:
            backend = self._engine_backend(self._entries[engine_id])
            missing.setdefault(backend, {}).setdefault("", []).append(engine_id)
        for measured, by_used in missing.items():
            parts = [f"{_ids(ids)} run on {BACKENDS[used].label} with the figures and file measured for it"
                     for used, ids in by_used.items() if used]
            if by_used.get(""):
                parts.append(f"{_ids(by_used[''])} had no other runtime measured and are left out")
            front = "; the recorded front does not hold, so every runnable engine is a candidate" \
                if self._fallbacks and candidates is None else ""
            _warn(f"{self._backend_available(measured)[1]}, the runtime chosen for these engines on device "
                  f"'{self.device}': {'; '.join(parts)}{front}. Install it to run the measured choice, or re-run "
                  "`snexport bench` on this device")

    def _file_problem(self, engine_id: str) -> str:
        """Why an engine's files cannot be trusted, or '' when they match the manifest."""
        if engine_id in self._verified:
            return ""
        entry, info = self._entries[engine_id], self._infos[engine_id]
        files = [(info.file, entry["sha256"], entry["size_bytes"])]
        if entry["weights_file"]:
            files.append((self.manifest_dir / entry["weights_file"], entry["weights_sha256"],
                          entry.get("weights_size_bytes")))
        for path, digest, size in files:
            try:
                problem = self._one_file_problem(path, digest, size)
            except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
                problem = f"{path} cannot be read ({exc})"
            if problem:
                return problem
        self._verified.add(engine_id)
        return ""

    def _one_file_problem(self, path: Path, digest: str, size: Optional[int]) -> str:
        # The manifest travels with its files, so a link out of its directory (to /etc/..., to another build)
        # is refused: the selector only ever opens what was shipped next to the manifest.
        real = path.resolve()
        if real != self.manifest_dir and self.manifest_dir not in real.parents:
            return f"{path} leads outside {self.manifest_dir} (to {real}); copy the file into the build directory"
        if not path.is_file():
            return f"{path} is missing"
        # The size check catches truncated copies without reading the file.
        if size is not None and path.stat().st_size != size:
            return f"{path} is {path.stat().st_size} bytes, manifest says {size}"
        if self.verify_hashes:
            if path not in self._hash_cache:
                self._hash_cache[path] = sha256_file(path)
            if self._hash_cache[path] != digest:
                return f"{path} does not match its sha256 in the manifest (altered or from another build)"
        return ""

    def _resolve(self, target: Union[str, EngineInfo]) -> EngineInfo:
        engine_id = target.id if isinstance(target, EngineInfo) else target
        if engine_id in self._infos:
            return self._infos[engine_id]
        matches = [i for i in self._infos.values() if i.stitch_id == engine_id]
        if len(matches) > 1:
            raise UnknownStitchError(
                f"stitch '{engine_id}' has several engines here; pick one of {', '.join(m.id for m in matches)}"
            )
        raise UnknownStitchError.for_id(engine_id, self._infos)

    # -- queries ---------------------------------------------------------------------------------------------

    @property
    def engines(self) -> list[EngineInfo]:
        """The candidates, fastest first."""
        return sorted((self._infos[i] for i in self._pool), key=lambda e: e.latency_ms)

    def info(self, target: Union[str, EngineInfo]) -> EngineInfo:
        return self._resolve(target)

    @property
    def active(self) -> Optional[EngineInfo]:
        with self._lock:
            return self._infos[self._active] if self._active else None

    @property
    def budget(self) -> tuple[Optional[float], Optional[float]]:
        """(latency_ms, memory_mb) currently in force; None means no limit."""
        return self._budget_latency, self._budget_memory

    @property
    def energy_budget(self) -> Optional[float]:
        """Energy per inference (mJ) currently in force; None means no limit."""
        return self._budget_energy

    @property
    def events(self) -> list[SwitchEvent]:
        """Switches so far (the latest 1000), oldest first."""
        with self._lock:
            return list(self._events)

    def loaded(self) -> list[str]:
        """Ids of the engines currently loaded, least recently used first."""
        with self._lock:
            return list(self._slots)

    def _energy_reason(self, engine_id: str) -> Optional[str]:
        m = self._entries[engine_id]["measurements"].get(self.device) or {}
        return (m.get("energy") or {}).get("reason")

    def _rank(self, info: EngineInfo) -> tuple:
        accuracy = info.top1 if self._by_accuracy else info.gflops
        return (accuracy, -info.latency_ms)

    def choose(self, latency_ms: Optional[float] = None, memory_mb: Optional[float] = None,
               strict: bool = False, energy_mj: Optional[float] = None) -> EngineInfo:
        """The best candidate whose latency, memory and energy fit the budget (None: no limit).

        Latency is checked against the engine's measured ``percentile`` (p90 by default: pooled over every timed
        round on the device, so a lucky median never admits an engine that misses the budget one run in ten).
        Energy is the measured mJ per inference; an engine without an energy measurement never fits an energy
        budget. When none fits: ``strict`` raises BudgetError; otherwise a SelectorWarning names the miss and the
        fastest engine that fits the memory budget is returned (or, if none fits memory either, the smallest).
        """
        _check_budget(latency_ms, memory_mb, energy_mj)
        pool = [self._infos[i] for i in self._pool]
        if energy_mj is not None and all(e.energy_mj is None for e in pool):
            reason = next((r for r in map(self._energy_reason, self._pool) if r), "no energy sensor was read")
            raise ManifestError(f"no engine has an energy measurement on {self.device} ({reason}); drop the "
                                "energy budget, or run `snexport bench` on a device with an energy sensor")
        fits = [e for e in pool if _within(e.latency_ms, latency_ms) and _within(e.memory_mb, memory_mb)
                and _within(e.energy_mj, energy_mj)]
        if fits:
            return max(fits, key=self._rank)
        fastest = min(pool, key=lambda e: (e.latency_ms, e.memory_mb))
        smallest = min(pool, key=lambda e: (e.memory_mb, e.latency_ms))
        wanted = " and ".join(
            part for part in (
                f"{self.percentile} latency <= {latency_ms:g} ms" if latency_ms is not None else "",
                f"memory <= {memory_mb:g} MB" if memory_mb is not None else "",
                f"energy <= {energy_mj:g} mJ" if energy_mj is not None else "",
            ) if part
        )
        what = (f"no engine on {self.device} meets {wanted}: the fastest is {fastest.id} "
                f"({fastest.latency_ms:.3g} ms), the smallest {smallest.id} ({smallest.memory_mb:.3g} MB)")
        if strict:
            raise BudgetError(what + "; relax the budget or build smaller stitches")
        in_memory = [e for e in pool if _within(e.memory_mb, memory_mb)]
        fallback = min(in_memory, key=lambda e: e.latency_ms) if in_memory else smallest
        _warn(f"{what}; using {fallback.id}")
        return fallback

    def memory_cost_mb(self, stitch_ids: Iterable[Union[str, EngineInfo]]) -> float:
        """Memory that keeping these engines loaded together costs on this device, per the manifest.

        Sum of each engine's measured cost, except that a weights file shared by several engines (engine packs)
        is counted once: each engine's measured cost includes the bytes of the file it references
        (``weights_used_bytes``), so those are taken out and the shared file's size is added back once.
        Engines whose pack usage is not recorded are counted in full, which can only overestimate.
        """
        infos = {info.id: info for info in map(self._resolve, stitch_ids)}
        total = 0.0
        pack_size: dict[str, float] = {}  # weights_file -> its size (MB)
        pack_used: dict[str, float] = collections.defaultdict(float)  # weights_file -> sum of engines' parts
        for engine_id, info in infos.items():
            if info.memory_mb is None:
                raise ManifestError(f"engine {engine_id} is not profiled on device '{self.device}'; its memory "
                                    "is unknown (run `snexport bench` on this device)")
            entry = self._entries[engine_id]
            pack, size, used = entry["weights_file"], entry.get("weights_size_bytes"), entry.get("weights_used_bytes")
            if pack and size is not None and used is not None:
                total += max(0.0, info.memory_mb - used / 1e6)
                pack_size[pack] = size / 1e6
                pack_used[pack] += used / 1e6
            else:
                total += info.memory_mb
        # The union of the byte ranges the engines use is at most the file, and at most the sum of their parts.
        total += sum(min(pack_size[p], pack_used[p]) for p in pack_size)
        return total

    def shared_weights(self, engines: Optional[Iterable[Union[str, EngineInfo]]] = None) -> dict[str, list[str]]:
        """Which engines share which weights file (engine packs): manifest path -> engine ids, for ``engines``
        (default: the candidates). Engines with their weights inside their own file are not listed."""
        ids = [self._resolve(e).id for e in engines] if engines is not None else list(self._pool)
        out: dict[str, list[str]] = {}
        for engine_id in ids:
            pack = self._entries[engine_id]["weights_file"]
            if pack:
                out.setdefault(pack, []).append(engine_id)
        return out

    def mapped_weights(self) -> dict[Path, Any]:
        """The weights files mapped so far (absolute path -> ``WeightsFileMap``), each once for all its engines."""
        with self._maps_lock:
            return dict(self._weights_maps)

    def _weights_map(self, path: Path) -> Any:
        from snexport.device.runtime.onnxruntime_runner import WeightsFileMap

        key = Path(path).resolve()
        with self._maps_lock:
            if key not in self._weights_maps:
                self._weights_maps[key] = WeightsFileMap(key)
            return self._weights_maps[key]

    # -- switching and running -------------------------------------------------------------------------------

    def _load(self, info: EngineInfo) -> _Slot:
        problem = self._file_problem(info.id)
        if problem:
            raise ManifestError(f"cannot load engine {info.id}: {problem}; re-run `snexport build` or copy the "
                                "build directory to the device again")
        try:
            runner = self._factory(self._entries[info.id], self.manifest_dir)
            runner.load()  # idempotent by contract: a factory may already have loaded it
        except BuildDirError as exc:  # the file is unusable (open_runner says why in one line): name the engine
            raise ManifestError(f"cannot load engine {info.id}: {exc}") from None
        except SnexportError:
            raise
        except Exception as exc:  # noqa: BLE001 - a custom factory's runtime errors, recognised like open_runner's
            from snexport.device.runtime.backends import is_runtime_error

            if not is_runtime_error(exc):
                raise
            first_line = (str(exc).strip().splitlines() or [""])[0][:200]
            raise ManifestError(f"cannot load engine {info.id}: the runtime refuses {info.file} "
                                f"({type(exc).__name__}: {first_line}); it is not a valid {info.format} engine for "
                                "this device: re-run `snexport build` or copy the build directory again") from None
        # Apps shape their inputs from the manifest (EngineInfo.input_shape): it must be what the engine takes.
        loaded = tuple(getattr(runner, "input_shape", ()) or ())
        if loaded and all(isinstance(d, int) for d in loaded) and loaded != info.input_shape:
            runner.close()
            raise ManifestError(f"engine {info.id} takes input {list(loaded)} but the manifest says "
                                f"{list(info.input_shape)}; re-run `snexport build` (the manifest does not describe "
                                "this file)")
        return _Slot(info, runner)

    def switch(self, target: Union[str, EngineInfo]) -> EngineInfo:
        """Make ``target`` the active engine (loading it if needed); runs already started finish on theirs."""
        info = self._resolve(target)
        self._switch_to(info.id, "manual")
        return info

    def _switch_to(self, engine_id: str, reason: str, expected_from: Any = _UNSET,
                   observed_ms: Optional[float] = None) -> Optional[SwitchEvent]:
        with self._switch_lock:
            with self._lock:
                self._check_open()
                # A feedback decision made before another switch landed is stale: drop it.
                if (expected_from is not _UNSET and self._active != expected_from) or self._active == engine_id:
                    return None
                slot = self._slots.get(engine_id)
            started = time.perf_counter()
            if slot is None:  # load outside the lock: runs on the current engine go on meanwhile
                slot = self._load(self._infos[engine_id])
                _return_freed_heap()
            load_ms = (time.perf_counter() - started) * 1000.0
            event, to_close = self._install(slot, reason, observed_ms, load_ms)
            with self._fb_lock:
                self._fb_window.clear()
                self._fb_count = 0
                self._fb_probe = reason == "recovered"
                self._fb_floor_logged = False
        for stale in to_close:
            stale.runner.close()
        if event is None:
            self._check_open()
        log.info("switched %s -> %s (%s%s)", event.from_id, engine_id, reason,
                 f", observed {observed_ms:.3g} ms" if observed_ms is not None else "")
        if self._on_switch:
            self._on_switch(event)
        return event

    def _install(self, slot: _Slot, reason: str, observed_ms: Optional[float],
                 load_ms: float) -> tuple[Optional[SwitchEvent], list[_Slot]]:
        """Make a loaded slot active and evict beyond the cache size; returns the event and runners to close."""
        with self._lock:
            if self._closed:  # closed while we were loading: nobody else will ever close this runner
                return None, [slot]
            engine_id = slot.info.id
            previous, self._active = self._active, engine_id
            self._slots[engine_id] = slot
            self._slots.move_to_end(engine_id)
            to_close = []
            while self.mode == "on_demand" and len(self._slots) > self.cache_size:
                _, evicted = self._slots.popitem(last=False)  # never the active one: it was just moved to the end
                evicted.retired = True
                if evicted.refs == 0:  # otherwise the last run using it closes it (see _release)
                    evicted.closed = True
                    to_close.append(evicted)
            self._seq += 1
            event = SwitchEvent(self._seq, time.monotonic(), previous, engine_id, reason, observed_ms,
                                self._budget_latency, load_ms)
            self._events.append(event)
            return event, to_close

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("selector is closed; create a new Selector")

    def run(self, x: Any) -> Any:
        """Run the active engine on ``x``; with feedback on, the run's wall time is fed to ``observe``."""
        with self._lock:
            self._check_open()
            slot = self._slots[self._active]
            slot.refs += 1
        started = time.perf_counter()
        try:
            out = slot.runner.run(x)
        finally:
            elapsed_ms = (time.perf_counter() - started) * 1000.0
            self._release(slot)
        if self.feedback is not None and self.feedback.time_runs:
            self.observe(elapsed_ms, engine_id=slot.info.id)
        return out

    def _release(self, slot: _Slot) -> None:
        with self._lock:
            slot.refs -= 1
            close_now = slot.retired and slot.refs == 0 and not slot.closed
            if close_now:
                slot.closed = True
        if close_now:
            slot.runner.close()

    def set_budget(self, latency_ms: Optional[float] = _UNSET, memory_mb: Optional[float] = _UNSET,
                   strict: bool = False, energy_mj: Optional[float] = _UNSET) -> EngineInfo:
        """Change the budget (None removes a limit, omitted keeps it) and switch to the profile's best fit."""
        new_latency = self._budget_latency if latency_ms is _UNSET else latency_ms
        new_memory = self._budget_memory if memory_mb is _UNSET else memory_mb
        new_energy = self._budget_energy if energy_mj is _UNSET else energy_mj
        chosen = self.choose(new_latency, new_memory, strict=strict, energy_mj=new_energy)
        self._budget_latency, self._budget_memory, self._budget_energy = new_latency, new_memory, new_energy
        with self._fb_lock:  # a new budget is a new regime: forget the back-off
            self._fb_up_after = self.feedback.up_after if self.feedback else 0
            self._fb_probe = False
        self._switch_to(chosen.id, "budget")
        return chosen

    # -- closed loop -----------------------------------------------------------------------------------------

    def observe(self, latency_ms: float, engine_id: Optional[str] = None) -> Optional[SwitchEvent]:
        """Feed one measured latency of the active engine; returns the switch it caused, if any.

        Step down: once ``down_after`` observations are in and their percentile exceeds the latency budget, the
        slowdown factor (observed / profiled) is applied to every faster engine and the most accurate one that
        would then fit is chosen (the fastest if none would). Step up: after ``up_after`` observations, to the
        best engine predicted (profile x slowdown) below budget x (1 - hysteresis); or, once the device is back
        at its profiled speed (slowdown <= 1), to any engine whose profile fits the budget. The margin keeps a
        steady slowdown from flip-flopping between two engines; an up step undone by the next step down doubles
        ``up_after`` (up to ``max_up_after``) so a borderline engine is retried less and less often.
        Observations tagged with another ``engine_id`` (runs that started before a switch) are ignored. A switch
        it causes happens in the calling thread (in on_demand mode that includes loading the engine).
        """
        if self.feedback is None:
            raise ValueError("feedback is off for this selector; pass feedback=FeedbackConfig()")
        if not _is_number(latency_ms) or latency_ms < 0:
            raise SettingsError(f"observe() takes a measured latency in ms (a finite number >= 0), got {latency_ms!r}")
        with self._fb_lock:
            active = self._active
            if active is None or (engine_id is not None and engine_id != active):
                return None
            self._fb_window.append(float(latency_ms))
            self._fb_count += 1
            decision = self._decide(self._infos[active])
        if decision is None:
            return None
        target, reason, observed = decision
        return self._switch_to(target, reason, expected_from=active, observed_ms=observed)

    def _decide(self, current: EngineInfo) -> Optional[tuple[str, str, float]]:
        cfg, budget = self.feedback, self._budget_latency
        if budget is None or current.latency_ms is None or self._fb_count < cfg.down_after:
            return None
        recent = _percentile(self._fb_window, self.percentile)
        slowdown = recent / current.latency_ms if current.latency_ms > 0 else 1.0
        pool = [self._infos[i] for i in self._pool if _within(self._infos[i].memory_mb, self._budget_memory)
                and _within(self._infos[i].energy_mj, self._budget_energy)]
        if recent > budget:
            if self._fb_probe:
                self._fb_up_after = min(int(self._fb_up_after * cfg.backoff), cfg.max_up_after)
                self._fb_probe = False
            faster = [e for e in pool if e.latency_ms < current.latency_ms]
            if not faster:
                if not self._fb_floor_logged:
                    self._fb_floor_logged = True
                    log.warning("%s observed %.3g ms over the %.3g ms budget and no faster engine exists",
                                current.id, recent, budget)
                return None
            fits = [e for e in faster if e.latency_ms * slowdown <= budget]
            target = max(fits, key=self._rank) if fits else min(faster, key=lambda e: e.latency_ms)
            return target.id, "slowdown", recent
        if self._fb_count < self._fb_up_after:
            return None
        if self._fb_probe:  # the step up held for a full up_after: relax the back-off again
            self._fb_probe = False
            self._fb_up_after = max(cfg.up_after, int(self._fb_up_after / cfg.backoff))
        headroom = budget * (1.0 - cfg.hysteresis)
        better = [
            e for e in pool
            if self._rank(e) > self._rank(current)
            and (e.latency_ms * slowdown <= headroom or (slowdown <= 1.0 and e.latency_ms <= budget))
        ]
        if not better:
            return None
        return max(better, key=self._rank).id, "recovered", recent

    # -- lifetime --------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close every runner; runs in flight finish first (their runner closes when they return)."""
        with self._lock:
            self._closed = True
            self._active = None
            idle = []
            for slot in self._slots.values():
                slot.retired = True
                if slot.refs == 0 and not slot.closed:
                    slot.closed = True
                    idle.append(slot)
            self._slots.clear()
        for slot in idle:
            slot.runner.close()
        with self._maps_lock:
            # Runners still in a run keep their views, and through them the map, alive until they finish.
            self._weights_maps.clear()

    def __enter__(self) -> "Selector":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A real number that is finite as a float; bool is refused (``latency_ms=True`` would otherwise mean 1 ms),
    and so is an integer too large for a float (10**309 overflows in every comparison with a float's format)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _ids(ids: list) -> str:
    """A short list of engine ids for a one-line message."""
    return ", ".join(ids[:4]) + (f" and {len(ids) - 4} more" if len(ids) > 4 else "")


def _energy_mj(measurement: Optional[Mapping[str, Any]]) -> Optional[float]:
    energy = (measurement or {}).get("energy") or {}
    value = energy.get("mj_per_inference")
    return None if value is None else float(value)


def _check_budget(latency_ms: Any, memory_mb: Any, energy_mj: Any = None) -> None:
    """Budgets are None (no limit) or finite numbers >= 0; NaN would fit nothing yet compare as 'no miss'."""
    for name, value in (("latency_ms", latency_ms), ("memory_mb", memory_mb), ("energy_mj", energy_mj)):
        if value is not None and (not _is_number(value) or value < 0):
            raise SettingsError(f"{name} budget must be a finite number >= 0 or None (no limit), got {value!r}")


def max_threads() -> int:
    """The most inference threads the selector lets an engine have: 4 per core of this machine. Far more makes
    ONNX Runtime spend minutes creating thread pools (a 5000-thread manifest hung the constructor)."""
    return 4 * (os.cpu_count() or 1)


def _check_threads(threads: Any, error: type, where: str) -> None:
    if not _is_int(threads) or not 1 <= threads <= max_threads():
        raise error(f"{where} is {threads!r}; thread counts are whole numbers from 1 to {max_threads()} "
                    f"(4 per core of this machine): re-run `snexport bench` here, or pass runner_options={{'threads': N}}")


def _within(value: Optional[float], limit: Optional[float]) -> bool:
    return limit is None or (value is not None and value <= limit)


def _percentile(values: Iterable[float], which: str) -> float:
    """Percentile with linear interpolation between order statistics (numpy's default method)."""
    data = sorted(values)
    if which == "mean":
        return sum(data) / len(data)
    q = 0.0 if which == "min" else 100.0 if which == "max" else float(which[1:])
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def _warn(message: str) -> None:
    """Warn, attributed to the first caller outside this module (the app's line); apps that want these in their
    logs call ``logging.captureWarnings(True)``."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, SelectorWarning, stacklevel=level)
