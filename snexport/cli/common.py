"""Shared CLI plumbing: consoles (results on stdout, progress and errors on stderr) and option types."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

# Without a terminal (pipes, CI logs) Rich assumes 80 columns and squeezes tables; allow wider output there.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 160)

ANCHORS_HELP = ("Comma-separated anchors: timm names or aliases (deit_ti, deit_s, deit_b, deit3_s/b/l, vit_ti/s/b/l); "
                "'demo' (default) is the bundled tiny family trained on scikit-learn's digits.")


def print_json(data: Any) -> None:
    # Plain print: Rich would wrap long lines and break the JSON for scripts.
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def fmt_acc(top1) -> str:
    return "unknown" if top1 is None else f"{top1:.2f}"


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"
