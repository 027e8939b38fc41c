"""hog_targets against an independent transcription of MaskFeat's HOG (SlowFast's `HOGLayerC`
and `_get_hog_label_2d`), against the reference, and on hand-made edges; only masked patches
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


def _maskfeat_hog(imgs: torch.Tensor, patch_size: int, bins: int = 9, cell: int = 8):
    """MaskFeat's HOG target written out in NumPy float64 from SlowFast's code:
    `HOGLayerC(nbins=bins, pool=cell)` (gaussian_window=0, as MaskFeat builds it) then
    `_get_hog_label_2d`'s unfolds."""
    x = imgs.double().numpy()
    B, C, H, W = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    weight_x = np.array([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    weight_y = weight_x.T
    gx, gy = np.zeros_like(x), np.zeros_like(x)
    for i in range(3):  # F.conv2d (a cross-correlation), one group per channel
        for j in range(3):
            gx += weight_x[i, j] * padded[:, :, i:i + H, j:j + W]
            gy += weight_y[i, j] * padded[:, :, i:i + H, j:j + W]
    norm_rgb = np.sqrt(gx**2 + gy**2)
    phase = np.arctan2(gx, gy) / np.pi * bins
    out = np.zeros((B, C, bins, H, W))
    b, c, y, xx = np.indices((B, C, H, W))
    np.add.at(out, (b, c, np.floor(phase).astype(np.int64) % bins, y, xx), norm_rgb)
    out = out.reshape(B, C, bins, H // cell, cell, W // cell, cell).sum(axis=(4, 6))
    out = out / np.maximum(np.linalg.norm(out, axis=2, keepdims=True), 1e-12)
    # _get_hog_label_2d: flatten(1, 2), permute(0, 2, 3, 1), unfold rows and cols by k, flatten
    k = patch_size // cell
    hog = out.reshape(B, C * bins, H // cell, W // cell).transpose(0, 2, 3, 1)
    hog = hog.reshape(B, H // patch_size, k, W // patch_size, k, C * bins)
    hog = hog.transpose(0, 1, 3, 5, 2, 4)
    return torch.from_numpy(hog.reshape(B, -1, C * bins * k * k))


@pytest.mark.parametrize("C,H,W,p,cell,bins", GEOMETRIES)
def test_reference_is_maskfeats_hog(C, H, W, p, cell, bins):
    imgs = torch.randn(2, C, H, W)
    want = _maskfeat_hog(imgs, p, bins, cell)
    torch.testing.assert_close(ref.hog_targets(imgs, p, bins, cell).double(), want, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("dtype,C,H,W,p,cell,bins", HOG_CASES)
def test_hog_is_maskfeats_hog(implementation, dtype, C, H, W, p, cell, bins):
    imgs = torch.randn(2, C, H, W).to(dtype)
    L = (H // p) * (W // p)
    mask = (torch.rand(2, L) > 0.4).float()
    mask[0, 0] = 1
    want = _maskfeat_hog(imgs, p, bins, cell).float()
    got = mk.hog_targets(imgs, p, bins, cell, mask)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want * mask[..., None], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, ref.hog_targets(imgs, p, bins, cell) * mask[..., None],
                               rtol=1e-5, atol=1e-6)
    wide = torch.empty(2, C, H, 2 * W, dtype=dtype)
    wide[..., ::2] = imgs
    torch.testing.assert_close(mk.hog_targets(wide[..., ::2], p, bins, cell), want, rtol=1e-5,
                               atol=1e-5)


def test_hog_of_edges(implementation):
    """MaskFeat's conventions, cell by cell ((channel, bin, cell row, cell col) per patch):
    gx is left minus right, gy top minus bottom, the bin floor(atan2(gx, gy) / pi * 9) mod 9.
    A vertical edge (gx < 0, gy = 0: -pi/2) is bin 4, a horizontal one (gx = 0: pi) bin 0;
    x - y rising (gx < 0 < gy: -pi/4) bin 6, x + y (gx, gy < 0: -3pi/4) bin 2. A flat cell is
    zero, the others have unit norm."""
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    imgs = torch.stack([(xs >= 8).float(), (ys >= 8).float(), xs - ys, xs + ys,
                        torch.zeros(16, 16)])[:, None]
    imgs[4, 0, 2:6, 2:6] = 1.0  # a square inside the top-left cell only
    cells = mk.hog_targets(imgs, 16, 9, 8).view(5, 9, 2, 2)
    assert cells[:4].argmax(dim=1).tolist() == [[[b, b], [b, b]] for b in (4, 0, 6, 2)]
    norms = cells.norm(dim=1)
    torch.testing.assert_close(norms[:4], torch.ones(4, 2, 2))
    torch.testing.assert_close(norms[4], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_hog_loss_matches_the_reference_and_trains(implementation):
    imgs = torch.randn(2, 3, 16, 16)
    pred = torch.randn(2, 4, 27, requires_grad=True)
    mask = torch.tensor([[1.0, 0, 1, 1], [0, 1, 0, 1]])
    got = mk.mae_loss(imgs, pred, mask, 8, target="hog")
    want = ref.hog_loss(imgs, pred.detach(), mask, 8)
    torch.testing.assert_close(got, want)
    got.backward()
    assert pred.grad[0, 1].abs().max() == 0 and pred.grad[0, 0].abs().max() > 0


def test_hog_loss_reads_removed_patches_only(implementation):
    """A NaN in a kept patch of pred reaches neither the HOG loss nor its gradient (the
    reference, as the official code, returns NaN)."""
    imgs = torch.randn(2, 3, 16, 16)
    pred = torch.randn(2, 4, 27)
    mask = torch.tensor([[1.0, 0, 1, 1], [0, 1, 0, 1]])
    want = ref.hog_loss(imgs, pred, mask, 8)
    poisoned = pred.clone()
    poisoned[0, 1, 3], poisoned[1, 2] = float("nan"), float("inf")
    assert torch.isnan(ref.hog_loss(imgs, poisoned, mask, 8))
    leaf = poisoned.requires_grad_(True)
    got = mk.mae_loss(imgs, leaf, mask, 8, target="hog")
    torch.testing.assert_close(got, want)
    (grad,) = torch.autograd.grad(got, leaf)
    assert torch.isfinite(grad).all() and torch.all(grad[mask == 0] == 0)


@pytest.mark.parametrize("call,error,argument", [
    (lambda: mk.hog_targets(torch.randn(1, 3, 16, 16), 8, cell=3), ValueError, "cell"),
    (lambda: mk.hog_targets(torch.randn(1, 3, 16, 16), 8, bins=1), ValueError, "bins"),
    (lambda: mk.hog_targets(torch.randn(1, 3, 16, 16), 8, mask=torch.ones(1, 3)), ValueError,
     "mask"),
    (lambda: mk.hog_targets(torch.randn(3, 16, 16), 8), ValueError, "imgs"),
    (lambda: mk.hog_targets(torch.randn(1, 3, 1, 4), 1, cell=1), ValueError, "imgs"),
    (lambda: mk.mae_loss(torch.randn(1, 3, 16, 16), torch.randn(1, 4, 48), torch.ones(1, 4), 8,
                         target="hog"), ValueError, "pred"),
    (lambda: mk.mae_loss(torch.randn(1, 3, 16, 16), torch.randn(1, 4, 27), torch.ones(1, 4), 8,
                         target="sift"), ValueError, "target"),
    (lambda: MAE({"patch_size": 12, "img_size": 24, "target": "hog"}), ValueError, "target"),
    # the pixel target's arguments would be silently ignored
    (lambda: mk.mae_loss(torch.randn(1, 3, 16, 16), torch.randn(1, 4, 27), torch.ones(1, 4), 8,
                         True, target="hog"), ValueError, "norm_pix_loss"),
    (lambda: mk.mae_loss(torch.randn(1, 3, 16, 16), torch.randn(1, 4, 27), torch.ones(1, 4), 8,
                         False, target="hog"), ValueError, "norm_pix_loss"),
    (lambda: mk.mae_loss(torch.randn(1, 3, 16, 16), torch.randn(1, 4, 27), torch.ones(1, 4), 8,
                         tubelet_size=2, target="hog"), ValueError, "tubelet_size"),
    (lambda: mk.mae_loss(torch.randn(1, 3, 16, 16), torch.randn(1, 4, 27), torch.ones(1, 4), 8,
                         target="hog", mean=(0.5,) * 3, std=(0.2,) * 3), ValueError, "mean"),
    (lambda: mk.mae_loss(torch.randn(1, 3, 16, 16), torch.randn(1, 4, 192), torch.ones(1, 4), 8,
                         True, target="pixel"), ValueError, "norm_pix_loss"),
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
