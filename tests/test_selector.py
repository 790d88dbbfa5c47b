"""selector.py on real engines: tiny timm ViTs exported to ONNX and run with ONNX Runtime.

The engines are real; the numbers in most manifests below are set by the test (choose() is a pure function of
them), while ``measured_build`` writes a manifest with latencies and memory measured here, as `snexport bench`
would, for the example app.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from snexport.errors import BudgetError, ManifestError, SettingsError
from snexport.hashing import sha256_file
from snexport.device.manifest import device_key, write_manifest
from snexport.device.runtime import open_runner
from snexport.device.selector import FeedbackConfig, Selector, SelectorWarning, max_threads

REPO = Path(__file__).resolve().parents[1]
DEVICE = "test-cpu-0000"
X = np.random.RandomState(0).randn(1, 1, 8, 8).astype(np.float32)
# name -> (embed_dim, depth): different widths so the engines' outputs differ.
TINY = {"small": (16, 1), "mid": (32, 2), "big": (48, 3)}


def _export(path: Path, width: int, depth: int) -> None:
    import timm
    import torch

    torch.manual_seed(width)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
                              num_classes=10, embed_dim=width, depth=depth, num_heads=2)
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes are expected
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), torch.randn(1, 1, 8, 8), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"])


@pytest.fixture(scope="module")
def engines_dir(tmp_path_factory) -> Path:
    """A build directory with engines/{small,mid,big}.onnx (real exports) and nothing else."""
    root = tmp_path_factory.mktemp("build")
    (root / "engines").mkdir()
    for name, (width, depth) in TINY.items():
        _export(root / "engines" / f"{name}.onnx", width, depth)
    return root


@pytest.fixture(scope="module")
def reference(engines_dir) -> dict:
    """Each engine's output on X, computed without the selector."""
    out = {}
    for name in TINY:
        runner = open_runner(engines_dir / "engines" / f"{name}.onnx", threads=1)
        out[name] = runner.run(X)
        runner.close()
    assert not np.allclose(out["small"], out["mid"]) and not np.allclose(out["mid"], out["big"])
    return out


def latency(p90: float, p50: float | None = None) -> dict:
    p50 = p90 * 0.8 if p50 is None else p50
    return {"mean": p50, "std": 0.01, "min": p50 * 0.9, "p50": p50, "p90": p90, "p99": p90 * 1.1,
            "max": p90 * 1.2, "iterations": 100}


def measurement(p90: float, mem: float = 5.0, p50: float | None = None, pareto: bool = True) -> dict:
    return {"latency_ms": latency(p90, p50), "throughput_ips": 1000.0 / p90,
            "memory": {"rss_load_delta_mb": mem, "rss_peak_mb": 200.0, "file_mb": 0.1, "device_delta_mb": None},
            "load_ms": {"cold": 5.0, "switch_p50": None, "switch_p99": None}, "pareto": pareto}


def entry(root: Path, name: str, top1, measurements: dict, stitch_id: str | None = None, **extra) -> dict:
    width, depth = TINY[name]
    path = root / "engines" / f"{name}.onnx"
    out = {
        "stitch_id": stitch_id or name,
        "route": {"front": name, "back": name, "cut": None, "resume": None, "layer": None, "blocks": depth},
        "file": f"engines/{name}.onnx", "format": "onnx", "precision": "fp32",
        "sha256": sha256_file(path), "size_bytes": path.stat().st_size,
        "input": {"name": "input", "shape": [1, 1, 8, 8], "dtype": "float32"},
        "output": {"name": "logits", "shape": [1, 10]},
        "accuracy": {"top1": top1, "source": "unknown" if top1 is None else {"dataset": "digits:val", "samples": 359}},
        "gflops": 0.001 * width * depth, "params": 1000 * width * depth,
        "weights_file": None, "weights_sha256": None, "measurements": measurements,
    }
    out.update(extra)
    return out


def device(measured_at: str = "2026-11-24T05:00:00+00:00") -> dict:
    return {"profile": "x86-cpu", "fingerprint": {"cpu": "test"}, "settings": {"threads": 1},
            "measured_at": measured_at}


def write(root: Path, name: str, engines: list, devices: dict | None = None) -> Path:
    data = {
        "schema_version": 1,
        "build": {"anchors": [{"name": n, "timm_name": "vit_tiny_patch16_224", "depth": d, "width": w,
                               "gflops": 0.001 * w * d, "params": 1000 * w * d} for n, (w, d) in TINY.items()],
                  "plan": {"window": 2, "stride": 1, "nearest": True, "two_way": False, "hash": "t"},
                  "snexport_version": "0.1.0", "created_at": "2026-11-24T05:00:00+00:00"},
        "devices": devices if devices is not None else {DEVICE: device()},
        "engines": engines,
    }
    return write_manifest(root / f"manifest-{name}.json", data)


