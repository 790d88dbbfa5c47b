"""`snexport plan`: enumerate the stitches of an anchor family (no weights needed)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from snexport.cli.cmd_stitch import FinalNormOption, LoraRankOption, ParamsOption, TwoWayOption, plan_settings
from snexport.cli.common import ANCHORS_HELP, fmt_params, out, print_json


def plan_cmd(
    anchors: Annotated[Optional[str], typer.Option("--anchors", "-a", help=ANCHORS_HELP)] = None,
    window: Annotated[int, typer.Option(help="Sliding-window size k_win for equal-depth anchors.", min=1)] = 2,
    stride: Annotated[int, typer.Option(help="Sliding-window stride s.", min=1)] = 1,
    nearest: Annotated[bool, typer.Option("--nearest/--no-nearest",
                                          help="Stitch only anchors adjacent in size (Ti→S, S→B).")] = True,
    two_way: TwoWayOption = False,
    lora_rank: LoraRankOption = 0,
    final_norm: FinalNormOption = True,
    params: ParamsOption = "module",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
):
    """Enumerate every stitch of the anchors with its route, FLOPs (paper convention) and params.

    Plain ViTs (DeiT, ViT) are stitched by sliding windows over their blocks; anchors with stages (Swin, ResNet,
    ResNet→Swin) within one stage at a time, between the same stage of neighbouring anchors (--window/--stride
    apply to equal stage depths). cut and resume count units over all stages; the stage column says where.
    --two-way gives SN-Netv2's set (one-way both directions and round trips); --no-nearest on three plain ViTs
    adds SN-Net v1's three-anchor routes. Routes with two stitching layers have ids spelling every hop,
    anchor:first-last joined by '>' (the table shows their first cut and last resume).
    """
    from snexport.families.registry import describe_anchors, split_anchor_names
    from snexport.stitching.plan import plan_stitches

    settings = plan_settings(window, stride, nearest, two_way, lora_rank, final_norm, params)
    plan = plan_stitches(describe_anchors(split_anchor_names(anchors)), settings)
    if as_json:
        print_json(plan_json(plan))
        return
    from rich.table import Table

    t = Table(title=f"{len(plan.stitches)} configurations ({len(plan.anchors)} anchors + {len(plan.stitch_only)} "
                    f"stitches), {plan.num_layers} stitching layers")
    for col in ("id", "front", "stage", "cut", "back", "resume", "layer", "blocks", "GFLOPs", "params"):
        t.add_column(col, justify="left" if col in ("id", "front", "back") else "right")
    for s in sorted(plan.stitches, key=lambda s: s.gflops):
        dash = "-"
        t.add_row(s.id, s.front, dash if s.stage is None else str(s.stage), dash if s.cut is None else str(s.cut),
                  dash if s.is_anchor else s.back,
                  dash if s.resume is None else str(s.resume), dash if s.layer is None else str(s.layer),
                  str(s.blocks), f"{s.gflops:.3f}", fmt_params(s.params))
    out.print(t)


def plan_json(plan) -> dict:
    return {
        "anchors": [{"name": a.name, "timm_name": a.timm_name, "family": a.family, "depth": a.depth,
                     "width": a.width, "gflops": round(a.gflops, 3), "params": a.params} for a in plan.anchors],
        "stitches": [{"id": s.id, "front": s.front, "back": s.back, "stage": s.stage, "cut": s.cut,
                      "resume": s.resume, "layer": s.layer, "blocks": s.blocks, "gflops": round(s.gflops, 3),
                      "params": s.params,
                      "route": [list(h) for h in s.route], "layers": list(s.junction_layers),
                      "params_module": s.params_module, "params_paper": s.params_paper}
                     for s in plan.stitch_only],
        "configurations": len(plan.stitches),
        "num_layers": plan.num_layers,
        "settings": plan.settings.to_dict(),
    }


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_cmd)
