"""Interleaved latency rounds and the noise-aware front (issue 10), with an injected clock instead of real time."""

from __future__ import annotations

import pytest

from snexport.device.pareto import noise_aware_front
from snexport.device.rounds import (RoundSettings, bootstrap_median_ci, iterations_for, percentile, pick_within,
                                    run_rounds, screen_variants, summarize_rounds, warmup_runs)
from snexport.errors import ProfileError


class FakeMachine:
    """A clock that advances by each engine's cost per run, plus a drift term that grows with elapsed work.

    ``drift_ms_per_s`` slows everything down as the machine heats up: measured one after another, the engine
    timed last looks slower than it is; interleaved rounds spread the drift over every engine.
    """

    def __init__(self, costs_ms: dict, drift_ms_per_s: float = 0.0):
        self.costs_ms = costs_ms
        self.drift = drift_ms_per_s
        self.now_ns = 0
        self.calls = {k: 0 for k in costs_ms}
        self.log: list[str] = []

    def clock(self) -> int:
        return self.now_ns

    def run(self, engine_id: str):
        def go():
            extra = self.drift * self.now_ns / 1e9
            self.now_ns += int((self.costs_ms[engine_id] + extra) * 1e6)
            self.calls[engine_id] += 1
            self.log.append(engine_id)
        return go


def test_percentile_interpolates_like_numpy():
    np = pytest.importorskip("numpy")
    values = sorted([3.0, 1.0, 4.0, 1.5, 9.0, 2.6])
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    with pytest.raises(ProfileError):
        percentile([], 50)


def test_every_round_times_every_engine_once_in_a_fresh_order():
    m = FakeMachine({"a": 1.0, "b": 2.0, "c": 3.0})
    settings = RoundSettings(rounds=6, warmup=2, iterations=4, min_duration_s=0.0, seed=3)
    stats = run_rounds({k: m.run(k) for k in m.costs_ms}, settings, counts={"a": 4, "b": 4, "c": 4}, clock=m.clock)
    # Each round is a permutation of the engines, and the permutation changes between rounds.
    orders = [sorted(m.costs_ms, key=lambda k: stats[k]["round_positions"][r]) for r in range(6)]
    assert all(sorted(stats[k]["round_positions"][r] for k in m.costs_ms) == [0, 1, 2] for r in range(6))
    assert len({tuple(o) for o in orders}) > 1
    # Blocks are contiguous: round by round, each engine's warm-up then its timed runs, nothing in between.
    assert m.log == [k for order in orders for k in order for _ in range(2 + 4)]
    for k, cost in m.costs_ms.items():
        assert stats[k]["iterations"] == 6 * 4 and stats[k]["rounds"] == 6
        assert stats[k]["p50_ms"] == pytest.approx(cost)
        assert stats[k]["p50_ci_ms"][0] <= cost <= stats[k]["p50_ci_ms"][1]
        assert m.calls[k] == 6 * (2 + 4)


def test_interleaving_spreads_drift_that_sequential_timing_would_pin_on_one_engine():
    """Two equal engines on a machine that slows down: timed one after the other, the second looks slower;
    in interleaved rounds both see the same drift on average, so their medians stay close."""
    costs = {"first": 1.0, "second": 1.0}
    seq = FakeMachine(costs, drift_ms_per_s=5.0)
    settings = RoundSettings(rounds=2, warmup=0, iterations=200, min_duration_s=0.0, seed=0)
    seq_stats = {k: run_rounds({k: seq.run(k)}, settings, counts={k: 200}, clock=seq.clock)[k] for k in costs}
    inter = FakeMachine(costs, drift_ms_per_s=5.0)
    settings = RoundSettings(rounds=40, warmup=0, iterations=10, min_duration_s=0.0, seed=0)
    inter_stats = run_rounds({k: inter.run(k) for k in costs}, settings, counts={"first": 10, "second": 10},
                             clock=inter.clock)
    seq_gap = seq_stats["second"]["p50_ms"] / seq_stats["first"]["p50_ms"]
    inter_gap = inter_stats["second"]["p50_ms"] / inter_stats["first"]["p50_ms"]
    assert seq_gap > 1.5
    assert abs(inter_gap - 1.0) < 0.1
    # The drift shows up as spread between rounds, which widens the interval.
    assert inter_stats["first"]["round_p50_spread_ms"] > 0.5


