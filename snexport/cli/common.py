"""Shared CLI plumbing: consoles (results on stdout, progress and errors on stderr) and option types."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from typing import Any, Callable, Iterator, Optional

import typer
from rich.console import Console

# Without a terminal (pipes, CI logs) Rich assumes 80 columns and squeezes tables; allow wider output there.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 160)

ANCHORS_HELP = ("Comma-separated anchors: timm names or aliases (deit_ti, deit_s, deit_b, deit3_s/b/l, vit_ti/s/b/l, "
                "swin_ti/s/b, resnet18/34/50/101); shortcuts deit, deit3, swin, resnet. 'demo' (default) is the "
                "bundled tiny ViT family trained on scikit-learn's digits, 'demo_cnn' its tiny-ResNet counterpart.")


# Import name -> the extra that installs it, for the one line a command prints when a package it needs is missing
# (a device-only install has the core and its runtime's extra, nothing of the host toolchain).
EXTRA_OF_MODULE = {
    **dict.fromkeys(("torch", "torchvision", "timm", "safetensors", "sklearn", "onnx", "onnxsim", "onnxslim",
                     "onnxscript", "jsonschema"), "build"),
    "matplotlib": "report", "onnxruntime": "ort", "tensorrt": "tensorrt", "cuda": "tensorrt", "pynvml": "energy",
}


def missing_extra(exc: ModuleNotFoundError) -> Optional[str]:
    """One line naming the extra that installs the missing package, or None when it is none of ours (a bug)."""
    top = (exc.name or "").partition(".")[0]
    extra = EXTRA_OF_MODULE.get(top)
    if extra is None:
        return None
    what = "the host toolchain" if extra == "build" else f"the '{extra}' extra"
    return (f"this command needs {top}, which is not installed here (it comes with {what}); "
            f"pip install 'snexport[{extra}]'")


def print_json(data: Any) -> None:
    # Plain print: Rich would wrap long lines and break the JSON for scripts.
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def fmt_acc(top1) -> str:
    return "unknown" if top1 is None else f"{top1:.2f}"


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


@contextlib.contextmanager
def on_interrupt(message: Callable[[], str]) -> Iterator[None]:
    """Ctrl-C inside: print one line, ``message()``, saying what was kept and how to continue; exit 130.

    Needed in every long command: Typer catches KeyboardInterrupt itself and exits 130 without a word, before
    ``main()``'s handler could say anything.
    """
    try:
        yield
    except KeyboardInterrupt:
        try:
            text = message()
        except Exception:  # noqa: BLE001 - the one line must come out even if the build is in a bad state
            text = "finished work is kept; re-run the same command to continue"
        err.print(f"[red]interrupted[/]: {text}")
        raise typer.Exit(130) from None


def interruptible(message: Callable[..., str]):
    """Decorator form of ``on_interrupt`` for a command: ``message`` gets the command's arguments by name."""
    def decorate(command):
        @functools.wraps(command)
        def run(**kwargs):
            with on_interrupt(lambda: message(**kwargs)):
                return command(**kwargs)
        return run
    return decorate