def three(root: Path, p90=(1.0, 4.0, 9.0), top1=(70.0, 75.0, 80.0), mem=(5.0, 10.0, 20.0)) -> list:
    return [entry(root, n, t, {DEVICE: measurement(p, m)}) for n, p, t, m in zip(TINY, p90, top1, mem)]


# -- choose() ------------------------------------------------------------------------------------------------


def test_choose_picks_the_most_accurate_engine_within_budget(engines_dir):
    with Selector(write(engines_dir, "choose", three(engines_dir)), mode="on_demand") as sel:
        assert sel.device == DEVICE
        assert sel.choose().id == "big"  # no budget: most accurate
        assert sel.choose(latency_ms=5.0).id == "mid"
        assert sel.choose(latency_ms=4.0).id == "mid"  # the budget is inclusive
        assert sel.choose(latency_ms=3.9).id == "small"
        assert sel.choose(memory_mb=12).id == "mid"
        assert sel.choose(latency_ms=100, memory_mb=5).id == "small"
        assert [e.id for e in sel.engines] == ["small", "mid", "big"]
        assert sel.active.id == "big"  # no initial budget


def test_accuracy_ties_go_to_the_faster_engine(engines_dir):
    engines = three(engines_dir, p90=(1.0, 4.0, 3.0), top1=(70.0, 80.0, 80.0))
    with Selector(write(engines_dir, "ties", engines), mode="on_demand") as sel:
        assert sel.choose().id == "big"  # 80 % at 3 ms beats 80 % at 4 ms
        assert sel.choose(latency_ms=2.0).id == "small"


def test_the_percentile_decides_what_fits(engines_dir):
    # big: median 3 ms but a long tail (p90 9 ms).
    engines = three(engines_dir)
    engines[2]["measurements"][DEVICE]["latency_ms"] = latency(9.0, p50=3.0)
    path = write(engines_dir, "tail", engines)
    with Selector(path, percentile="p50", mode="on_demand") as p50, Selector(path, mode="on_demand") as p90:
        assert p50.choose(latency_ms=5.0).id == "big"
        assert p90.choose(latency_ms=5.0).id == "mid"
        assert p90.info("big").latency_ms == 9.0 and p50.info("big").latency_ms == 3.0
    with pytest.raises(ValueError, match="percentile"):
        Selector(path, percentile="p95")


def _with_energy(engines, mj):
    for e, value in zip(engines, mj):
        e["measurements"][DEVICE]["energy"] = {
            "mj_per_inference": value, "mean_power_w": None if value is None else 20.0,
            "source": None if value is None else "rapl:package-0", "reason": "no sensor" if value is None else None}
    return engines


def test_energy_is_a_budget_beside_latency_and_memory(engines_dir):
    engines = _with_energy(three(engines_dir), (2.0, 8.0, 30.0))
    with Selector(write(engines_dir, "energy", engines), mode="on_demand") as sel:
        assert [sel.info(n).energy_mj for n in ("small", "mid", "big")] == [2.0, 8.0, 30.0]
        assert sel.choose(energy_mj=10).id == "mid"
        assert sel.choose(energy_mj=8).id == "mid"  # inclusive, like the other budgets
        assert sel.choose(energy_mj=5, latency_ms=100).id == "small"
        assert sel.choose(latency_ms=5.0, energy_mj=1000).id == "mid"  # every limit must hold
        with pytest.raises(BudgetError, match="energy <= 1 mJ"):
            sel.choose(energy_mj=1, strict=True)
        assert sel.set_budget(energy_mj=9).id == "mid" and sel.energy_budget == 9
        assert sel.set_budget(latency_ms=2.0).id == "small" and sel.energy_budget == 9  # omitted: kept
        for bad in (float("nan"), -1.0, "5", True):
            with pytest.raises(SettingsError, match="energy_mj"):
                sel.choose(energy_mj=bad)


def test_an_engine_without_an_energy_measurement_never_fits_an_energy_budget(engines_dir):
    engines = _with_energy(three(engines_dir), (None, 8.0, 30.0))
    with Selector(write(engines_dir, "energy-gap", engines), mode="on_demand") as sel:
        assert sel.info("small").energy_mj is None
        assert sel.choose(energy_mj=100).id == "big" and sel.choose(energy_mj=10).id == "mid"
    none = _with_energy(three(engines_dir), (None, None, None))
    with Selector(write(engines_dir, "energy-none", none), mode="on_demand") as sel:
        assert sel.choose().id == "big"  # no energy budget: energy plays no part
        with pytest.raises(ManifestError, match="no engine has an energy measurement.*no sensor"):
            sel.choose(energy_mj=100)


def test_budget_nobody_meets_warns_and_falls_back_or_raises_when_strict(engines_dir):
    with Selector(write(engines_dir, "strict", three(engines_dir)), mode="on_demand") as sel:
        with pytest.warns(SelectorWarning, match=r"no engine .* meets p90 latency <= 0.5 ms.*using small"):
            assert sel.choose(latency_ms=0.5).id == "small"
        with pytest.raises(BudgetError, match="fastest is small"):
            sel.choose(latency_ms=0.5, strict=True)
        # Memory is the miss: the smallest engine, not merely the fastest one.
        with pytest.warns(SelectorWarning, match="memory <= 1 MB"):
            assert sel.choose(memory_mb=1).id == "small"
        with pytest.raises(BudgetError):
            sel.choose(latency_ms=0.1, memory_mb=1, strict=True)


