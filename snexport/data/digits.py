"""scikit-learn's bundled digits (1797 8x8 grayscale images, 10 classes): the demo and test dataset.

It ships inside the scikit-learn package, so it works offline. The split is fixed (seeded), 80/20.
"""

from __future__ import annotations

import numpy as np

from snexport.errors import DataError

SPLIT_SEED = 0
TRAIN_FRACTION = 0.8


def digits_arrays(split: str, input_shape: tuple = (1, 8, 8)) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 (N, C, H, W) normalised with train-split statistics, labels int64)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0
    labels = bunch.target.astype(np.int64)
    order = np.random.RandomState(SPLIT_SEED).permutation(len(images))
    n_train = int(round(TRAIN_FRACTION * len(images)))
    idx = order[:n_train] if split == "train" else order[n_train:]
    mean, std = images[order[:n_train]].mean(), images[order[:n_train]].std()
    x = (images[idx] - mean) / std
    c, h, w = input_shape
    x = x[:, None]
    if (h, w) != (8, 8):
        import torch

        x = torch.nn.functional.interpolate(torch.from_numpy(x), size=(h, w), mode="bilinear",
                                            align_corners=False).numpy()
    if c != 1:
        x = np.repeat(x, c, axis=1)
    return np.ascontiguousarray(x, dtype=np.float32), labels[idx]


def digits_splits(input_shape: tuple, batch_size: int = 64, distributed: bool = False):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from snexport.data import DataSplits

    if input_shape[1] < 8 or input_shape[2] < 8:
        raise DataError(f"the digits set is 8x8; anchors with input {input_shape} cannot use it; pass --data DIR")
    tx, ty = digits_arrays("train", input_shape)
    vx, vy = digits_arrays("val", input_shape)
    train_ds = TensorDataset(torch.from_numpy(tx), torch.from_numpy(ty))
    val_ds = TensorDataset(torch.from_numpy(vx), torch.from_numpy(vy))
    sampler = None
    if distributed:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(train_ds, shuffle=True, seed=SPLIT_SEED)
    train = DataLoader(train_ds, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, drop_last=False)
    val = DataLoader(val_ds, batch_size=256, shuffle=False)
    return DataSplits("digits:val", train, val, 10, sampler)
