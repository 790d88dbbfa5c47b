"""Pareto fronts over evaluated stitches: which stitches are worth exporting at all.

Pure functions over records (dicts or objects such as ``EvalResult``); standard library only.

Dominance: ``a`` dominates ``b`` iff ``a`` is at least as good as ``b`` in every objective and strictly better in at
least one. Equal points therefore never dominate each other, so duplicates all stay on the front (two stitches with
identical figures are both legitimate choices; the caller breaks ties).

Unknown values (``None``, or NaN): an objective whose value is unknown on either of two records cannot be used to
compare them, so dominance between that pair is decided on the objectives both records know. A record whose
objectives are *all* unknown is never dominated and never dominates. So a record with an unknown accuracy can
still be dominated on cost alone; when that is not what you want (it is not, for stitches of random-init anchors),
use ``select_candidates``, which keeps records of unknown accuracy out of the front and flags them instead.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

DIRECTIONS = ("max", "min")


def get_value(record: Any, name: str) -> Any:
    """Read field ``name`` from a mapping (``record[name]``) or an object (``record.name``); missing → None."""
    if isinstance(record, Mapping):
        return record.get(name)
    return getattr(record, name, None)


def _known(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _check_objectives(objectives: Mapping[str, str]) -> None:
    if not objectives:
        raise ValueError("pareto_front needs at least one objective, e.g. {'top1': 'max', 'gflops': 'min'}")
    bad = {k: v for k, v in objectives.items() if v not in DIRECTIONS}
    if bad:
        raise ValueError(f"objective directions must be 'max' or 'min'; got {bad}")


def dominates(a: Any, b: Any, objectives: Mapping[str, str], key: Callable[[Any, str], Any] = get_value) -> bool:
    """True iff ``a`` is no worse than ``b`` on every objective both know, and strictly better on one of them."""
    strictly_better = False
    for name, direction in objectives.items():
        va, vb = key(a, name), key(b, name)
        if not (_known(va) and _known(vb)):
            continue  # not comparable on this objective: it neither helps nor hurts either record
        if direction == "min":
            va, vb = -va, -vb
        if va < vb:
            return False
        if va > vb:
            strictly_better = True
    return strictly_better


def pareto_front(
    records: Iterable[Any],
    objectives: Mapping[str, str],
    key: Callable[[Any, str], Any] = get_value,
) -> list:
    """The non-dominated records, in their input order.

    ``objectives`` maps a field name to ``"max"`` or ``"min"``, e.g. ``{"top1": "max", "gflops": "min"}``;
    ``key(record, name)`` reads a value (default: mapping lookup or attribute). O(n²) comparisons, which is nothing
    for the few hundred stitches an SN-Net has.
    """
    _check_objectives(objectives)
    items = list(records)
    return [
        r for i, r in enumerate(items)
        if not any(dominates(o, r, objectives, key) for j, o in enumerate(items) if j != i)
    ]


def select_candidates(
    records: Sequence[Any],
    by: str | Sequence[str] = "gflops",
    accuracy_key: str = "top1",
    key: Callable[[Any, str], Any] = get_value,
) -> list[dict]:
    """Stitches worth exporting: the accuracy-vs-cost Pareto front, or every stitch when accuracy is unknown.

    ``by`` names the cost objective(s) to minimise ("gflops", "params", "latency_ms", ...). Returns one dict per
    selected record, in input order: ``{"record": r, "accuracy_known": bool, "reason": str}``.

    - accuracy known for every record → front over (accuracy max, costs min);
    - accuracy known for none (random-init anchors, no dataset) → every record is a candidate, flagged
      ``accuracy_known=False``: cost alone cannot say which stitch is better, and dropping all but the cheapest would
      leave the device selector nothing to choose from;
    - accuracy known for some → the known ones go through the front; the unknown ones are all kept and flagged,
      for the same reason (we do not guess an accuracy).
    """
    costs = [by] if isinstance(by, str) else list(by)
    if not costs:
        raise ValueError("select_candidates needs at least one cost objective in `by`")
    missing_cost = [get_id(r) for r in records if not all(_known(key(r, c)) for c in costs)]
    if missing_cost:
        raise ValueError(f"records without a value for {costs}: {missing_cost[:5]}; measure them or choose another `by`")

    known = [r for r in records if _known(key(r, accuracy_key))]
    objectives = {accuracy_key: "max", **{c: "min" for c in costs}}
    on_front = {id(r) for r in pareto_front(known, objectives, key)}
    picked = []
    for r in records:
        if not _known(key(r, accuracy_key)):
            picked.append({"record": r, "accuracy_known": False, "reason": f"{accuracy_key} unknown; kept by cost only"})
        elif id(r) in on_front:
            picked.append({"record": r, "accuracy_known": True, "reason": f"on the {accuracy_key}/{'+'.join(costs)} front"})
    return picked


def get_id(record: Any) -> Optional[str]:
    """Best-effort identifier for error messages (``stitch_id`` or ``id``)."""
    return get_value(record, "stitch_id") or get_value(record, "id")


# ---------------------------------------------------------------------------------------------------------------
# The measured front (bench and `select --by latency` share it)

# Memory enters Pareto tests at 5 MB resolution: RSS deltas carry a few MB of allocator noise, which would
# otherwise keep slower, less accurate engines on the front (tiny engines all round to 0).
MEMORY_RESOLUTION_MB = 5.0


def memory_for_pareto(memory_mb) -> float:
    """An engine's memory cost (MB, see ``manifest.engine_memory_mb``) rounded to the Pareto resolution."""
    mb = max(float(memory_mb or 0.0), 0.0)
    return MEMORY_RESOLUTION_MB * round(mb / MEMORY_RESOLUTION_MB)


