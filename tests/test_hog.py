"""hog_targets against the reference, against scikit-image's `hog` where the conventions
coincide (one channel, patch = cell, L2 norm), and on hand-made edges; only masked patches
computed; the HOG loss and `mae pretrain --target hog`."""
import numpy as np
import pytest
import torch

import mae_kernels as mk
from mae import MAE
from mae.cli import main
from mae_kernels import reference as ref

from .utils import DTYPES

# the kernel reads every dtype as float32: each dtype once, the geometries in float32
GEOMETRIES = [(3, 16, 16, 8, 8, 9), (1, 32, 16, 16, 8, 9), (2, 12, 24, 12, 4, 6),
              (3, 8, 8, 8, 2, 2)]
HOG_CASES = [(torch.float32, *g) for g in GEOMETRIES] + [(d, *GEOMETRIES[0]) for d in DTYPES[1:]]


@pytest.mark.parametrize("dtype,C,H,W,p,cell,bins", HOG_CASES)
def test_hog_matches_the_reference(implementation, dtype, C, H, W, p, cell, bins):
    imgs = torch.randn(2, C, H, W).to(dtype)
    L = (H // p) * (W // p)
    mask = (torch.rand(2, L) > 0.4).float()
    mask[0, 0] = 1
    want = ref.hog_targets(imgs, p, bins, cell)
    got = mk.hog_targets(imgs, p, bins, cell, mask)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want * mask[..., None], rtol=1e-5, atol=1e-6)
    wide = torch.empty(2, C, H, 2 * W, dtype=dtype)
    wide[..., ::2] = imgs
    torch.testing.assert_close(mk.hog_targets(wide[..., ::2], p, bins, cell), want,
                               rtol=1e-5, atol=1e-6)


def test_hog_is_scikit_image_hog_where_conventions_coincide():
    skimage_hog = pytest.importorskip("skimage.feature").hog
    img = torch.rand(1, 1, 40, 24, dtype=torch.float64)
    want = skimage_hog(img[0, 0].numpy(), orientations=9, pixels_per_cell=(8, 8),
                       cells_per_block=(1, 1), block_norm="L2", feature_vector=True)
    got = ref.hog_targets(img, 8, 9, 8)
    np.testing.assert_allclose(got.flatten().numpy(), want, rtol=1e-4, atol=1e-6)


def test_hog_of_edges(implementation):
    """A vertical edge has a horizontal gradient: orientation 0, bin 0; a horizontal edge is at
    90 degrees: bin 4 of 9 (80-100 degrees). Each patch's vector has unit norm."""
    imgs = torch.zeros(2, 1, 8, 8)
    imgs[0, :, :, 4:] = 1.0
    imgs[1, :, 4:, :] = 1.0
    hog = mk.hog_targets(imgs, 8)
    assert hog.shape == (2, 1, 9)
    assert hog[0, 0].argmax() == 0 and hog[1, 0].argmax() == 4
    torch.testing.assert_close(hog.norm(dim=-1), torch.ones(2, 1))
    assert hog[0, 0, 1:].abs().max() == 0


def test_hog_loss_matches_the_reference_and_trains(implementation):
    imgs = torch.randn(2, 3, 16, 16)
    pred = torch.randn(2, 4, 27, requires_grad=True)
    mask = torch.tensor([[1.0, 0, 1, 1], [0, 1, 0, 1]])
    got = mk.mae_loss(imgs, pred, mask, 8, target="hog")
    want = ref.hog_loss(imgs, pred.detach(), mask, 8)
    torch.testing.assert_close(got, want)
    got.backward()
    assert pred.grad[0, 1].abs().max() == 0 and pred.grad[0, 0].abs().max() > 0


@pytest.mark.parametrize("call,error,argument", [
    (lambda: mk.hog_targets(torch.randn(1, 3, 16, 16), 8, cell=3), ValueError, "cell"),
    (lambda: mk.hog_targets(torch.randn(1, 3, 16, 16), 8, bins=1), ValueError, "bins"),
    (lambda: mk.hog_targets(torch.randn(1, 3, 16, 16), 8, mask=torch.ones(1, 3)), ValueError,
     "mask"),
    (lambda: mk.hog_targets(torch.randn(3, 16, 16), 8), ValueError, "imgs"),
    (lambda: mk.mae_loss(torch.randn(1, 3, 16, 16), torch.randn(1, 4, 48), torch.ones(1, 4), 8,
                         target="hog"), ValueError, "pred"),
    (lambda: mk.mae_loss(torch.randn(1, 3, 16, 16), torch.randn(1, 4, 27), torch.ones(1, 4), 8,
                         target="sift"), ValueError, "target"),
    (lambda: MAE({"patch_size": 12, "img_size": 24, "target": "hog"}), ValueError, "target"),
])
def test_hog_bad_input_names_the_argument(call, error, argument):
    with pytest.raises(error, match=argument):
        call()


def test_pretrain_with_hog_targets(tmp_path):
    assert main(["pretrain", "--target", "hog", "--epochs", "1", "--dataset-size", "32",
                 "--batch-size", "16", "--num-workers", "0", "--quiet", "--device", "cpu",
                 "--output-dir", str(tmp_path)]) == 0
    assert (tmp_path / "checkpoint-last.pth").exists()
    assert not list(tmp_path.glob("reconstruction-*.png"))  # HOG is not a picture
    assert main(["linprobe", "--checkpoint", str(tmp_path / "checkpoint-last.pth"),
                 "--epochs", "1", "--train-size", "32", "--val-size", "16",
                 "--device", "cpu", "--quiet"]) == 0
