"""Do two `snexport bench` runs on one build rank the engines the same way? (issue 10)

For each build, runs the measurement twice, each time in a fresh process, and prints:
- Spearman's rho of the engines' p50 latencies between the two runs,
- the Jaccard index of the two measured fronts (and whether the smallest anchor is on both); the second bench, like
  any re-bench, moves an engine across the front only on clear evidence (``pareto.FRONT_STICKY_MARGIN``), so the
  Jaccard index of each run's front on its own numbers, without that hysteresis, is printed too,
- each engine's p50 in both runs and their relative spread.
Side by side with the baseline, in the same run: the method bench used before issue 10 (engines measured one after
another, once each, with the peak-RSS sampler thread running beside the timed loop, front by p50 alone).

Builds: `demo` (the fresh-clone demo family, `snexport build`) and `deit` (DeiT-S/B, random init: the two anchors +
6 stitches spread over the FLOPs range, exported for x86-cpu). Both are made under benchmarks/.builds/stability/ on
first use and reused afterwards.

    uv run python benchmarks/bench_stability.py                 # both builds
    uv run python benchmarks/bench_stability.py --builds demo   # the demo alone (~3 min on 2 cores)

Run it on an otherwise idle machine: the point is the measurement's own noise. The load average before each run is
printed next to the figures, with the machine and the settings, and everything is written to
benchmarks/results/bench_stability.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILDS = REPO / "benchmarks" / ".builds" / "stability"
RESULTS = REPO / "benchmarks" / "results" / "bench_stability.json"  # --backends X: bench_stability-X.json
SNEXPORT = [sys.executable, "-m", "snexport.cli.app"]
# The measurement settings bench used before issue 10 (profiles/x86-cpu.toml then): one pass per engine.
BASELINE_SETTINGS = {"warmup": 10, "iterations": 100, "min_duration_s": 2.0, "max_duration_s": 60.0}


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("$", " ".join(str(c) for c in cmd), flush=True)
    done = subprocess.run([str(c) for c in cmd], text=True, capture_output=True, **kw)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"command failed ({done.returncode}): {' '.join(str(c) for c in cmd)}")
    return done


def make_build(name: str) -> Path:
    out = BUILDS / name
    if (out / "manifest.json").is_file():
        return out
    if name == "demo":
        run(SNEXPORT + ["build", "--out", out])
        return out
    plan = json.loads(run(SNEXPORT + ["plan", "--anchors", "deit_s,deit_b", "--json"]).stdout)
    stitches = sorted((s for s in plan["stitches"] if s["cut"] is not None), key=lambda s: s["gflops"])
    picks = [stitches[round(i * (len(stitches) - 1) / 5)]["id"] for i in range(6)]
    ids = ["deit_s", "deit_b"] + picks
    run(SNEXPORT + ["build", "--anchors", "deit_s,deit_b", "--random-init", "--target", "x86-cpu", "--out", out,
                    "--stitches", ",".join(ids)])
    return out


def bench_once(build: Path, backends: str = "") -> dict:
    """`snexport bench` in a fresh process; returns {id: p50} and the front from the manifest it wrote."""
    from snexport.device.manifest import engine_memory_mb
    from snexport.device.pareto import noise_aware_front

    started = time.perf_counter()
    run(SNEXPORT + ["bench", build, "--target", "x86-cpu", "--json"] + (["--backends", backends] if backends else []))
    seconds = time.perf_counter() - started
    manifest = json.loads((build / "manifest.json").read_text())
    key = max(manifest["devices"], key=lambda k: manifest["devices"][k]["measured_at"])
    p50, front, ci, how, rows = {}, set(), {}, {}, []
    for e in manifest["engines"]:
        m = e["measurements"].get(key)
        if m:
            p50[e["stitch_id"]] = m["latency_ms"]["p50"]
            how[e["stitch_id"]] = f"{m.get('backend', '?')}/{m.get('threads') or '-'}t"
            ci[e["stitch_id"]] = (m.get("latency_noise") or {}).get("p50_ci")
            rows.append({"id": e["stitch_id"], "top1": (e.get("accuracy") or {}).get("top1"),
                         "latency_p50_ms": p50[e["stitch_id"]], "latency_ci_ms": ci[e["stitch_id"]],
                         "memory_mb": engine_memory_mb(m)})
            if m["pareto"]:
                front.add(e["stitch_id"])
    # The same measurements' front without the re-bench hysteresis (what this run alone says).
    alone = noise_aware_front(rows)["front"]
    return {"p50": p50, "front": sorted(front), "front_without_history": sorted(alone), "ci": ci, "how": how,
            "seconds": round(seconds, 1)}


def baseline_once(build: Path) -> dict:
    """The pre-issue-10 method, in a fresh process: sequential profile_engine with the RSS sampler beside the loop."""
    code = f"""