def test_unknown_accuracy_ranks_by_compute(engines_dir):
    engines = three(engines_dir, top1=(None, 75.0, 80.0))  # one unknown makes accuracies incomparable
    with Selector(write(engines_dir, "unknown", engines), mode="on_demand") as sel:
        assert sel.choose().id == "big"
        assert sel.choose(latency_ms=5.0).id == "mid"
    # Largest GFLOPs wins even when a smaller engine happens to be slower.
    engines = three(engines_dir, p90=(3.0, 2.0, 9.0), top1=(None, None, None))
    with Selector(write(engines_dir, "unknown2", engines), mode="on_demand") as sel:
        assert sel.choose(latency_ms=3.5).id == "mid"


def test_unprofiled_engines_cannot_be_chosen_but_can_be_switched_to(engines_dir, reference):
    engines = three(engines_dir)
    engines[2]["measurements"] = {}  # big: not yet profiled on this device
    with Selector(write(engines_dir, "partial", engines), mode="on_demand") as sel:
        assert [e.id for e in sel.engines] == ["small", "mid"]
        assert sel.choose().id == "mid"
        assert sel.info("big").profiled is False
        sel.switch("big")
        np.testing.assert_array_equal(sel.run(X), reference["big"])
    for e in engines:
        e["measurements"] = {}
    with pytest.raises(ManifestError, match="no engine .* has been profiled on any device"):
        Selector(write(engines_dir, "none", engines, devices={}))
    with pytest.raises(ManifestError, match="none can be chosen by latency"):
        Selector(write(engines_dir, "none2", engines))


def test_device_defaults_to_the_latest_measured(engines_dir):
    old, new = "old-dev", "new-dev"
    engines = [entry(engines_dir, n, 70.0 + i, {old: measurement(1.0 + i), new: measurement(5.0 - i)})
               for i, n in enumerate(TINY)]
    devices = {old: device("2026-11-01T00:00:00+00:00"), new: device("2026-11-20T00:00:00Z")}
    path = write(engines_dir, "devices", engines, devices)
    with Selector(path, mode="on_demand") as sel:
        assert sel.device == new and sel.info("small").latency_ms == 5.0
    with Selector(path, device=old, mode="on_demand") as sel:
        assert sel.info("small").latency_ms == 1.0
    with pytest.raises(ManifestError, match="device 'jetson' has no measurements.*new-dev, old-dev"):
        Selector(path, device="jetson")


def test_candidates_default_to_the_devices_pareto_set(engines_dir):
    engines = three(engines_dir)
    engines[1]["measurements"][DEVICE]["pareto"] = False
    path = write(engines_dir, "pareto", engines)
    with Selector(path, mode="on_demand") as sel:
        assert [e.id for e in sel.engines] == ["small", "big"]
    with Selector(path, mode="on_demand", candidates=["mid", "small"]) as sel:
        assert [e.id for e in sel.engines] == ["small", "mid"]


# -- file integrity ------------------------------------------------------------------------------------------


def _copy_build(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "engines", dst / "engines")
    return dst


def test_altered_or_missing_engines_are_left_out_with_a_warning(engines_dir, tmp_path, reference):
    root = _copy_build(engines_dir, tmp_path)
    path = write(root, "integrity", three(root))
    data = bytearray((root / "engines" / "big.onnx").read_bytes())
    data[-10] ^= 0xFF  # same size, different bytes: only the hash can tell
    (root / "engines" / "big.onnx").write_bytes(bytes(data))
    (root / "engines" / "mid.onnx").unlink()
    with pytest.warns(SelectorWarning) as caught:
        sel = Selector(path, mode="preload")
    messages = " | ".join(str(w.message) for w in caught)
    assert "engine big left out" in messages and "does not match its sha256" in messages
    assert "engine mid left out" in messages and "missing" in messages and "snexport build" in messages
    with sel:
        assert [e.id for e in sel.engines] == ["small"]
        np.testing.assert_array_equal(sel.run(X), reference["small"])
        with pytest.raises(ManifestError, match="cannot load engine big"):
            sel.switch("big")
    # Without hashing, a same-size edit goes unnoticed (the documented trade-off); the missing file does not.
    with pytest.warns(SelectorWarning, match="engine mid left out"):
        with Selector(path, mode="on_demand", verify_hashes=False, latency_ms=2.0) as sel:
            assert [e.id for e in sel.engines] == ["small", "big"]
    (root / "engines" / "small.onnx").unlink()
    with pytest.warns(SelectorWarning), pytest.raises(ManifestError, match="every candidate engine .* missing"):
        Selector(path)


