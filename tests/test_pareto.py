import itertools
import math
import random
import subprocess
import sys

import pytest

from snexport.device.pareto import dominates, pareto_front, select_candidates
from snexport.records import EvalResult

ACC_COST = {"top1": "max", "gflops": "min"}


def rec(sid, top1, gflops, params=1):
    return {"stitch_id": sid, "top1": top1, "gflops": gflops, "params": params}


def ids(records):
    return [r["stitch_id"] if isinstance(r, dict) else r.stitch_id for r in records]


# ----------------------------------------------------------------------------- hand-built fronts


def test_front_of_a_staircase_keeps_every_step_and_drops_dominated_points():
    records = [
        rec("a", 70.0, 1.0),
        rec("b", 75.0, 2.0),
        rec("c", 74.0, 3.0),  # worse and dearer than b
        rec("d", 80.0, 4.0),
        rec("e", 80.0, 5.0),  # as accurate as d but dearer
        rec("f", 60.0, 1.0),  # as cheap as a but less accurate
    ]
    assert ids(pareto_front(records, ACC_COST)) == ["a", "b", "d"]


def test_duplicates_do_not_dominate_each_other_and_both_stay():
    records = [rec("a", 80.0, 4.0), rec("b", 80.0, 4.0), rec("c", 79.0, 4.0)]
    assert ids(pareto_front(records, ACC_COST)) == ["a", "b"]


def test_direction_matters():
    records = [rec("cheap", 70.0, 1.0), rec("dear", 70.0, 9.0)]
    assert ids(pareto_front(records, {"top1": "max", "gflops": "min"})) == ["cheap"]
    assert ids(pareto_front(records, {"top1": "max", "gflops": "max"})) == ["dear"]


def test_single_objective_front_is_all_records_sharing_the_best_value():
    records = [rec("a", 1.0, 3.0), rec("b", 2.0, 3.0), rec("c", 3.0, 3.0)]
    assert ids(pareto_front(records, {"gflops": "min"})) == ["a", "b", "c"]
    assert ids(pareto_front(records, {"top1": "max"})) == ["c"]


def test_records_may_be_objects_and_key_may_be_custom():
    objs = [
        EvalResult("x", 70.0, 1.0, 10, 100, "d", "h"),
        EvalResult("y", 65.0, 2.0, 20, 100, "d", "h"),
        EvalResult("z", 80.0, 3.0, 30, 100, "d", "h"),
    ]
    assert ids(pareto_front(objs, ACC_COST)) == ["x", "z"]
    rows = [("x", 70.0, 1.0), ("y", 65.0, 2.0)]
    cols = {"top1": 1, "gflops": 2}
    front = pareto_front(rows, ACC_COST, key=lambda r, name: r[cols[name]])
    assert [r[0] for r in front] == ["x"]


def test_empty_input_and_bad_objectives():
    assert pareto_front([], ACC_COST) == []
    with pytest.raises(ValueError, match="at least one objective"):
        pareto_front([rec("a", 1, 1)], {})
    with pytest.raises(ValueError, match="'max' or 'min'"):
        pareto_front([rec("a", 1, 1)], {"top1": "maximize"})


# ----------------------------------------------------------------------------- unknown values


def test_unknown_value_is_skipped_when_comparing_a_pair():
    # a's accuracy is unknown: a vs b is decided on gflops alone, where b is cheaper.
    a, b = rec("a", None, 2.0), rec("b", 50.0, 1.0)
    assert dominates(b, a, ACC_COST)
    assert not dominates(a, b, ACC_COST)
    assert ids(pareto_front([a, b], ACC_COST)) == ["b"]


def test_nan_counts_as_unknown():
    a, b = rec("a", math.nan, 2.0), rec("b", 50.0, 2.0)
    # equal on the only comparable objective: neither dominates
    assert ids(pareto_front([a, b], ACC_COST)) == ["a", "b"]


def test_record_with_all_objectives_unknown_is_never_dominated_and_never_dominates():
    blank = rec("blank", None, None)
    others = [rec("a", 90.0, 1.0), rec("b", 10.0, 9.0)]
    assert ids(pareto_front([blank, *others], ACC_COST)) == ["blank", "a"]


# ----------------------------------------------------------------------------- brute force cross-check


