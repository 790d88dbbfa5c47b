"""`snexport build`: anchors → SN-Net → evaluation → Pareto → export → profile → manifest, in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from snexport.cli.common import ANCHORS_HELP, interruptible, out
from snexport.cli.cmd_stitch import (WEIGHTS_HELP, FinalNormOption, LoraRankOption, ParamsOption, TwoWayOption,
                                     plan_settings)


@interruptible(lambda out_dir, **_: f"finished stages are kept in {out_dir}; re-run the same `snexport build` "
               "command to continue from where it stopped")
def build_cmd(
    anchors: Annotated[Optional[str], typer.Option("--anchors", "-a", help=ANCHORS_HELP)] = None,
    target: Annotated[Optional[str], typer.Option(help="Device profile (jetson-orin, jetson-orin-nx, "
                                                  "jetson-orin-nano, x86-cpu, cuda-gpu) or a TOML path; default: "
                                                  "this machine.")] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Build directory.")] = Path("build"),
    data: Annotated[Optional[str], typer.Option(help="ImageFolder root (train/, val/); the demo uses digits.")] = None,
    epochs: Annotated[Optional[int], typer.Option(min=0, help="Fine-tuning epochs (default: 30 for the demo, 10 "
                                                  "for demo_cnn, 5 with --data, 0 without).")] = None,
    weights: Annotated[Optional[list[str]], typer.Option("--weights", "-w", help=WEIGHTS_HELP)] = None,
    random_init: Annotated[bool, typer.Option("--random-init", help="Random anchor weights (architecture-only: "
                                              "latency and memory; accuracy unknown).")] = False,
    stitches: Annotated[str, typer.Option(help="What to export: 'pareto', 'all', or ids.")] = "pareto",
    precision: Annotated[Optional[str], typer.Option(help="Precisions of the exported engines, comma-separated "
                                                     "(fp32, fp16, int8). int8 (ONNX Runtime targets): a static "
                                                     "int8 engine per stitch beside the FP32 one, with its own "
                                                     "measured top-1 and latency. Default: the target's.")] = None,
    nearest: Annotated[bool, typer.Option("--nearest/--no-nearest", help="Only stitch adjacent anchors.")] = True,
    two_way: TwoWayOption = False,
    lora_rank: LoraRankOption = 0,
    final_norm: FinalNormOption = True,
    params: ParamsOption = "module",
):
    """Run every stage in order, skipping those whose inputs are unchanged; end with the selector switching."""
    from snexport.families.registry import parse_weights_option, split_anchor_names
    from snexport.device.runtime.backends import default_target
    from snexport.device.report import write_report
    from snexport.export.deploy import parse_precisions
    from snexport.pipeline.run import BuildOptions, run_build, selector_demo

    opts = BuildOptions(out=out_dir, anchors=split_anchor_names(anchors), target=target or default_target(),
                        weights=parse_weights_option(weights), random_init=random_init, data=data, epochs=epochs,
                        stitches=stitches, precisions=parse_precisions(precision) if precision else None,
                        settings=plan_settings(nearest=nearest, two_way=two_way, lora_rank=lora_rank,
                                               final_norm=final_norm, params=params))
    result = run_build(opts, say=out.print)
    build = result["build"]
    report = write_report(build, result["manifest"], result.get("device_key"))
    if result["profiled"]:
        from snexport.cli.cmd_bench import show_measurements

        out.print(show_measurements(result["bench"], f"Engines on {result['device_key']}"))
        out.print("Selector (the part an edge app embeds), switching as the latency budget moves:")
        selector_demo(build, say=out.print)
    out.print(f"manifest: {build.manifest_path}\n{report['note']}")


def register(app: typer.Typer) -> None:
    app.command("build")(build_cmd)
