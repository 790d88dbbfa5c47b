"""Energy-per-inference measurement for the device side of snexport.

Standard library only.  Three sensor back-ends share one interface:

* ``RaplSensor``    -- Linux powercap RAPL package counters (Intel, and AMD Zen
                       on kernels whose ``intel_rapl_msr`` driver covers it).
* ``Ina3221Sensor`` -- NVIDIA Jetson INA3221 power monitor, total input rail
                       (``VDD_IN``) only, integrated from sampled power.
* ``NvmlSensor``    -- NVIDIA GPU energy counter via NVML (``pynvml`` from the
                       ``nvidia-ml-py`` package; optional).

Typical use::

    sensor = open_energy_sensor()              # best available, or NoSensor
    with sensor.measure() as m:
        for _ in range(n):
            session.run(...)
    record["energy"] = per_inference_mj(m, n)  # plain JSON-able dict

What is measured, and what is not
---------------------------------
* Every number is the energy of the *domain the sensor covers* over the timed
  window, idle/baseline power included (nothing is subtracted):
  RAPL = CPU package(s) (cores, caches, on-die uncore; not DRAM unless the
  package domain includes it on that CPU), INA3221 VDD_IN = the Jetson module's
  input (not the carrier board), NVML = the GPU as NVML reports it.
* Nothing here is a model or an estimate.  When a counter or rail cannot give a
  real number, the result is ``{"energy_mj_per_inference": None, "reason": ...}``.

Effect on the timed code
------------------------
* Counter sensors (RAPL, NVML) read their counters once at the start and once
  at the end of the window: a few sysfs reads / one NVML call each side.
* The INA3221 has no energy counter, so ``Ina3221Sensor`` runs a sampling
  thread **beside the timed work** for the whole window (default every 20 ms,
  two small sysfs reads per sample).  That thread takes the GIL briefly and
  wakes a CPU core; ONNX Runtime and TensorRT release the GIL while running,
  but on a small Jetson CPU the extra wake-ups can still shift latency
  slightly.  Callers who need clean latency numbers should measure energy in
  separate rounds from latency.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = [
    "EnergySensor",
    "Measurement",
    "NoSensor",
    "RaplSensor",
    "Ina3221Sensor",
    "NvmlSensor",
    "open_energy_sensor",
    "per_inference_mj",
    "integrate_power_samples",
    "query_nvpmodel",
    "query_jetson_clocks",
    "TOTAL_INPUT_RAIL_LABELS",
]

Opener = Callable[[str], str]
Runner = Callable[[Sequence[str]], Tuple[int, str, str]]

#: Labels accepted as the Jetson *total* module input rail.  ``VDD_IN`` is the
#: label on Orin NX / Orin Nano (tegra234-p3767), Xavier NX, TX1, TX2, TX2 NX;
#: ``POM_5V_IN`` is the same rail's label on the original Jetson Nano (L4T 32).
#: Jetson AGX Orin and AGX Xavier have no total-input channel on their INA3221s.
TOTAL_INPUT_RAIL_LABELS = ("VDD_IN", "POM_5V_IN")

_RAPL_ZONE_RE = re.compile(r"^intel-rapl:(\d+)$")  # top-level zones only
_RAPL_PACKAGE_NAME_RE = re.compile(r"^package-\d+(-die-\d+)?$")


def _read_text(path: str) -> str:
    with open(path, "r", encoding="ascii", errors="replace") as fh:
        return fh.read()


def _join(root: str, *parts: str) -> str:
    """Join absolute sysfs path parts under an injectable root ("/" = real)."""
    rel = os.path.join(*parts).lstrip("/")
    return os.path.join(root, rel)


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------


class Measurement:
    """One timed window.  Use as a context manager (``with sensor.measure() as m``).

    After the ``with`` block: ``energy_j`` (None when no real number could be
    obtained; then ``reason`` says why), ``seconds``, ``mean_power_w``,
    ``source``, ``method``, ``scope``, ``warnings``, and ``samples`` (list of
    ``(t_seconds_from_start, watts)`` for sampling sensors, else None).
    """

    def __init__(self, sensor: "EnergySensor"):
        self._sensor = sensor
        self._state: object = None
        self._t0: Optional[float] = None
        self.source: Optional[str] = sensor.source
        self.method: Optional[str] = sensor.method
        self.scope: Optional[str] = sensor.scope
        self.energy_j: Optional[float] = None
        self.seconds: Optional[float] = None
        self.reason: Optional[str] = None
        self.samples: Optional[List[Tuple[float, float]]] = None
        self.warnings: List[str] = []
        self.details: Dict[str, object] = {}
        self.finished = False

    @property
    def mean_power_w(self) -> Optional[float]:
        if self.energy_j is None or not self.seconds or self.seconds <= 0:
            return None
        return self.energy_j / self.seconds

    def __enter__(self) -> "Measurement":
        try:
            self._state = self._sensor._start(self)
        except Exception as exc:  # sensor failed at start: no number, keep timing
            self._state = None
            self.reason = f"{self._sensor.kind}: start failed: {_err(exc)}"
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        t1 = time.perf_counter()
        self.seconds = t1 - (self._t0 if self._t0 is not None else t1)
        if self.reason is None:
            try:
                self._sensor._finish(self, self._state, self._t0, t1)
            except Exception as err:
                self.energy_j = None
                self.reason = f"{self._sensor.kind}: end read failed: {_err(err)}"
        if self.energy_j is not None:
            min_s = self._sensor.min_reliable_seconds
            if min_s and self.seconds < min_s:
                self.warnings.append(
                    f"window {self.seconds:.4f} s is shorter than {min_s} s, below which "
                    f"{self._sensor.kind} resolution makes the number coarse; "
                    "time more inferences per window"
                )
        self.finished = True
        return False  # never swallow the timed code's exceptions

    def to_dict(self, include_samples: bool = False) -> Dict[str, object]:
        out: Dict[str, object] = {
            "energy_j": self.energy_j,
            "seconds": self.seconds,
            "mean_power_w": self.mean_power_w,
            "source": self.source,
            "method": self.method,
            "scope": self.scope,
        }
        if self.energy_j is None:
            out["reason"] = self.reason
        if self.samples is not None:
            out["n_samples"] = len(self.samples)
            if include_samples:
                out["samples"] = [[t, w] for t, w in self.samples]
        if self.warnings:
            out["warnings"] = list(self.warnings)
        if self.details:
            out["details"] = dict(self.details)
        return out


# --------------------------------------------------------------------------
# Base sensor / NoSensor
# --------------------------------------------------------------------------


class EnergySensor:
    """Common interface.  ``available`` is False with a ``reason`` when unusable."""

    kind = "none"
    method: Optional[str] = None
    scope: Optional[str] = None
    min_reliable_seconds: float = 0.0
    # True when the sensor runs a thread during the window (INA3221): bench then measures energy in rounds of
    # its own instead of during the latency rounds, so nothing of ours runs beside the timed code.
    samples_during_window = False

    def __init__(self) -> None:
        self.available = False
        self.reason: Optional[str] = None
        self.source: Optional[str] = None

    def measure(self) -> Measurement:
        return Measurement(self)

    def close(self) -> None:
        """Release library handles (NVML); sysfs sensors hold none."""

    def describe(self) -> Dict[str, object]:
        d: Dict[str, object] = {"kind": self.kind, "available": self.available}
        if self.available:
            d.update(source=self.source, method=self.method, scope=self.scope)
        else:
            d["reason"] = self.reason
        return d

    # subclass hooks -------------------------------------------------------
    def _start(self, m: Measurement) -> object:
        raise NotImplementedError

    def _finish(self, m: Measurement, state: object, t0: float, t1: float) -> None:
        raise NotImplementedError


class NoSensor(EnergySensor):
    """Stand-in when nothing can measure energy; measurements carry the reason."""

    kind = "none"

    def __init__(self, reason: str):
        super().__init__()
        self.reason = reason

    def _start(self, m: Measurement) -> object:
        m.reason = self.reason
        return None

    def _finish(self, m, state, t0, t1) -> None:  # pragma: no cover - not reached
        m.reason = self.reason


# --------------------------------------------------------------------------
# RAPL (powercap)
# --------------------------------------------------------------------------


class _RaplZone:
    def __init__(self, index: int, name: str, energy_path: str, max_range_uj: Optional[int]):
        self.index = index
        self.name = name
        self.energy_path = energy_path
        self.max_range_uj = max_range_uj


class RaplSensor(EnergySensor):
    """Sum of RAPL *package* domains from ``/sys/class/powercap/intel-rapl:N``.

    Sub-domains (``intel-rapl:N:M``: core, uncore, dram) are not added: core
    and uncore are parts of the package, and adding them would double count.
    Other top-level zones (``psys``; ``intel-rapl-mmio:N``, which mirrors the
    same package) are skipped for the same reason.

    ``energy_uj`` is a free-running counter that wraps at
    ``max_energy_range_uj``.  One wrap between start and end is corrected;
    more than one wrap cannot be detected from two reads, so a warning is
    added when the window is long enough for that to be possible at
    ``max_plausible_package_w`` per package.
    """

    kind = "rapl"
    method = (
        "RAPL energy_uj counter delta (start/end reads) per package domain, "
        "single wrap corrected with max_energy_range_uj, summed over packages"
    )
    scope = "CPU package domain(s) only; idle power included; no GPU, no board"
    min_reliable_seconds = 0.01  # counters update about every millisecond

    def __init__(self, root: str = "/", opener: Optional[Opener] = None,
                 max_plausible_package_w: float = 500.0):
        super().__init__()
        self.root = root
        self._open = opener or _read_text
        self.max_plausible_package_w = max_plausible_package_w
        self.zones: List[_RaplZone] = []
        self.skipped: List[str] = []
        self._discover()

    def _discover(self) -> None:
        base = _join(self.root, "/sys/class/powercap")
        if not os.path.isdir(base):
            self.reason = (
                "no /sys/class/powercap (kernel without powercap/intel_rapl, a VM "
                "without RAPL, or a container that masks it)"
            )
            return
        found = []
        for entry in sorted(os.listdir(base)):
            m = _RAPL_ZONE_RE.match(entry)
            if not m:
                continue
            zdir = os.path.join(base, entry)
            try:
                name = self._open(os.path.join(zdir, "name")).strip()
            except OSError as exc:
                self.skipped.append(f"{entry}: name unreadable ({_err(exc)})")
                continue
            if not _RAPL_PACKAGE_NAME_RE.match(name):
                self.skipped.append(f"{entry}: {name} (not a package domain)")
                continue
            try:
                max_range: Optional[int] = int(
                    self._open(os.path.join(zdir, "max_energy_range_uj")).strip())
            except (OSError, ValueError):
                max_range = None
            found.append(_RaplZone(int(m.group(1)), name,
                                   os.path.join(zdir, "energy_uj"), max_range))
        found.sort(key=lambda z: z.index)
        if not found:
            self.reason = "no RAPL package domain (intel-rapl:N named package-N) under " + base
            return
        for z in found:  # probe: energy_uj is root-only on Linux >= 5.10
            try:
                int(self._open(z.energy_path).strip())
            except (OSError, ValueError) as exc:
                self.reason = (
                    f"cannot read {z.energy_path}: {_err(exc)} (energy_uj is readable "
                    "by root only on Linux >= 5.10, the CVE-2020-8694 mitigation; run as "
                    "root or grant read access to the file)"
                )
                return
        self.zones = found
        self.available = True
        self.source = "rapl:" + "+".join(z.name for z in found)

    def describe(self) -> Dict[str, object]:
        d = super().describe()
        if self.zones:
            d["domains"] = [{"zone": f"intel-rapl:{z.index}", "name": z.name,
                             "max_energy_range_uj": z.max_range_uj} for z in self.zones]
        if self.skipped:
            d["skipped"] = list(self.skipped)
        return d

    def _read_all(self) -> List[int]:
        return [int(self._open(z.energy_path).strip()) for z in self.zones]

    def _start(self, m: Measurement) -> object:
        if not self.available:
            m.reason = self.reason
            return None
        return self._read_all()

    def _finish(self, m: Measurement, state: object, t0: float, t1: float) -> None:
        start = state
        end = self._read_all()
        total_uj = 0
        wraps = []
        for z, a, b in zip(self.zones, start, end):
            d = b - a
            if d < 0:
                if z.max_range_uj is None:
                    m.energy_j = None
                    m.reason = (
                        f"rapl: {z.name} counter went backwards ({a} -> {b} uJ), i.e. it "
                        "wrapped, and max_energy_range_uj is unreadable, so the wrap "
                        "cannot be corrected"
                    )
                    return
                d += z.max_range_uj
                wraps.append(z.name)
            total_uj += d
        m.energy_j = total_uj / 1e6
        m.details["counter_uj"] = {z.name: [a, b] for z, a, b in zip(self.zones, start, end)}
        if wraps:
            m.details["wrapped"] = wraps
        missing = [z.name for z in self.zones if z.max_range_uj is None]
        if missing:
            m.warnings.append(
                "max_energy_range_uj unreadable for " + ", ".join(missing)
                + "; no wrap was seen, but a wrap could not have been corrected")
        ranges = [z.max_range_uj for z in self.zones if z.max_range_uj]
        if ranges and m.seconds is not None:
            safe_s = min(ranges) / 1e6 / self.max_plausible_package_w
            if m.seconds > safe_s:
                m.warnings.append(
                    f"window {m.seconds:.1f} s exceeds {safe_s:.0f} s, the time one "
                    f"counter range lasts at {self.max_plausible_package_w:.0f} W; a "
                    "second wrap would be undetectable -- use shorter windows")


# --------------------------------------------------------------------------
# Jetson INA3221
# --------------------------------------------------------------------------


def integrate_power_samples(samples: Sequence[Tuple[float, float]],
                            t_start: float, t_end: float) -> float:
    """Energy (J) over ``[t_start, t_end]`` from ``(t, watts)`` samples.

    Trapezoid rule on the piecewise-linear curve through the samples, clipped
    to the window; before the first / after the last sample the nearest
    sample's value is held.  Samples must be sorted by time.
    """
    if t_end <= t_start or not samples:
        return 0.0
    pts = list(samples)
    # Extend with held values so the curve covers the whole window.
    if pts[0][0] > t_start:
        pts.insert(0, (t_start, pts[0][1]))
    if pts[-1][0] < t_end:
        pts.append((t_end, pts[-1][1]))
    energy = 0.0
    for (ta, pa), (tb, pb) in zip(pts, pts[1:]):
        if tb <= ta:
            continue
        lo, hi = max(ta, t_start), min(tb, t_end)
        if hi <= lo:
            continue
        slope = (pb - pa) / (tb - ta)
        p_lo = pa + slope * (lo - ta)
        p_hi = pa + slope * (hi - ta)
        energy += 0.5 * (p_lo + p_hi) * (hi - lo)
    return energy


class _Rail:
    def __init__(self, label: str, device_dir: str, layout: str, voltage_path: str,
                 current_path: str, power_path: Optional[str] = None):
        self.label = label
        self.device_dir = device_dir
        self.layout = layout  # "hwmon" or "iio"
        self.voltage_path = voltage_path
        self.current_path = current_path
        self.power_path = power_path


class Ina3221Sensor(EnergySensor):
    """Jetson module input power from the INA3221 ``VDD_IN`` rail, sampled and integrated.

    Layouts searched under ``root``:

    * hwmon (JetPack 5/6, mainline ``ina3221`` driver):
      ``/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/`` and any
      ``/sys/class/hwmon/hwmon*/`` whose ``name`` is ``ina3221``;
      channel N (1..3): ``inN_label``, ``inN_input`` (bus mV), ``currN_input`` (mA).
    * iio (JetPack 4 / L4T 32, NVIDIA ``ina3221x`` driver):
      ``/sys/bus/i2c/drivers/ina3221x/*/iio:device*/``; channel N (0..2):
      ``rail_name_N``, ``in_voltageN_input`` (mV), ``in_currentN_input`` (mA),
      ``in_powerN_input`` (mW, used only if voltage/current are missing).

    Power = bus voltage x current.  Only a total-input rail
    (``TOTAL_INPUT_RAIL_LABELS``) is used; component rails are never summed,
    because they overlap or leave parts of the module out (AGX Orin has no
    VDD_IN channel, so it reports unavailable).

    Sampling: a thread reads the rail every ``interval_s`` beside the timed
    work (see the module docstring).  The chip's own conversion/averaging
    time (hwmon ``update_interval``, ms) bounds how fast values really change;
    sampling faster than it only repeats values.
    """

    kind = "ina3221"
    samples_during_window = True
    method = (
        "INA3221 total-input rail power (bus mV x mA) sampled by a background thread "
        "at a fixed interval, trapezoid-integrated over the window"
    )
    scope = ("Jetson module input (VDD_IN): CPU, GPU, DLA, SoC, DRAM on the module; "
             "carrier board and peripherals excluded; idle power included")

    def __init__(self, root: str = "/", interval_s: float = 0.02,
                 opener: Optional[Opener] = None,
                 rail_labels: Iterable[str] = TOTAL_INPUT_RAIL_LABELS):
        super().__init__()
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.root = root
        self.interval_s = float(interval_s)
        self._open = opener or _read_text
        self.rail_labels = tuple(rail_labels)
        self.rails: List[_Rail] = []
        self.rail: Optional[_Rail] = None
        self.update_interval_ms: Optional[float] = None
        self.min_reliable_seconds = 10 * self.interval_s
        self._discover()

    # discovery ------------------------------------------------------------
    def _hwmon_dirs(self) -> List[str]:
        dirs = glob.glob(_join(self.root, "/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*"))
        for d in glob.glob(_join(self.root, "/sys/class/hwmon/hwmon*")):
            try:
                if self._open(os.path.join(d, "name")).strip() == "ina3221":
                    dirs.append(d)
            except OSError:
                pass
        seen, out = set(), []
        for d in sorted(dirs):
            key = os.path.realpath(d)
            if key not in seen and os.path.isdir(d):
                seen.add(key)
                out.append(d)
        return out

    def _discover(self) -> None:
        rails: List[_Rail] = []
        for d in self._hwmon_dirs():
            for ch in (1, 2, 3):
                try:
                    label = self._open(os.path.join(d, f"in{ch}_label")).strip()
                except OSError:
                    continue
                if label and label.upper() != "NC":  # "NC" = channel not connected
                    rails.append(_Rail(label, d, "hwmon",
                                       os.path.join(d, f"in{ch}_input"),
                                       os.path.join(d, f"curr{ch}_input")))
        for d in sorted(glob.glob(_join(self.root,
                                        "/sys/bus/i2c/drivers/ina3221x/*/iio:device*"))):
            for ch in (0, 1, 2):
                try:
                    label = self._open(os.path.join(d, f"rail_name_{ch}")).strip()
                except OSError:
                    continue
                if label:
                    rails.append(_Rail(label, d, "iio",
                                       os.path.join(d, f"in_voltage{ch}_input"),
                                       os.path.join(d, f"in_current{ch}_input"),
                                       os.path.join(d, f"in_power{ch}_input")))
        self.rails = rails
        if not rails:
            self.reason = ("no INA3221 rails found (no labelled channels under "
                           "/sys/bus/i2c/drivers/ina3221*/ or ina3221 hwmon devices)")
            return
        wanted = {l.upper(): i for i, l in enumerate(self.rail_labels)}
        total = [r for r in rails if r.label.upper() in wanted]
        if not total:
            self.reason = (
                "no total input rail (VDD_IN); found only component rails: "
                + ", ".join(r.label for r in rails)
                + " -- component rails are not summed (they overlap or omit parts "
                "of the module)")
            return
        total.sort(key=lambda r: wanted[r.label.upper()])
        self.rail = total[0]
        try:
            self._read_power_w()
        except (OSError, ValueError) as exc:
            self.reason = f"cannot read INA3221 rail {self.rail.label}: {_err(exc)}"
            self.rail = None
            return
        if self.rail.layout == "hwmon":
            try:
                self.update_interval_ms = float(self._open(
                    os.path.join(self.rail.device_dir, "update_interval")).strip())
            except (OSError, ValueError):
                self.update_interval_ms = None
        self.available = True
        self.source = f"ina3221:{self.rail.label}"

    def describe(self) -> Dict[str, object]:
        d = super().describe()
        d["rails_seen"] = [r.label for r in self.rails]
        if self.rail is not None:
            d["rail_dir"] = self.rail.device_dir
            d["layout"] = self.rail.layout
            d["sample_interval_s"] = self.interval_s
            d["sensor_update_interval_ms"] = self.update_interval_ms
        return d

    # reading --------------------------------------------------------------
    def _read_power_w(self) -> float:
        r = self.rail
        try:
            mv = float(self._open(r.voltage_path).strip())
            ma = float(self._open(r.current_path).strip())
            return mv * ma / 1e6
        except OSError:
            if r.power_path is None:
                raise
            return float(self._open(r.power_path).strip()) / 1e3

    def _start(self, m: Measurement) -> object:
        if not self.available:
            m.reason = self.reason
            return None
        state = {"samples": [], "errors": [], "stop": threading.Event()}
        th = threading.Thread(target=self._sample_loop, args=(state,),
                              name="ina3221-sampler", daemon=True)
        state["thread"] = th
        state["origin"] = time.perf_counter()
        th.start()
        return state

    def _sample_once(self, state) -> None:
        ta = time.perf_counter()
        try:
            w = self._read_power_w()
        except (OSError, ValueError) as exc:
            state["errors"].append(_err(exc))
            return
        tb = time.perf_counter()
        state["samples"].append((0.5 * (ta + tb), w))

    def _sample_loop(self, state) -> None:
        stop: threading.Event = state["stop"]
        origin = state["origin"]
        k = 0
        while True:
            self._sample_once(state)
            k += 1
            delay = origin + k * self.interval_s - time.perf_counter()
            if delay < 0:  # fell behind: skip missed slots, keep the grid
                k += int(-delay // self.interval_s) + 1
                delay = origin + k * self.interval_s - time.perf_counter()
            if stop.wait(max(0.0, delay)):
                return

    def _finish(self, m: Measurement, state, t0: float, t1: float) -> None:
        state["stop"].set()
        state["thread"].join(timeout=max(1.0, 10 * self.interval_s))
        self._sample_once(state)  # closing sample just after the window
        samples = sorted(state["samples"])
        errors = state["errors"]
        m.samples = [(t - t0, w) for t, w in samples]
        m.details["sample_interval_s"] = self.interval_s
        if self.update_interval_ms is not None:
            m.details["sensor_update_interval_ms"] = self.update_interval_ms
            if self.interval_s * 1e3 < self.update_interval_ms:
                m.warnings.append(
                    f"sampling every {self.interval_s * 1e3:g} ms, faster than the "
                    f"INA3221 update interval {self.update_interval_ms:g} ms; "
                    "consecutive samples repeat")
        if errors:
            m.details["read_errors"] = len(errors)
            m.warnings.append(f"{len(errors)} sample reads failed, first: {errors[0]}")
        if len(samples) < 2:
            m.energy_j = None
            m.reason = (f"ina3221: only {len(samples)} power sample(s) in the window"
                        + (f"; read error: {errors[0]}" if errors else ""))
            return
        m.energy_j = integrate_power_samples(samples, t0, t1)


# --------------------------------------------------------------------------
# NVML
# --------------------------------------------------------------------------


class NvmlSensor(EnergySensor):
    """GPU energy from ``nvmlDeviceGetTotalEnergyConsumption`` (mJ, Volta and newer).

    ``nvml`` may be injected (anything with ``nvmlDeviceGetHandleByIndex`` and
    ``nvmlDeviceGetTotalEnergyConsumption``; ``nvmlInit``,
    ``nvmlDeviceGetCount`` and ``nvmlDeviceGetName`` are used when present).
    Without injection ``pynvml`` is imported; if it is missing, or there is no
    GPU, or the counter is not supported, the sensor is unavailable with the
    reason.  NVML updates this counter only every few tens of milliseconds, so
    windows should be well over a second.
    """

    kind = "nvml"
    method = "NVML nvmlDeviceGetTotalEnergyConsumption counter delta (mJ, start/end reads)"
    scope = "one NVIDIA GPU as reported by NVML; idle power included; no host CPU/DRAM"
    min_reliable_seconds = 1.0

    def __init__(self, index: int = 0, nvml: object = None):
        super().__init__()
        self.index = index
        self.nvml = nvml
        self.handle = None
        self.name: Optional[str] = None
        self._inited = False
        self._open_device()

    def _open_device(self) -> None:
        nv = self.nvml
        if nv is None:
            try:
                import pynvml as nv  # type: ignore
            except ImportError:
                self.reason = "pynvml not installed (pip package nvidia-ml-py)"
                return
            self.nvml = nv
        try:
            if hasattr(nv, "nvmlInit"):
                nv.nvmlInit()
                self._inited = True
            if hasattr(nv, "nvmlDeviceGetCount"):
                count = nv.nvmlDeviceGetCount()
                if self.index >= count:
                    self.reason = (f"no NVIDIA GPU at index {self.index} "
                                   f"(nvmlDeviceGetCount() = {count})")
                    return
            self.handle = nv.nvmlDeviceGetHandleByIndex(self.index)
            name = (nv.nvmlDeviceGetName(self.handle)
                    if hasattr(nv, "nvmlDeviceGetName") else f"GPU{self.index}")
            if isinstance(name, bytes):
                name = name.decode("utf-8", "replace")
            self.name = str(name)
        except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
            self.reason = f"NVML unavailable: {_err(exc)}"
            return
        try:
            int(nv.nvmlDeviceGetTotalEnergyConsumption(self.handle))
        except Exception as exc:
            not_supported = getattr(nv, "NVMLError_NotSupported", None)
            if (isinstance(not_supported, type) and isinstance(exc, not_supported)) \
                    or "NotSupported" in type(exc).__name__:
                self.reason = (f"nvmlDeviceGetTotalEnergyConsumption not supported on "
                               f"{self.name} (needs Volta or newer, full NVML support)")
            else:
                self.reason = f"nvmlDeviceGetTotalEnergyConsumption failed: {_err(exc)}"
            return
        self.available = True
        self.source = f"nvml:{self.name}"

    def describe(self) -> Dict[str, object]:
        d = super().describe()
        d["device_index"] = self.index
        return d

    def close(self) -> None:
        if self._inited and hasattr(self.nvml, "nvmlShutdown"):
            try:
                self.nvml.nvmlShutdown()
            except Exception:
                pass
        self._inited = False

    def _start(self, m: Measurement) -> object:
        if not self.available:
            m.reason = self.reason
            return None
        return int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))

    def _finish(self, m: Measurement, state, t0: float, t1: float) -> None:
        end = int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))
        m.details["counter_mj"] = [state, end]
        m.details["device_index"] = self.index
        if end < state:
            m.energy_j = None
            m.reason = (f"nvml: energy counter went backwards ({state} -> {end} mJ); "
                        "driver reloaded during the window?")
            return
        m.energy_j = (end - state) / 1e3


# --------------------------------------------------------------------------
# Selection and results
# --------------------------------------------------------------------------

_AUTO_ORDER = ("ina3221", "nvml", "rapl")


def open_energy_sensor(kind: str = "auto", root: str = "/", **kwargs) -> EnergySensor:
    """Return an available sensor of ``kind`` or a ``NoSensor`` carrying the reason.

    ``kind``: "auto", "ina3221", "nvml", "rapl" or "none".  "auto" tries, in
    order, the Jetson module input rail, an NVIDIA GPU, then CPU RAPL.  The
    domains differ (module / GPU / CPU package), so callers who know where
    the model runs (e.g. ONNX Runtime CPU EP -> "rapl", TensorRT -> "nvml" on
    a dGPU or "ina3221" on Jetson) should ask for that kind.  Extra keyword
    arguments go to the sensor class (``interval_s``, ``opener``, ``nvml``,
    ``index``, ...); keywords a sensor does not take are ignored for it.
    """
    builders = {
        "rapl": lambda: RaplSensor(root=root, **_pick(kwargs, ("opener", "max_plausible_package_w"))),
        "ina3221": lambda: Ina3221Sensor(root=root, **_pick(kwargs, ("interval_s", "opener", "rail_labels"))),
        "nvml": lambda: NvmlSensor(**_pick(kwargs, ("index", "nvml"))),
    }
    if kind == "none":
        return NoSensor("energy measurement disabled (kind='none')")
    if kind != "auto":
        if kind not in builders:
            raise ValueError(f"unknown sensor kind {kind!r}; use auto, {', '.join(builders)}, none")
        s = builders[kind]()
        if s.available:
            return s
        s.close()
        return NoSensor(f"{kind}: {s.reason}")
    reasons = []
    for k in _AUTO_ORDER:
        s = builders[k]()
        if s.available:
            return s
        s.close()
        reasons.append(f"{k}: {s.reason}")
    return NoSensor("no energy sensor available -- " + "; ".join(reasons))


def _pick(d: Dict[str, object], keys: Sequence[str]) -> Dict[str, object]:
    return {k: d[k] for k in keys if k in d}


def per_inference_mj(measurement: Measurement, n_inferences: int) -> Dict[str, object]:
    """Plain JSON-able result for a manifest.

    ``{"energy_mj_per_inference": float, "mean_power_w", "source", "method", ...}``
    or ``{"energy_mj_per_inference": None, "reason": str}``.
    """
    if not isinstance(n_inferences, int) or isinstance(n_inferences, bool) or n_inferences <= 0:
        raise ValueError("n_inferences must be a positive int")
    if not measurement.finished:
        return {"energy_mj_per_inference": None,
                "reason": "measurement not finished (use it as a with-block first)"}
    if measurement.energy_j is None:
        return {"energy_mj_per_inference": None,
                "reason": measurement.reason or "no energy value"}
    out: Dict[str, object] = {
        "energy_mj_per_inference": measurement.energy_j * 1e3 / n_inferences,
        "mean_power_w": measurement.mean_power_w,
        "source": measurement.source,
        "method": measurement.method,
        "scope": measurement.scope,
        "energy_j_total": measurement.energy_j,
        "seconds": measurement.seconds,
        "n_inferences": n_inferences,
    }
    if measurement.samples is not None:
        out["n_samples"] = len(measurement.samples)
        out["sample_interval_s"] = measurement.details.get("sample_interval_s")
    if measurement.warnings:
        out["warnings"] = list(measurement.warnings)
    return out


# --------------------------------------------------------------------------
# Jetson power-mode context (optional; runner injectable for tests)
# --------------------------------------------------------------------------


def _default_runner(argv: Sequence[str]) -> Tuple[int, str, str]:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    return p.returncode, p.stdout, p.stderr


def _run(runner: Optional[Runner], argv: Sequence[str]):
    try:
        return (runner or _default_runner)(argv), None
    except FileNotFoundError:
        return None, f"{argv[0]} not found"
    except subprocess.TimeoutExpired:
        return None, f"{' '.join(argv)} timed out"
    except OSError as exc:
        return None, f"{' '.join(argv)}: {_err(exc)}"


def query_nvpmodel(runner: Optional[Runner] = None) -> Dict[str, object]:
    """Current Jetson power mode from ``nvpmodel -q``.

    Returns ``{"available": True, "mode_name": "MAXN", "mode_id": 0, "raw": ...}``
    or ``{"available": False, "reason": ...}``.
    """
    res, why = _run(runner, ["nvpmodel", "-q"])
    if res is None:
        return {"available": False, "reason": why}
    rc, out, err = res
    if rc != 0:
        return {"available": False,
                "reason": f"nvpmodel -q exited {rc}: {(err or out).strip()[:200]}"}
    name, mode_id = None, None
    lines = [l.strip() for l in out.splitlines() if l.strip()]
    for i, line in enumerate(lines):
        m = re.match(r"NV Power Mode:\s*(.+)$", line)
        if m:
            name = m.group(1).strip()
            for nxt in lines[i + 1:]:
                if re.fullmatch(r"\d+", nxt):
                    mode_id = int(nxt)
                    break
            break
    if name is None:
        return {"available": False, "reason": "no 'NV Power Mode:' line in nvpmodel -q output",
                "raw": out[:2000]}
    return {"available": True, "mode_name": name, "mode_id": mode_id, "raw": out[:2000]}


def query_jetson_clocks(runner: Optional[Runner] = None) -> Dict[str, object]:
    """Clock state from ``jetson_clocks --show`` (needs root on most releases).

    ``clocks_pinned`` is *inferred*: True when every online CPU and the GPU
    report MinFreq == MaxFreq (what ``jetson_clocks`` sets), False when any
    differs, None when the output has no such lines.  The raw text is kept.
    """
    res, why = _run(runner, ["jetson_clocks", "--show"])
    if res is None:
        return {"available": False, "reason": why}
    rc, out, err = res
    if rc != 0:
        return {"available": False,
                "reason": f"jetson_clocks --show exited {rc}: {(err or out).strip()[:200]}"}
    pinned: List[bool] = []
    for line in out.splitlines():
        line = line.strip()
        is_cpu = re.match(r"cpu\d+:", line)
        if not (is_cpu or line.startswith("GPU")):
            continue
        if is_cpu and re.search(r"Online=0\b", line):
            continue
        mn = re.search(r"MinFreq=(\d+)", line)
        mx = re.search(r"MaxFreq=(\d+)", line)
        if mn and mx:
            pinned.append(mn.group(1) == mx.group(1))
    return {
        "available": True,
        "clocks_pinned": (all(pinned) if pinned else None),
        "clocks_pinned_basis": "inferred: MinFreq == MaxFreq on online CPUs and GPU",
        "raw": out[:4000],
    }
