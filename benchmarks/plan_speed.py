"""`snexport plan` of known names against a bare `import torch, timm`, interleaved in one run (issue 13, item 1).

Per round, in a rotated order, each a fresh Python process of this environment:
- "import": ``python -c "import torch, timm"`` — what any plan cost before (the import was the whole cost);
- "plan (meta)": the pre-issue-13 path, ``describe_anchor(name, recorded=False)`` (meta-device builds) +
  ``plan_stitches``, in-process, no CLI;
- "plan (CLI)": ``python -m snexport.cli.app plan --anchors ... --json``, which answers from the recorded facts.
Wall and CPU (user + sys of the child) seconds: min / median / max over the rounds. CPU time is the steadier
figure on a shared box (other processes stretch wall time, not a child's CPU time); both are printed, with the
machine and the load average before and after every round. Target: plan (CLI) <= 0.25x the import.

    python benchmarks/plan_speed.py
    python benchmarks/plan_speed.py --anchors deit_ti,deit_s,deit_b --rounds 7

Writes benchmarks/results/plan_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def commands(anchors: str) -> dict[str, list[str]]:
    names = [n for n in anchors.split(",") if n]
    meta = ("from snexport.families.registry import describe_anchor, split_anchor_names\n"
            "from snexport.stitching.plan import plan_stitches\n"
            f"plan = plan_stitches([describe_anchor(n, recorded=False) for n in split_anchor_names({anchors!r})])\n"
            "print(len(plan.stitches))\n")
    assert names
    return {
        "import": [sys.executable, "-c", "import torch, timm"],
        "plan (meta)": [sys.executable, "-c", meta],
        "plan (CLI)": [sys.executable, "-m", "snexport.cli.app", "plan", "--anchors", anchors, "--json"],
    }


def timed(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, child CPU seconds) of one process; fails loudly if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} failed:\n{done.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def summary(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--anchors", default="deit_ti,deit_s,deit_b")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()

    cmds = commands(args.anchors)
    kinds = list(cmds)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}, "
          f"{sys.executable}; PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r}; "
          f"anchors {args.anchors}; {args.rounds} rounds, order rotated")
    timed(cmds["import"])  # warm the page cache once: every kind then reads the same files from memory
    samples: dict[str, list[dict]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
        for kind in order:
            before = load_average()
            wall, cpu = timed(cmds[kind])
            samples[kind].append({"round": r, "wall": wall, "cpu": cpu, "load_before": before,
                                  "load_after": load_average()})
            print(f"  round {r} {kind:12s} wall {wall:6.2f} s  cpu {cpu:6.2f} s  load {before}")
    table = {k: {"wall": summary([s["wall"] for s in v]), "cpu": summary([s["cpu"] for s in v])}
             for k, v in samples.items()}
    print(f"\n{'':14s}{'wall min / median / max (s)':>30s}{'cpu min / median / max (s)':>30s}")
    for kind in kinds:
        w, c = table[kind]["wall"], table[kind]["cpu"]
        print(f"  {kind:12s}{w['min']:10.2f}{w['median']:9.2f}{w['max']:9.2f}   {c['min']:10.2f}{c['median']:9.2f}"
              f"{c['max']:9.2f}")
    ratios = {f"{kind} / import ({measure} {stat})": table[kind][measure][stat] / table["import"][measure][stat]
              for kind in ("plan (CLI)", "plan (meta)") for measure in ("wall", "cpu") for stat in ("min", "median")}
    for name, value in ratios.items():
        print(f"  {name:42s} {value:5.2f}x" + ("   (target <= 0.25x)" if name.startswith("plan (CLI)") else ""))
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / "plan_speed.json"
    from snexport.device.profiling import device_fingerprint

    out.write_text(json.dumps({"anchors": args.anchors, "rounds": args.rounds, "samples": samples, "summary": table,
                               "ratios": ratios, "machine": device_fingerprint()}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