import json, sys
from snexport.buildfiles import BuildFiles
from snexport.device import deployset
from snexport.device.bench import host_facts
from snexport.device.pareto import memory_for_pareto, select_candidates
from snexport.device.profiles import load_profile
from snexport.device.profiling import profile_engine
profile = load_profile("x86-cpu")
build = BuildFiles({str(build)!r})
arts = deployset.deployable(build, profile)
facts = host_facts(build)
options = profile.runner_options()
rows = []
for a in arts:
    st = profile_engine(build.root / a.file, {BASELINE_SETTINGS!r}, runner_options=options)
    rows.append({{"id": a.stitch_id, "top1": facts[a.stitch_id]["accuracy"]["top1"],
                  "latency_p50_ms": st["latency"]["p50_ms"],
                  "memory_mb": memory_for_pareto((st["memory"]["rss_load_delta_bytes"] or 0) / 1e6)}})
if all(r["top1"] is not None for r in rows):
    front = [c["record"]["id"] for c in select_candidates(rows, by=["latency_p50_ms", "memory_mb"])]
else:
    from snexport.device.pareto import pareto_front
    front = [r["id"] for r in pareto_front(rows, {{"latency_p50_ms": "min", "memory_mb": "min"}})]
print(json.dumps({{"p50": {{r["id"]: r["latency_p50_ms"] for r in rows}}, "front": sorted(front)}}))
"""
    started = time.perf_counter()
    out = run([sys.executable, "-c", code]).stdout
    doc = json.loads(out.strip().splitlines()[-1])
    doc["seconds"] = round(time.perf_counter() - started, 1)
    return doc


def ranks(values: list[float]) -> list[float]:
    """Ranks 1..n, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else 1.0


def compare(first: dict, second: dict, smallest: str) -> dict:
    ids = sorted(set(first["p50"]) & set(second["p50"]))
    a, b = [first["p50"][i] for i in ids], [second["p50"][i] for i in ids]
    f1, f2 = set(first["front"]), set(second["front"])
    h1, h2 = set(first.get("front_without_history", ())), set(second.get("front_without_history", ()))
    return {
        "engines": len(ids),
        "spearman_rho": round(spearman(a, b), 4),
        "front_jaccard": round(len(f1 & f2) / len(f1 | f2), 4) if f1 | f2 else 1.0,
        "same_front": f1 == f2,
        "smallest_on_both_fronts": smallest in f1 and smallest in f2,
        "only_on_one_front": sorted(f1 ^ f2),
        **({"without_history": {"front_jaccard": round(len(h1 & h2) / len(h1 | h2), 4) if h1 | h2 else 1.0,
                                "same_front": h1 == h2, "only_on_one_front": sorted(h1 ^ h2)}}
           if "front_without_history" in first else {}),
        "per_engine": {i: {"p50_ms": [round(first["p50"][i], 4), round(second["p50"][i], 4)],
                           "runs_on": [first.get("how", {}).get(i, ""), second.get("how", {}).get(i, "")],
                           "on_front": [i in f1, i in f2],
                           "rel_spread": round(abs(first["p50"][i] - second["p50"][i])
                                               / ((first["p50"][i] + second["p50"][i]) / 2), 4)}
                       for i in ids},
        "seconds": [first["seconds"], second["seconds"]],
    }


