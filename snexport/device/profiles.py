"""Device profiles: how to build and measure engines for one kind of device, read from ``profiles/*.toml``.

A profile fixes the backend, precision and measurement settings so that numbers taken on two devices of the
same kind are comparable, and carries the hardware facts a reader of a profile.jsonl needs (SMs, memory,
bandwidth) next to the fingerprint fields that must be recorded with every measurement (power mode, clocks).

Standard library only. The schema is strict: an unknown key or a wrong type is an error naming the key and the
file, because a misspelt setting would otherwise be measured with a default while the profile claims otherwise.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from snexport.device.runtime.backends import BACKENDS as _BACKEND_TABLE
from snexport.errors import ProfileError

try:
    import tomllib as _toml
except ImportError:  # Python 3.10
    try:
        import tomli as _toml  # type: ignore[no-redef]
    except ImportError:
        _toml = None

# `jetson-orin` means the flagship module; the smaller modules are named explicitly.
ALIASES = {"jetson-orin": "jetson-orin-agx"}

BACKENDS = tuple(_BACKEND_TABLE)
PRECISIONS = ("fp32", "fp16")
ENERGY_SENSORS = ("auto", "rapl", "nvml", "ina3221", "none")
# A profile describes a device that may not be this machine, so only an absolute sanity bound applies when it is
# read; `runner_options` checks the count against this machine's cores before any runtime sees it.
MAX_THREADS = 1024
MAX_PROFILE_BYTES = 1 << 20
# Fingerprint fields a profile may ask to be recorded (and checked present) with each measurement.
RECORDABLE = ("power_mode", "gpu_clock", "cpu_clock", "thermal", "l4t_release", "nvmap")


def _search_dirs() -> list[Path]:
    """Where profiles live: inside an installed wheel first (pyproject force-includes profiles/ as
    snexport/_profiles), then the repository checkout."""
    package = Path(__file__).resolve().parent.parent  # snexport/
    return [package / "_profiles", package.parent / "profiles"]


@dataclass(frozen=True)
class MeasurementSettings:
    """How bench times engines: ``rounds`` interleaved rounds, each timing every engine once (issue 10)."""

    warmup: int = 10  # untimed runs of an engine at the start of each round (clocks ramp, allocators settle)
    iterations: int = 20  # minimum timed runs of an engine per round
    min_duration_s: float = 0.3  # ... and minimum timed seconds per engine per round, whichever takes longer
    max_duration_s: float = 10.0  # cap on timed seconds per engine per round
    percentiles: tuple = (50.0, 90.0, 99.0)
    rounds: int = 5  # interleaved rounds, a fresh random engine order each
    ci_level: float = 0.95  # confidence level of the p50 interval (bootstrap over rounds)
    budget_s: float = 0.0  # > 0: fewer rounds (not below min_rounds) when `rounds` would take longer than this
    min_rounds: int = 5

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["percentiles"] = list(self.percentiles)
        return out

    def round_settings(self, quick: bool = False):
        """The settings of ``snexport.device.rounds``; ``quick`` is bench's first look (at most 8 short rounds)."""
        from snexport.device.rounds import RoundSettings

        if quick:
            return RoundSettings(rounds=min(self.rounds, 8), warmup=min(self.warmup, 3), iterations=1,
                                 min_duration_s=min(self.min_duration_s, 0.01), min_rounds=2,
                                 budget_s=min(self.budget_s or 10.0, 10.0),
                                 max_duration_s=min(self.max_duration_s, 1.0), percentiles=self.percentiles,
                                 ci_level=self.ci_level).check()
        return RoundSettings(rounds=self.rounds, warmup=self.warmup, iterations=self.iterations,
                             min_duration_s=self.min_duration_s, max_duration_s=self.max_duration_s,
                             budget_s=self.budget_s, min_rounds=min(self.min_rounds, self.rounds),
                             percentiles=self.percentiles, ci_level=self.ci_level).check()


