"""`snexport evaluate`: top-1, FLOPs and params of every configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from snexport.cli.common import fmt_acc, fmt_params, interruptible, out, print_json


def results_table(results, title: str):
    from rich.table import Table

    t = Table(title=title)
    for col in ("config", "top-1 %", "GFLOPs", "params", "samples"):
        t.add_column(col, justify="left" if col == "config" else "right")
    for r in results:
        is_anchor = ">" not in r.stitch_id
        name = f"[bold]{r.stitch_id}[/] (anchor)" if is_anchor else r.stitch_id
        t.add_row(name, fmt_acc(r.top1), f"{r.gflops:.4f}", fmt_params(r.params), str(r.samples))
    return t


@interruptible(lambda build_dir, **_: f"results so far are kept in {build_dir}/eval.jsonl; re-run `snexport "
               f"evaluate {build_dir}` to evaluate the rest")
def evaluate_cmd(
    build_dir: Annotated[Path, typer.Argument(help="Build directory.")],
    stitches: Annotated[Optional[str], typer.Option(help="Comma-separated configuration ids; default all.")] = None,
    data: Annotated[Optional[str], typer.Option(help="ImageFolder root; default: the build's data.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines' content as one list.")] = False,
):
    """Evaluate configurations into eval.jsonl (resumable: finished ones are skipped).

    Multi-process: `torchrun --standalone --nproc_per_node 2 -m snexport.cli.app evaluate BUILD` splits the
    configurations among the ranks (gloo on CPU, nccl on GPU); rank 0 writes eval.jsonl and prints the table.
    """
    from snexport.buildfiles import require_writable
    from snexport.data.distributed import is_main_process
    from snexport.stitching.store import BuildDir
    from snexport.evaluation.evaluate import evaluate_build

    build = BuildDir(build_dir).require()
    require_writable(build.root, "snexport evaluate")  # results go to eval.jsonl as they come
    ids = [s.strip() for s in stitches.split(",") if s.strip()] if stitches else None
    results = evaluate_build(build, ids, data)
    if not is_main_process():
        return  # every rank holds the same results; one prints them
    if as_json:
        print_json([r.to_dict() for r in results])
        return
    out.print(results_table(results, f"{len(results)} configurations by FLOPs ({results[0].dataset if results else ''})"))
    anchors = [r for r in results if ">" not in r.stitch_id and r.top1 is not None]
    if anchors:
        smallest = min(anchors, key=lambda r: r.gflops)
        below = [r for r in results if ">" in r.stitch_id and r.top1 is not None and r.top1 < smallest.top1]
        out.print(f"{len(below)} of {sum('>' in r.stitch_id for r in results)} stitches are below the smallest "
                  f"anchor ({smallest.stitch_id}, {smallest.top1:.2f}%)")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_cmd)