def machine() -> dict:
    from snexport.device.profiling import device_fingerprint

    fp = device_fingerprint()
    return {"cpu": fp["cpu"], "memory_total_bytes": fp["memory_total_bytes"], "os": fp["os"]["platform"],
            "python": platform.python_version(), "onnxruntime": fp["versions"].get("onnxruntime")}


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def show(name: str, method: str, result: dict) -> None:
    print(f"\n{name} / {method}: {result['engines']} engines, Spearman rho {result['spearman_rho']:.3f}, "
          f"front Jaccard {result['front_jaccard']:.2f} (same front: {result['same_front']}, smallest anchor on "
          f"both: {result['smallest_on_both_fronts']}), {result['seconds'][0]:.0f} s + {result['seconds'][1]:.0f} s")
    if "without_history" in result:
        alone = result["without_history"]
        print(f"  each run's front on its own numbers (no re-bench hysteresis): Jaccard {alone['front_jaccard']:.2f}, "
              f"same: {alone['same_front']}, differ on: {', '.join(alone['only_on_one_front']) or 'none'}")
    print(f"  {'engine':32s} {'p50 run 1':>10s} {'p50 run 2':>10s} {'spread':>8s}  {'front':>5s}  runs on")
    for i, r in sorted(result["per_engine"].items(), key=lambda kv: kv[1]["p50_ms"][0]):
        front = "".join("y" if f else "-" for f in r["on_front"])
        runs_on = " / ".join(dict.fromkeys(r["runs_on"])) if any(r["runs_on"]) else ""
        print(f"  {i:32s} {r['p50_ms'][0]:10.4f} {r['p50_ms'][1]:10.4f} {100 * r['rel_spread']:7.1f}%  {front:>5s}  "
              f"{runs_on}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--builds", default="demo,deit", help="comma-separated: demo, deit")
    ap.add_argument("--fresh", action="store_true", help="rebuild the builds from scratch")
    ap.add_argument("--backends", default="", help="passed to `snexport bench --backends` (default: bench's own, "
                    "every installed CPU runtime; each engine's p50 is then that of the runtime chosen for it in "
                    "that run, so a runtime flip between runs shows up as spread)")
    args = ap.parse_args()
    from snexport.device.profiles import load_profile

    report = {"machine": machine(), "settings": load_profile("x86-cpu").measurement.to_dict(),
              "baseline_settings": dict(BASELINE_SETTINGS, method="sequential, RSS sampler beside the timed loop"),
              "builds": {}}
    print(json.dumps({"machine": report["machine"], "settings": report["settings"]}, indent=1))
    for name in [b.strip() for b in args.builds.split(",") if b.strip()]:
        if args.fresh and (BUILDS / name).exists():
            shutil.rmtree(BUILDS / name)
        build = make_build(name)
        smallest = "demo_s" if name == "demo" else "deit_s"
        entry = {"load_before": load(), "machine": report["machine"], "settings": report["settings"],
                 "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        label = f"interleaved rounds (snexport bench{' --backends ' + args.backends if args.backends else ''})"
        entry["backends"] = args.backends or "bench default"
        runs = {label: [bench_once(build, args.backends), bench_once(build, args.backends)],
                "baseline: sequential": [baseline_once(build), baseline_once(build)]}
        entry["load_after"] = load()
        for method, (one, two) in runs.items():
            entry[method] = compare(one, two, smallest)
            show(name, method, entry[method])
        print(f"  load average before/after: {entry['load_before']} / {entry['load_after']}")
        report["builds"][name] = entry
    results = RESULTS.with_name(f"bench_stability-{args.backends.replace(',', '_')}.json") if args.backends else RESULTS
    results.parent.mkdir(parents=True, exist_ok=True)
    if results.is_file():  # keep the other builds' latest figures (each build records its own machine and settings)
        kept = json.loads(results.read_text()).get("builds", {})
        for name, entry in kept.items():
            if name not in report["builds"]:
                report["builds"][name] = entry
    for entry in report["builds"].values():
        entry.setdefault("machine", report["machine"])
        entry.setdefault("settings", report["settings"])
    results.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwritten: {results.relative_to(REPO)}")


if __name__ == "__main__":
    main()
