"""`snexport stitch`: create a build directory with the plan and the least-squares-initialised SN-Net."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from snexport.cli.common import ANCHORS_HELP, err, interruptible, out

WEIGHTS_HELP = "Local weights per anchor, NAME=PATH (.safetensors or .pth); repeat or comma-separate."

# Plan options shared by `plan`, `stitch` and `build` (the conventions they set are recorded in the plan).
TwoWayOption = Annotated[bool, typer.Option(
    "--two-way", help="SN-Netv2 two-way stitching: both directions and round trips per anchor pair (134 "
                      "configurations for DeiT-S/B, DeiT3-S/L); --window/--stride do not apply.")]
LoraRankOption = Annotated[int, typer.Option(
    "--stitch-lora-rank", min=0, help="SN-Netv2 LoRA stitching layers: frozen least-squares weight + trained "
                                      "rank-R update and bias (official: 64); exports merge the update. 0: plain.")]
FinalNormOption = Annotated[bool, typer.Option(
    "--final-norm/--no-final-norm", help="Apply the last anchor's final norm on stitched routes (SN-Netv2, "
                                         "default); --no-final-norm is SN-Net v1 DeiT's convention.")]
ParamsOption = Annotated[str, typer.Option(
    "--params", help="What the params column counts: 'module' (every parameter of the exported module) or "
                     "'paper' (official SN-Net: front patch embedding without cls/position tokens).")]


def plan_settings(window: int = 2, stride: int = 1, nearest: bool = True, two_way: bool = False, lora_rank: int = 0,
                  final_norm: bool = True, params: str = "module"):
    from snexport.stitching.plan import PlanSettings

    return PlanSettings(window, stride, nearest, two_way, final_norm=final_norm, params=params,
                        lora_rank=lora_rank).check()


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
    two_way: TwoWayOption = False,
    lora_rank: LoraRankOption = 0,
    final_norm: FinalNormOption = True,
    params: ParamsOption = "module",
    from_official: Annotated[Optional[Path], typer.Option(
        "--from-official", help="An official SN-Net v1 DeiT or SN-Netv2 checkpoint (their state-dict layout): "
                                "picks the matching plan and conventions and loads its weights (no LS init).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a different build in --out.")] = False,
):
    """Plan the stitches, load the anchors, least-squares-init every stitching layer, save the build."""
    from snexport.families.registry import parse_weights_option, split_anchor_names
    from snexport.stitching.stage import stitch_stage

    if from_official is not None:
        from snexport.stitching.official import official_stage

        build, facts = official_stage(out_dir, from_official, data=data, force=force)
        out.print(f"build {build.root}: {facts['configurations']} configurations from the official {facts['method']} "
                  f"checkpoint {from_official} (anchors {', '.join(facts['anchors'])}; final norm on stitched routes "
                  f"{'on' if facts['final_norm'] else 'off'}; {facts['layers']} stitching layers loaded)")
        return
    settings = plan_settings(window, stride, nearest, two_way, lora_rank, final_norm, params)
    build, info = stitch_stage(out_dir, split_anchor_names(anchors), parse_weights_option(weights), random_init,
                               settings, calib_images, data, force=force)
    ls = info["ls_init"]
    if info.get("skipped"):
        err.print(f"{build.root}: same plan and inputs already built; nothing to do (use --force to redo)")
    out.print(f"build {build.root}: {len(build.load_plan().stitches)} configurations; least-squares init of "
              f"{ls['layers']} layers from {ls['calibration_images']} {ls['source']} images took "
              f"{ls['total_seconds']:.2f} s (collect {ls['collect_seconds']:.2f} s, solve {ls['solve_seconds']:.2f} s)")


def register(app: typer.Typer) -> None:
    app.command("stitch")(stitch_cmd)
