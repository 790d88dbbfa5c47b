"""Interleaved latency rounds: the timing discipline behind `snexport bench` (issue 10).

Why rounds: measuring engines one after another, once each, turns any drift of the machine (clock ramps, a
neighbour's burst, thermal throttling, page-cache state) into a difference *between engines*. Here every round
times every engine once, in a fresh random order, after its own warm-up; an engine's statistics pool all its
rounds, and the spread between its per-round medians shows how much the machine moved. Nothing of ours runs while
the clock runs: no sampler thread (memory is measured in its own pass, ``profiling.profile_engine``), no I/O, only
``run`` between two clock reads. Energy counters (RAPL, NVML), when present, are read right before and after each
engine's timed block, outside the clock.

Confidence interval of the median: a bootstrap over rounds — resample whole rounds with replacement, take the
pooled median of each resample, report the central ``ci_level`` interval. Resampling rounds, not single samples,
keeps the within-round correlation of samples and puts the between-round drift into the interval, which is what
decides whether two engines' medians differ beyond the noise (``pareto.noise_aware_front``).

Standard library at import; numpy (the device's runtime dependency) is imported for the bootstrap.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from snexport.errors import ProfileError

DEFAULT_BOOTSTRAP = 2000


@dataclass(frozen=True)
class RoundSettings:
    rounds: int = 5  # interleaved rounds; each times every engine once
    warmup: int = 10  # untimed runs of an engine at the start of each of its rounds
    iterations: int = 20  # minimum timed runs of an engine per round
    min_duration_s: float = 0.3  # ... and minimum timed seconds per engine per round (fast engines get more samples)
    max_duration_s: float = 10.0  # cap on timed seconds per engine per round
    percentiles: tuple = (50.0, 90.0, 99.0)
    ci_level: float = 0.95  # confidence level of the p50 interval
    bootstrap: int = DEFAULT_BOOTSTRAP  # resamples of rounds for that interval
    seed: int = 0  # round orders and bootstrap resamples

    def check(self) -> "RoundSettings":
        if self.rounds < 2:
            raise ProfileError(f"measurement.rounds must be >= 2 to see drift between rounds, got {self.rounds}")
        if self.warmup < 0 or self.iterations < 1:
            raise ProfileError("measurement needs warmup >= 0 and iterations >= 1; fix the settings")
        if not 0 <= self.min_duration_s <= self.max_duration_s:
            raise ProfileError("measurement needs 0 <= min_duration_s <= max_duration_s; fix the settings")
        if not 0.5 <= self.ci_level < 1:
            raise ProfileError(f"measurement.ci_level must lie in [0.5, 1), got {self.ci_level}")
        return self

    def method(self) -> dict:
        """How the numbers were taken, stored next to them (profile.jsonl, manifest)."""
        return {
            "timing": "interleaved rounds",
            "rounds": self.rounds,
            "order": f"fresh random permutation of the engines each round (seed {self.seed})",
            "warmup_per_round": self.warmup,
            "iterations_per_round": f"max({self.iterations}, runs filling {self.min_duration_s:g} s), "
                                    f"at most {self.max_duration_s:g} s",
            "statistics": "percentiles (linear interpolation) over the samples of all rounds",
            "p50_ci": {"level": self.ci_level, "method": f"bootstrap over rounds ({self.bootstrap} resamples)"},
            "beside_the_clock": "nothing: memory is measured in a separate pass; energy counters are read "
                                "outside the timed block",
        }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on already sorted values.

    The one percentile function of the device half: profiling, bench and the selector's feedback loop use it.
    """
    if not sorted_values:
        raise ProfileError("no samples to take a percentile of; measure at least one iteration")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def calibrate(run: Callable[[], Any], warmup: int, clock: Callable[[], int] = time.perf_counter_ns) -> float:
    """Seconds per run of a warm engine (median of a few timed runs after ``warmup`` untimed ones)."""
    for _ in range(max(warmup, 1)):
        run()
    times = []
    for _ in range(5):
        t0 = clock()
        run()
        times.append((clock() - t0) / 1e9)
    return sorted(times)[2]


def iterations_for(seconds_per_run: float, settings: RoundSettings) -> int:
    """Timed runs per round for an engine: enough to fill min_duration_s, at least ``iterations``, capped."""
    per = max(seconds_per_run, 1e-7)
    wanted = max(settings.iterations, math.ceil(settings.min_duration_s / per))
    cap = max(settings.iterations, math.floor(settings.max_duration_s / per))
    return int(min(wanted, cap))