def test_iterations_fill_the_minimum_duration_within_the_cap():
    s = RoundSettings(iterations=20, min_duration_s=0.5, max_duration_s=2.0)
    assert iterations_for(0.001, s) == 500  # 1 ms engine: 0.5 s of samples
    assert iterations_for(0.2, s) == 20  # slow engine: the minimum count
    assert iterations_for(10.0, s) == 20  # slower than the cap allows: still the minimum count
    assert iterations_for(1e-9, RoundSettings(iterations=1, min_duration_s=1.0, max_duration_s=1e-3)) >= 1


def test_bootstrap_interval_reflects_between_round_spread():
    steady = [[1.0, 1.01, 0.99] * 10] * 5
    lo, hi = bootstrap_median_ci(steady, 0.95, 1000, 0)
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    drifting = [[1.0 + 0.1 * r] * 30 for r in range(5)]
    lo, hi = bootstrap_median_ci(drifting, 0.95, 1000, 0)
    assert lo < 1.2 < hi and hi - lo >= 0.2
    with pytest.raises(ProfileError):
        bootstrap_median_ci([[1.0, 2.0], [1.0]], 0.95, 100, 0)


def test_summary_keeps_the_percentiles_and_the_round_figures():
    rounds = [[1.0, 2.0, 3.0, 4.0], [2.0, 3.0, 4.0, 5.0]]
    s = summarize_rounds(rounds, RoundSettings(rounds=2))
    assert s["p50_ms"] == pytest.approx(3.0) and s["min_ms"] == 1.0 and s["max_ms"] == 5.0
    assert s["round_p50_ms"] == [2.5, 3.5] and s["round_p50_spread_ms"] == pytest.approx(1.0)
    assert s["iterations"] == 8 and s["iterations_per_round"] == 4 and s["rounds"] == 2


def test_settings_are_checked():
    with pytest.raises(ProfileError, match="rounds"):
        RoundSettings(rounds=1).check()
    with pytest.raises(ProfileError, match="ci_level"):
        RoundSettings(ci_level=1.0).check()
    assert RoundSettings().method()["p50_ci"]["method"].startswith("bootstrap over rounds")


def row(i, top1, lo, hi, mem=0.0, p50=None):
    return {"id": i, "top1": top1, "latency_ci_ms": (lo, hi), "memory_mb": mem,
            "latency_p50_ms": (lo + hi) / 2 if p50 is None else p50}


def test_front_drops_only_what_is_beaten_beyond_the_noise():
    rows = [
        row("small", 70.0, 0.30, 0.34),  # fastest, least accurate
        row("stitch", 72.0, 0.33, 0.37),  # overlaps small: tied, both stay
        row("slow_bad", 71.0, 0.50, 0.55),  # beaten beyond noise by "stitch" (more accurate, faster): dropped
        row("big", 90.0, 0.60, 0.70),
        row("big_mem", 90.0, 0.10, 0.20, mem=50.0),  # fastest but bigger: dominates nothing bigger-memory-wise
    ]
    out = noise_aware_front(rows)
    assert out["front"] == ["small", "stitch", "big", "big_mem"]
    assert out["dominated_by"] == {"slow_bad": "stitch"}
    assert out["tied"]["small"] == ["stitch"] and out["tied"]["stitch"] == ["small"]
    # The smallest anchor stays on the front even when a stitch's median is lower, as long as it is within noise.
    out = noise_aware_front([row("demo_s", 73.0, 0.28, 0.40), row("demo_s:3>demo_m:4", 75.0, 0.30, 0.38)])
    assert out["front"] == ["demo_s", "demo_s:3>demo_m:4"]


