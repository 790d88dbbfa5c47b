"""Which stitches to deploy: the Pareto set by FLOPs (anywhere) or by measured latency/memory (after bench).

Writes ``candidates.json`` in the build directory. With unknown accuracy (random-init anchors) every configuration
is a candidate unless the user names them, and the output says accuracy is unknown.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from snexport.buildfiles import read_json, read_jsonl, require_writable
from snexport.errors import BuildDirError, SnexportError
from snexport.hashing import atomic_write_json


def parse_stitch_choice(choice: str | None) -> tuple[str, list[str]]:
    """'pareto' | 'all' | 'ID,ID' -> (mode, ids)."""
    choice = (choice or "pareto").strip()
    if choice in ("pareto", "all"):
        return choice, []
    return "ids", [c.strip() for c in choice.split(",") if c.strip()]


def latest_profile(build, device_key: Optional[str] = None) -> dict[str, dict]:
    """stitch id -> newest profile.jsonl record on one device (default: the newest device measured).

    Of an engine measured on several runtimes, the record of the one it runs on (``chosen``; bench marks it)."""
    rows = [r for r in read_jsonl(build.profile_path)
            if isinstance(r.get("stitch_id"), str) and isinstance(r.get("stats"), dict) and r.get("chosen", True)]
    if not rows:
        return {}
    key = device_key or rows[-1].get("device_key")
    return {r["stitch_id"]: r for r in rows if r.get("device_key") == key}


def select_stage(build, by: str = "gflops", stitches: str | None = "pareto", device_key: Optional[str] = None) -> dict:
    from snexport.device.bench import measurement_for_manifest
    from snexport.device.manifest import engine_memory_mb
    from snexport.device.pareto import memory_for_pareto, select_candidates

    plan = build.load_plan()
    require_writable(build.root, "snexport select")  # it ends by writing candidates.json
    evals = build.read_eval()
    mode, ids = parse_stitch_choice(stitches)
    for i in ids:
        plan.get(i)  # unknown ids: a clear error listing the valid ones
    records = []
    profile = latest_profile(build, device_key) if by == "latency" else {}
    if by == "latency" and not profile:
        raise BuildDirError(f"{build.root} has no measurements yet; run `snexport bench {build.root}` first, "
                            "or select with --by gflops")
    if by not in ("gflops", "latency"):
        raise SnexportError(f"--by must be 'gflops' or 'latency', not {by!r}")
    for s in plan.stitches:
        if by == "latency" and s.id not in profile:
            continue  # only measured engines can be compared on latency
        top1 = evals[s.id].top1 if s.id in evals else None
        rec = {"id": s.id, "top1": top1, "gflops": s.gflops, "params": s.params, "is_anchor": s.is_anchor}
        if by == "latency":
            measured = _measurement(build, s.id, profile[s.id]["stats"], measurement_for_manifest)
            rec["latency_p50_ms"] = measured["latency_ms"]["p50"]
            rec["memory_mb"] = memory_for_pareto(engine_memory_mb(measured))
        records.append(rec)
    if not records:
        raise BuildDirError(f"{build.root} has no evaluated configurations; run `snexport evaluate {build.root}`")
    missing_eval = [r["id"] for r in records if r["id"] not in evals]
    if mode == "pareto" and missing_eval and build.accuracy_known:
        raise BuildDirError(f"{len(missing_eval)} configurations are not evaluated yet (e.g. {missing_eval[0]}); run "
                            f"`snexport evaluate {build.root}` first, or pass --stitches all|ID,ID")
    cost = ["gflops"] if by == "gflops" else ["latency_p50_ms", "memory_mb"]
    if mode == "pareto":
        chosen = select_candidates(records, by=cost, accuracy_key="top1")
        picked = [c["record"] for c in chosen]
    elif mode == "all":
        picked = records
    else:
        picked = [r for r in records if r["id"] in ids]
    accuracy_known = all(r["top1"] is not None for r in picked)
    doc = {"by": by, "mode": mode, "accuracy_known": accuracy_known, "weights_hash": build.weights_hash(),
           "candidates": sorted(picked, key=lambda r: (r.get("latency_p50_ms", r["gflops"]), r["id"])),
           "considered": len(records)}
    atomic_write_json(build.candidates_path, doc)
    return doc


def _measurement(build, stitch_id: str, stats: dict, to_manifest) -> dict:
    """One profile.jsonl record as the manifest's measurement; BuildDirError when it is malformed or its numbers
    are not finite, non-negative durations (a NaN latency would sort anywhere on the Pareto front)."""
    fix = f"re-run `snexport bench {build.root}` on the device to measure it again"
    try:
        measured = to_manifest(stats, None)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise BuildDirError(f"{build.profile_path}: the record of {stitch_id} is malformed ({type(exc).__name__}: "
                            f"{exc}); {fix}") from None
    timings = [measured["latency_ms"], measured["load_ms"]]
    bad = [v for t in timings for v in t.values() if v is not None and not (_finite(v) and v >= 0)]
    if bad or not _finite_tree(measured):
        raise BuildDirError(f"{build.profile_path}: the record of {stitch_id} holds "
                            f"{'a negative' if bad and _finite(bad[0]) else 'a non-finite'} number; {fix}")
    return measured


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _finite_tree(value: Any) -> bool:
    if isinstance(value, dict):
        return all(_finite_tree(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite_tree(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def read_candidates(build) -> dict:
    if not build.candidates_path.is_file():
        raise BuildDirError(f"{build.root} has no candidates.json; run `snexport select {build.root}` first")
    fix = f"re-run `snexport select {build.root}`"
    doc = read_json(build.candidates_path, "the candidates", fix)
    if not isinstance(doc, dict) or not isinstance(doc.get("candidates"), list) or not all(
            isinstance(c, dict) and isinstance(c.get("id"), str) for c in doc["candidates"]):
        raise BuildDirError(f"{build.candidates_path} is corrupt; {fix}")
    return doc
