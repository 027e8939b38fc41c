"""patchify3d / unpatchify3d and mae_loss over tubelets against the reference (and VideoMAE's
layout, worked out element by element), forward and backward, on the CPU kernels and on the
Triton launchers (interpreted)."""
import pytest
import torch

import mae_kernels as mk
from mae_kernels import reference as ref

from .utils import DTYPES, assert_close

# (B, C, T, H, W, t, p): one frame, odd sizes, a non-square frame, one channel
VIDEOS = [(1, 3, 1, 4, 4, 1, 2), (2, 3, 4, 6, 9, 2, 3), (1, 1, 6, 4, 8, 3, 4),
          (2, 2, 2, 5, 5, 1, 5)]


def _non_contiguous(t):
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C,T,H,W,t,p", VIDEOS)
def test_patchify3d_roundtrip(implementation, dtype, B, C, T, H, W, t, p):
    videos = torch.randn(B, C, T, H, W, dtype=dtype)
    x = mk.patchify3d(videos, (t, p, p))
    assert torch.equal(x, ref.patchify3d(videos, (t, p, p)))
    assert torch.equal(mk.patchify3d(_non_contiguous(videos), (t, p, p)), x)
    grid = (T // t, H // p, W // p)
    assert torch.equal(mk.unpatchify3d(x, (t, p, p), grid, C), videos)
    leaf = videos.clone().requires_grad_(True)
    grad = torch.randn_like(x)
    (g,) = torch.autograd.grad(mk.patchify3d(leaf, (t, p, p)), leaf, grad)
    assert torch.equal(g, ref.unpatchify3d(grad, (t, p, p), grid, C))
    leaf = x.clone().requires_grad_(True)
    grad = torch.randn_like(videos)
    (g,) = torch.autograd.grad(mk.unpatchify3d(leaf, (t, p, p), grid, C), leaf, grad)
    assert torch.equal(g, ref.patchify3d(grad, (t, p, p)))


def test_patchify3d_is_videomae_layout():
    """token (f, i, j), value (dt, r, c, ch) = video[ch, f*t + dt, i*p + r, j*p + c]: VideoMAE's
    `b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)`; one frame with t=1 is patchify."""
    C, T, H, W, t, p = 2, 4, 4, 6, 2, 2
    videos = torch.randn(1, C, T, H, W)
    x = ref.patchify3d(videos, (t, p, p))
    h, w = H // p, W // p
    for f in range(T // t):
        for i in range(h):
            for j in range(w):
                token = x[0, (f * h + i) * w + j].view(t, p, p, C)
                for dt in range(t):
                    want = videos[0, :, f * t + dt, i * p:(i + 1) * p, j * p:(j + 1) * p]
                    assert torch.equal(token[dt], want.permute(1, 2, 0))
    imgs = torch.randn(2, 3, 8, 4)
    assert torch.equal(ref.patchify3d(imgs[:, :, None], (1, 4, 4)), ref.patchify(imgs, 4))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_pix_loss", [True, False])
@pytest.mark.parametrize("B,C,T,H,W,t,p", VIDEOS[1:])
def test_mae_loss_over_tubelets(implementation, dtype, norm_pix_loss, B, C, T, H, W, t, p):
    videos = torch.randn(B, C, T, H, W, dtype=dtype)
    L, E = (T // t) * (H // p) * (W // p), t * p * p * C
    pred = torch.randn(B, L, E, dtype=dtype)
    mask = (torch.rand(B, L) > 0.4).float()
    mask[0, 0] = 1
    got = mk.mae_loss(videos, pred, mask, p, norm_pix_loss, t)
    want = ref.mae_loss(videos.float(), pred.float(), mask, p, norm_pix_loss, t)
    assert_close(got, want, dtype)
    leaf_a, leaf_b = pred.clone().requires_grad_(True), pred.float().requires_grad_(True)
    (ga,) = torch.autograd.grad(mk.mae_loss(videos, leaf_a, mask, p, norm_pix_loss, t), leaf_a)
    (gb,) = torch.autograd.grad(ref.mae_loss(videos.float(), leaf_b, mask, p, norm_pix_loss, t),
                                leaf_b)
    assert_close(ga, gb, dtype)
    assert_close(mk.mae_loss(_non_contiguous(videos), pred, mask, p, norm_pix_loss, t), want,
                 dtype)


@pytest.mark.parametrize("call,error,argument", [
    (lambda: mk.patchify3d(torch.randn(1, 3, 4, 8), (2, 4, 4)), ValueError, "videos"),
    (lambda: mk.patchify3d(torch.randn(1, 3, 3, 8, 8), (2, 4, 4)), ValueError, "tubelet_size"),
    (lambda: mk.patchify3d(torch.randn(1, 3, 4, 8, 8), (2, 4, 2)), TypeError, "tubelet_size"),
    (lambda: mk.patchify3d(torch.randn(1, 3, 4, 8, 8), (0, 4, 4)), ValueError, "tubelet_size"),
    (lambda: mk.unpatchify3d(torch.randn(1, 8, 96), (2, 4, 4), (2, 2, 3)), ValueError, "grid"),
    (lambda: mk.unpatchify3d(torch.randn(1, 8, 90), (2, 4, 4), (2, 2, 2)), ValueError,
     "values per patch"),
    (lambda: mk.mae_loss(torch.randn(1, 3, 4, 8, 8), torch.randn(1, 8, 96), torch.ones(1, 8), 4,
                         True, 3), ValueError, "tubelet_size"),
    (lambda: mk.mae_loss(torch.randn(1, 3, 8, 8), torch.randn(1, 4, 48), torch.ones(1, 4), 4,
                         True, 2), ValueError, "tubelet_size"),
    (lambda: mk.mae_loss(torch.randn(1, 3, 4, 8, 8), torch.randn(1, 8, 48), torch.ones(1, 8), 4,
                         True, 2), ValueError, "pred"),
])
def test_video_bad_input_names_the_argument(call, error, argument):
    with pytest.raises(error, match=argument):
        call()
