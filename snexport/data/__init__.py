"""Datasets: the bundled digits demo set and ImageFolder directories through timm's pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class DataSplits:
    """Loaders for one dataset; `name` goes into eval.jsonl and the manifest as the accuracy source."""

    name: str
    train: Any  # torch DataLoader
    val: Any  # torch DataLoader
    num_classes: int
    train_sampler: Any = None  # DistributedSampler under torchrun, so epochs reshuffle per rank


def open_data(data: str | None, input_shape: tuple, num_classes: int, batch_size: int = 64,
              workers: int = 0, distributed: bool = False) -> DataSplits:
    """`data` is None/'digits' for the bundled set, or an ImageFolder root with train/ and val/."""
    if data in (None, "", "digits"):
        from snexport.data.digits import digits_splits

        return digits_splits(input_shape, batch_size=batch_size, distributed=distributed)
    from snexport.data.imagefolder import imagefolder_splits

    return imagefolder_splits(data, input_shape, num_classes, batch_size=batch_size, workers=workers,
                              distributed=distributed)
