"""Datasets: digits split, and ImageFolder layout errors."""

from __future__ import annotations

import numpy as np
import pytest

from snexport.data.digits import digits_arrays
from snexport.errors import DataError


def test_digits_split_is_fixed_and_disjoint():
    tx, ty = digits_arrays("train")
    vx, vy = digits_arrays("val")
    assert tx.shape == (1438, 1, 8, 8) and vx.shape == (359, 1, 8, 8)
    assert abs(float(tx.mean())) < 1e-3  # normalised with train statistics
    assert np.array_equal(digits_arrays("val")[1], vy)
    assert not {a.tobytes() for a in vx[:50]} <= {a.tobytes() for a in tx}
    assert set(np.unique(ty)) == set(range(10))


def test_digits_resized_and_channel_repeated():
    x, _ = digits_arrays("val", (3, 16, 16))
    assert x.shape == (359, 3, 16, 16) and np.array_equal(x[:, 0], x[:, 2])


def _png(path, value):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((10, 10, 3), value, dtype=np.uint8)).save(path)


def test_imagefolder_errors_and_success(tmp_path):
    from snexport.data import open_data

    with pytest.raises(DataError, match="does not exist"):
        open_data(str(tmp_path / "missing"), (3, 8, 8), 10)
    (tmp_path / "ds").mkdir()
    with pytest.raises(DataError, match="no 'train/' directory"):
        open_data(str(tmp_path / "ds"), (3, 8, 8), 10)
    (tmp_path / "ds" / "train").mkdir()
    with pytest.raises(DataError, match="no class directories"):
        open_data(str(tmp_path / "ds"), (3, 8, 8), 10)
    (tmp_path / "ds" / "train" / "cat").mkdir()
    (tmp_path / "ds" / "train" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="holds no images"):
        open_data(str(tmp_path / "ds"), (3, 8, 8), 10)
    for split in ("train", "val"):
        for label, value in (("cat", 10), ("dog", 240)):
            for i in range(3):
                _png(tmp_path / "ds" / split / label / f"{i}.png", value)
    splits = open_data(str(tmp_path / "ds"), (3, 8, 8), 10, batch_size=2)
    x, y = next(iter(splits.val))
    assert tuple(x.shape) == (2, 3, 8, 8) and set(y.tolist()) <= {0, 1}
    with pytest.raises(DataError, match="classes"):
        open_data(str(tmp_path / "ds"), (3, 8, 8), 1)
