"""`snexport export`: one validated ONNX model (and TensorRT engine, on a device) per selected stitch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from snexport.cli.common import err, interruptible, out


@interruptible(lambda build_dir, **_: f"stitches exported so far are kept (listed in {build_dir}/exports.json); "
               f"re-run `snexport export {build_dir}` with the same options to export the rest")
def export_cmd(
    build_dir: Annotated[Path, typer.Argument(help="Build directory.")] = Path("build"),
    stitches: Annotated[str, typer.Option(help="'pareto' (by FLOPs, default), 'all', or comma-separated ids.")] = "pareto",
    opset: Annotated[int, typer.Option(min=17, help="ONNX opset (>= 17 keeps LayerNorm one op).")] = 18,
    simplifier: Annotated[str, typer.Option(help="onnxsim, onnxslim or none.")] = "onnxsim",
    batch: Annotated[int, typer.Option(min=1, help="Static batch size of the exported graphs.")] = 1,
    exporter: Annotated[str, typer.Option(help="auto (dynamo, falling back to TorchScript), dynamo or "
                                          "torchscript.")] = "auto",
    fmt: Annotated[str, typer.Option("--format", help="onnx, or tensorrt (builds engines; needs TensorRT and "
                                     "a GPU).")] = "onnx",
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write FP16 ONNX (LayerNorm/Softmax in FP32), "
                                       "validated on CPU (same as adding fp16 to --precision).")] = False,
    precision: Annotated[Optional[str], typer.Option(help="Precisions of the ONNX files, comma-separated: fp32 "
                                                     "(always), fp16, int8 (static QDQ for ONNX Runtime, calibrated "
                                                     "on the build's calibration images, its top-1 measured on the "
                                                     "validation split). Default: fp32.")] = None,
    target: Annotated[str, typer.Option(help="Device profile for --format tensorrt (precision, workspace).")] = "cuda-gpu",
    pack: Annotated[Optional[bool], typer.Option("--pack/--no-pack", help="Also write a shared-weight pack: every "
                                                 "distinct tensor stored once (default for ONNX Runtime).")] = None,
):
    """Export, simplify and validate each stitch against PyTorch; record every file in exports.json."""
    from snexport.stitching.store import BuildDir
    from snexport.device.tensorrt_build import engines_stage
    from snexport.export.deploy import export_stage, parse_precisions

    precisions = parse_precisions(precision, fp16)  # a typo fails before anything is read
    build = BuildDir(build_dir).require()
    if fmt not in ("onnx", "tensorrt"):
        from snexport.errors import SnexportError

        raise SnexportError(f"--format must be onnx or tensorrt, not {fmt!r}")
    profile = None
    if fmt == "tensorrt":
        from snexport.device.profiles import load_profile

        profile = load_profile(target)
        fp16 = fp16 or profile.precision == "fp16"
    pack = (fmt == "onnx") if pack is None else pack
    precisions = parse_precisions(precisions, fp16)  # --format tensorrt may have turned fp16 on
    arts = export_stage(build, stitches, opset=opset, simplifier=simplifier, batch=batch, exporter=exporter, fp16=fp16,
                        pack=pack, profile=profile, precisions=precisions)
    from rich.table import Table

    t = Table(title=f"{len(arts)} ONNX files in {build.engines_dir}")
    for c in ("stitch", "precision", "MB", "max abs err", "rel err", "cosine", "top-1 agree", "TensorRT ops"):
        t.add_column(c, justify="left" if c == "stitch" else "right")
    for a in arts:
        v = a.validation
        trt = v.get("tensorrt_compat") or {}
        t.add_row(a.stitch_id, a.precision, f"{a.size_bytes / 1e6:.2f}", f"{v.get('max_abs', float('nan')):.2e}",
                  f"{v.get('rel_max_abs', float('nan')):.2e}", f"{v.get('cosine', float('nan')):.6f}",
                  f"{v.get('top1_agreement', float('nan')):.3f}", "ok" if trt.get("ok", True) else "UNSUPPORTED")
    out.print(t)
    if fmt == "tensorrt":
        engines = engines_stage(build, profile)
        out.print(f"{len(engines)} TensorRT engines built ({profile.precision}) in {build.engines_dir}")
    else:
        if pack:
            from snexport.device.pack import read_pack_index

            for precision, w in (read_pack_index(build.root) or {}).get("weights", {}).items():
                out.print(f"pack ({precision}): {w}")
        err.print("next: `snexport bench " + str(build.root) + "` profiles them on this machine")


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)
