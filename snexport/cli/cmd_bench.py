"""`snexport bench`: profile a build on this machine and update its manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from snexport.cli.common import interruptible, out


def show_measurements(result: dict, title: str):
    from rich.table import Table

    from snexport.cli.common import fmt_acc

    t = Table(title=title)
    several = len(result.get("backends") or ()) > 1
    columns = ["engine", "top-1 %", "p50 ms", "p90 ms", "p99 ms", "cold load ms", "switch p50 ms", "RSS +MB", "Pareto"]
    if several:  # which runtime each engine runs on, and the paired screening it was chosen on (chosen one first)
        columns[1:1] = ["backend", "screened ms"]
    for c in columns:
        t.add_column(c, justify="left" if c in ("engine", "backend", "screened ms") else "right")
    tops = {r["id"]: r["top1"] for r in result["rows"]}
    for sid, m in sorted(result["measurements"].items(), key=lambda kv: kv[1]["latency_ms"]["p50"]):
        lat, load = m["latency_ms"], m["load_ms"]
        sw = "-" if load["switch_p50"] is None else f"{load['switch_p50']:.3f}"
        cells = [sid, fmt_acc(tops.get(sid)), f"{lat['p50']:.3f}", f"{lat['p90']:.3f}", f"{lat['p99']:.3f}",
                 f"{load['cold']:.1f}", sw, f"{m['memory']['rss_load_delta_mb']:.1f}",
                 "yes" if sid in result["pareto"] else ""]
        if several:
            # Screening figures side by side: measured in the same alternation, unlike the rounds' p50 (all engines
            # interleaved), so they compare like with like.
            figures = sorted((m.get("by_backend") or {}).items(), key=lambda kv: kv[0] != m.get("backend"))
            cells[1:1] = [m.get("backend", ""), ", ".join(
                f"{b} refused" if "refused" in f else
                f"{b} {f['screen_ms'] if f.get('screen_ms') is not None else f['latency_p50_ms']:.3f}"
                for b, f in figures)]
        t.add_row(*cells)
    return t


@interruptible(lambda build_dir, **_: f"engines built so far are kept and the manifest keeps its previous "
               f"measurements (new ones are written when all engines are measured); re-run `snexport bench {build_dir}`")
def bench_cmd(
    build_dir: Annotated[Path, typer.Argument(help="Build directory (copied to this device).")] = Path("build"),
    target: Annotated[Optional[str], typer.Option(help="Device profile name or TOML path; default: the build's "
                                                  "target, else this machine's.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the measurements as JSON.")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="A first look: at most 8 short rounds instead of the "
                                        "profile's settings (wider intervals; the manifest records it).")] = False,
    backends: Annotated[Optional[str], typer.Option(help="Runtimes to measure each engine on, comma-separated "
                                                    "(onnxruntime/ort, openvino/ov); each engine then runs on the "
                                                    "profile's own unless another is >10% faster. Default: every "
                                                    "installed CPU runtime on a CPU profile, the profile's own "
                                                    "elsewhere.")] = None,
):
    """Build engines if needed, measure latency/memory/load/switch per engine, re-select, update the manifest."""
    from snexport.buildfiles import DEVICE_PROFILE, BuildFiles, require_writable
    from snexport.cli.common import print_json
    from snexport.device.bench import bench_stage, bundle_target
    from snexport.device.profiles import load_profile
    from snexport.device.report import write_report
    from snexport.device.runtime.backends import default_target

    build = BuildFiles(build_dir).require_deployable()
    require_writable(build.root, "snexport bench")  # engines, profile.jsonl and the manifest are written there
    if target is None and build.is_bundle and build.path(DEVICE_PROFILE).is_file():
        from snexport.device.bundle import bundle_profile

        profile = bundle_profile(build)  # the copy, under the name the host gave the profile
    else:
        profile = load_profile(target or build.info().get("target") or bundle_target(build) or default_target())
    factory = None
    if profile.backend == "torch" and not build.is_bundle:
        from snexport.pipeline.run import module_factory
        from snexport.stitching.store import BuildDir

        factory = module_factory(BuildDir(build.root), profile)
    requested = [b for b in (backends or "").split(",") if b.strip()] or None
    result = bench_stage(build, profile, module_factory=factory, quick=quick, backends=requested)
    report = write_report(build, result["manifest"], result["device_key"])
    if as_json:
        print_json({k: result[k] for k in ("device_key", "backends", "chosen", "pareto", "measurements")})
        return
    out.print(show_measurements(result, f"{result['engines']} engines on {result['device_key']}"))
    out.print(f"manifest: {build.manifest_path}")
    out.print(f"plot: {report['plot']}" if report.get("plot") else report["note"], markup=False)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_cmd)