def run_rounds(
    runs: Mapping[str, Callable[[], Any]],
    settings: RoundSettings,
    *,
    counts: Optional[Mapping[str, int]] = None,
    energy: Optional[Any] = None,
    clock: Callable[[], int] = time.perf_counter_ns,
    progress: Optional[Callable[..., None]] = None,
) -> dict[str, dict]:
    """Time every engine in ``runs`` (id -> zero-argument run) in interleaved rounds; returns id -> statistics.

    ``counts`` fixes the timed runs per round per engine (default: calibrated with ``iterations_for``), so every
    round of an engine has the same number of samples and the bootstrap weighs rounds equally. ``energy`` is a
    counter sensor (``snexport.device.energy``, ``kind == "counter"``) read around each timed block.
    ``progress(1)`` is called after each engine's block.
    """
    settings.check()
    ids = list(runs)
    if not ids:
        raise ProfileError("no engines to time")
    if counts is None:
        counts = {i: iterations_for(calibrate(runs[i], settings.warmup, clock), settings) for i in ids}
    rng = random.Random(settings.seed)
    samples: dict[str, list[list[float]]] = {i: [] for i in ids}
    orders = []
    energy_parts: dict[str, list] = {i: [] for i in ids}
    for _ in range(settings.rounds):
        order = ids[:]
        rng.shuffle(order)
        orders.append(order)
        for engine_id in order:
            run, n = runs[engine_id], counts[engine_id]
            for _ in range(settings.warmup):
                run()
            block = [0] * n
            meter = energy.measure() if energy is not None else None
            if meter is not None:
                meter.__enter__()
            for k in range(n):
                t0 = clock()
                run()
                block[k] = clock() - t0
            if meter is not None:
                meter.__exit__(None, None, None)
                energy_parts[engine_id].append((meter, n))
            samples[engine_id].append([t / 1e6 for t in block])
            if progress is not None:
                progress(1)
    out = {}
    for engine_id in ids:
        out[engine_id] = summarize_rounds(samples[engine_id], settings)
        out[engine_id]["round_positions"] = [order.index(engine_id) for order in orders]
        if energy is not None:
            out[engine_id]["energy"] = combine_energy(energy_parts[engine_id])
    return out


def summarize_rounds(rounds: Sequence[Sequence[float]], settings: RoundSettings) -> dict:
    """Pooled percentiles, mean/std/min/max, per-round medians and their spread, and the bootstrap p50 interval."""
    import statistics

    pooled = sorted(v for r in rounds for v in r)
    if not pooled:
        raise ProfileError("no samples to summarize")
    out: dict[str, Any] = {
        "mean_ms": statistics.fmean(pooled),
        "std_ms": statistics.stdev(pooled) if len(pooled) > 1 else 0.0,
        "min_ms": pooled[0],
    }
    for q in sorted(set(float(q) for q in settings.percentiles) | {50.0, 90.0, 99.0}):
        out[f"p{q:g}_ms"] = percentile(pooled, q)
    out["max_ms"] = pooled[-1]
    round_p50 = [percentile(sorted(r), 50.0) for r in rounds]
    lo, hi = bootstrap_median_ci(rounds, settings.ci_level, settings.bootstrap, settings.seed)
    out.update({
        "p50_ci_ms": [lo, hi],
        "ci_level": settings.ci_level,
        "round_p50_ms": round_p50,
        "round_p50_spread_ms": max(round_p50) - min(round_p50),
        "rounds": len(rounds),
        "iterations_per_round": len(rounds[0]),
        "iterations": len(pooled),
        "throughput_per_s": len(pooled) / (sum(pooled) / 1e3) if sum(pooled) > 0 else None,
    })
    return out


def bootstrap_median_ci(rounds: Sequence[Sequence[float]], level: float, resamples: int, seed: int) -> tuple:
    """Central ``level`` interval of the pooled median over resamples of whole rounds (with replacement)."""
    import numpy as np

    lengths = {len(r) for r in rounds}
    if len(lengths) != 1:
        raise ProfileError("every round of an engine must hold the same number of samples")
    data = np.asarray(rounds, dtype=np.float64)  # (rounds, n)
    r = len(data)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, r, size=(int(resamples), r))
    medians = np.median(data[picks].reshape(int(resamples), -1), axis=1)
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(medians, alpha)), float(np.quantile(medians, 1.0 - alpha))


def combine_energy(parts: Sequence[tuple]) -> dict:
    """Energy per inference over an engine's timed blocks (sum of joules / sum of runs), or None with the reason."""
    total_j, total_s, runs, sources, reasons = 0.0, 0.0, 0, set(), []
    for meter, n in parts:
        if meter.energy_j is None:
            reasons.append(meter.reason or "no reading")
            continue
        total_j += meter.energy_j
        total_s += meter.seconds
        runs += n
        sources.add(meter.source)
    if runs == 0:
        return {"energy_mj_per_inference": None, "mean_power_w": None,
                "reason": reasons[0] if reasons else "no energy reading"}
    return {"energy_mj_per_inference": total_j * 1e3 / runs, "mean_power_w": total_j / total_s if total_s else None,
            "source": ", ".join(sorted(sources)), "blocks": len(parts) - len(reasons), "runs": runs}
