"""Measurement discipline: statistics on a fake clock, memory sampling, fingerprint robustness, engine profiles.

No test asserts on wall-clock speed: latency logic is checked with a deterministic clock, real runs only for
structure (counts, ordering, JSON-ability).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from importlib import metadata

import pytest

from snexport.device import profiling
from snexport.errors import ProfileError
from snexport.device.profiling import (
    CudaMemoryDelta,
    PeakRSSSampler,
    device_fingerprint,
    measure_latency,
    measure_switch,
    measurement_record,
    nvmap_used_bytes,
    percentile,
    process_rss_bytes,
    profile_engine,
    resolve_settings,
    summarize_ms,
)


class FakeClock:
    """A nanosecond clock that only moves when the measured function 'runs' for its scripted duration."""

    def __init__(self, durations_ms):
        self.now = 0
        self.durations_ms = list(durations_ms)
        self.calls = 0

    def __call__(self) -> int:
        return self.now

    def run(self) -> None:
        ms = self.durations_ms[self.calls % len(self.durations_ms)]
        self.calls += 1
        self.now += int(ms * 1_000_000)


# -- latency statistics ------------------------------------------------------------------------------------


def test_measure_latency_statistics_on_fake_clock():
    clock = FakeClock([0.0] * 3 + [float(ms) for ms in range(1, 101)])  # 3 warm-up calls, then 1..100 ms
    stats = measure_latency(clock.run, warmup=3, iterations=100, min_duration_s=0.0, batch_size=4, clock=clock)
    assert clock.calls == 103 and stats["iterations"] == 100 and stats["warmup"] == 3
    assert stats["min_ms"] == 1.0 and stats["max_ms"] == 100.0
    assert stats["mean_ms"] == pytest.approx(50.5)
    assert stats["std_ms"] == pytest.approx(statistics.stdev(range(1, 101)))
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["p90_ms"] == pytest.approx(90.1)
    assert stats["p99_ms"] == pytest.approx(99.01)
    # 4 images per call, 100 calls in 5.05 s of busy time.
    assert stats["throughput_per_s"] == pytest.approx(4 * 100 / 5.05)
    assert stats["total_s"] == pytest.approx(5.05)
    assert stats["capped"] is False


def test_min_duration_extends_the_run():
    clock = FakeClock([10.0])
    stats = measure_latency(clock.run, warmup=0, iterations=5, min_duration_s=0.2, max_duration_s=10, clock=clock)
    assert stats["iterations"] == 20 and stats["capped"] is False


def test_max_duration_caps_the_run_and_says_so():
    clock = FakeClock([10.0])
    stats = measure_latency(clock.run, warmup=0, iterations=1000, min_duration_s=0.0, max_duration_s=0.05, clock=clock)
    assert stats["iterations"] == 5 and stats["capped"] is True


def test_measure_latency_real_function_orders_percentiles():
    stats = measure_latency(lambda: sum(range(2000)), warmup=2, iterations=50, min_duration_s=0.0,
                            percentiles=(50, 90, 99, 99.9))
    assert stats["iterations"] >= 50
    ordered = [stats[k] for k in ("min_ms", "p50_ms", "p90_ms", "p99_ms", "p99.9_ms", "max_ms")]
    assert ordered == sorted(ordered)
    json.dumps(stats)


def test_measure_latency_refuses_bad_settings():
    with pytest.raises(ProfileError):
        measure_latency(lambda: None, iterations=0)
    with pytest.raises(ProfileError, match="max_duration_s"):
        measure_latency(lambda: None, min_duration_s=2.0, max_duration_s=1.0)


def test_percentile_matches_numpy_linear_interpolation():
    np = pytest.importorskip("numpy")
    values = sorted(np.random.default_rng(1).exponential(size=37).tolist())
    for q in (0, 1, 50, 90, 99, 99.9, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert summarize_ms([3.0])["std_ms"] == 0.0


# -- memory --------------------------------------------------------------------------------------------------


def test_process_rss_is_plausible():
    import psutil

    rss = process_rss_bytes()
    assert rss is not None and rss > 0
    assert abs(rss - psutil.Process().memory_info().rss) < 64 * 1024 * 1024


def test_peak_rss_sampler_sees_an_allocation():
    size = 96 * 1024 * 1024
    with PeakRSSSampler(interval_s=0.001) as sampler:
        block = b"\x01" * size  # written, so the pages are resident (a zeroed bytearray may not be)
    del block
    info = sampler.to_dict()
    assert info["samples"] >= 2
    assert info["rss_peak_delta_bytes"] >= size * 0.8
    assert info["rss_peak_bytes"] >= info["rss_start_bytes"]
    json.dumps(info)


def test_nvmap_parsed_from_meminfo(monkeypatch):
    fake = "MemTotal:       65536000 kB\nNvMapMemUsed:       1024 kB\n"
    monkeypatch.setattr(profiling, "_read", lambda path: fake if path == "/proc/meminfo" else None)
    assert nvmap_used_bytes() == 1024 * 1024


def test_cuda_memory_delta_without_cuda_is_unknown():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        pytest.skip("CUDA present: the no-CUDA path cannot be exercised")
    with CudaMemoryDelta() as delta:
        pass
    assert delta.used_delta_bytes is None


# -- device fingerprint ----------------------------------------------------------------------------------------


def test_fingerprint_has_keys_and_is_json():
    fp = device_fingerprint()
    for key in ("hostname", "cpu", "memory_total_bytes", "os", "python", "versions", "gpu", "jetson", "thermal_c"):
        assert key in fp
    for key in ("model", "logical_cores", "physical_cores", "usable_cores"):
        assert key in fp["cpu"]
    assert set(fp["versions"]) >= {"torch", "onnxruntime", "tensorrt", "onnx"}
    assert fp["versions"]["onnxruntime"] == metadata.version("onnxruntime")
    assert fp["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    json.loads(json.dumps(fp))


def test_fingerprint_survives_unreadable_system(monkeypatch):
    monkeypatch.setattr(profiling, "_read", lambda path: None)
    monkeypatch.setattr(profiling, "_run", lambda cmd, timeout=3.0: None)
    monkeypatch.setattr(profiling.os, "cpu_count", lambda: (_ for _ in ()).throw(OSError("no")))
    fp = device_fingerprint()
    assert fp["memory_total_bytes"] is None and fp["cpu"]["logical_cores"] is None
    assert fp["jetson"] == {"l4t_release": None, "power_mode": None, "clocks_pinned": None, "gpu_cur_freq_hz": None,
                            "nvmap_used_bytes": None}
    json.dumps(fp)


def test_fingerprint_reads_jetson_facts(monkeypatch):
    files = {
        "/etc/nv_tegra_release": "# R36 (release), REVISION: 4.0, GCID: 1, BOARD: generic, EABI: aarch64\nsha...",
        "/proc/meminfo": "MemTotal: 64000000 kB\nNvMapMemUsed: 2048 kB\n",
        "/proc/device-tree/model": "NVIDIA Jetson AGX Orin Developer Kit\x00",
    }
    real_read = profiling._read
    monkeypatch.setattr(profiling, "_read", lambda path: files.get(path, real_read(path)))
    nvpmodel = "NV Power Mode: MAXN\n0"
    monkeypatch.setattr(profiling, "_run", lambda cmd, timeout=3.0: nvpmodel if cmd[0] == "nvpmodel" else None)
    fp = device_fingerprint()
    assert fp["jetson"]["l4t_release"].startswith("# R36 (release), REVISION: 4.0")
    assert fp["jetson"]["power_mode"] == "MAXN (0)"
    assert fp["jetson"]["nvmap_used_bytes"] == 2048 * 1024
    assert fp["board"] == "NVIDIA Jetson AGX Orin Developer Kit"
    assert fp["memory_total_bytes"] == 64000000 * 1024


# -- engine profiling ----------------------------------------------------------------------------------------

FAST = {"warmup": 2, "iterations": 10, "min_duration_s": 0.0, "max_duration_s": 5.0}


@pytest.fixture(scope="module")
def matmul_onnx(tmp_path_factory):
    """A small real ONNX model (y = relu(x @ W)) built directly, so these tests need no torch."""
    onnx = pytest.importorskip("onnx")
    np = pytest.importorskip("numpy")
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["h"]), helper.make_node("Relu", ["h"], ["output"])],
        "matmul",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 64])],
        initializer=[numpy_helper.from_array(weight, "W")],
    )
    path = tmp_path_factory.mktemp("prof") / "matmul.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_profile_engine_from_path(matmul_onnx):
    record = profile_engine(matmul_onnx, FAST, runner_options={"threads": 1})
    assert record["file_size_bytes"] == matmul_onnx.stat().st_size
    assert record["backend"] == "onnxruntime" and record["input_shape"] == [1, 64]
    assert record["settings"]["iterations"] == 10 and record["settings"]["warmup"] == 2
    assert record["runner_settings"]["intra_op_num_threads"] == 1
    load = record["load"]
    assert load["cold_load_ms"] == pytest.approx(load["construct_load_ms"] + load["first_run_ms"])
    mem = record["memory"]
    assert mem["rss_before_load_bytes"] > 0 and mem["rss_peak_during_runs_bytes"] >= mem["rss_after_load_bytes"] * 0.9
    lat = record["latency"]
    assert lat["iterations"] >= 10 and lat["p50_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    json.loads(json.dumps(record))


def test_profile_engine_from_factory_closes_runner(matmul_onnx):
    from snexport.device.runtime.onnxruntime_runner import OnnxRuntimeRunner

    made = []

    def factory():
        made.append(OnnxRuntimeRunner(matmul_onnx, threads=1))
        return made[-1]

    record = profile_engine(factory, FAST)
    assert record["file"] is None and record["latency"]["iterations"] >= 10
    assert len(made) == 1 and made[0].session is None  # profiled, then closed


def test_settings_resolution():
    from snexport.device.profiles import load_profile

    profile = load_profile("x86-cpu")
    cfg = resolve_settings(profile)
    assert cfg["iterations"] == profile.measurement.iterations
    assert cfg["min_duration_s"] == profile.measurement.min_duration_s
    assert cfg["percentiles"] == list(profile.measurement.percentiles)
    with pytest.raises(ProfileError, match="iteratons"):
        resolve_settings({"iteratons": 5})


class _Slow:
    """A real runner whose runs take at least ``delay_s`` and are counted."""

    def __init__(self, inner, delay_s: float):
        self.inner, self.delay_s, self.runs = inner, delay_s, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, x):
        import time

        self.runs += 1
        time.sleep(self.delay_s)
        return self.inner.run(x)


def test_slow_engines_stop_switching_and_memory_runs_at_their_budget(matmul_onnx):
    np = pytest.importorskip("numpy")
    from snexport.device.runtime import open_runner

    x = np.ones((1, 64), np.float32)
    with open_runner(matmul_onnx, threads=1) as a, open_runner(matmul_onnx, threads=1) as b:
        slow_b = _Slow(b, 0.02)
        result = measure_switch(a, slow_b, x, repeats=20, budget_s=0.05)
        assert result["repeats"] == 3 and slow_b.runs == 1 + 2 * 3  # at least 3 switches, then the budget stops it
        primed = measure_switch(a, slow_b, x, repeats=20, budget_s=0.05, primed=True)
        assert primed["repeats"] == 3 and slow_b.runs == 7 + 2 * 3  # runners that already ran: no first runs
        # B's steady state given (bench's rounds): each repeat is A then one timed B, the overhead against it.
        given = measure_switch(a, slow_b, x, repeats=20, budget_s=0.05, primed=True, steady={"p50_ms": 1.0})
        assert given["repeats"] == 3 and slow_b.runs == 13 + 3 and given["steady"] == {"p50_ms": 1.0}
        assert given["switch_overhead_p50_ms"] == pytest.approx(given["switch"]["p50_ms"] - 1.0)
        assert given["switch"]["p50_ms"] >= 20.0
        fast = measure_switch(a, b, x, repeats=20, budget_s=5.0)
        assert fast["repeats"] == 20  # the budget only cuts slow engines
    made = []

    def factory():
        made.append(_Slow(open_runner(matmul_onnx, threads=1), 0.02))
        return made[-1]

    stats = profile_engine(factory, time_latency=False, memory_runs=20, memory_budget_s=0.01)
    assert made[0].runs == 1 + 2 and stats["memory"]["rss_peak_during_runs_bytes"] > 0


def test_measure_switch(matmul_onnx):
    np = pytest.importorskip("numpy")
    from snexport.device.runtime import open_runner

    x = np.ones((1, 64), np.float32)
    with open_runner(matmul_onnx, threads=1) as a, open_runner(matmul_onnx, threads=1) as b:
        result = measure_switch(a, b, x, repeats=7)
    assert result["repeats"] == 7
    for part in ("switch", "steady"):
        s = result[part]
        assert s["min_ms"] <= s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"]
    assert result["switch_overhead_p50_ms"] == pytest.approx(result["switch"]["p50_ms"] - result["steady"]["p50_ms"])
    json.dumps(result)


def test_measurement_record_is_a_json_line(matmul_onnx):
    stats = {"p50_ms": 1.0}
    line = measurement_record("deit_s:3>deit_b:4", "engines/a.onnx", "onnxruntime", stats, device_fingerprint(), FAST)
    back = json.loads(json.dumps(line))
    assert back["stitch_id"] == "deit_s:3>deit_b:4" and back["stats"] == stats and back["settings"] == FAST
    assert back["device"]["python"]["version"] and back["measured_at"].endswith("+00:00")


# -- import hygiene ------------------------------------------------------------------------------------------


def test_profiling_and_profiles_import_nothing_heavy():
    code = (
        "import sys\n"
        "import snexport.device.runtime, snexport.device.profiling as p, snexport.device.profiles as d\n"
        "p.device_fingerprint(); d.load_profile('jetson-orin'); d.list_profiles()\n"
        "p.measure_latency(lambda: None, warmup=1, iterations=3, min_duration_s=0)\n"
        "with p.PeakRSSSampler(): pass\n"
        "heavy = [m for m in ('torch', 'numpy', 'onnxruntime', 'tensorrt', 'onnx', 'timm') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"heavy modules imported: {out}"