# Latency enters the measured front at 5 % resolution on top of the p50 intervals: an interval comes from one run,
# in which each engine is loaded once, but where an engine lands in memory moves its speed by a few % from one load
# to the next (bench_stability, 2-core EPYC: the ratio of two engines' p50s moved by up to 4.4 % between two
# benches whose intervals were each a fraction of that), which no interval from one run can see.
LATENCY_RESOLUTION = 0.05


# A re-bench moves an engine across the front only on clear evidence (hysteresis): one that was on this device's
# front leaves it only to an engine faster by LATENCY_RESOLUTION + FRONT_STICKY_MARGIN; one that was dominated
# comes back only when nothing is faster than it beyond its interval and by more than LATENCY_RESOLUTION -
# FRONT_STICKY_MARGIN. bench_stability saw a pair of demo engines 8.0 % apart in one bench and 4.4 % in the next
# (the slower one reloaded 4.7 % faster): at a single 5 % line the front changed between two runs of one build.
FRONT_STICKY_MARGIN = 0.05


def clearly_faster(a: Mapping[str, Any], b: Mapping[str, Any], resolution: float = LATENCY_RESOLUTION) -> bool:
    """Whether ``a`` is faster than ``b`` beyond the noise: its whole p50 interval lies below ``b``'s and its p50
    is lower by more than ``resolution`` (relative)."""
    return (a["latency_ci_ms"][1] < b["latency_ci_ms"][0]
            and a["latency_p50_ms"] < (1.0 - resolution) * b["latency_p50_ms"])


def _mb(row: Mapping[str, Any]) -> float:
    return max(float(row.get("memory_mb") or 0.0), 0.0)


def noise_aware_front(rows: Sequence[Mapping[str, Any]], accuracy_key: str = "top1",
                      previous: Optional[Mapping[str, bool]] = None) -> dict:
    """The measured front, where a difference counts only beyond the measurement's noise (issue 10).

    Each row: ``id``, ``top1`` (or None), ``latency_p50_ms``, ``latency_ci_ms`` = (low, high) of the p50's
    confidence interval, ``memory_mb``. An engine is dropped only when another engine is at least as accurate,
    ``clearly_faster`` and no bigger in memory beyond ``MEMORY_RESOLUTION_MB`` (a tolerance, not a rounding: two
    engines 0.2 MB apart never land on two sides of a rounding boundary). With any accuracy unknown, accuracy is
    left out of the test (random-init builds: a latency/memory front). Engines on the front of which neither is
    clearly faster than the other are *tied*: the measurement cannot order them.

    ``previous`` (id -> was on the front, from this device's last bench): the hysteresis of
    ``FRONT_STICKY_MARGIN``, so a re-bench changes the front only where the engines moved clearly.

    Returns {"front": [ids in input order], "tied": {id: [ids it is tied with]}, "dominated_by": {id: id}}.
    """
    rows = list(rows)
    use_accuracy = bool(rows) and all(_known(r.get(accuracy_key)) for r in rows)

    previous = previous or {}

    def resolution(b) -> float:
        was = previous.get(b["id"])
        if was is None:  # not measured before: no history to keep
            return LATENCY_RESOLUTION
        return LATENCY_RESOLUTION + FRONT_STICKY_MARGIN if was else LATENCY_RESOLUTION - FRONT_STICKY_MARGIN

    def beats(a, b) -> bool:
        if a is b:
            return False
        if use_accuracy and a[accuracy_key] < b[accuracy_key]:
            return False
        return clearly_faster(a, b, resolution(b)) and _mb(a) <= _mb(b) + MEMORY_RESOLUTION_MB

    dominated_by = {}
    for b in rows:
        winner = next((a for a in rows if beats(a, b)), None)
        if winner is not None:
            dominated_by[b["id"]] = winner["id"]
    front = [r for r in rows if r["id"] not in dominated_by]
    tied = {}
    for a in front:
        others = [b["id"] for b in front if b is not a and not clearly_faster(a, b) and not clearly_faster(b, a)]
        if others:
            tied[a["id"]] = others
    return {"front": [r["id"] for r in front], "tied": tied, "dominated_by": dominated_by}


def best_backend(measured: Mapping[str, Mapping[str, Any]], preference: Sequence[str] = ()) -> str:
    """Of the runtimes measured for an engine, the one to fall back on: the fastest beyond the noise.

    The selector uses it on a device where the runtime bench chose is not installed, to pick among the others
    measured for that engine (``by_backend``). bench itself chooses from a paired comparison
    (``bench.screen_engines``), which is sharper than comparing intervals from separate measurements.

    ``measured``: backend -> {``latency_p50_ms``, ``latency_ci_ms`` = (low, high) of the p50's interval,
    ``memory_mb`` (at ``MEMORY_RESOLUTION_MB``)}. Every backend whose interval overlaps the fastest one's is as
    fast as the measurement can tell; of those the one that costs less memory wins (an engine pack shared by ONNX
    Runtime sessions is cheaper than OpenVINO's per-model copy), then the earlier in ``preference`` (the profile's
    own backend first), then the lower p50. So a backend is picked for speed only when it is faster beyond the
    noise, and its own memory is what the engine is then costed with.
    """
    if not measured:
        raise ValueError("best_backend needs at least one measured backend")
    fastest = min(measured, key=lambda b: measured[b]["latency_p50_ms"])
    ceiling = measured[fastest]["latency_ci_ms"][1]
    tied = [b for b in measured if measured[b]["latency_ci_ms"][0] <= ceiling]
    rank = {b: i for i, b in enumerate(preference)}
    return min(tied, key=lambda b: (measured[b]["memory_mb"], rank.get(b, len(rank)), measured[b]["latency_p50_ms"]))
