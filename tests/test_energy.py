"""Tests for snexport/device/energy.py.  Fake sysfs trees live under tmp_path; nothing here needs hardware
except the optional real-NVML test, which skips with a reason when it cannot run."""

import json
import os
import sys
import threading
import time

import pytest

from snexport.device import energy  # noqa: E402
from snexport.device.energy import (  # noqa: E402
    Ina3221Sensor, NoSensor, NvmlSensor, RaplSensor, integrate_power_samples,
    open_energy_sensor, per_inference_mj, query_jetson_clocks, query_nvpmodel)


def write(path, text):
    """Write atomically so a concurrently sampling thread never sees a half file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(str(text) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- RAPL

RANGE = 262143328850  # a real Intel max_energy_range_uj value


def make_rapl(root, packages=((0, 1_000_000), (1, 2_000_000)), max_range=RANGE,
              extra_zones=True):
    pc = os.path.join(root, "sys/class/powercap")
    os.makedirs(pc, exist_ok=True)
    write(os.path.join(pc, "intel-rapl", "enabled"), 1)  # control type dir, not a zone
    for idx, e in packages:
        z = os.path.join(pc, f"intel-rapl:{idx}")
        write(os.path.join(z, "name"), f"package-{idx}")
        write(os.path.join(z, "energy_uj"), e)
        if max_range is not None:
            write(os.path.join(z, "max_energy_range_uj"), max_range)
        # subdomains: flat symlink-style entries in the class dir, and nested children
        for sub, name, val in ((0, "core", 10**11), (1, "uncore", 10**11), (2, "dram", 10**11)):
            for d in (os.path.join(pc, f"intel-rapl:{idx}:{sub}"),
                      os.path.join(z, f"intel-rapl:{idx}:{sub}")):
                write(os.path.join(d, "name"), name)
                write(os.path.join(d, "energy_uj"), val)
                write(os.path.join(d, "max_energy_range_uj"), RANGE)
    if extra_zones:
        # psys (platform) and the MMIO mirror of package-0 must not be added
        write(os.path.join(pc, "intel-rapl:9", "name"), "psys")
        write(os.path.join(pc, "intel-rapl:9", "energy_uj"), 5 * 10**11)
        write(os.path.join(pc, "intel-rapl-mmio:0", "name"), "package-0")
        write(os.path.join(pc, "intel-rapl-mmio:0", "energy_uj"), 5 * 10**11)
    return pc


def bump(pc, zone, value):
    write(os.path.join(pc, zone, "energy_uj"), value)


def test_rapl_sums_packages_only(tmp_path):
    pc = make_rapl(str(tmp_path))
    s = RaplSensor(root=str(tmp_path))
    assert s.available, s.reason
    assert s.source == "rapl:package-0+package-1"
    with s.measure() as m:
        bump(pc, "intel-rapl:0", 1_000_000 + 3_000_000)   # +3 J
        bump(pc, "intel-rapl:1", 2_000_000 + 1_500_000)   # +1.5 J
        # subdomains and psys move too; they must not be counted
        bump(pc, "intel-rapl:0:0", 10**11 + 9_000_000)
        bump(pc, "intel-rapl:9", 5 * 10**11 + 50_000_000)
        time.sleep(0.02)
    assert m.energy_j == pytest.approx(4.5)
    assert m.seconds > 0.015
    assert m.mean_power_w == pytest.approx(4.5 / m.seconds)
    d = per_inference_mj(m, 9)
    assert d["energy_mj_per_inference"] == pytest.approx(500.0)
    assert d["source"] == "rapl:package-0+package-1"
    assert "wrap" in d["method"]
    json.dumps(d)
    skipped = " ".join(s.describe()["skipped"])
    assert "psys" in skipped


def test_rapl_counter_wrap(tmp_path):
    start = RANGE - 1_000_000          # 1 J before the wrap
    pc = make_rapl(str(tmp_path), packages=((0, start),))
    s = RaplSensor(root=str(tmp_path))
    with s.measure() as m:
        bump(pc, "intel-rapl:0", 2_500_000)   # wrapped, then +2.5 J
    assert m.energy_j == pytest.approx(3.5)
    assert m.details["wrapped"] == ["package-0"]
    assert per_inference_mj(m, 7)["energy_mj_per_inference"] == pytest.approx(500.0)


def test_rapl_missing_max_range_no_wrap_ok_but_warned(tmp_path):
    pc = make_rapl(str(tmp_path), packages=((0, 1000),), max_range=None)
    s = RaplSensor(root=str(tmp_path))
    assert s.available
    with s.measure() as m:
        bump(pc, "intel-rapl:0", 1000 + 2_000_000)
    assert m.energy_j == pytest.approx(2.0)
    assert any("max_energy_range_uj" in w for w in m.warnings)


def test_rapl_missing_max_range_with_wrap_gives_none(tmp_path):
    pc = make_rapl(str(tmp_path), packages=((0, 9_000_000),), max_range=None)
    s = RaplSensor(root=str(tmp_path))
    with s.measure() as m:
        bump(pc, "intel-rapl:0", 100)
    assert m.energy_j is None
    assert "wrap" in m.reason and "max_energy_range_uj" in m.reason
    d = per_inference_mj(m, 10)
    assert d == {"energy_mj_per_inference": None, "reason": m.reason}


def test_rapl_unreadable_energy_directory_in_place(tmp_path):
    # Running as root defeats chmod 000, so make energy_uj a directory instead.
    pc = make_rapl(str(tmp_path), packages=((0, 5),))
    p = os.path.join(pc, "intel-rapl:0", "energy_uj")
    os.remove(p)
    os.mkdir(p)
    s = RaplSensor(root=str(tmp_path))
    assert not s.available
    assert "energy_uj" in s.reason and "CVE-2020-8694" in s.reason
    so = open_energy_sensor("rapl", root=str(tmp_path))
    assert isinstance(so, NoSensor)
    with so.measure() as m:
        pass
    d = per_inference_mj(m, 1)
    assert d["energy_mj_per_inference"] is None and "energy_uj" in d["reason"]


def test_rapl_unreadable_energy_injected_opener(tmp_path):
    make_rapl(str(tmp_path))

    def opener(path):
        if path.endswith("energy_uj"):
            raise PermissionError(13, "Permission denied", path)
        return energy._read_text(path)

    s = RaplSensor(root=str(tmp_path), opener=opener)
    assert not s.available
    assert "PermissionError" in s.reason and "root" in s.reason


def test_rapl_no_powercap(tmp_path):
    s = RaplSensor(root=str(tmp_path))
    assert not s.available and "powercap" in s.reason


def test_rapl_only_subdomains_or_psys(tmp_path):
    pc = os.path.join(str(tmp_path), "sys/class/powercap")
    write(os.path.join(pc, "intel-rapl:0", "name"), "psys")
    write(os.path.join(pc, "intel-rapl:0", "energy_uj"), 1)
    write(os.path.join(pc, "intel-rapl:0:0", "name"), "core")
    write(os.path.join(pc, "intel-rapl:0:0", "energy_uj"), 1)
    s = RaplSensor(root=str(tmp_path))
    assert not s.available and "package" in s.reason


def test_rapl_long_window_warns_about_second_wrap(tmp_path):
    pc = make_rapl(str(tmp_path), packages=((0, 0),), max_range=1_000_000)  # 1 J range
    s = RaplSensor(root=str(tmp_path), max_plausible_package_w=100.0)  # wraps every 10 ms
    with s.measure() as m:
        bump(pc, "intel-rapl:0", 500_000)
        time.sleep(0.05)
    assert m.energy_j == pytest.approx(0.5)
    assert any("second wrap" in w for w in m.warnings)


def test_rapl_end_read_failure_reports_reason(tmp_path):
    pc = make_rapl(str(tmp_path), packages=((0, 5),))
    s = RaplSensor(root=str(tmp_path))
    with s.measure() as m:
        p = os.path.join(pc, "intel-rapl:0", "energy_uj")
        os.remove(p)
    assert m.energy_j is None and "end read failed" in m.reason


def test_timed_code_exception_propagates(tmp_path):
    make_rapl(str(tmp_path), packages=((0, 5),))
    s = RaplSensor(root=str(tmp_path))
    with pytest.raises(ZeroDivisionError):
        with s.measure():
            1 / 0


# --------------------------------------------------------------------------- INA3221

I2C = "sys/bus/i2c/drivers/ina3221"


def make_hwmon(root, addr, hwmon, rails, update_interval=None):
    """rails: {channel: (label, mV, mA)} in the JetPack 6 hwmon layout."""
    d = os.path.join(root, I2C, addr, "hwmon", hwmon)
    os.makedirs(d, exist_ok=True)
    write(os.path.join(d, "name"), "ina3221")
    for ch, (label, mv, ma) in rails.items():
        write(os.path.join(d, f"in{ch}_label"), label)
        write(os.path.join(d, f"in{ch}_input"), mv)
        write(os.path.join(d, f"curr{ch}_input"), ma)
        write(os.path.join(d, f"in{ch + 3}_input"), 1234)  # shunt uV, unused
    write(os.path.join(d, "in7_label"), "sum of shunt voltages")
    write(os.path.join(d, "in7_input"), 9999)
    if update_interval is not None:
        write(os.path.join(d, "update_interval"), update_interval)
    # /sys/class/hwmon/hwmonN -> same device (must not be counted twice)
    cls = os.path.join(root, "sys/class/hwmon")
    os.makedirs(cls, exist_ok=True)
    link = os.path.join(cls, hwmon)
    if not os.path.exists(link):
        os.symlink(d, link)
    return d


def orin_nano_tree(root, mv=5000, ma=1000):
    return make_hwmon(root, "1-0040", "hwmon3",
                      {1: ("VDD_IN", mv, ma), 2: ("VDD_CPU_GPU_CV", 4900, 800),
                       3: ("VDD_SOC", 4900, 900)}, update_interval=3)


def test_ina3221_picks_vdd_in(tmp_path):
    orin_nano_tree(str(tmp_path))
    s = Ina3221Sensor(root=str(tmp_path))
    assert s.available, s.reason
    assert s.source == "ina3221:VDD_IN"
    assert s.describe()["rails_seen"] == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]
    assert s._read_power_w() == pytest.approx(5.0)
    assert s.update_interval_ms == 3


def test_ina3221_integrates_changing_power(tmp_path):
    d = orin_nano_tree(str(tmp_path), mv=5000, ma=1000)          # 5 W
    s = Ina3221Sensor(root=str(tmp_path), interval_s=0.005)
    before = threading.active_count()
    with s.measure() as m:
        time.sleep(0.30)
        write(os.path.join(d, "curr1_input"), 2000)               # 10 W
        # component rails change wildly; they must not leak into the result
        write(os.path.join(d, "curr2_input"), 50000)
        time.sleep(0.30)
        write(os.path.join(d, "in1_input"), 4000)                  # 8 W
        time.sleep(0.20)
    expected = 5 * 0.30 + 10 * 0.30 + 8 * 0.20                    # 6.1 J over ~0.8 s
    assert m.seconds == pytest.approx(0.80, abs=0.05)
    # allow for sleep jitter: compare against the exact-length expectation scaled
    assert m.energy_j == pytest.approx(expected * m.seconds / 0.80, rel=0.06)
    assert 60 < len(m.samples) < 200
    powers = {round(w, 6) for _, w in m.samples}
    assert {5.0, 10.0, 8.0} <= powers
    assert max(powers) < 11                                        # no summing of rails
    assert m.mean_power_w == pytest.approx(m.energy_j / m.seconds)
    r = per_inference_mj(m, 100)
    assert r["source"] == "ina3221:VDD_IN"
    assert r["energy_mj_per_inference"] == pytest.approx(m.energy_j * 10)
    assert r["n_samples"] == len(m.samples)
    assert "trapezoid" in r["method"]
    json.dumps(r)
    json.dumps(m.to_dict(include_samples=True))
    time.sleep(0.05)
    assert threading.active_count() <= before                     # sampler stopped


def test_ina3221_warns_when_sampling_faster_than_chip(tmp_path):
    orin_nano_tree(str(tmp_path))
    s = Ina3221Sensor(root=str(tmp_path), interval_s=0.001)       # chip updates every 3 ms
    with s.measure() as m:
        time.sleep(0.02)
    assert m.energy_j == pytest.approx(5.0 * m.seconds, rel=1e-6)  # constant power
    assert any("update interval" in w for w in m.warnings)


def test_ina3221_only_component_rails_unavailable(tmp_path):
    # Jetson AGX Orin layout: no VDD_IN channel at all
    make_hwmon(str(tmp_path), "1-0040", "hwmon3",
               {1: ("VDD_GPU_SOC", 843, 6170), 2: ("VDD_CPU_CV", 780, 3437),
                3: ("VIN_SYS_5V0", 4968, 953)})
    make_hwmon(str(tmp_path), "1-0041", "hwmon4",
               {1: ("NC", 0, 0), 2: ("VDDQ_VDD2_1V8AO", 1800, 341)})
    s = Ina3221Sensor(root=str(tmp_path))
    assert not s.available
    assert s.describe()["rails_seen"] == ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0",
                                          "VDDQ_VDD2_1V8AO"]
    assert "no total input rail (VDD_IN)" in s.reason
    assert "VDD_GPU_SOC" in s.reason and "VDDQ_VDD2_1V8AO" in s.reason
    so = open_energy_sensor("ina3221", root=str(tmp_path))
    with so.measure() as m:
        pass
    d = per_inference_mj(m, 5)
    assert d["energy_mj_per_inference"] is None
    assert "no total input rail (VDD_IN)" in d["reason"]


def test_ina3221_none_present(tmp_path):
    s = Ina3221Sensor(root=str(tmp_path))
    assert not s.available and "no INA3221" in s.reason


def test_ina3221_legacy_iio_layout(tmp_path):
    d = os.path.join(str(tmp_path), "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0")
    write(os.path.join(d, "rail_name_0"), "POM_5V_IN")
    write(os.path.join(d, "in_voltage0_input"), 5000)
    write(os.path.join(d, "in_current0_input"), 600)
    write(os.path.join(d, "in_power0_input"), 3000)
    write(os.path.join(d, "rail_name_1"), "POM_5V_GPU")
    s = Ina3221Sensor(root=str(tmp_path))
    assert s.available, s.reason
    assert s.source == "ina3221:POM_5V_IN"
    assert s._read_power_w() == pytest.approx(3.0)
    os.remove(os.path.join(d, "in_current0_input"))            # fall back to in_power (mW)
    write(os.path.join(d, "in_power0_input"), 2500)
    assert s._read_power_w() == pytest.approx(2.5)


def test_ina3221_unreadable_rail(tmp_path):
    d = orin_nano_tree(str(tmp_path))
    os.remove(os.path.join(d, "in1_input"))
    os.mkdir(os.path.join(d, "in1_input"))
    s = Ina3221Sensor(root=str(tmp_path))
    assert not s.available and "cannot read INA3221 rail VDD_IN" in s.reason


def test_integrate_power_samples_exact():
    # linear ramp 0 -> 10 W over 1 s sampled at 0, 0.5, 1.0: trapezoid is exact for a ramp
    assert integrate_power_samples([(0, 0), (0.5, 5), (1, 10)], 0, 1) == pytest.approx(5.0)
    # clipping inside a segment: ramp on [0.25, 0.75] = mean 5 W * 0.5 s
    assert integrate_power_samples([(0, 0), (1, 10)], 0.25, 0.75) == pytest.approx(2.5)
    # held values outside the samples
    assert integrate_power_samples([(1, 4), (2, 4)], 0, 3) == pytest.approx(12.0)
    # step sampled at 0.1 s: trapezoid smears the step over one interval
    samples = [(t / 10, 2.0 if t < 5 else 6.0) for t in range(11)]
    assert integrate_power_samples(samples, 0, 1) == pytest.approx(
        2 * 0.4 + 0.5 * (2 + 6) * 0.1 + 6 * 0.5)
    assert integrate_power_samples([], 0, 1) == 0.0


# --------------------------------------------------------------------------- NVML


class FakeNvml:
    """Implements the two required NVML calls (+ name); counter in mJ."""

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    def __init__(self, values, supported=True):
        self.values = list(values)
        self.supported = supported
        self.calls = 0

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("handle", i)

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H200"

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        assert h == ("handle", 0)
        if not self.supported:
            raise self.NVMLError_NotSupported("Not Supported")
        v = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        return v


def test_nvml_fake_delta_mj():
    fake = FakeNvml([1_000_000, 1_000_000, 1_012_345])  # probe, start, end
    s = NvmlSensor(nvml=fake)
    assert s.available, s.reason
    assert s.source == "nvml:NVIDIA H200"
    with s.measure() as m:
        pass
    assert m.energy_j == pytest.approx(12.345)
    d = per_inference_mj(m, 5)
    assert d["energy_mj_per_inference"] == pytest.approx(2469.0)
    assert d["source"] == "nvml:NVIDIA H200"
    assert "mJ" in d["method"]
    assert any("shorter than" in w for w in d["warnings"])  # <1 s window flagged


def test_nvml_fake_minimal_two_functions():
    class Minimal:
        def __init__(self):
            self.v = iter([10, 10, 2010])

        def nvmlDeviceGetHandleByIndex(self, i):
            return ("handle", i)

        def nvmlDeviceGetTotalEnergyConsumption(self, h):
            return next(self.v)

    s = NvmlSensor(nvml=Minimal())
    assert s.available
    with s.measure() as m:
        pass
    assert m.energy_j == pytest.approx(2.0)


def test_nvml_fake_not_supported():
    s = NvmlSensor(nvml=FakeNvml([0], supported=False))
    assert not s.available
    assert "not supported" in s.reason and "NVIDIA H200" in s.reason


def test_nvml_counter_backwards_is_none():
    s = NvmlSensor(nvml=FakeNvml([500, 500, 100]))
    with s.measure() as m:
        pass
    assert m.energy_j is None and "backwards" in m.reason


def test_nvml_missing_pynvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes import raise ImportError
    s = NvmlSensor()
    assert not s.available and "pynvml not installed" in s.reason


def test_nvml_real_if_present():
    try:
        import pynvml  # noqa: F401
    except ImportError:
        pytest.skip("pynvml (nvidia-ml-py) not installed")
    s = NvmlSensor()
    if not s.available:
        pytest.skip(f"NVML energy not usable here: {s.reason}")
    x = 0
    with s.measure() as m:
        t_end = time.perf_counter() + 1.2
        while time.perf_counter() < t_end:
            x += 1
    assert m.energy_j is not None and m.energy_j > 0
    assert 1 < m.mean_power_w < 2000
    assert m.source.startswith("nvml:")


# --------------------------------------------------------------------------- selection


def test_auto_prefers_ina3221_then_falls_back(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    make_rapl(str(tmp_path), packages=((0, 5),))
    s = open_energy_sensor(root=str(tmp_path))
    assert isinstance(s, RaplSensor)          # no Jetson, no NVML -> RAPL
    orin_nano_tree(str(tmp_path))
    s = open_energy_sensor(root=str(tmp_path))
    assert isinstance(s, Ina3221Sensor)


def test_auto_nothing_gives_nosensor_with_all_reasons(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    s = open_energy_sensor(root=str(tmp_path))
    assert isinstance(s, NoSensor)
    for k in ("ina3221:", "nvml:", "rapl:"):
        assert k in s.reason
    with s.measure() as m:
        pass
    d = per_inference_mj(m, 3)
    assert set(d) == {"energy_mj_per_inference", "reason"}
    assert d["energy_mj_per_inference"] is None


def test_open_energy_sensor_nvml_injected():
    s = open_energy_sensor("nvml", nvml=FakeNvml([1, 1, 1001]))
    assert isinstance(s, NvmlSensor) and s.available


def test_unknown_kind_and_bad_n():
    with pytest.raises(ValueError):
        open_energy_sensor("bogus")
    m = NoSensor("x").measure()
    with m:
        pass
    with pytest.raises(ValueError):
        per_inference_mj(m, 0)


def test_unfinished_measurement_not_reported(tmp_path):
    make_rapl(str(tmp_path), packages=((0, 5),))
    m = RaplSensor(root=str(tmp_path)).measure()
    assert per_inference_mj(m, 1)["energy_mj_per_inference"] is None


# --------------------------------------------------------------------------- Jetson helpers


def test_query_nvpmodel_parses():
    out = "NV Power Mode: 15W\n1\n"
    r = query_nvpmodel(runner=lambda argv: (0, out, ""))
    assert r == {"available": True, "mode_name": "15W", "mode_id": 1, "raw": out}


def test_query_nvpmodel_missing_and_failing():
    def missing(argv):
        raise FileNotFoundError(argv[0])

    assert query_nvpmodel(runner=missing) == {"available": False, "reason": "nvpmodel not found"}
    r = query_nvpmodel(runner=lambda argv: (1, "", "NVPM ERROR: failed"))
    assert not r["available"] and "NVPM ERROR" in r["reason"]


SHOW_PINNED = """SOC family:tegra234  Machine:NVIDIA Jetson Orin Nano
Online CPUs: 0-5
cpu0: Online=1 Governor=schedutil MinFreq=1510400 MaxFreq=1510400 CurrentFreq=1510400
cpu1: Online=1 Governor=schedutil MinFreq=1510400 MaxFreq=1510400 CurrentFreq=1510400
cpu5: Online=0 Governor=schedutil MinFreq=115200 MaxFreq=1510400 CurrentFreq=729600
GPU MinFreq=624750000 MaxFreq=624750000 CurrentFreq=624750000
EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=3199000000 FreqOverride=1
NV Power Mode: 15W
"""


def test_query_jetson_clocks_inference():
    r = query_jetson_clocks(runner=lambda argv: (0, SHOW_PINNED, ""))
    assert r["available"] and r["clocks_pinned"] is True
    unpinned = SHOW_PINNED.replace("GPU MinFreq=624750000", "GPU MinFreq=306000000")
    assert query_jetson_clocks(runner=lambda a: (0, unpinned, ""))["clocks_pinned"] is False
    assert query_jetson_clocks(runner=lambda a: (0, "nothing", ""))["clocks_pinned"] is None
    assert not query_jetson_clocks(runner=lambda a: (1, "", "must be root"))["available"]


def test_nvml_close_calls_shutdown():
    fake = FakeNvml([1])
    fake.inits = fake.shutdowns = 0

    def init():
        fake.inits += 1

    def shutdown():
        fake.shutdowns += 1

    fake.nvmlInit, fake.nvmlShutdown = init, shutdown
    s = NvmlSensor(nvml=fake)
    s.close()
    s.close()
    assert (fake.inits, fake.shutdowns) == (1, 1)
