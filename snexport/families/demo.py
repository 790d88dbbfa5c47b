"""The bundled demo family: three tiny ViTs trained on the digits set on first use, then cached.

The cache key covers every setting that changes the weights (architecture, recipe, data split), so a changed
recipe trains anew and an unchanged one starts at once. Cache root: $SNEXPORT_CACHE or ~/.cache/snexport.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

# The bundled demo family: tiny ViTs on 8x8 digits, patch 2 -> 16 patches + cls = 17 tokens, depth 6.
# Widths 16/32/64 give a real accuracy ladder with gaps to stitch across (measured on 2 cores, 20 epochs:
# ~72/82/90% val top-1 in ~5/7/15 s). Width 128 reached only ~92% at 3-6x the training time, so it was dropped.
DEMO_FAMILY = ("demo_s", "demo_m", "demo_l")
_DEMO_BASE = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, depth=6, num_heads=2)
DEMO_KWARGS: dict[str, dict] = {
    "demo_s": dict(_DEMO_BASE, embed_dim=16),
    "demo_m": dict(_DEMO_BASE, embed_dim=32),
    "demo_l": dict(_DEMO_BASE, embed_dim=64),
}
DEMO_TIMM_NAME = "vit_tiny_patch16_224"  # only the architecture class; every size field is overridden


def is_demo_family(names) -> bool:
    """True when every anchor is a bundled demo anchor (digits data, demo training recipe)."""
    names = list(names)
    return bool(names) and all(n in DEMO_KWARGS for n in names)

# Per-anchor accuracy and time are written next to the weights (<name>-<key>.json) and shown by the demo.
DEMO_RECIPE = {"epochs": 20, "batch_size": 64, "lr": 2e-3, "weight_decay": 0.05, "warmup_fraction": 0.1,
               "label_smoothing": 0.1, "seed": 0, "version": 2}
# Per-anchor overrides, chosen from a sweep on 2 cores (val top-1, train time on one thread):
# w16 lr 2e-3 20 ep -> 72%, 5 s; w32 lr 1e-3 20 ep -> 82%, 7 s; w64 lr 1e-3 30 ep -> 90%, 22 s.
# With one shared recipe the larger anchors under-train and the ladder inverts (w32 92% > w64 89%).
DEMO_OVERRIDES = {"demo_s": {}, "demo_m": {"lr": 1e-3}, "demo_l": {"lr": 1e-3, "epochs": 30}}


def demo_recipe(name: str) -> dict:
    return dict(DEMO_RECIPE, **DEMO_OVERRIDES[name])


def cache_root() -> Path:
    return Path(os.environ.get("SNEXPORT_CACHE", Path.home() / ".cache" / "snexport")).expanduser()


def demo_key(name: str) -> str:
    from snexport.data.digits import SPLIT_SEED, TRAIN_FRACTION

    blob = json.dumps({"name": name, "timm": DEMO_TIMM_NAME, "kwargs": DEMO_KWARGS[name], "recipe": demo_recipe(name),
                       "split": [SPLIT_SEED, TRAIN_FRACTION]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def demo_weights_path(name: str, train_if_missing: bool = True) -> Path:
    path = cache_root() / "demo" / f"{name}-{demo_key(name)}.safetensors"
    if not path.is_file() and train_if_missing:
        train_demo_anchor(name, path)
    return path


def train_demo_anchor(name: str, path: Path, show_progress: bool = True) -> float:
    """Train one demo anchor from scratch on the digits train split; returns val top-1 (%)."""
    import timm
    import torch
    from safetensors.torch import save_file

    from snexport.data.digits import digits_splits
    from snexport.hashing import atomic_path, atomic_write_json
    from snexport.progress import progress_task
    from snexport.families.schedule import cosine_with_warmup

    r = demo_recipe(name)
    torch.manual_seed(r["seed"])
    kwargs = DEMO_KWARGS[name]
    model = timm.create_model(DEMO_TIMM_NAME, pretrained=False, **kwargs)
    data = digits_splits((kwargs["in_chans"], kwargs["img_size"], kwargs["img_size"]), batch_size=r["batch_size"])
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    steps = r["epochs"] * len(data.train)
    sched = cosine_with_warmup(opt, steps, int(r["warmup_fraction"] * steps))
    started = time.perf_counter()
    with progress_task(f"training demo anchor {name} (first run only)", steps, show_progress) as advance:
        for _ in range(r["epochs"]):
            model.train()
            for x, y in data.train:
                loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=r["label_smoothing"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                advance()
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for x, y in data.val:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    top1 = 100.0 * correct / total
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
                  metadata={"name": name, "val_top1": f"{top1:.2f}"})
    atomic_write_json(path.with_suffix(".json"), {"name": name, "val_top1": top1, "recipe": r,
                                                  "train_seconds": round(time.perf_counter() - started, 1)})
    return top1
