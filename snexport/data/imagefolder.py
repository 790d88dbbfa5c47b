"""ImageFolder datasets (root/train/<class>/*.jpg, root/val/<class>/*.jpg) through timm's data pipeline."""

from __future__ import annotations

from pathlib import Path

from snexport.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def check_imagefolder(root: Path, split: str) -> Path:
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(
            f"{root} is not an ImageFolder dataset: no '{split}/' directory; expected {root}/{split}/<class>/<image>"
        )
    classes = [d for d in split_dir.iterdir() if d.is_dir()]
    if not classes:
        raise DataError(f"{split_dir} has no class directories; expected {split_dir}/<class>/<image>")
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for d in classes for p in d.iterdir()):
        raise DataError(f"{split_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); check the path")
    return split_dir


def imagefolder_splits(root: str, input_shape: tuple, num_classes: int, batch_size: int = 64, workers: int = 0,
                       distributed: bool = False):
    import torch
    from timm.data import create_dataset, create_transform

    from snexport.data import DataSplits

    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DataError(f"data directory {root_path} does not exist; pass an ImageFolder root with train/ and val/")
    train_dir = check_imagefolder(root_path, "train")
    val_dir = check_imagefolder(root_path, "val")
    size = tuple(input_shape)
    train_ds = create_dataset("", root=str(train_dir), is_training=True)
    val_ds = create_dataset("", root=str(val_dir), is_training=False)
    found = len({label for _, label in getattr(train_ds.reader, "samples", [])}) or None
    if found is not None and found > num_classes:
        raise DataError(f"{train_dir} has {found} classes but the anchors' heads have {num_classes}")
    # Standard ImageNet eval/train transforms at the anchors' input size (DeiT recipe, without mixup).
    train_ds.transform = create_transform(size, is_training=True, auto_augment="rand-m9-mstd0.5-inc1")
    val_ds.transform = create_transform(size, is_training=False)
    sampler = None
    if distributed:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(train_ds, shuffle=True)
    train = torch.utils.data.DataLoader(train_ds, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                                        num_workers=workers, drop_last=True)
    val = torch.utils.data.DataLoader(val_ds, batch_size=batch_size, shuffle=False, num_workers=workers)
    return DataSplits(f"imagefolder:{val_dir}", train, val, num_classes, sampler)
