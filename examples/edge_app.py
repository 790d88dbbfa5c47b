"""A minimal on-device app: classify a stream of images while the latency budget changes.

Uses only the selector and a manifest (plus numpy for the images), as an app on a Jetson or an x86 box would:

    python examples/edge_app.py BUILD/manifest.json [--images X.npy [--labels Y.npy]] [--steps 200]

Halfway through, the budget tightens (as when the app starts sharing the device, or the battery gets low) and
the selector switches to a faster engine. Without --images it feeds random inputs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np

from snexport.errors import SnexportError
from snexport.device.selector import FeedbackConfig, Selector


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("manifest", help="manifest.json (or the build directory holding it)")
    p.add_argument("--images", help=".npy of float32 images, (N, C, H, W) or (N, H, W), already normalised")
    p.add_argument("--labels", help=".npy of integer labels for --images; prints top-1 at the end")
    p.add_argument("--steps", type=int, default=100, help="inferences to run (default 100)")
    p.add_argument("--budget-ms", type=float, help="first latency budget (default: the slowest engine fits)")
    p.add_argument("--then-budget-ms", type=float, help="budget from halfway on (default: only the fastest fits)")
    p.add_argument("--memory-mb", type=float, help="memory budget for the engine")
    p.add_argument("--mode", choices=["preload", "on_demand"], default="preload")
    p.add_argument("--feedback", action="store_true", help="step down/up on measured latency (closed loop)")
    p.add_argument("--device", help="device key in the manifest (default: the latest measured)")
    return p.parse_args(argv)


def load_images(args: argparse.Namespace, input_shape: tuple, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    per_image = tuple(input_shape[1:])
    if not args.images:
        return np.random.RandomState(0).randn(16, *per_image).astype(dtype), None
    images = np.load(args.images)
    if images.ndim == len(per_image):  # (N, H, W) for a one-channel model
        images = images[:, None]
    if tuple(images.shape[1:]) != per_image:
        raise SystemExit(f"error: images are {images.shape[1:]} but the engines take {per_image}")
    labels = np.load(args.labels) if args.labels else None
    return images.astype(dtype), labels


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    feedback = FeedbackConfig() if args.feedback else None
    with Selector(args.manifest, device=args.device, mode=args.mode, feedback=feedback,
                  on_switch=lambda e: print(f"switch {e.from_id} -> {e.to_id} ({e.reason}, load {e.load_ms:.1f} ms)")
                  ) as sel:
        engines = sel.engines  # fastest first, as profiled on this device
        first = args.budget_ms if args.budget_ms is not None else engines[-1].latency_ms
        second = args.then_budget_ms if args.then_budget_ms is not None else engines[0].latency_ms * 1.05
        print(f"device {sel.device}: {len(engines)} engines, {sel.percentile} "
              f"{engines[0].latency_ms:.3f}..{engines[-1].latency_ms:.3f} ms")
        info = images = labels = None
        correct = 0
        for step in range(args.steps):
            if step in (0, args.steps // 2):
                budget = first if step == 0 else second
                info = sel.set_budget(latency_ms=budget, memory_mb=args.memory_mb)
                print(f"budget {budget:.3f} ms -> {info.id} ({sel.percentile} {info.latency_ms:.3f} ms, "
                      f"top-1 {info.top1 if info.top1 is not None else 'unknown'})")
            if images is None:
                images, labels = load_images(args, info.input_shape, info.input_dtype)
            i = step % len(images)
            started = time.perf_counter()
            logits = sel.run(images[i : i + 1])
            elapsed = (time.perf_counter() - started) * 1000
            pred = int(np.argmax(logits))
            correct += labels is not None and pred == int(labels[i])
            print(f"step {step:4d} engine {sel.active.id} latency {elapsed:.3f} ms class {pred}")
        if labels is not None:
            print(f"top-1 over {args.steps} images: {100.0 * correct / args.steps:.1f}%")
        reasons = [e.reason for e in sel.events]
        print(f"switches: {len(reasons) - 1} ({', '.join(reasons[1:]) or 'none'})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except SnexportError as exc:  # expected failures: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