def test_shared_weights_file_is_verified_and_counted_once(engines_dir, tmp_path):
    root = _copy_build(engines_dir, tmp_path)
    pack = root / "engines" / "pack.bin"
    pack.write_bytes(os.urandom(10_000_000))
    shared = {"weights_file": "engines/pack.bin", "weights_sha256": sha256_file(pack),
              "weights_size_bytes": 10_000_000}
    engines = three(root, mem=(9.0, 12.0, 20.0))
    engines[0].update(shared, weights_used_bytes=6_000_000)
    engines[1].update(shared, weights_used_bytes=8_000_000)
    path = write(root, "pack", engines)
    with Selector(path, mode="on_demand") as sel:
        # private parts 3 + 4 MB, the 10 MB file once (not 6 + 8), plus big's 20 MB with no pack.
        assert sel.memory_cost_mb(["small", "mid"]) == pytest.approx(3 + 4 + 10)
        assert sel.memory_cost_mb(["small"]) == pytest.approx(9.0)
        assert sel.memory_cost_mb(["small", "mid", "big"]) == pytest.approx(37.0)
    engines[1]["weights_used_bytes"] = None  # unknown usage: counted in full, never underestimated
    with Selector(write(root, "pack2", engines), mode="on_demand") as sel:
        assert sel.memory_cost_mb(["small", "mid"]) == pytest.approx(3 + 6 + 12)
    pack.write_bytes(os.urandom(10_000_000))
    with pytest.warns(SelectorWarning, match=r"engine (small|mid) left out.*pack.bin does not match"):
        with Selector(path, mode="on_demand") as sel:
            assert [e.id for e in sel.engines] == ["big"]


# -- switching, caching, threads -----------------------------------------------------------------------------


class TrackingRunner:
    """The real ORT runner, plus a record of closes and a check that nothing closes it mid-run."""

    def __init__(self, entry: dict, root: Path, log: list, delay_s: float = 0.0, gate: threading.Event | None = None):
        self.inner = open_runner(root / entry["file"], threads=1)
        self.backend, self.input_name = self.inner.backend, self.inner.input_name
        self.input_shape, self.output_name = self.inner.input_shape, self.inner.output_name
        self.stitch_id, self.log, self.delay_s, self.gate = entry["stitch_id"], log, delay_s, gate
        self.closed = False
        self.closed_mid_run = False
        log.append(("open", self.stitch_id, self))

    def load(self):
        self.inner.load()

    def run(self, x):
        if self.closed:
            self.closed_mid_run = True
        out = self.inner.run(x)
        if self.gate is not None:
            self.gate.wait(10)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.closed:
            self.closed_mid_run = True
        return out

    def close(self):
        self.closed = True
        self.inner.close()
        self.log.append(("close", self.stitch_id, self))


def test_on_demand_cache_evicts_least_recently_used_and_closes_it(engines_dir, reference):
    log = []
    path = write(engines_dir, "lru", three(engines_dir))
    sel = Selector(path, mode="on_demand", cache_size=2, runner_factory=lambda e, r: TrackingRunner(e, r, log))
    assert sel.loaded() == ["big"]
    sel.switch("small")
    sel.switch("mid")  # cache: small, mid; big evicted
    assert sel.loaded() == ["small", "mid"]
    assert [(k, s) for k, s, _ in log] == [("open", "big"), ("open", "small"), ("open", "mid"), ("close", "big")]
    sel.switch("small")  # hit: no load, small becomes most recent
    assert len(log) == 4 and sel.loaded() == ["mid", "small"]
    sel.switch("big")  # mid is now the least recently used
    assert [(k, s) for k, s, _ in log[4:]] == [("open", "big"), ("close", "mid")]
    np.testing.assert_array_equal(sel.run(X), reference["big"])
    reasons = [(e.from_id, e.to_id, e.reason) for e in sel.events]
    assert reasons[0] == (None, "big", "initial") and reasons[-1] == ("small", "big", "manual")
    sel.close()
    runners = {r for _, _, r in log}
    assert all(r.closed for r in runners)
    with pytest.raises(RuntimeError, match="closed"):
        sel.run(X)


def test_eviction_waits_for_the_run_that_uses_the_runner(engines_dir, reference):
    log, gate = [], threading.Event()
    factory = lambda e, r: TrackingRunner(e, r, log, gate=gate)  # noqa: E731
    sel = Selector(write(engines_dir, "inflight", three(engines_dir)), mode="on_demand", cache_size=1,
                   runner_factory=factory)
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("out", sel.run(X)))
    worker.start()
    while not any(s.refs for s in sel._slots.values()):  # wait until the run holds its runner
        time.sleep(0.001)
    big = next(r for k, s, r in log if s == "big")
    for target in ("small", "mid"):
        sel.switch(target)  # the first switch evicts big (cache_size=1) while its run is blocked in the gate
    assert not big.closed  # deferred: its run is still in flight
    gate.set()
    worker.join(10)
    np.testing.assert_array_equal(result["out"], reference["big"])  # finished on the engine it started with
    assert big.closed and not big.closed_mid_run
    small = next(r for k, s, r in log if s == "small")
    assert small.closed  # evicted by the switch to mid with nothing in flight: closed at once
    sel.close()


