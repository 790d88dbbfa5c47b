"""Which stitches to deploy: the Pareto set by FLOPs (anywhere) or by measured latency/memory (after bench).

Writes ``candidates.json`` in the build directory. With unknown accuracy (random-init anchors) every configuration
is a candidate unless the user names them, and the output says accuracy is unknown.
"""

from __future__ import annotations

from typing import Optional

from snexport.buildfiles import read_json, read_jsonl
from snexport.errors import BuildDirError, SnexportError
from snexport.hashing import atomic_write_json


def parse_stitch_choice(choice: str | None) -> tuple[str, list[str]]:
    """'pareto' | 'all' | 'ID,ID' -> (mode, ids)."""
    choice = (choice or "pareto").strip()
    if choice in ("pareto", "all"):
        return choice, []
    return "ids", [c.strip() for c in choice.split(",") if c.strip()]


def latest_profile(build, device_key: Optional[str] = None) -> dict[str, dict]:
    """stitch id -> newest profile.jsonl record on one device (default: the newest device measured)."""
    rows = [r for r in read_jsonl(build.profile_path) if "stitch_id" in r and isinstance(r.get("stats"), dict)]
    if not rows:
        return {}
    key = device_key or rows[-1].get("device_key")
    return {r["stitch_id"]: r for r in rows if r.get("device_key") == key}


def select_stage(build, by: str = "gflops", stitches: str | None = "pareto", device_key: Optional[str] = None) -> dict:
    from snexport.device.bench import measurement_for_manifest
    from snexport.device.manifest import engine_memory_mb
    from snexport.device.pareto import memory_for_pareto, select_candidates

    plan = build.load_plan()
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
            measured = measurement_for_manifest(profile[s.id]["stats"], None)
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


def read_candidates(build) -> dict:
    if not build.candidates_path.is_file():
        raise BuildDirError(f"{build.root} has no candidates.json; run `snexport select {build.root}` first")
    fix = f"re-run `snexport select {build.root}`"
    doc = read_json(build.candidates_path, "the candidates", fix)
    if not isinstance(doc, dict) or not isinstance(doc.get("candidates"), list):
        raise BuildDirError(f"{build.candidates_path} is corrupt; {fix}")
    return doc