def test_front_needs_a_latency_difference_beyond_the_resolution():
    # Tight, disjoint intervals but only 3 % apart: one run's interval cannot see how a reload moves an engine, so
    # the slower, less accurate engine stays, tied; at 8 % apart it is dropped.
    near = [row("fast", 80.0, 0.970, 0.980), row("slow", 79.0, 0.995, 1.005)]
    out = noise_aware_front(near)
    assert out["front"] == ["fast", "slow"] and out["tied"] == {"fast": ["slow"], "slow": ["fast"]}
    far = [row("fast", 80.0, 0.915, 0.925), row("slow", 79.0, 0.995, 1.005)]
    assert noise_aware_front(far)["dominated_by"] == {"slow": "fast"}
    # 8 % lower medians but overlapping intervals: still within the noise.
    wide = [row("fast", 80.0, 0.80, 1.00, p50=0.92), row("slow", 79.0, 0.95, 1.05, p50=1.0)]
    assert noise_aware_front(wide)["front"] == ["fast", "slow"]


def test_a_rebench_moves_engines_across_the_front_only_on_clear_evidence():
    from snexport.device.pareto import FRONT_STICKY_MARGIN, LATENCY_RESOLUTION

    def pair(gap):  # "slow" is less accurate and `gap` slower, with tight intervals
        return [row("fast", 80.0, 0.99, 1.01, p50=1.0), row("slow", 79.0, 0.99 + gap, 1.01 + gap, p50=1.0 + gap)]

    # 8 % apart: dropped without history; kept by a re-bench when it was on the front (8 % < 5 % + 5 %).
    assert noise_aware_front(pair(0.08))["dominated_by"] == {"slow": "fast"}
    assert noise_aware_front(pair(0.08), previous={"fast": True, "slow": True})["front"] == ["fast", "slow"]
    # 4.4 % apart: tied without history; stays off the front when it was off (4.4 % > 5 % - 5 %, beyond the CI).
    assert noise_aware_front(pair(0.044))["front"] == ["fast", "slow"]
    assert noise_aware_front(pair(0.044), previous={"fast": True, "slow": False})["dominated_by"] == {"slow": "fast"}
    # Clear evidence still moves it: 12 % slower leaves the front; overlapping intervals bring it back.
    gap = LATENCY_RESOLUTION + FRONT_STICKY_MARGIN + 0.02
    assert noise_aware_front(pair(gap), previous={"slow": True})["dominated_by"] == {"slow": "fast"}
    overlapping = [row("fast", 80.0, 0.95, 1.05, p50=1.0), row("slow", 79.0, 1.0, 1.1, p50=1.05)]
    assert noise_aware_front(overlapping, previous={"slow": False})["front"] == ["fast", "slow"]


def test_front_memory_is_a_tolerance_not_a_rounding():
    # 7.4 and 7.6 MB would round to 5 and 10: a rounding boundary between them would keep "slow" on the front in
    # one run and drop it in the next. As a 5 MB tolerance, 0.2 MB never decides; 6 MB more does.
    rows = [row("fast", 80.0, 0.5, 0.6, mem=7.6), row("slow", 79.0, 1.0, 1.1, mem=7.4)]
    assert noise_aware_front(rows)["dominated_by"] == {"slow": "fast"}
    rows = [row("fast", 80.0, 0.5, 0.6, mem=13.5), row("slow", 79.0, 1.0, 1.1, mem=7.4)]
    assert noise_aware_front(rows)["front"] == ["fast", "slow"]


def test_front_with_unknown_accuracy_is_a_latency_memory_front():
    rows = [row("a", None, 1.0, 1.1), row("b", None, 2.0, 2.1), row("c", None, 0.5, 0.6, mem=10.0)]
    out = noise_aware_front(rows)
    assert out["front"] == ["a", "c"] and out["dominated_by"] == {"b": "a"}