@dataclass(frozen=True)
class HardwareFacts:
    """Published facts about the target (deployment-notes.md, Jetson table); informational, never measured."""

    gpu: Optional[str] = None
    compute_capability: Optional[str] = None
    cuda_cores: Optional[int] = None
    sm_count: Optional[int] = None
    dla_cores: Optional[int] = None
    cpu_cores: Optional[int] = None
    memory_gb: Optional[int] = None
    memory_bandwidth_gbs: Optional[float] = None
    unified_memory: Optional[bool] = None  # CPU and GPU share DRAM: a GPU budget is a system-memory budget
    power_modes: Optional[str] = None

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    backend: str  # tensorrt | onnxruntime | torch
    precision: str  # fp32 | fp16
    threads: Optional[int]  # CPU inference threads (ONNX Runtime intra-op, OpenVINO INFERENCE_NUM_THREADS); None: the runtime's choice
    workspace_mb: Optional[int]  # TensorRT builder workspace limit
    memory_budget_mb: Optional[int]  # default budget for the selector; override per deployment
    measurement: MeasurementSettings
    hardware: HardwareFacts = field(default_factory=HardwareFacts)
    record: tuple = ()  # fingerprint fields that must accompany every measurement (see RECORDABLE)
    notes: str = ""
    source: str = ""  # the TOML file it was read from
    energy_sensor: str = "auto"  # snexport.device.energy kind: auto | rapl | nvml | ina3221 | none
    # Runtimes `snexport bench` measures each engine on (each engine then runs on its fastest); () = every
    # installed CPU runtime of the backend table for a CPU backend, else `backend` alone. Pin it to compare boxes
    # that have different runtimes installed.
    backends: tuple = ()

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["measurement"] = self.measurement.to_dict()
        out["hardware"] = self.hardware.to_dict()
        out["record"] = list(self.record)
        out["backends"] = list(self.backends)
        return out

    def runner_options(self, backend: Optional[str] = None) -> dict:
        """Constructor options for the runner of ``backend`` (default: the profile's) under this profile
        (``snexport.device.runtime.open_runner(path, backend=backend, **options)``): the table's defaults for it
        and the profile's thread count, for a backend whose runner takes one."""
        spec = _BACKEND_TABLE[backend or self.backend]
        options: dict = {k: list(v) if isinstance(v, list) else v for k, v in spec.runner_defaults.items()}
        if spec.takes_threads and self.threads is not None:
            # 4 per core at most: far more makes ONNX Runtime spend minutes creating thread pools.
            limit = 4 * (os.cpu_count() or 1)
            if self.threads > limit:
                raise ProfileError(f"profile {self.name} asks for {self.threads} threads but this machine has "
                                   f"{os.cpu_count()} cores (at most {limit}); lower 'threads' in {self.source}")
            options["threads"] = self.threads
        return options


# -------------------------------------------------------------------------------------------------------------
# Schema checking
# -------------------------------------------------------------------------------------------------------------

_TOP_LEVEL = {
    "description": str,
    "backend": str,
    "precision": str,
    "threads": int,
    "workspace_mb": int,
    "memory_budget_mb": int,
    "record": list,
    "notes": str,
    "measurement": dict,
    "hardware": dict,
    "energy_sensor": str,
    "backends": list,
}
_MEASUREMENT = {"warmup": int, "iterations": int, "min_duration_s": float, "max_duration_s": float, "percentiles": list,
                "rounds": int, "ci_level": float, "budget_s": float, "min_rounds": int}
_HARDWARE = {
    "gpu": str,
    "compute_capability": str,
    "cuda_cores": int,
    "sm_count": int,
    "dla_cores": int,
    "cpu_cores": int,
    "memory_gb": int,
    "memory_bandwidth_gbs": float,
    "unified_memory": bool,
    "power_modes": str,
}
_REQUIRED = ("description", "backend", "precision", "measurement")
_TYPE_NAMES = {
    str: "a string", int: "an integer", float: "a number", bool: "true/false", list: "a list", dict: "a table"
}