@pytest.mark.parametrize("mode", ["preload", "on_demand"])
def test_runs_during_switches_finish_on_the_engine_they_started_with(engines_dir, reference, mode):
    log = []
    factory = lambda e, r: TrackingRunner(e, r, log, delay_s=0.001)  # noqa: E731
    sel = Selector(write(engines_dir, f"threads-{mode}", three(engines_dir)), mode=mode, cache_size=1,
                   runner_factory=factory)
    stop = threading.Event()
    records, errors = [], []

    def worker():
        try:
            while not stop.is_set():
                t0 = time.monotonic()
                out = sel.run(X)
                records.append((t0, time.monotonic(), out))
        except Exception as exc:  # surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    order = ["small", "mid", "big"]
    for i in range(30):
        sel.switch(order[i % 3])
        time.sleep(0.002)
    stop.set()
    for t in threads:
        t.join(20)
    assert not errors and len(records) > 30
    # Timeline of the active engine; each output must be exactly one engine's, and that engine must have been
    # active at some moment between the run's start and end (it was active when the run took its runner).
    timeline = [(e.at, e.to_id) for e in sel.events]
    for t0, t1, out in records:
        matches = [name for name, ref in reference.items() if np.array_equal(out, ref)]
        assert len(matches) == 1
        active_at_start = [name for at, name in timeline if at <= t0][-1:]
        became_active = [name for at, name in timeline if t0 < at <= t1]
        assert matches[0] in active_at_start + became_active
    assert not any(r.closed_mid_run for _, _, r in log)
    sel.close()
    assert all(r.closed for _, _, r in log)


def test_preload_loads_every_candidate_up_front(engines_dir):
    log = []
    path = write(engines_dir, "preload", three(engines_dir))
    with pytest.warns(SelectorWarning, match="preloading 3 engines costs 35 MB, over the 30 MB budget"):
        sel = Selector(path, mode="preload", latency_ms=5, memory_mb=30,
                       runner_factory=lambda e, r: TrackingRunner(e, r, log))
    assert sorted(s for _, s, _ in log) == ["big", "mid", "small"] and sel.active.id == "mid"
    sel.switch("small")
    sel.switch("big")
    assert len(log) == 3  # no loads, nothing closed
    assert sel.events[-1].load_ms < 1000  # recorded (no load happened, so this is bookkeeping time)
    assert sel.memory_cost_mb(sel.engines) == pytest.approx(35.0)
    sel.close()
    assert all(r.closed for _, _, r in log)


def test_set_budget_switches_and_reports(engines_dir):
    seen = []
    with Selector(write(engines_dir, "budget", three(engines_dir)), mode="on_demand", on_switch=seen.append) as sel:
        assert sel.set_budget(latency_ms=5.0).id == "mid"
        assert sel.active.id == "mid" and sel.budget == (5.0, None)
        assert sel.set_budget(memory_mb=6).id == "small"  # latency budget kept
        assert sel.budget == (5.0, 6)
        assert sel.set_budget(latency_ms=None, memory_mb=None).id == "big"
        with pytest.raises(BudgetError):
            sel.set_budget(latency_ms=0.1, strict=True)
        assert sel.active.id == "big" and sel.budget == (None, None)  # a refused budget changes nothing
    assert [(e.from_id, e.to_id, e.reason) for e in seen] == [
        (None, "big", "initial"), ("big", "mid", "budget"), ("mid", "small", "budget"), ("small", "big", "budget")]


# -- closed loop ---------------------------------------------------------------------------------------------


def _loop_selector(root: Path, name: str, p90=(2.0, 5.0, 9.0), **cfg) -> Selector:
    engines = three(root, p90=p90)
    config = FeedbackConfig(time_runs=False, **{"window": 20, "down_after": 10, "up_after": 20, **cfg})
    return Selector(write(root, name, engines), mode="preload", feedback=config, latency_ms=10.0)


def _feed(sel: Selector, n: int, factor: float) -> None:
    """n observations of the active engine at `factor` x its profiled latency (a deterministic slowdown)."""
    for _ in range(n):
        sel.observe(sel.active.latency_ms * factor)