class SwingingMachine(FakeMachine):
    """A machine whose speed swings like a shared VM's: every ``period_s`` it switches between fast and
    ``1 + swing`` times slower (measured on the 2-vCPU box: +-15 % over 0.1-1 s)."""

    def __init__(self, costs_ms: dict, swing: float = 0.4, period_s: float = 0.3):
        super().__init__(costs_ms)
        self.swing, self.period_ns = swing, int(period_s * 1e9)

    def run(self, engine_id: str):
        def go():
            slow = (self.now_ns // self.period_ns) % 3 == 0  # a third of the time slow
            self.now_ns += int(self.costs_ms[engine_id] * (1 + self.swing * slow) * 1e6)
            self.calls[engine_id] += 1
            self.log.append(engine_id)
        return go


def _ranking(settings: RoundSettings, seed: int) -> list[str]:
    costs = {f"e{i}": 0.30 * 1.03 ** i for i in range(8)}  # 8 engines, 3 % apart
    m = SwingingMachine(costs)
    settings = RoundSettings(**{**settings.__dict__, "seed": seed, "bootstrap": 50})
    stats = run_rounds({k: m.run(k) for k in costs}, settings, clock=m.clock)
    return sorted(costs, key=lambda k: stats[k]["p50_ms"])


def test_many_short_rounds_rank_close_engines_on_a_swinging_machine():
    """Why x86-cpu.toml measures 40 rounds of 20 ms: a machine's slow spells then hit every engine alike, and
    engines 3 % apart keep their order; 5 rounds of 0.5 s pin whole slow spells on whichever engine ran then."""
    from snexport.device.profiles import load_profile

    truth = [f"e{i}" for i in range(8)]
    short = load_profile("x86-cpu").measurement.round_settings()
    assert short.rounds >= 40 and short.min_duration_s <= 0.02
    assert all(_ranking(short, seed) == truth for seed in range(5))
    long = RoundSettings(rounds=5, warmup=10, iterations=20, min_duration_s=0.5)
    assert any(_ranking(long, seed) != truth for seed in range(5))


def test_warmup_is_at_most_a_third_of_a_block():
    s = RoundSettings(warmup=10)
    assert warmup_runs(60, s) == 10  # a fast engine: the full warm-up
    assert warmup_runs(3, s) == 1  # a slow engine with a 3-run block: one warm-up run, not ten
    assert warmup_runs(1, s) == 1
    assert warmup_runs(60, RoundSettings(warmup=0)) == 0


def test_screening_times_variants_in_alternation_and_picks_within_tolerance():
    m = FakeMachine({"ort1": 0.40, "ort2": 0.60, "ov1": 0.30, "ov2": 0.50})
    figures = screen_variants({k: m.run(k) for k in m.costs_ms}, passes=6, warmup=2, block_s=0.02, seed=1,
                              drop_above=10.0, clock=m.clock)
    for k, cost in m.costs_ms.items():
        assert figures[k]["p50_ms"] == pytest.approx(cost) and figures[k]["rounds"] == 6
    # Alternation: the variants' blocks interleave (every pass visits every variant), not one variant's passes in a row.
    firsts = [m.log.index(k) for k in m.costs_ms]
    lasts = [len(m.log) - 1 - m.log[::-1].index(k) for k in m.costs_ms]
    assert max(firsts) < min(lasts)
    # Blocks fill ~20 ms at each variant's own speed: the fast variant gets more timed runs.
    assert figures["ov1"]["iterations_per_round"] > figures["ort2"]["iterations_per_round"]
    medians = {k: f["p50_ms"] for k, f in figures.items()}
    assert pick_within(medians, ["ort1", "ort2", "ov1", "ov2"]) == "ov1"  # 25 % faster than the preferred one
    close = {"ort1": 0.31, "ov1": 0.30}
    assert pick_within(close, ["ort1", "ov1"]) == "ort1"  # within 5 %: the preference wins
    assert pick_within(close, ["ov1", "ort1"]) == "ov1"
    assert pick_within({1: 0.5, 2: 0.3}, [1, 2]) == 2  # more threads only when clearly faster
    with pytest.raises(ProfileError):
        pick_within({}, [])


def test_screening_of_slow_variants_shrinks_to_its_budget():
    slow = FakeMachine({"one": 200.0, "two": 180.0})  # DeiT-B-like runs: 0.1-0.2 s each
    figures = screen_variants({k: slow.run(k) for k in slow.costs_ms}, passes=10, budget_s=1.5, min_passes=3,
                              clock=slow.clock)
    assert all(f["rounds"] == 3 and not f["dropped"] for f in figures.values())  # the first pass alone took ~1 s
    assert slow.now_ns / 1e9 < 4.0
    # Slow variants: two warm-ups in the first block only; later blocks are one timed run each, and no variant's
    # block follows its own (what a warm-up would hide then hits both alike).
    assert slow.calls == {"one": 2 + 3, "two": 2 + 3}
    later = slow.log[6:]
    assert len(later) == 4 and all(a != b for a, b in zip(slow.log[5:], later))
    fast = FakeMachine({"one": 0.3, "two": 0.2})
    figures = screen_variants({k: fast.run(k) for k in fast.costs_ms}, passes=10, clock=fast.clock)
    assert all(f["rounds"] == 10 for f in figures.values())


def test_screening_stops_timing_a_variant_far_slower_after_its_first_pass():
    """One thread of a DeiT-S/B engine on 2 cores runs ~1.8x slower: it cannot come within any tolerance a choice
    uses, so after the first pass only the variants within SCREEN_DROP_ABOVE of the fastest are timed."""
    from snexport.device.rounds import SCREEN_DROP_ABOVE

    costs = {"ort1": 300.0, "ort2": 165.0, "ov1": 290.0, "ov2": 160.0, "ov2b": 160.0 * (SCREEN_DROP_ABOVE - 0.1)}
    m = FakeMachine(costs)
    figures = screen_variants({k: m.run(k) for k in costs}, passes=10, warmup=2, budget_s=1.5, min_passes=3,
                              clock=m.clock)
    for k in ("ort1", "ov1"):  # dropped: two warm-ups and one timed run, their first pass's figures
        assert figures[k]["dropped"] and figures[k]["rounds"] == 1 and m.calls[k] == 3
    for k in ("ort2", "ov2", "ov2b"):  # within the factor: timed in every pass
        assert not figures[k]["dropped"] and figures[k]["rounds"] == 3
    for k, cost in costs.items():  # paired figures stay on one scale, dropped or not
        assert figures[k]["paired_ms"] == pytest.approx(cost, rel=1e-6)
    assert pick_within({k: f["paired_ms"] for k, f in figures.items()}, list(costs)) == "ort2"
    # Without the drop the same screening takes a quarter longer.
    unbounded = FakeMachine(costs)
    screen_variants({k: unbounded.run(k) for k in costs}, passes=10, warmup=2, budget_s=1.5, min_passes=3,
                    drop_above=float("inf"), clock=unbounded.clock)
    assert unbounded.now_ns > 1.2 * m.now_ns


def test_calibration_of_a_slow_engine_stops_at_its_budget():
    from snexport.device.rounds import calibrate

    slow = FakeMachine({"b": 200.0})  # a DeiT-B run: 10 warm-ups and 5 timed runs would take 3 s
    assert calibrate(slow.run("b"), warmup=10, clock=slow.clock, budget_s=0.5) == pytest.approx(0.2)
    assert slow.calls["b"] == 3 + 3  # warm-up past 0.5 s after 3 runs; 3 timed runs past it too
    fast = FakeMachine({"d": 0.3})  # a demo engine: the full warm-up and 5 timed runs
    assert calibrate(fast.run("d"), warmup=10, clock=fast.clock, budget_s=0.5) == pytest.approx(0.0003)
    assert fast.calls["d"] == 15


def test_a_rebench_keeps_the_previous_choice_unless_clearly_beaten(monkeypatch):
    """Runtimes 12 % apart: a first bench takes the faster one (beyond the 10 % runtime tolerance); a re-bench that
    previously chose the other keeps it (within tolerance + sticky margin), so two runs measure the same variant."""
    from types import SimpleNamespace

    import snexport.device.rounds as rounds
    from snexport.device.bench import screen_engines

    paired = {("e@onnxruntime", 1): 1.12, ("e@onnxruntime", 2): 1.60, ("e@openvino", 1): 1.00,
              ("e@openvino", 2): 1.40}

    def fake_screen(variants, **_):
        assert set(variants) == set(paired)  # every runtime with every candidate thread count, side by side
        return {v: {"p50_ms": paired[v], "p50_ci_ms": [paired[v]] * 2, "paired_ms": paired[v]} for v in variants}

    class Runner:
        def load(self):
            pass

        def run(self, x):
            return x

        def close(self):
            pass

    monkeypatch.setattr(rounds, "screen_variants", fake_screen)
    art = SimpleNamespace(input_shape=(1, 1, 8, 8), precision="fp32")
    keyed = {"e@onnxruntime": ("e", "onnxruntime", art), "e@openvino": ("e", "openvino", art)}
    candidates = {k: [1, 2] for k in keyed}
    factory = lambda k, t: Runner  # noqa: E731
    order = ["onnxruntime", "openvino"]
    found = screen_engines(keyed, factory, candidates, order, show_progress=False)
    assert found.chosen == {"e": "openvino"} and found.threads == {"e@onnxruntime": 1, "e@openvino": 1}
    found = screen_engines(keyed, factory, candidates, order, show_progress=False, previous={"e": ("onnxruntime", 1)})
    assert found.chosen == {"e": "onnxruntime"}  # 12 % < 10 % + 5 %: kept
    paired[("e@onnxruntime", 1)] = 1.25
    found = screen_engines(keyed, factory, candidates, order, show_progress=False, previous={"e": ("onnxruntime", 1)})
    assert found.chosen == {"e": "openvino"}  # 25 %: clearly beaten, the choice moves


def test_screening_stops_trying_one_thread_on_bigger_engines_once_it_lost_clearly(monkeypatch):
    """Engines are screened smallest first; once one thread of a runtime was dropped (far slower) on an engine,
    bigger engines on that runtime are screened with every core only, and an engine left with one way to run is
    not loaded at all."""
    from types import SimpleNamespace

    import snexport.device.rounds as rounds
    from snexport.device.bench import screen_engines

    seen = []

    def fake_screen(variants, **_):
        seen.append(sorted(variants))
        out = {}
        for key, t in variants:
            engine = key.split("@")[0]
            lost = t == 1 and engine != "small" and key.endswith("onnxruntime")  # one thread far slower
            out[(key, t)] = {"p50_ms": 2.0 if lost else 1.0, "p50_ci_ms": [1.0, 1.0], "paired_ms": 2.0 if lost else 1.0,
                             "dropped": lost}
        return out

    loads, closed = [], []

    def factory(k, t):
        class Runner:
            variant = (k, t)

            def load(self):
                loads.append((k, t))

            def run(self, x):
                return x

            def close(self):
                closed.append((k, t))
        return Runner

    monkeypatch.setattr(rounds, "screen_variants", fake_screen)
    art = SimpleNamespace(input_shape=(1, 1, 8, 8), precision="fp32")
    sizes = {"big": 30.0, "small": 1.0, "mid": 10.0}
    keyed = {f"{e}@{b}": (e, b, art) for e in sizes for b in ("onnxruntime", "openvino")}
    candidates = {k: [1, 2] for k in keyed}
    threads = screen_engines(keyed, factory, candidates, ["onnxruntime", "openvino"], show_progress=False,
                             sizes=sizes).threads
    assert [s[0][0].split("@")[0] for s in seen] == ["small", "mid", "big"]  # smallest first
    assert ("mid@onnxruntime", 1) in seen[1] and ("big@onnxruntime", 1) not in seen[2]
    assert ("big@openvino", 1) in seen[2]  # the other runtime's one thread never lost: still tried
    assert threads["mid@onnxruntime"] == 2 and threads["big@onnxruntime"] == 2 and threads["big@openvino"] == 1
    assert ("big@onnxruntime", 1) not in loads

    # One runtime only: a bigger engine left with one way to run is neither loaded nor timed; it runs on every core.
    seen.clear()
    loads.clear()
    ort = {k: v for k, v in keyed.items() if k.endswith("onnxruntime")}
    found = screen_engines(ort, factory, {k: [1, 2] for k in ort}, ["onnxruntime"], show_progress=False, sizes=sizes)
    assert len(seen) == 2 and not any(k.startswith("big") for k, _ in loads)
    assert found.threads["big@onnxruntime"] == 2 and found.chosen["big"] == "onnxruntime"
    assert "big@onnxruntime" not in found.screened

    # keep: each engine's chosen variant stays loaded for the rounds; every other variant is closed.
    loads.clear()
    closed.clear()
    found = screen_engines(keyed, factory, candidates, ["onnxruntime", "openvino"], show_progress=False,
                           sizes=sizes, keep=True)
    assert {k: r.variant for k, r in found.kept.items()} == {
        f"{e}@{b}": (f"{e}@{b}", found.threads[f"{e}@{b}"]) for e, b in found.chosen.items()}
    assert sorted(closed) == sorted(v for v in loads if v not in [r.variant for r in found.kept.values()])
