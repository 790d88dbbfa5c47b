"""A whole `snexport build` with this checkout against the same build with a baseline commit, alternating in one run
(issue 13, item 3: the DeiT-S/B random-init build in under 10 minutes).

Each run is a fresh process building into a fresh directory (nothing resumes), the two codes in turn: this checkout
with this environment's Python, the baseline from a git worktree of ``--baseline`` with its own locked environment
(`uv sync --frozen`, made before anything is timed). Per run: wall seconds, the child's CPU seconds (user + sys; the
steadier figure on a shared box), the load average before and after, and the seconds since start at which each
stage's summary line appeared (the stage's end: where the build spends its time). Printed as min / median / max
per code with the ratio this / baseline per pair, and written with the machine to
``benchmarks/results/build_timing-<anchors>.json``.

    uv run python benchmarks/build_timing.py                       # DeiT-S/B random init, 2 pairs, baseline ecfc6ba
    uv run python benchmarks/build_timing.py --rounds 1 --baseline HEAD~3

A DeiT-S/B pair takes about 25 minutes on 2 cores and needs ~30 GB of disk while a build directory exists (each is
removed after its run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# The code before the issue-13 build-time work of the last stop (the screening, pack and switch changes).
DEFAULT_BASELINE = "ecfc6ba"
# A stage's summary line ("[3/6] export: ..."), printed as the stage ends.
STAGE_LINE = re.compile(r"^\[\d+/\d+\] [a-z-]+")


def baseline_python(ref: str, workdir: Path) -> Path:
    """The baseline's Python: a detached worktree of ``ref`` with its locked environment synced."""
    tree = workdir / "baseline"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), ref], check=True,
                   capture_output=True)
    subprocess.run(["uv", "sync", "--frozen", "--quiet"], cwd=tree, check=True)
    return tree / ".venv" / "bin" / "python"


def timed_build(python: Path, cwd: Path, args: list[str], out: Path) -> dict:
    """One build in a fresh process into ``out`` (removed afterwards): wall, child CPU, progress stamps."""
    shutil.rmtree(out, ignore_errors=True)
    load_before = [round(v, 2) for v in os.getloadavg()]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    env = dict(os.environ, COLUMNS="150")
    proc = subprocess.Popen([str(python), "-m", "snexport.cli.app", "build", *args, "--out", str(out)], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    stamps: dict[str, float] = {}
    tail: list[str] = []
    for line in proc.stdout:
        line = line.strip()
        tail = (tail + [line])[-20:]
        match = STAGE_LINE.match(line)
        if match and match.group(0) not in stamps:
            stamps[match.group(0)] = round(time.perf_counter() - started, 1)
    code = proc.wait()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    shutil.rmtree(out, ignore_errors=True)
    if code != 0:
        raise SystemExit(f"build with {python} failed (exit {code}):\n" + "\n".join(tail))
    return {"wall_s": round(wall, 1),
            "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1),
            "load_before": load_before, "load_after": [round(v, 2) for v in os.getloadavg()],
            "stage_ended_at_s": stamps}


def summary(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--anchors", default="deit_s,deit_b")
    parser.add_argument("--target", default="x86-cpu")
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git commit to compare against")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of builds (this, baseline)")
    parser.add_argument("--scratch", type=Path, default=None, help="where builds and the worktree go (default: tmp)")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    build_args = ["--anchors", args.anchors, "--random-init", "--target", args.target]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "unknown"
    workdir = Path(tempfile.mkdtemp(prefix="build_timing-", dir=args.scratch))
    try:
        pythons = {"this": (Path(sys.executable), REPO), "baseline": (baseline_python(args.baseline, workdir),
                                                                      workdir / "baseline")}
        from snexport.device.profiling import device_fingerprint

        machine = device_fingerprint()
        print(f"machine: {machine['cpu']['model']}, {os.cpu_count()} cpus; `snexport build {' '.join(build_args)}`; "
              f"this = {head}, baseline = {args.baseline}; {args.rounds} pairs, order alternating")
        runs: dict[str, list[dict]] = {"this": [], "baseline": []}
        for r in range(args.rounds):
            for kind in (["this", "baseline"] if r % 2 == 0 else ["baseline", "this"]):
                python, cwd = pythons[kind]
                run = timed_build(python, cwd, build_args, workdir / f"build-{kind}")
                runs[kind].append(dict(run, round=r))
                print(f"  round {r} {kind:8s} wall {run['wall_s']:7.1f} s  cpu {run['cpu_s']:7.1f} s  "
                      f"load {run['load_before']}", flush=True)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(workdir / "baseline")],
                       capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)
    table = {k: {m: summary([run[m] for run in v]) for m in ("wall_s", "cpu_s")} for k, v in runs.items()}
    ratios = [a["wall_s"] / b["wall_s"] for a, b in zip(runs["this"], runs["baseline"])]
    print(f"\n{'':10s}{'wall min / median / max (s)':>30s}{'cpu min / median / max (s)':>30s}")
    for kind in runs:
        w, c = table[kind]["wall_s"], table[kind]["cpu_s"]
        print(f"  {kind:8s}{w['min']:10.1f}{w['median']:9.1f}{w['max']:9.1f}   {c['min']:10.1f}{c['median']:9.1f}"
              f"{c['max']:9.1f}")
    target = "   (target: this under 600 s)" if args.anchors == "deit_s,deit_b" else ""
    print(f"  wall this / baseline per pair: {', '.join(f'{x:.2f}x' for x in ratios)}{target}")
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"build_timing-{args.anchors.replace(',', '-')}.json"
    out.write_text(json.dumps({"command": ["snexport", "build", *build_args], "this": head,
                               "baseline": args.baseline, "rounds": args.rounds, "runs": runs, "summary": table,
                               "wall_ratio_per_pair": ratios, "machine": machine}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
