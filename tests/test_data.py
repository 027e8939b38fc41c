"""Data: the built-in shapes, image folders, and augmentation that is a function of
(seed, epoch, index) so resumed runs see the same images."""
import numpy as np
import pytest
import torch
from PIL import Image

from mae.cli import main
from mae.data.images import (
    SHAPE_CLASSES,
    ImageFolderDataset,
    ShapesDataset,
    build_dataset,
    collate_skipping,
    denormalize,
    to_rgb,
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


def test_16_bit_png_loads_at_its_grey_level(tmp_path):
    """`convert("RGB")` clips 16-bit values at 255: mid-grey loaded as white."""
    grey = np.full((12, 10), 128 * 257, np.uint16)
    grey[0, 0] = 65535
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    x, _ = ImageFolderDataset(tmp_path, 8, train=False)[0]
    pixels = denormalize(x) * 255
    torch.testing.assert_close(pixels.median(), torch.tensor(128.0), atol=0.5, rtol=0)
    # the other integer modes Pillow opens 16-bit images in
    big_endian = Image.frombytes("I;16B", (10, 12), grey.astype(">u2").tobytes())
    for img in (big_endian, Image.fromarray(grey).convert("I")):
        rgb = np.asarray(to_rgb(img))
        assert rgb.shape == (12, 10, 3) and rgb[0, 0].tolist() == [255] * 3, img.mode
        assert (rgb[1:] == 128).all(), img.mode
    eight_bit = Image.fromarray(np.full((4, 4), 77, np.uint8))
    assert (np.asarray(to_rgb(eight_bit)) == 77).all()


def test_empty_class_folder_is_an_error(tmp_path):
    """As torchvision's ImageFolder: a class without images is not silently a class."""
    for name in ("cat", "dog"):
        (tmp_path / "train" / name).mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / "cat" / "a.png")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match="no valid file for the classes dog under .*train"):
        ImageFolderDataset(tmp_path, 8)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / "dog" / "b.png")
    assert ImageFolderDataset(tmp_path, 8).classes == ["cat", "dog"]


def test_pretrain_on_only_unreadable_files_is_an_error(tmp_path, capsys):
    """Every image skipped: the epoch trained on nothing, so no "loss 0.0000" run and no
    checkpoint of an untrained model."""
    data = tmp_path / "data"
    data.mkdir()
    for k in range(4):
        (data / f"{k}.jpg").write_bytes(b"not a jpeg")
    config = tmp_path / "tiny.yaml"
    config.write_text("encoder_dim: 32\nencoder_layers: 1\ndecoder_dim: 32\ndecoder_layers: 1\n")
    out = tmp_path / "out"
    with pytest.warns(RuntimeWarning, match="unreadable image"):
        code = main(["pretrain", "--data-path", str(data), "--config", str(config),
                     "--input-size", "16", "--patch-size", "8", "--epochs", "1",
                     "--batch-size", "2", "--num-workers", "0", "--quiet", "--device", "cpu",
                     "--output-dir", str(out)])
    assert code == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert f"all 4 files it drew from --data-path {data} were unreadable" in errors[0]
    assert not list(out.glob("checkpoint*"))
