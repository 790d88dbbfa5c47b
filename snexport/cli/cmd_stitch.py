"""`snexport stitch`: create a build directory with the plan and the least-squares-initialised SN-Net."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from snexport.cli.common import ANCHORS_HELP, err, interruptible, out

WEIGHTS_HELP = "Local weights per anchor, NAME=PATH (.safetensors or .pth); repeat or comma-separate."


@interruptible(lambda out_dir, **_: f"nothing was written to {out_dir} (a build appears only once the stitch stage "
               "finishes); re-run the same command")
def stitch_cmd(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Build directory to create.")] = Path("build"),
    anchors: Annotated[Optional[str], typer.Option("--anchors", "-a", help=ANCHORS_HELP)] = None,
    weights: Annotated[Optional[list[str]], typer.Option("--weights", "-w", help=WEIGHTS_HELP)] = None,
    random_init: Annotated[bool, typer.Option("--random-init", help="Random anchor weights: architecture-only work "
                                              "(plans, latency, memory); accuracy is reported as unknown.")] = False,
    calib_images: Annotated[int, typer.Option("--calib-images", min=1, help="Calibration images for the "
                                              "least-squares init.")] = 100,
    data: Annotated[Optional[str], typer.Option(help="ImageFolder root (train/, val/); the demo uses digits.")] = None,
    window: Annotated[int, typer.Option(min=1, help="Sliding-window size.")] = 2,
    stride: Annotated[int, typer.Option(min=1, help="Sliding-window stride.")] = 1,
    nearest: Annotated[bool, typer.Option("--nearest/--no-nearest", help="Only stitch adjacent anchors.")] = True,
    two_way: Annotated[bool, typer.Option("--two-way", help="Also Slow-to-Fast stitches.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a different build in --out.")] = False,
):
    """Plan the stitches, load the anchors, least-squares-init every stitching layer, save the build."""
    from snexport.families.registry import parse_weights_option, split_anchor_names
    from snexport.stitching.stage import stitch_stage
    from snexport.stitching.plan import PlanSettings

    build, info = stitch_stage(out_dir, split_anchor_names(anchors), parse_weights_option(weights), random_init,
                               PlanSettings(window, stride, nearest, two_way), calib_images, data, force=force)
    ls = info["ls_init"]
    if info.get("skipped"):
        err.print(f"{build.root}: same plan and inputs already built; nothing to do (use --force to redo)")
    out.print(f"build {build.root}: {len(build.load_plan().stitches)} configurations; least-squares init of "
              f"{ls['layers']} layers from {ls['calibration_images']} {ls['source']} images took "
              f"{ls['total_seconds']:.2f} s (collect {ls['collect_seconds']:.2f} s, solve {ls['solve_seconds']:.2f} s)")


def register(app: typer.Typer) -> None:
    app.command("stitch")(stitch_cmd)
