"""Measurements under different power modes (nvpmodel, jetson_clocks, CPU governor) are different devices (issue 10)."""

from __future__ import annotations

import copy

from snexport.device.manifest import device_key, merge_measurements


def fingerprint(power_mode="MAXN (0)", clocks_pinned=True, governor="performance"):
    return {
        "hostname": "orin-1",
        "board": "NVIDIA Jetson AGX Orin Developer Kit",
        "cpu": {"model": "ARMv8 Processor rev 1 (v8l)", "arch": "aarch64", "logical_cores": 12, "governor": governor,
                "cur_freq_khz": 2201600},
        "gpu": {"name": "Orin (nvgpu)", "driver": "540.4.0"},
        "versions": {"tensorrt": "10.3.0", "onnxruntime": "1.20.0", "numpy": "1.26.4"},
        "jetson": {"l4t_release": "# R36 (release), REVISION: 4.3", "power_mode": power_mode,
                   "clocks_pinned": clocks_pinned, "gpu_cur_freq_hz": 1300500000},
        "thermal_c": {"gpu-thermal": 45.0},
    }


def test_power_mode_clocks_and_governor_make_new_device_keys():
    base = device_key(fingerprint(), "jetson-orin-agx")
    assert device_key(fingerprint(), "jetson-orin-agx") == base
    # Volatile readings (temperature, current clock, hostname) do not make a new device.
    drift = fingerprint()
    drift["thermal_c"]["gpu-thermal"] = 61.5
    drift["cpu"]["cur_freq_khz"] = 1113600
    drift["hostname"] = "orin-2"
    assert device_key(drift, "jetson-orin-agx") == base
    others = {device_key(fingerprint(power_mode="30W (2)"), "jetson-orin-agx"),
              device_key(fingerprint(clocks_pinned=False), "jetson-orin-agx"),
              device_key(fingerprint(governor="schedutil"), "jetson-orin-agx")}
    assert base not in others and len(others) == 3


def _manifest(ids):
    engine = {
        "route": {"front": "a", "back": "a", "cut": None, "resume": None, "layer": None, "blocks": 6},
        "file": "engines/x.onnx", "format": "onnx", "precision": "fp32", "sha256": "0" * 64, "size_bytes": 1,
        "input": {"name": "input", "shape": [1, 1, 8, 8], "dtype": "float32"},
        "output": {"name": "logits", "shape": [1, 10]},
        "accuracy": {"top1": 70.0, "source": {"dataset": "digits:val", "samples": 10}},
        "gflops": 0.001, "params": 100, "weights_file": None, "weights_sha256": None, "weights_size_bytes": None,
        "weights_used_bytes": None, "versions": {}, "measurements": {},
    }
    engines = []
    for n, i in enumerate(ids):
        e = copy.deepcopy(engine)
        e["stitch_id"], e["file"], e["sha256"] = i, f"engines/{i}.onnx", f"{n:064x}"
        engines.append(e)
    return {"schema_version": 1, "devices": {}, "engines": engines, "build": {
        "anchors": [{"name": "a", "timm_name": "t", "depth": 6, "width": 16, "gflops": 0.001, "params": 100}],
        "plan": {"window": 2, "stride": 1, "nearest": True, "two_way": False, "hash": "h"},
        "snexport_version": "0", "created_at": "2026-12-01T00:00:00+00:00"}}


def _measurement(p50):
    return {"latency_ms": {"mean": p50, "std": 0.0, "min": p50, "p50": p50, "p90": p50, "p99": p50, "max": p50,
                           "iterations": 10},
            "throughput_ips": 1000.0 / p50,
            "memory": {"rss_load_delta_mb": 1.0, "rss_peak_mb": 100.0, "file_mb": 0.1, "device_delta_mb": None},
            "load_ms": {"cold": 1.0, "switch_p50": None, "switch_p99": None}, "pareto": False,
            "latency_noise": {"p50_ci": [p50 * 0.95, p50 * 1.05], "ci_level": 0.95, "rounds": 5,
                              "round_p50_spread": p50 * 0.02},
            "energy": {"mj_per_inference": None, "mean_power_w": None, "source": None, "reason": "no sensor"}}


def test_two_power_modes_keep_separate_measurements_and_fronts():
    doc = _manifest(["a", "b"])
    maxn, low = device_key(fingerprint(), "jetson-orin-agx"), device_key(fingerprint("15W (1)"), "jetson-orin-agx")
    doc = merge_measurements(doc, maxn, {"profile": "jetson-orin-agx", "fingerprint": fingerprint(), "settings": {}},
                             {"a": _measurement(1.0), "b": _measurement(2.0)}, ["a", "b"])
    doc = merge_measurements(doc, low, {"profile": "jetson-orin-agx", "fingerprint": fingerprint("15W (1)"),
                                        "settings": {}}, {"a": _measurement(3.0), "b": _measurement(5.0)}, ["a"])
    assert set(doc["devices"]) == {maxn, low}
    a, b = doc["engines"]
    assert a["measurements"][maxn]["latency_ms"]["p50"] == 1.0 and a["measurements"][low]["latency_ms"]["p50"] == 3.0
    # Each mode has its own front: b is on the MAXN front and off the 15 W one.
    assert b["measurements"][maxn]["pareto"] and not b["measurements"][low]["pareto"]
