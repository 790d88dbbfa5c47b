"""`snexport train`: joint fine-tuning of a build's SN-Net (also under torchrun)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from snexport.cli.common import on_interrupt, out


def train_cmd(
    build_dir: Annotated[Path, typer.Argument(help="Build directory made by `snexport stitch`.")],
    epochs: Annotated[int, typer.Option(min=1, help="Epochs in the whole schedule.")] = 3,
    batch_size: Annotated[int, typer.Option(min=1, help="Per-process batch size.")] = 64,
    lr: Annotated[float, typer.Option(help="Learning rate of the stitching layers.")] = 1e-3,
    anchor_lr_scale: Annotated[float, typer.Option(help="Anchors' learning rate as a fraction of --lr.")] = 0.1,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.05,
    warmup_epochs: Annotated[float, typer.Option(help="Linear warm-up before the cosine decay.")] = 0.5,
    sampling: Annotated[str, typer.Option(help="'uniform' (SN-Net), 'flops' (SN-Netv2 FLOPs-grouped) or 'auto': "
                                          "'flops' for two-way (SN-Netv2) plans, else 'uniform'.")] = "auto",
    flops_sampling_k: Annotated[Optional[float], typer.Option(help="SN-Netv2 flops_sampling_k: group i (ascending "
                                                              "FLOPs) drawn with weight i/k + 1/G; default uniform "
                                                              "over groups.")] = None,
    distill: Annotated[str, typer.Option(help="Hard distillation teacher: 'largest' anchor, or an anchor name; "
                                         "empty for none.")] = "",
    data: Annotated[Optional[str], typer.Option(help="ImageFolder root; default: the build's data.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run after its last "
                                         "finished epoch.")] = False,
    restart: Annotated[bool, typer.Option("--restart", help="Discard training so far; start again from the "
                                          "least-squares init.")] = False,
    seed: Annotated[int, typer.Option(help="Seed for sampling and data order.")] = 0,
):
    """Fine-tune all configurations jointly, one sampled configuration per step; checkpoint every epoch.

    Multi-process: `torchrun --nproc_per_node 2 -m snexport.cli.app train BUILD` (gloo on CPU, nccl on GPU).
    """
    from snexport.stitching.store import BuildDir
    from snexport.training.train import TrainSettings, train_build

    build = BuildDir(build_dir).require()
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr, anchor_lr_scale=anchor_lr_scale,
                             weight_decay=weight_decay, warmup_epochs=warmup_epochs, sampling=sampling,
                             flops_sampling_k=flops_sampling_k, distill=distill, seed=seed, data=data or "")
    with on_interrupt(_interrupted(build, restart)):
        summary = train_build(build, settings, resume=resume, restart=restart, log=out.print)
    if summary["history"]:
        last = summary["history"][-1]
        out.print(f"trained epochs {summary['epochs_done']}/{summary['epochs_total']} on {summary['world_size']} "
                  f"process(es) in {summary['seconds']} s; last loss {last['loss']:.4f}")
    else:
        out.print(f"nothing to train: {summary['epochs_done']}/{summary['epochs_total']} epochs already done")


def _interrupted(build, restart: bool):
    """The line Ctrl-C prints: what training is on disk now, and the command that continues it."""
    from snexport import buildfiles as files
    from snexport.training.train import checkpoint_epochs

    state = build.path(files.TRAIN_STATE)
    before = state.stat().st_mtime_ns if state.is_file() else None

    def message() -> str:
        now = state.stat().st_mtime_ns if state.is_file() else None
        if restart and now == before:
            return (f"the restart had not finished an epoch, so the previous training in {build.root} is kept as it "
                    f"was; run `snexport train {build.root} --restart` again")
        done = checkpoint_epochs(build)
        if not done:
            return f"no epoch had finished, nothing was changed; run `snexport train {build.root}` again"
        return f"{done} finished epoch(s) are kept; continue with `snexport train {build.root} --resume`"

    return message


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)
