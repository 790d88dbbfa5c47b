"""Smoke tests for benchmarks/: the scripts run end to end on the demo family and write well-formed results.

No assertion on speed (DESIGN.md, "Honest measurement"): only structure and sanity (positive, finite, ordered).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUNTIME_COMPARE = REPO / "benchmarks" / "runtime_compare.py"


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_evenly_spaced_keeps_anchors_and_spreads_stitches(demo_plan):
    rc = _load_script(RUNTIME_COMPARE)
    picked = rc.evenly_spaced(demo_plan.stitches, n=6)
    anchors = [s for s in demo_plan.stitches if s.is_anchor]
    others = [s for s in picked if not s.is_anchor]
    assert {s.id for s in anchors} <= {s.id for s in picked}
    assert len(others) == 6 and len({s.id for s in others}) == 6
    assert [s.gflops for s in picked] == sorted(s.gflops for s in picked)
    all_stitches = sorted(s.gflops for s in demo_plan.stitches if not s.is_anchor)
    assert min(s.gflops for s in others) == all_stitches[0]  # both ends of the range are targets
    assert max(s.gflops for s in others) == all_stitches[-1]
    assert rc.evenly_spaced(demo_plan.stitches, n=6) == picked  # deterministic


@pytest.mark.long
def test_runtime_compare_quick_demo(tmp_path):
    results = tmp_path / "results"
    # SNEXPORT_CACHE is inherited from conftest, so the trained demo anchors are reused across test runs.
    done = subprocess.run(
        [sys.executable, str(RUNTIME_COMPARE), "--family", "demo", "--quick", "--threads", "1",
         "--out", str(tmp_path / "builds"), "--results", str(results)],
        capture_output=True, text=True, timeout=900, env=dict(os.environ), cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "runtime_compare" in done.stdout  # the table title

    doc = json.loads((results / "runtime_compare-demo.json").read_text())
    assert doc["benchmark"] == "runtime_compare" and doc["family"] == "demo"
    s = doc["settings"]
    assert s["threads"] == 1 and s["quick"] is True
    for key in ("warmup", "iterations", "min_duration_s", "max_duration_s", "switch_repeats"):
        assert key in s
    assert doc["machine"]["cpu"]["logical_cores"] >= 1
    assert doc["versions"]["torch"] and doc["versions"]["onnxruntime"]

    # Trained demo anchors: accuracy is known, so the selection is the Pareto front; anchors are on it
    # (the smallest and the most accurate model are never dominated).
    assert doc["selection"]["rule"] == "pareto"
    rows = doc["rows"]
    assert [r["stitch_id"] for r in rows] == doc["selection"]["ids"] and len(rows) >= 2
    assert [r["gflops"] for r in rows] == sorted(r["gflops"] for r in rows)
    assert any(r["is_anchor"] for r in rows)
    for r in rows:
        assert (tmp_path / "builds" / "demo" / r["file"]).is_file() and r["file"].endswith(".onnx")
        for backend in ("onnxruntime", "eager"):
            lat = r[backend]["latency"]
            assert lat["iterations"] >= s["iterations"]
            assert 0 < lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["max_ms"]
        assert _positive(r["onnxruntime"]["load"]["cold_load_ms"])
        assert _positive(r["ort_over_eager_p50"])
        sw = r["onnxruntime"]["warm_switch"]
        assert sw["repeats"] == s["switch_repeats"] and _positive(sw["switch"]["p50_ms"])
        assert sw["from_stitch"] != r["stitch_id"]

    mem = doc["memory"]
    ort = mem["onnxruntime"]
    assert len(ort["engines"]) == len(rows)
    assert ort["rss_all_loaded_bytes"] >= ort["rss_baseline_bytes"] > 0
    assert ort["rss_all_loaded_delta_bytes"] == ort["rss_all_loaded_bytes"] - ort["rss_baseline_bytes"]
    assert mem["eager"]["rss_snnet_all_stitches_bytes"] > 0 and len(mem["eager"]["standalone"]) == len(rows)