def test_feedback_steps_down_under_slowdown_and_back_up_after_it(engines_dir):
    # window 20 at p90: the window's p90 exceeds the budget once 3 of its 20 latencies (15 %) are slow.
    with _loop_selector(engines_dir, "loop") as sel:
        assert sel.active.id == "big"
        _feed(sel, 200, 1.0)  # nominal: big fits (9 <= 10)
        assert sel.active.id == "big"
        _feed(sel, 2, 1.5)  # two slow runs in twenty are outliers, not a slowdown
        assert sel.active.id == "big"
        _feed(sel, 1, 1.5)  # the third: big now takes 13.5 ms at p90; mid would take 7.5 ms
        assert sel.active.id == "mid"
        _feed(sel, 500, 1.5)  # steady slowdown: big predicted 13.5 > 9 (budget - 10 %): stay
        assert sel.active.id == "mid"
        _feed(sel, 18, 1.0)  # throttling over; the window's p90 still shows slow runs
        assert sel.active.id == "mid"
        _feed(sel, 1, 1.0)  # now p90 is back at the profile: big fits again
        assert sel.active.id == "big"
        _feed(sel, 500, 1.0)
        assert [(e.from_id, e.to_id, e.reason) for e in sel.events] == [
            (None, "big", "initial"), ("big", "mid", "slowdown"), ("mid", "big", "recovered")]
        assert sel.events[1].observed_ms == pytest.approx(13.5) and sel.events[1].budget_ms == 10.0


def test_feedback_needs_enough_observations_after_a_switch(engines_dir):
    with _loop_selector(engines_dir, "fresh") as sel:
        _feed(sel, 9, 2.0)  # a fresh engine is not judged before down_after observations
        assert sel.active.id == "big"
        _feed(sel, 1, 2.0)
        assert sel.active.id != "big"


def test_feedback_jumps_to_the_engine_that_fits_the_observed_slowdown(engines_dir):
    with _loop_selector(engines_dir, "jump") as sel:
        _feed(sel, 10, 2.2)  # mid would take 11 ms: straight to small (4.4 ms)
        assert sel.active.id == "small"
        _feed(sel, 100, 2.2)
        assert sel.active.id == "small"
        _feed(sel, 19, 1.6)  # mid predicted 8 <= 9: one step up; big (14.4) still out
        assert sel.active.id == "mid"
        _feed(sel, 100, 1.6)
        assert [e.to_id for e in sel.events] == ["big", "small", "mid"]


def test_feedback_holds_still_just_above_the_threshold(engines_dir):
    # big is tight (9.8 ms against a 10 ms budget); the device runs 3 % slower than profiled for a long time.
    with _loop_selector(engines_dir, "tight", p90=(2.0, 5.0, 9.8)) as sel:
        _feed(sel, 2000, 1.03)
        assert [e.to_id for e in sel.events] == ["big", "mid"]  # one step down, then no oscillation


def test_feedback_backs_off_an_engine_that_keeps_failing(engines_dir):
    # Whenever big runs it is over budget; mid always runs at its profiled speed, so each up step is a fair
    # retry. The wait before each retry doubles: the switching rate decays instead of oscillating.
    with _loop_selector(engines_dir, "backoff", p90=(2.0, 5.0, 9.8)) as sel:
        ups = []
        for i in range(1000):
            factor = 1.1 if sel.active.id == "big" else 1.0
            event = sel.observe(sel.active.latency_ms * factor)
            if event and event.reason == "recovered":
                ups.append(i)
        gaps = [b - a for a, b in zip(ups, ups[1:])]
        assert len(gaps) >= 3 and all(later > 1.5 * earlier for earlier, later in zip(gaps, gaps[1:])), gaps
        # A new budget forgets the back-off: the next retry comes after the base up_after (20) again.
        assert sel.set_budget(latency_ms=10.0).id == "big"
        _feed(sel, 10, 1.1)
        assert sel.active.id == "mid"
        _feed(sel, 19, 1.0)
        assert sel.active.id == "mid"
        _feed(sel, 1, 1.0)
        assert sel.active.id == "big"


def test_observations_from_before_a_switch_are_ignored(engines_dir):
    with _loop_selector(engines_dir, "stale") as sel:
        for _ in range(50):
            sel.observe(1000.0, engine_id="small")  # a slow run that started on another engine
        assert sel.active.id == "big" and len(sel.events) == 1


def test_run_times_itself_when_feedback_is_on(engines_dir, reference):
    # Profiled: small 0.1 ms, mid 0.5 ms. Every run of this runner takes at least 20 ms, far over the 1 ms
    # budget, so the loop must step down to small after down_after runs; no speed is asserted.
    log = []
    engines = three(engines_dir, p90=(0.1, 0.5, 50.0))
    config = FeedbackConfig(window=4, down_after=3, up_after=100)  # 3 of 3 runs over budget
    factory = lambda e, r: TrackingRunner(e, r, log, delay_s=0.02)  # noqa: E731
    with Selector(write(engines_dir, "timed", engines), mode="on_demand", feedback=config, latency_ms=1.0,
                  runner_factory=factory) as sel:
        assert sel.active.id == "mid"
        for _ in range(3):
            np.testing.assert_array_equal(sel.run(X), reference["mid"])
        assert sel.active.id == "small" and sel.events[-1].reason == "slowdown"
        assert sel.events[-1].observed_ms >= 20.0
    with Selector(write(engines_dir, "nofb", engines), mode="on_demand") as sel, pytest.raises(ValueError):
        sel.observe(1.0)


# -- a manifest measured here, and the example app -----------------------------------------------------------