def brute_force_front(points, directions):
    """Independent restatement of the definition over plain tuples (no unknowns)."""
    signs = [1 if d == "max" else -1 for d in directions]
    norm = [tuple(s * v for s, v in zip(signs, p)) for p in points]
    keep = []
    for i, p in enumerate(norm):
        dominated = any(
            all(qv >= pv for qv, pv in zip(q, p)) and any(qv > pv for qv, pv in zip(q, p))
            for j, q in enumerate(norm) if j != i
        )
        if not dominated:
            keep.append(i)
    return keep


@pytest.mark.parametrize("seed", range(25))
def test_matches_brute_force_on_random_points(seed):
    rnd = random.Random(seed)
    dims = rnd.randint(1, 4)
    n = rnd.randint(0, 40)
    directions = [rnd.choice(["max", "min"]) for _ in range(dims)]
    # small integer grid: many ties and exact duplicates, the cases a sloppy comparison gets wrong
    points = [tuple(rnd.randint(0, 5) for _ in range(dims)) for _ in range(n)]
    records = [{"i": i, **{f"m{d}": p[d] for d in range(dims)}} for i, p in enumerate(points)]
    objectives = {f"m{d}": directions[d] for d in range(dims)}

    front = pareto_front(records, objectives)
    assert [r["i"] for r in front] == brute_force_front(points, directions)
    # and the defining properties: nothing on the front is dominated; everything off it is dominated by the front
    for r in front:
        assert not any(dominates(o, r, objectives) for o in records)
    on = {r["i"] for r in front}
    for r in records:
        if r["i"] not in on:
            assert any(dominates(f, r, objectives) for f in front)


def test_front_is_invariant_to_input_order():
    rnd = random.Random(7)
    records = [rec(str(i), rnd.randint(0, 9), rnd.randint(0, 9)) for i in range(30)]
    expected = set(ids(pareto_front(records, ACC_COST)))
    for _ in range(5):
        rnd.shuffle(records)
        assert set(ids(pareto_front(records, ACC_COST))) == expected


# ----------------------------------------------------------------------------- select_candidates


def test_select_with_all_accuracies_known_is_the_front():
    records = [rec("a", 70.0, 1.0), rec("b", 65.0, 2.0), rec("c", 80.0, 3.0)]
    picked = select_candidates(records, by="gflops")
    assert ids([p["record"] for p in picked]) == ["a", "c"]
    assert all(p["accuracy_known"] for p in picked)


def test_select_with_no_accuracy_keeps_every_record_flagged():
    records = [rec("a", None, 1.0), rec("b", None, 2.0), rec("c", None, 2.0)]
    picked = select_candidates(records, by="gflops")
    assert ids([p["record"] for p in picked]) == ["a", "b", "c"]
    assert not any(p["accuracy_known"] for p in picked)
    assert "unknown" in picked[0]["reason"]


def test_select_with_some_accuracies_known_fronts_the_known_and_keeps_the_unknown():
    records = [rec("a", 70.0, 1.0), rec("u", None, 5.0), rec("b", 60.0, 2.0), rec("c", 75.0, 3.0)]
    picked = select_candidates(records, by="gflops")
    assert ids([p["record"] for p in picked]) == ["a", "u", "c"]
    assert [p["accuracy_known"] for p in picked] == [True, False, True]


def test_select_over_several_costs_and_other_accuracy_key():
    records = [
        {"stitch_id": "a", "acc": 70.0, "gflops": 1.0, "latency_ms": 9.0},
        {"stitch_id": "b", "acc": 70.0, "gflops": 2.0, "latency_ms": 1.0},
        {"stitch_id": "c", "acc": 60.0, "gflops": 2.0, "latency_ms": 9.0},
    ]
    picked = select_candidates(records, by=["gflops", "latency_ms"], accuracy_key="acc")
    assert ids([p["record"] for p in picked]) == ["a", "b"]


def test_select_refuses_records_without_the_cost():
    with pytest.raises(ValueError, match="latency_ms"):
        select_candidates([rec("a", 70.0, 1.0)], by="latency_ms")


def test_importing_pareto_does_not_import_torch():
    code = "import sys, snexport.device.pareto; sys.exit(1 if 'torch' in sys.modules or 'numpy' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_brute_force_helper_itself_on_a_known_case():
    # guards the cross-check against a broken oracle
    pts = list(itertools.product([0, 1], repeat=2))  # (0,0) (0,1) (1,0) (1,1)
    assert brute_force_front(pts, ["max", "max"]) == [3]
    assert brute_force_front(pts, ["min", "max"]) == [1]
