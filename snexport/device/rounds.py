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
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from snexport.errors import ProfileError

DEFAULT_BOOTSTRAP = 2000
# Seconds of warm-up, and of timed runs, after which calibration stops adding runs (``calibrate``).
CALIBRATION_BUDGET_S = 0.5


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
    budget_s: float = 0.0  # > 0: fewer rounds when `rounds` of every engine would take longer (plan_rounds)
    min_rounds: int = 2  # ... but never fewer than this

    def check(self) -> "RoundSettings":
        if self.rounds < 2:
            raise ProfileError(f"measurement.rounds must be >= 2 to see drift between rounds, got {self.rounds}")
        if self.warmup < 0 or self.iterations < 1:
            raise ProfileError("measurement needs warmup >= 0 and iterations >= 1; fix the settings")
        if not 0 <= self.min_duration_s <= self.max_duration_s:
            raise ProfileError("measurement needs 0 <= min_duration_s <= max_duration_s; fix the settings")
        if not 2 <= self.min_rounds <= self.rounds or self.budget_s < 0:
            raise ProfileError("measurement needs 2 <= min_rounds <= rounds and budget_s >= 0; fix the settings")
        if not 0.5 <= self.ci_level < 1:
            raise ProfileError(f"measurement.ci_level must lie in [0.5, 1), got {self.ci_level}")
        return self

    def method(self) -> dict:
        """How the numbers were taken, stored next to them (profile.jsonl, manifest)."""
        return {
            "timing": "interleaved rounds",
            "rounds": self.rounds if not self.budget_s else
            f"up to {self.rounds}, fewer (at least {self.min_rounds}) where they would take over {self.budget_s:g} s",
            "order": f"fresh random permutation of the engines each round (seed {self.seed})",
            "warmup_per_round": f"{self.warmup} untimed runs, at most a third of the block's timed runs (>= 1)",
            "iterations_per_round": f"max({self.iterations}, runs filling {self.min_duration_s:g} s), "
                                    f"at most {self.max_duration_s:g} s",
            "statistics": "percentiles (linear interpolation) over the samples of all rounds",
            "p50_ci": {"level": self.ci_level, "method": f"bootstrap over rounds ({self.bootstrap} resamples)"},
            "beside_the_clock": "nothing: memory is measured as each engine loads, before any timing (the sampler "
                                "thread stops before a clock runs); energy counters are read "
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


def calibrate(run: Callable[[], Any], warmup: int, clock: Callable[[], int] = time.perf_counter_ns,
              budget_s: float = CALIBRATION_BUDGET_S) -> float:
    """Seconds per run of a warm engine: the median of 5 timed runs (3 once they pass ``budget_s``) after ``warmup``
    untimed ones (fewer once they pass ``budget_s``, at least 2: the first run after a load pays one-time setup).

    Only the block sizes and the number of rounds depend on it, so a slow engine need not run 15 times for it: 10
    warm-ups and 5 timed runs of each of a 36-engine DeiT-S/B build took 108 s of a 15-minute build here."""
    spent, done = 0, 0
    while done < max(warmup, 1) and not (done >= 2 and spent / 1e9 > budget_s):
        t0 = clock()
        run()
        spent += clock() - t0
        done += 1
    times: list[float] = []
    while len(times) < 5 and not (len(times) >= 3 and sum(times) > budget_s):
        t0 = clock()
        run()
        times.append((clock() - t0) / 1e9)
    return statistics.median(times)


def iterations_for(seconds_per_run: float, settings: RoundSettings) -> int:
    """Timed runs per round for an engine: enough to fill min_duration_s, at least ``iterations``, capped."""
    per = max(seconds_per_run, 1e-7)
    wanted = max(settings.iterations, math.ceil(settings.min_duration_s / per))
    cap = max(settings.iterations, math.floor(settings.max_duration_s / per))
    return int(min(wanted, cap))


# Choosing how to run an engine (runtime, thread count): a variant within this fraction of the fastest one's
# median counts as just as fast, and the earliest of those in the caller's preference wins (fewer threads: no pool
# to wake, the steadiest figures, cores left to the app; the profile's own runtime: the shared-weight pack).
SCREEN_TOLERANCE = 0.05
# Another runtime than the profile's own must be faster by more than this: runtimes differ in memory (OpenVINO keeps
# a private copy of about each engine's weights; ONNX Runtime engines share the pack), and DeiT-S/B engines sit
# 5-15 % apart on ONNX Runtime and OpenVINO here, where a 5 % rule flipped half of them between two runs.
RUNTIME_TOLERANCE = 0.10
# A re-bench keeps the previous choice unless another variant beats it by this much more than the tolerance: an
# engine whose runtimes sat 10 +- 3 % apart ran on ONNX Runtime in one run and OpenVINO in the next (its p50 moved
# 19 %), which reorders the engines for nothing.
STICKY_MARGIN = 0.05
# A variant this many times slower than the fastest in the first screening pass is timed no further: the widest
# margin a choice allows is RUNTIME_TOLERANCE + STICKY_MARGIN (15 %), and a 1.5x gap is far outside this VM's
# +-15 % swings.
SCREEN_DROP_ABOVE = 1.5
# A screening block of fewer timed runs than this (runs of block_s / 3 or more) is a slow variant's: after its
# first block it gets no warm-up (screen_variants).
SLOW_BLOCK_RUNS = 3


def screen_variants(
    variants: Mapping[Any, Callable[[], Any]],
    *,
    passes: int = 10,
    warmup: int = 2,
    block_s: float = 0.015,
    min_runs: int = 1,
    budget_s: float = 1.5,
    min_passes: int = 3,
    drop_above: float = SCREEN_DROP_ABOVE,
    warm: Sequence[Any] = (),
    seed: int = 0,
    clock: Callable[[], int] = time.perf_counter_ns,
) -> dict[Any, dict]:
    """Time the ways of running one engine (``variants``: label -> run, e.g. (runtime, threads)) against each other;
    returns label -> ``summarize_rounds`` statistics (passes as rounds) plus ``paired_ms``, the figure to compare
    variants by: per pass, the variant's block median over the pass's geometric mean, median over passes, scaled.

    Paired by design: the variants are timed in alternation, ``passes`` times in a fresh random order, so drift of
    the machine hits them alike and their ratio is sharper than a comparison across separate rounds. Each block is
    ``warmup`` untimed runs (later blocks: at most a third of the block, at least one), then a fixed number of timed
    runs per variant (at least ``min_runs``, filling about ``block_s`` at the speed its first block's last warm-up
    run showed), so passes weigh alike in the bootstrap interval. After the first pass, the number of passes shrinks
    (not below ``min_passes``) so that they take about ``budget_s`` (a DeiT-B variant's block is a 0.2 s run), and a
    variant slower than ``drop_above`` times the fastest in that pass is timed no more: it cannot come within any
    tolerance a choice uses, and on 2 cores a DeiT-S/B engine on one thread is ~1.8x slower, 40 % of the screening
    time of a 36-engine build. Such a variant's figures are its first pass's (``rounds`` 1, ``dropped`` True).
    ``warm``: variants that already ran since their load (a reference check): one warm-up run in their first block.
    Later blocks of a slow variant (fewer than ``SLOW_BLOCK_RUNS`` timed runs) have no warm-up.

    Why it matters on small CPUs: a 0.5 ms demo stitch on 2 cores runs ~40 % faster on one thread than on two
    (waking the second thread costs more than it saves) and its median moves by up to 2x between processes with
    two, while bigger networks gain from every core; OpenVINO runs the demo's engines ~25 % faster than ONNX Runtime.
    """
    if not variants:
        raise ProfileError("no variants to screen")
    labels = list(variants)
    counts: dict[Any, int] = {}
    rng = random.Random(seed)
    samples: dict[Any, list[list[float]]] = {v: [] for v in labels}
    done = 0
    timed = labels[:]  # the variants still timed
    last = None
    while done < passes:
        started = clock()
        order = timed[:]
        rng.shuffle(order)
        if len(order) > 1 and order[0] == last:  # every block follows another variant's block
            order.append(order.pop(0))
        last = order[-1]
        for v in order:
            run = variants[v]
            if v not in counts:  # first block: warm up, then size the block from the last warm-up run
                for _ in range(1 if v in warm else max(warmup, 1)):
                    t0 = clock()
                    run()
                counts[v] = max(min_runs, math.ceil(block_s / max((clock() - t0) / 1e9, 1e-7)))
            elif counts[v] >= SLOW_BLOCK_RUNS:  # later blocks: at most a third of the block as warm-up (>= 1 run)
                for _ in range(warmup_runs(counts[v], RoundSettings(warmup=warmup))):
                    run()
            # A slow variant's later blocks (a run of 5 ms or more) get no warm-up: it would cost as much as the
            # block, and in alternation every block follows another variant's, so whatever a warm-up would hide
            # hits every variant alike. For DeiT-S/B engines it is nothing: a run right after another engine's took
            # the steady run's time (median -0.4 % over 36 engines), and skipping it saved 22 s of a 36-engine bench.
            samples[v].append(time_runs(run, counts[v], clock))
        done += 1
        if done == 1:
            first = {v: percentile(sorted(samples[v][0]), 50.0) for v in labels}
            timed = [v for v in labels if first[v] <= drop_above * min(first.values())]
            if budget_s > 0:  # slow engines: fewer passes (not below min_passes) to stay near the budget
                fitting = math.floor(budget_s / max((clock() - started) / 1e9, 1e-9))
                passes = max(min(passes, min_passes), min(passes, fitting))
    settings = RoundSettings(rounds=max(2, passes), warmup=warmup, seed=seed)
    out = {v: dict(summarize_rounds(samples[v], settings), dropped=v not in timed) for v in labels}
    # Paired figure: each pass's block medians relative to that pass's geometric mean over the variants timed in
    # every pass (the machine's speed in that pass cancels), the median over passes, scaled back to milliseconds;
    # a dropped variant's relative to the first pass's mean of those.
    block = {v: [percentile(sorted(b), 50.0) for b in samples[v]] for v in labels}
    pass_means = [math.exp(statistics.fmean(math.log(max(block[v][p], 1e-9)) for v in timed)) for p in range(passes)]
    scale = math.exp(statistics.fmean(math.log(max(out[v]["p50_ms"], 1e-9)) for v in timed))
    for v in labels:
        out[v]["paired_ms"] = scale * statistics.median(block[v][p] / pass_means[p] for p in range(len(block[v])))
    return out


def pick_within(medians: Mapping[Any, float], preference: Sequence[Any], tolerance: float = SCREEN_TOLERANCE) -> Any:
    """The first label of ``preference`` whose median lies within ``tolerance`` of the fastest one's."""
    if not medians:
        raise ProfileError("nothing to pick from")
    best = min(medians.values())
    ordered = [v for v in preference if v in medians] + [v for v in medians if v not in preference]
    return next(v for v in ordered if medians[v] <= best * (1.0 + tolerance))


def time_runs(run: Callable[[], Any], n: int, clock: Callable[[], int] = time.perf_counter_ns) -> list[float]:
    """``n`` timed runs, in ms; only ``run`` sits between the two clock reads (durations are converted after)."""
    block = [0] * n
    for k in range(n):
        t0 = clock()
        run()
        block[k] = clock() - t0
    return [t / 1e6 for t in block]


def warmup_runs(timed_runs: int, settings: RoundSettings) -> int:
    """Untimed runs before an engine's timed block in a round: ``settings.warmup``, but at most a third of the
    block's timed runs (at least one), so short blocks of a slow engine are not mostly warm-up."""
    return min(settings.warmup, max(1, math.ceil(timed_runs / 3)))


def plan_rounds(runs: Mapping[str, Callable[[], Any]], settings: RoundSettings,
                clock: Callable[[], int] = time.perf_counter_ns,
                estimates: Optional[Mapping[str, float]] = None) -> tuple[dict[str, int], int]:
    """Timed runs per round for each engine (calibrated) and the number of rounds: ``settings.rounds``, or fewer
    (not below ``min_rounds``) where their estimated time would exceed ``budget_s`` (a DeiT-B run takes 0.2 s
    here, a demo engine's 0.3 ms: one setting cannot suit both without a budget).

    ``estimates``: seconds per run already measured (bench's screening) for engines that need no calibration;
    each of those runs once here, since a runner's first run after its load pays one-time setup."""
    estimates = estimates or {}
    per = {}
    for i in runs:
        if i in estimates:
            runs[i]()
            per[i] = float(estimates[i])
        else:
            per[i] = calibrate(runs[i], settings.warmup, clock)
    counts = {i: iterations_for(per[i], settings) for i in runs}
    rounds = settings.rounds
    if settings.budget_s > 0:
        round_s = sum((counts[i] + warmup_runs(counts[i], settings)) * per[i] for i in runs)
        rounds = max(settings.min_rounds, min(rounds, math.floor(settings.budget_s / max(round_s, 1e-9))))
    return counts, rounds


def run_rounds(
    runs: Mapping[str, Callable[[], Any]],
    settings: RoundSettings,
    *,
    counts: Optional[Mapping[str, int]] = None,
    rounds: Optional[int] = None,
    energy: Optional[Any] = None,
    clock: Callable[[], int] = time.perf_counter_ns,
    progress: Optional[Callable[..., None]] = None,
) -> dict[str, dict]:
    """Time every engine in ``runs`` (id -> zero-argument run) in interleaved rounds; returns id -> statistics.

    ``counts`` fixes the timed runs per round per engine and ``rounds`` the number of rounds (default: both from
    ``plan_rounds``), so every round of an engine has the same number of samples and the bootstrap weighs rounds
    equally. ``energy`` is a
    counter sensor (``snexport.device.energy``, ``kind == "counter"``) read around each timed block.
    ``progress(1)`` is called after each engine's block.
    """
    settings.check()
    ids = list(runs)
    if not ids:
        raise ProfileError("no engines to time")
    n_rounds = settings.rounds
    if counts is None:
        counts, n_rounds = plan_rounds(runs, settings, clock)
    if rounds is not None:
        n_rounds = rounds
    rng = random.Random(settings.seed)
    samples: dict[str, list[list[float]]] = {i: [] for i in ids}
    orders = []
    energy_parts: dict[str, list] = {i: [] for i in ids}
    for _ in range(n_rounds):
        order = ids[:]
        rng.shuffle(order)
        orders.append(order)
        for engine_id in order:
            run, n = runs[engine_id], counts[engine_id]
            for _ in range(warmup_runs(n, settings)):
                run()
            meter = energy.measure() if energy is not None else None
            if meter is not None:
                meter.__enter__()
            block = time_runs(run, n, clock)
            if meter is not None:
                meter.__exit__(None, None, None)
                energy_parts[engine_id].append((meter, n))
            samples[engine_id].append(block)
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