@pytest.fixture(scope="module")
def measured_build(engines_dir, reference) -> Path:
    """manifest.json with latency, memory and load times measured on this machine, as `snexport bench` would."""
    import psutil

    proc = psutil.Process()
    fingerprint = {"profile": "x86-cpu", "cpu": "test-host", "threads": 1}
    key = device_key(fingerprint)
    engines = []
    for name in TINY:
        path = engines_dir / "engines" / f"{name}.onnx"
        rss0, t0 = proc.memory_info().rss, time.perf_counter()
        runner = open_runner(path, threads=1)
        cold_ms = (time.perf_counter() - t0) * 1000
        for _ in range(5):
            runner.run(X)
        rss1 = proc.memory_info().rss
        samples = []
        for _ in range(60):
            t = time.perf_counter()
            runner.run(X)
            samples.append((time.perf_counter() - t) * 1000)
        runner.close()
        q = statistics.quantiles(samples, n=100, method="inclusive")
        m = {"latency_ms": {"mean": statistics.fmean(samples), "std": statistics.stdev(samples),
                            "min": min(samples), "p50": q[49], "p90": q[89], "p99": q[98], "max": max(samples),
                            "iterations": len(samples)},
             "throughput_ips": 1000 / statistics.fmean(samples),
             "memory": {"rss_load_delta_mb": (rss1 - rss0) / 1e6, "rss_peak_mb": proc.memory_info().rss / 1e6,
                        "file_mb": path.stat().st_size / 1e6, "device_delta_mb": None},
             "load_ms": {"cold": cold_ms, "switch_p50": None, "switch_p99": None}, "pareto": True}
        engines.append(entry(engines_dir, name, None, {key: m}))
    devices = {key: {"profile": "x86-cpu", "fingerprint": fingerprint, "settings": {"threads": 1},
                     "measured_at": "2026-11-24T06:00:00+00:00"}}
    write(engines_dir, "measured", engines, devices)
    (engines_dir / "manifest.json").write_bytes((engines_dir / "manifest-measured.json").read_bytes())
    return engines_dir


def _run_example(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "examples" / "edge_app.py"), *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_example_app_runs_end_to_end(measured_build, tmp_path):
    done = _run_example(str(measured_build / "manifest.json"), "--steps", "40")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 40 and all(any(name in line for name in TINY) for line in steps)
    assert any(line.startswith("budget ") for line in lines)
    assert "switch " in done.stdout and "switches:" in lines[-1]


def test_example_app_reads_images_and_labels(measured_build, tmp_path):
    images = np.random.RandomState(1).randn(12, 8, 8).astype(np.float32)
    labels = np.arange(12) % 10
    np.save(tmp_path / "x.npy", images)
    np.save(tmp_path / "y.npy", labels)
    done = _run_example(str(measured_build), "--images", str(tmp_path / "x.npy"), "--labels",
                        str(tmp_path / "y.npy"), "--steps", "24", "--mode", "on_demand")
    assert done.returncode == 0, done.stderr
    assert "top-1 over 24 images" in done.stdout
    bad = _run_example(str(measured_build / "nope.json"))
    assert bad.returncode != 0 and "no manifest at" in bad.stderr and "Traceback" not in bad.stderr


# -- hostile manifests and bad arguments (issue 8) ---------------------------------------------------------------


@pytest.mark.timeout(120)
def test_thread_counts_are_checked_before_onnx_runtime_sees_them(engines_dir):
    """5000 threads made the constructor hang for minutes creating ONNX Runtime thread pools."""
    from snexport.errors import SettingsError

    hostile = {DEVICE: dict(device(), settings={"backend": "onnxruntime", "threads": 5000})}
    path = write(engines_dir, "threads", three(engines_dir), devices=hostile)
    if 5000 <= max_threads():
        pytest.skip("this machine has 1250+ cores")
    with pytest.raises(ManifestError, match=r"threads.*is 5000.*1 to \d+"):
        Selector(path)
    with Selector(path, mode="on_demand", runner_options={"threads": 1}) as sel:  # the caller's override wins
        assert sel.run(X).shape == (1, 10)
    with pytest.raises(SettingsError, match="threads"):
        Selector(path, runner_options={"threads": 0})


def test_each_engine_runs_with_the_thread_count_bench_chose_for_it(engines_dir):
    """bench picks threads per engine (one thread for a tiny engine, every core for a big one): the selector opens
    each engine with its own count, the device's count where an engine has none, the caller's when given."""
    engines = three(engines_dir)
    engines[0]["measurements"][DEVICE]["threads"] = 1
    engines[2]["measurements"][DEVICE]["threads"] = 2
    devices = {DEVICE: dict(device(), settings={"backend": "onnxruntime", "threads": 3})}
    path = write(engines_dir, "per-engine-threads", engines, devices=devices)
    with Selector(path, mode="preload") as sel:
        assert {i: sel._slots[i].runner.threads for i in ("small", "mid", "big")} == {"small": 1, "mid": 3, "big": 2}
        assert sel.run(X).shape == (1, 10)
    with Selector(path, mode="preload", runner_options={"threads": 1}) as sel:  # the caller's count wins
        assert {sel._slots[i].runner.threads for i in ("small", "mid", "big")} == {1}
    engines[1]["measurements"][DEVICE]["threads"] = 5000
    hostile = write(engines_dir, "per-engine-threads-hostile", engines, devices=devices)
    if 5000 <= max_threads():
        pytest.skip("this machine has 1250+ cores")
    with pytest.raises(ManifestError, match=r"threads of 'mid'.*is 5000"):
        Selector(hostile, mode="preload")


