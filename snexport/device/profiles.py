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
# Fingerprint fields a profile may ask to be recorded (and checked present) with each measurement.
RECORDABLE = ("power_mode", "gpu_clock", "cpu_clock", "thermal", "l4t_release", "nvmap")


def _search_dirs() -> list[Path]:
    """Where profiles live: inside an installed wheel first (pyproject force-includes profiles/ as
    snexport/_profiles), then the repository checkout."""
    package = Path(__file__).resolve().parent.parent  # snexport/
    return [package / "_profiles", package.parent / "profiles"]


@dataclass(frozen=True)
class MeasurementSettings:
    warmup: int = 10  # untimed runs before timing (clocks ramp up, allocators and autotuners settle)
    iterations: int = 100  # minimum timed runs
    min_duration_s: float = 1.0  # ... and minimum timed seconds, whichever takes longer
    max_duration_s: float = 30.0  # hard cap per engine; the record says when it was hit
    percentiles: tuple = (50.0, 90.0, 99.0)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["percentiles"] = list(self.percentiles)
        return out


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
    threads: Optional[int]  # CPU inference threads (ONNX Runtime intra-op); None: the runtime's choice
    workspace_mb: Optional[int]  # TensorRT builder workspace limit
    memory_budget_mb: Optional[int]  # default budget for the selector; override per deployment
    measurement: MeasurementSettings
    hardware: HardwareFacts = field(default_factory=HardwareFacts)
    record: tuple = ()  # fingerprint fields that must accompany every measurement (see RECORDABLE)
    notes: str = ""
    source: str = ""  # the TOML file it was read from

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["measurement"] = self.measurement.to_dict()
        out["hardware"] = self.hardware.to_dict()
        out["record"] = list(self.record)
        return out

    def runner_options(self) -> dict:
        """Constructor options for this profile's runner (``snexport.device.runtime.open_runner(path, **options)``)."""
        if self.backend == "onnxruntime":
            options: dict = {"providers": ["cpu"]}
            if self.threads is not None:
                options["threads"] = self.threads
            return options
        return {}


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
}
_MEASUREMENT = {"warmup": int, "iterations": int, "min_duration_s": float, "max_duration_s": float, "percentiles": list}
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
        ok, value = True, float(value)
    if not ok:
        raise ProfileError(
            f"'{where}' in {path} must be {_TYPE_NAMES[kind]}, got {type(value).__name__} {value!r}; fix the profile"
        )
    return value


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
    for key in ("threads", "workspace_mb", "memory_budget_mb"):
        _positive(top.get(key), key, path)

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
    if measurement.max_duration_s < measurement.min_duration_s:
        raise ProfileError(f"'measurement.max_duration_s' in {path} is below min_duration_s; raise it")

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
    if text.endswith(".toml") or os.sep in text or candidate.is_file():
        if not candidate.is_file():
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
            data = _toml.load(fh)
    except _toml.TOMLDecodeError as exc:
        raise ProfileError(f"{path} is not valid TOML ({exc}); fix the syntax") from exc
    return _parse(data, name, path)
