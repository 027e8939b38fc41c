"""Data: the built-in shapes, image folders, and augmentation that is a function of
(seed, epoch, index) so resumed runs see the same images."""
import numpy as np
import pytest
import torch
from PIL import Image

from mae.data import (
    SHAPE_CLASSES,
    ImageFolderDataset,
    ShapesDataset,
    build_dataset,
    collate_skipping,
    denormalize,
)


def test_shapes_are_deterministic_and_labelled():
    a, b = ShapesDataset(32, train=True, length=20), ShapesDataset(32, train=True, length=20)
    for i in (0, 7, 19):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == i % len(SHAPE_CLASSES)
    a.set_epoch(1)
    assert not torch.equal(a[3][0], b[3][0])  # a new epoch draws new crops
    val = ShapesDataset(32, train=False, length=20)
    assert not torch.equal(val[3][0], ShapesDataset(32, train=False, split="train")[3][0])
    x = val[0][0]
    assert x.shape == (3, 32, 32) and 0 <= denormalize(x).min() and denormalize(x).max() <= 1


def test_non_square_size():
    x, _ = ShapesDataset((24, 40), length=4)[0]
    assert x.shape == (3, 24, 40)


def test_flat_image_folder_and_splits(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((10, 12, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, 8, train=True)
    assert len(ds) == 3 and ds.classes == ["images"]
    assert ds[1][0].shape == (3, 8, 8)
    assert len(build_dataset(tmp_path, 8, "val", augment=False, required=False)) == 3
    # a labelled split (probing, fine-tuning) is never silently the training images
    with pytest.raises(FileNotFoundError, match="no 'val' split"):
        build_dataset(tmp_path, 8, "val", augment=False)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data-path"):
        ImageFolderDataset(tmp_path / "nope", 8)
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderDataset(tmp_path, 8)


def test_collate_counts_skipped():
    item = (torch.zeros(3, 4, 4), 1)
    imgs, labels, skipped = collate_skipping([item, None, item])
    assert imgs.shape == (2, 3, 4, 4) and labels.tolist() == [1, 1] and skipped == 1
    assert collate_skipping([None]) == (None, None, 1)
