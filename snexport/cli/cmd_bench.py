"""`snexport bench`: profile a build on this machine and update its manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from snexport.cli.common import out


def show_measurements(result: dict, title: str):
    from rich.table import Table

    from snexport.cli.common import fmt_acc

    t = Table(title=title)
    for c in ("engine", "top-1 %", "p50 ms", "p90 ms", "p99 ms", "cold load ms", "switch p50 ms", "RSS +MB", "Pareto"):
        t.add_column(c, justify="left" if c == "engine" else "right")
    tops = {r["id"]: r["top1"] for r in result["rows"]}
    for sid, m in sorted(result["measurements"].items(), key=lambda kv: kv[1]["latency_ms"]["p50"]):
        lat, load = m["latency_ms"], m["load_ms"]
        sw = "-" if load["switch_p50"] is None else f"{load['switch_p50']:.3f}"
        t.add_row(sid, fmt_acc(tops.get(sid)), f"{lat['p50']:.3f}", f"{lat['p90']:.3f}", f"{lat['p99']:.3f}",
                  f"{load['cold']:.1f}", sw, f"{m['memory']['rss_load_delta_mb']:.1f}",
                  "yes" if sid in result["pareto"] else "")
    return t


def bench_cmd(
    build_dir: Annotated[Path, typer.Argument(help="Build directory (copied to this device).")] = Path("build"),
    target: Annotated[Optional[str], typer.Option(help="Device profile name or TOML path; default: the build's "
                                                  "target, else this machine's.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the measurements as JSON.")] = False,
):
    """Build engines if needed, measure latency/memory/load/switch per engine, re-select, update the manifest."""
    from snexport.buildfiles import BuildFiles
    from snexport.cli.common import print_json
    from snexport.device.bench import bench_stage, bundle_target
    from snexport.device.profiles import load_profile
    from snexport.device.report import write_report
    from snexport.device.runtime.backends import default_target

    build = BuildFiles(build_dir).require_deployable()
    profile = load_profile(target or build.info().get("target") or bundle_target(build) or default_target())
    factory = None
    if profile.backend == "torch" and not build.is_bundle:
        from snexport.pipeline.run import module_factory
        from snexport.stitching.store import BuildDir

        factory = module_factory(BuildDir(build.root), profile)
    result = bench_stage(build, profile, module_factory=factory)
    report = write_report(build, result["manifest"], result["device_key"])
    if as_json:
        print_json({k: result[k] for k in ("device_key", "pareto", "measurements")})
        return
    out.print(show_measurements(result, f"{result['engines']} engines on {result['device_key']}"))
    out.print(f"manifest: {build.manifest_path}")
    out.print(f"plot: {report['plot']}" if report.get("plot") else report["note"])


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_cmd)
