"""`snexport select`: the Pareto candidates, or what the on-device selector would pick under a budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from snexport.cli.common import err, fmt_acc, fmt_params, out, print_json


def select_cmd(
    build_dir: Annotated[Path, typer.Argument(help="Build directory.")] = Path("build"),
    by: Annotated[str, typer.Option(help="Cost to trade accuracy against: 'gflops' (anywhere) or 'latency' "
                                    "(measured by `snexport bench`).")] = "gflops",
    stitches: Annotated[str, typer.Option(help="'pareto', 'all', or comma-separated ids.")] = "pareto",
    latency_ms: Annotated[Optional[float], typer.Option(help="Show the selector's pick under this latency budget.")] = None,
    memory_mb: Annotated[Optional[float], typer.Option(help="... and this memory budget (MB).")] = None,
    energy_mj: Annotated[Optional[float], typer.Option(help="... and this energy budget (mJ per inference, "
                                                       "measured by bench where the device has a sensor).")] = None,
    percentile: Annotated[str, typer.Option(help="Latency percentile the budget applies to (p90: pooled over "
                                            "every timed round of bench).")] = "p90",
    strict: Annotated[bool, typer.Option("--strict", help="Fail when no engine meets the budget.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Write and print the Pareto candidates; with --latency-ms/--memory-mb/--energy-mj, ask the selector instead."""
    from snexport.buildfiles import BuildFiles
    from snexport.errors import BuildDirError

    if latency_ms is not None or memory_mb is not None or energy_mj is not None:
        # The selector's pick: device half only (manifest + engines), so it works on a bundle and a bare install.
        from snexport.device.selector import Selector

        build = BuildFiles(build_dir).require_deployable()
        with Selector(build.manifest_path, percentile=percentile, mode="on_demand", cache_size=1) as sel:
            info = sel.choose(latency_ms=latency_ms, memory_mb=memory_mb, strict=strict, energy_mj=energy_mj)
        if as_json:
            print_json({"stitch_id": info.stitch_id, "top1": info.top1, "file": str(info.file),
                        "latency_ms": info.latency_ms, "memory_mb": info.memory_mb, "energy_mj": info.energy_mj})
        else:
            energy = "" if info.energy_mj is None else f", {info.energy_mj:.3g} mJ"
            out.print(f"{info.stitch_id}: top-1 {fmt_acc(info.top1)}, {percentile} "
                      f"{info.latency_ms:.3f} ms, {info.memory_mb:.1f} MB{energy}  ({info.file})")
        return
    if BuildFiles(build_dir).is_bundle:
        raise BuildDirError(f"{build_dir} is a device bundle: choosing the Pareto candidates needs the build's plan "
                            "and evaluation, on the host; here, ask the selector with --latency-ms, --memory-mb and/or --energy-mj")
    from snexport.selection.select import select_stage
    from snexport.stitching.store import BuildDir

    doc = select_stage(BuildDir(build_dir).require(), by=by, stitches=stitches)
    if as_json:
        print_json(doc)
        return
    from rich.table import Table

    t = Table(title=f"{len(doc['candidates'])} of {doc['considered']} configurations selected ({doc['mode']}, by {by})")
    cols = ["config", "top-1 %", "GFLOPs", "params"] + (["p50 ms", "memory MB"] if by == "latency" else [])
    for c in cols:
        t.add_column(c, justify="left" if c == "config" else "right")
    for r in doc["candidates"]:
        row = [r["id"] + (" (anchor)" if r["is_anchor"] else ""), fmt_acc(r["top1"]), f"{r['gflops']:.4f}",
               fmt_params(r["params"])]
        if by == "latency":
            row += [f"{r['latency_p50_ms']:.3f}", f"{r['memory_mb']:.1f}"]
        t.add_row(*row)
    out.print(t)
    if not doc["accuracy_known"]:
        err.print("accuracy is unknown (random-init anchors): every configuration is a candidate; pick with "
                  "--stitches ID,ID")


def register(app: typer.Typer) -> None:
    app.command("select")(select_cmd)