def _check_type(value: Any, kind: type, where: str, path: Path) -> Any:
    # bool is an int in Python; `threads = true` must not pass as 1.
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ProfileError(
            f"'{where}' in {path} must be {_TYPE_NAMES[kind]}, got {type(value).__name__} {_short(value)}; "
            "fix the profile"
        )
    # TOML has nan, inf and integers of any size; none is a meaningful setting (a NaN duration compares false
    # with every limit, a huge integer overflows float()).
    if kind in (int, float) and not (abs(value) < 2**63 if isinstance(value, int) else math.isfinite(value)):
        raise ProfileError(f"'{where}' in {path} is {_short(value)}; use a finite number of sensible size")
    return float(value) if kind is float else value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_table(table: dict, schema: dict[str, type], prefix: str, path: Path) -> dict:
    checked = {}
    for key, value in table.items():
        where = f"{prefix}{key}"
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ProfileError(f"unknown key '{where}' in {path}{hint}; valid keys: {', '.join(schema)}")
        checked[key] = _check_type(value, schema[key], where, path)
    return checked


def _positive(value: Any, where: str, path: Path, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise ProfileError(f"'{where}' in {path} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _one_of(value: str, choices: tuple, where: str, path: Path) -> None:
    if value not in choices:
        raise ProfileError(f"'{where}' in {path} is '{value}'; use one of {', '.join(choices)}")


def _parse(data: dict, name: str, path: Path) -> DeviceProfile:
    top = _check_table(data, _TOP_LEVEL, "", path)
    missing = [key for key in _REQUIRED if key not in top]
    if missing:
        raise ProfileError(f"{path} lacks required key(s) {', '.join(missing)}; add them (see profiles/x86-cpu.toml)")
    _one_of(top["backend"], BACKENDS, "backend", path)
    _one_of(top["precision"], PRECISIONS, "precision", path)
    _one_of(top.get("energy_sensor", "auto"), ENERGY_SENSORS, "energy_sensor", path)
    for key in ("threads", "workspace_mb", "memory_budget_mb"):
        _positive(top.get(key), key, path)
    if top.get("threads", 0) > MAX_THREADS:
        raise ProfileError(f"'threads' in {path} is {top['threads']}; no device has use for more than {MAX_THREADS}")

    m = _check_table(top["measurement"], _MEASUREMENT, "measurement.", path)
    for i, q in enumerate(m.get("percentiles", [])):
        q = _check_type(q, float, f"measurement.percentiles[{i}]", path)
        if not 0 < q <= 100:
            raise ProfileError(f"'measurement.percentiles[{i}]' in {path} is {q}; percentiles lie in (0, 100]")
    if "percentiles" in m:
        m["percentiles"] = tuple(float(q) for q in m["percentiles"])
    measurement = MeasurementSettings(**m)
    _positive(measurement.iterations, "measurement.iterations", path)
    _positive(measurement.warmup, "measurement.warmup", path, allow_zero=True)
    _positive(measurement.min_duration_s, "measurement.min_duration_s", path, allow_zero=True)
    if measurement.rounds < 2:
        raise ProfileError(f"'measurement.rounds' in {path} is {measurement.rounds}; use >= 2 (rounds show drift)")
    if measurement.min_rounds < 2:
        raise ProfileError(f"'measurement.min_rounds' in {path} is {measurement.min_rounds}; use >= 2")
    _positive(measurement.budget_s, "measurement.budget_s", path, allow_zero=True)
    if not 0.5 <= measurement.ci_level < 1:
        raise ProfileError(f"'measurement.ci_level' in {path} is {measurement.ci_level}; use a level in [0.5, 1)")
    if measurement.max_duration_s < measurement.min_duration_s:
        raise ProfileError(f"'measurement.max_duration_s' in {path} is below min_duration_s; raise it")

    backends = top.get("backends", [])
    for i, item in enumerate(backends):
        _check_type(item, str, f"backends[{i}]", path)
        _one_of(item, BACKENDS, f"backends[{i}]", path)
        if item != top["backend"] and not (_BACKEND_TABLE[item].cpu and _BACKEND_TABLE[top["backend"]].cpu):
            raise ProfileError(f"'backends[{i}]' in {path} is '{item}', which cannot stand in for '{top['backend']}'; "
                               "only CPU runtimes are measured side by side (e.g. onnxruntime, openvino)")

    hardware = HardwareFacts(**_check_table(top.get("hardware", {}), _HARDWARE, "hardware.", path))
    record = top.get("record", [])
    for i, item in enumerate(record):
        _check_type(item, str, f"record[{i}]", path)
        _one_of(item, RECORDABLE, f"record[{i}]", path)

    return DeviceProfile(
        name=name,
        description=top["description"],
        backend=top["backend"],
        precision=top["precision"],
        threads=top.get("threads"),
        workspace_mb=top.get("workspace_mb"),
        memory_budget_mb=top.get("memory_budget_mb"),
        measurement=measurement,
        hardware=hardware,
        record=tuple(record),
        notes=top.get("notes", "").strip(),
        source=str(path),
        energy_sensor=top.get("energy_sensor", "auto"),
        backends=tuple(dict.fromkeys(backends)),
    )


# -------------------------------------------------------------------------------------------------------------
# Public API
# -------------------------------------------------------------------------------------------------------------


def _profile_files() -> dict[str, Path]:
    """Profile name -> file; an earlier search directory wins over a later one."""
    found: dict[str, Path] = {}
    for directory in _search_dirs():
        if directory.is_dir():
            for file in sorted(directory.glob("*.toml")):
                found.setdefault(file.stem, file)
    return found


def list_profiles(include_aliases: bool = False) -> list[str]:
    """Names accepted by ``load_profile`` (file stems; aliases too when asked)."""
    names = set(_profile_files())
    if include_aliases:
        names |= {alias for alias, target in ALIASES.items() if target in names}
    return sorted(names)


def load_profile(name_or_path: str | os.PathLike) -> DeviceProfile:
    """Load a profile by name (``jetson-orin-agx``), alias (``jetson-orin``) or path to a ``.toml`` file."""
    if _toml is None:
        raise ProfileError("reading profiles needs tomllib (Python >= 3.11) or the `tomli` package on Python 3.10")
    text = str(name_or_path)
    candidate = Path(text)
    try:
        is_file = candidate.is_file()
    except (OSError, ValueError):  # a name too long for the file system, or with a NUL in it
        is_file = False
    if text.endswith(".toml") or os.sep in text or is_file:
        if not is_file:
            raise ProfileError(
                f"no profile file at {candidate}; pass an existing .toml or one of {', '.join(list_profiles())}"
            )
        path, name = candidate, candidate.stem
    else:
        name = ALIASES.get(text, text)
        files = _profile_files()
        if name not in files:
            valid = list_profiles(include_aliases=True)
            close = difflib.get_close_matches(text, valid, n=2, cutoff=0.5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ProfileError(f"unknown device profile '{text}'.{hint} Valid profiles: {', '.join(valid)}")
        path = files[name]
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_PROFILE_BYTES + 1)
    except OSError as exc:
        raise ProfileError(f"cannot read profile {path} ({exc.strerror}); check the path and its permissions") from None
    if len(raw) > MAX_PROFILE_BYTES:
        raise ProfileError(f"{path} is over {MAX_PROFILE_BYTES >> 20} MiB, far more than a profile; pass the right file")
    try:
        data = _toml.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{path} is not UTF-8 text (byte {exc.start}); save the profile as UTF-8") from None
    except _toml.TOMLDecodeError as exc:
        raise ProfileError(f"{path} is not valid TOML ({exc}); fix the syntax") from None
    except RecursionError:
        raise ProfileError(f"{path} nests arrays or tables too deeply for a profile; fix the syntax") from None
    return _parse(data, name, path)