def test_candidates_must_name_at_least_one_engine(engines_dir):
    from snexport.errors import SettingsError

    path = write(engines_dir, "cands", three(engines_dir))
    with pytest.raises(SettingsError, match="candidates is empty"):  # was an IndexError
        Selector(path, candidates=[])
    with pytest.raises(SettingsError, match="list of engine ids"):  # a string would be iterated letter by letter
        Selector(path, candidates="mid")


@pytest.mark.parametrize("bad", [float("nan"), -1.0, True, "5", float("inf"), 10**309, [3]],
                         ids=["nan", "negative", "bool", "str", "inf", "10**309", "list"])
def test_budgets_must_be_finite_non_negative_numbers(engines_dir, bad):
    from snexport.errors import SettingsError

    path = write(engines_dir, "budgets", three(engines_dir))
    with pytest.raises(SettingsError, match="budget"):
        Selector(path, mode="on_demand", latency_ms=bad)
    with Selector(path, mode="on_demand", latency_ms=5.0, feedback=FeedbackConfig()) as sel:
        for call in (lambda: sel.choose(latency_ms=bad), lambda: sel.choose(memory_mb=bad),
                     lambda: sel.set_budget(latency_ms=bad), lambda: sel.set_budget(memory_mb=bad)):
            with pytest.raises(SettingsError, match="budget"):
                call()
        assert sel.budget == (5.0, None)  # a refused budget never becomes the active one (NaN was kept)
        assert sel.active.id == "mid"
        if not isinstance(bad, (list, str)):
            with pytest.raises(SettingsError, match="observe"):
                sel.observe(bad if not isinstance(bad, bool) else True)
        with pytest.warns(SelectorWarning, match="no engine"):
            assert sel.choose(latency_ms=0).id == "small"  # zero is a (harsh) budget, not an error


def test_engine_linked_outside_the_build_directory_is_refused(engines_dir, tmp_path):
    root = _copy_build(engines_dir, tmp_path / "build")
    path = write(root, "escape", three(root))
    outside = tmp_path / "elsewhere.onnx"
    shutil.copyfile(root / "engines" / "big.onnx", outside)  # same bytes: the hash check alone would pass it
    (root / "engines" / "big.onnx").unlink()
    (root / "engines" / "big.onnx").symlink_to(outside)
    with pytest.warns(SelectorWarning, match="engine big left out.*leads outside"):
        with Selector(path, mode="on_demand") as sel:
            assert [e.id for e in sel.engines] == ["small", "mid"]
    with pytest.warns(SelectorWarning), pytest.raises(ManifestError, match="leads outside"):
        Selector(path, candidates=["big"])


def test_engine_that_is_not_a_model_is_a_one_line_error(engines_dir, tmp_path):
    """An engine linked (inside the directory) to a non-ONNX file whose hash the manifest claims: the runtime's
    InvalidProtobuf error becomes one ManifestError line."""
    root = _copy_build(engines_dir, tmp_path / "build")
    (root / "engines" / "notes.txt").write_bytes(b"these are not the weights you are looking for\n" * 20)
    (root / "engines" / "big.onnx").unlink()
    (root / "engines" / "big.onnx").symlink_to("notes.txt")
    engines = three(root)
    engines[2].update(sha256=sha256_file(root / "engines" / "notes.txt"),
                      size_bytes=(root / "engines" / "notes.txt").stat().st_size)
    path = write(root, "garbage", engines)
    with pytest.raises(ManifestError, match=r"cannot load engine big: ONNX Runtime cannot open .*InvalidProtobuf"
                       ) as info:
        Selector(path, mode="preload")
    assert "\n" not in str(info.value)
    with Selector(path, mode="on_demand", latency_ms=5.0) as sel:
        with pytest.raises(ManifestError, match=r"not a valid \.onnx engine"):
            sel.switch("big")
        assert sel.active.id == "mid"  # the failed switch changed nothing


def test_manifest_input_shape_must_be_what_the_engine_takes(engines_dir):
    engines = three(engines_dir)
    engines[1]["input"]["shape"] = [1, 1, 7, 8]
    path = write(engines_dir, "shape", engines)
    with Selector(path, mode="on_demand", latency_ms=2.0) as sel:
        with pytest.raises(ManifestError, match=r"mid takes input \[1, 1, 8, 8\] but the manifest says \[1, 1, 7, 8\]"):
            sel.switch("mid")
