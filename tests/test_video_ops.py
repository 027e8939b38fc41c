"""patchify3d / unpatchify3d and mae_loss over tubelets against the reference (and VideoMAE's
layout, worked out element by element), forward and backward, on the CPU kernels and on the
Triton launchers (interpreted); the video loss against a transcription of VideoMAE's."""
import pytest
import torch

import mae_kernels as mk
from mae.data.images import IMAGENET_MEAN, IMAGENET_STD
from mae.models.video import VideoMAE
from mae_kernels import reference as ref

from .utils import DTYPES, IMPLEMENTATIONS, assert_close, running

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


def _data_norm(C):
    """A per-channel (mean, std) as a loader would normalise with (ImageNet's for RGB)."""
    if C == 3:
        return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    return {"mean": torch.linspace(0.3, 0.6, C), "std": torch.linspace(0.2, 0.3, C)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_pix_loss", [True, False])
@pytest.mark.parametrize("unnormalize", [False, True])
@pytest.mark.parametrize("B,C,T,H,W,t,p", VIDEOS[1:])
def test_mae_loss_over_tubelets(implementation, dtype, norm_pix_loss, unnormalize, B, C, T, H, W,
                                t, p):
    videos = torch.randn(B, C, T, H, W, dtype=dtype)
    L, E = (T // t) * (H // p) * (W // p), t * p * p * C
    pred = torch.randn(B, L, E, dtype=dtype)
    mask = (torch.rand(B, L) > 0.4).float()
    mask[0, 0] = 1
    norm = _data_norm(C) if unnormalize else {}
    got = mk.mae_loss(videos, pred, mask, p, norm_pix_loss, t, **norm)
    want = ref.mae_loss(videos.float(), pred.float(), mask, p, norm_pix_loss, t, **norm)
    assert_close(got, want, dtype)
    leaf_a, leaf_b = pred.clone().requires_grad_(True), pred.float().requires_grad_(True)
    (ga,) = torch.autograd.grad(mk.mae_loss(videos, leaf_a, mask, p, norm_pix_loss, t, **norm),
                                leaf_a)
    (gb,) = torch.autograd.grad(ref.mae_loss(videos.float(), leaf_b, mask, p, norm_pix_loss, t,
                                             **norm), leaf_b)
    assert_close(ga, gb, dtype)
    assert_close(mk.mae_loss(_non_contiguous(videos), pred, mask, p, norm_pix_loss, t, **norm),
                 want, dtype)


def _videomae_loss(videos, outputs, bool_masked_pos, patch_size, tubelet, normlize_target):
    """VideoMAE's `train_one_epoch` loss (MCG-NJU/VideoMAE engine_for_pretraining.py), written
    out with reshapes: un-normalise with ImageNet's mean and std, `b c (t p0) (h p1) (w p2) ->
    b (t h w) (p0 p1 p2) c`, per channel (x - mean) / (unbiased std + 1e-6), the masked
    tubelets' labels, nn.MSELoss against `outputs` (B, masked per sample, t*p*p*C)."""
    mean = torch.tensor(IMAGENET_MEAN)[None, :, None, None, None]
    std = torch.tensor(IMAGENET_STD)[None, :, None, None, None]
    unnorm_videos = videos * std + mean
    B, C, T, H, W = videos.shape
    p = patch_size
    x = unnorm_videos.reshape(B, C, T // tubelet, tubelet, H // p, p, W // p, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(B, -1, tubelet * p * p, C)
    if normlize_target:
        x = (x - x.mean(dim=-2, keepdim=True)) / (
            x.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
    videos_patch = x.reshape(B, x.shape[1], -1)
    labels = videos_patch[bool_masked_pos].reshape(B, -1, videos_patch.shape[-1])
    return torch.nn.MSELoss()(outputs, labels)


@pytest.mark.parametrize("normlize_target", [True, False])
def test_video_loss_is_videomaes(implementation, normlize_target):
    """The video target is VideoMAE's, not MAE's: un-normalised, normalised per channel within
    each tubelet with std + 1e-6 (MAE: over the whole patch, eps inside the root)."""
    B, C, T, H, W, t, p = 2, 3, 4, 8, 12, 2, 4
    videos = (torch.rand(B, C, T, H, W) - torch.tensor(IMAGENET_MEAN)[:, None, None, None]) \
        / torch.tensor(IMAGENET_STD)[:, None, None, None]  # normalised [0, 1] pixels
    L, E = (T // t) * (H // p) * (W // p), t * p * p * C
    pred = torch.randn(B, L, E)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):  # VideoMAE's masks remove as many tubelets from every sample
        mask[b, torch.randperm(L)[:9]] = True
    want = _videomae_loss(videos, pred[mask].reshape(B, 9, E), mask, p, t, normlize_target)
    got = mk.mae_loss(videos, pred, mask.float(), p, normlize_target, t, mean=IMAGENET_MEAN,
                      std=IMAGENET_STD)
    assert_close(got, want, torch.float32)
    assert_close(ref.mae_loss(videos, pred, mask.float(), p, normlize_target, t, IMAGENET_MEAN,
                              IMAGENET_STD), want, torch.float32)
    mae_rule = ref.norm_pix(ref.patchify3d(videos, (t, p, p))) if normlize_target \
        else ref.patchify3d(videos, (t, p, p))
    assert (got - ref.masked_mse(pred, mae_rule, mask.float(), torch.float32)).abs() > 1e-3


def test_videomae_model_trains_on_videomaes_target(implementation):
    """The model's loss (`mae pretrain --video`) is VideoMAE's for its pred and mask: the
    clips un-normalised with the loaders' ImageNet mean and std."""
    config = {"num_frames": 4, "img_size": 16, "patch_size": 8, "encoder_dim": 32,
              "encoder_layers": 1, "decoder_dim": 32, "decoder_layers": 1}
    videos = torch.randn(2, 3, 4, 16, 16)
    for norm_pix_loss in (True, False):
        model = VideoMAE({**config, "norm_pix_loss": norm_pix_loss, "mask_ratio": 0.5})
        loss, pred, mask = model.predict(videos, 0.5)
        removed = mask.bool()
        outputs = pred.detach()[removed].reshape(2, -1, pred.shape[-1])
        assert_close(loss, _videomae_loss(videos, outputs, removed, 8, 2, norm_pix_loss),
                     torch.float32)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_video_loss_reads_removed_tubelets_only(implementation, norm_pix_loss):
    """A NaN or inf in a kept tubelet of pred or of the video reaches neither the loss nor the
    gradient, on both paths (the reference, as VideoMAE's code, returns NaN)."""
    videos = torch.randn(2, 3, 4, 4, 8)
    pred = torch.randn(2, 4, 96)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 1]])
    norm = _data_norm(3)
    want_leaf = pred.clone().requires_grad_(True)
    want = ref.mae_loss(videos, want_leaf, mask, 4, norm_pix_loss, 2, **norm)
    poisoned, dirty = pred.clone(), videos.clone()
    poisoned[0, 1, 7], poisoned[1, 0] = float("nan"), float("inf")
    dirty[0, :, 0:2, 0:4, 4:8] = float("nan")  # tubelet 1 of clip 0: kept
    assert torch.isnan(ref.mae_loss(videos, poisoned, mask, 4, norm_pix_loss, 2, **norm))
    leaf = poisoned.requires_grad_(True)
    got = mk.mae_loss(dirty, leaf, mask, 4, norm_pix_loss, 2, **norm)
    assert_close(got, want, torch.float32)
    (g,) = torch.autograd.grad(got, leaf)
    (w,) = torch.autograd.grad(want, want_leaf)
    assert torch.isfinite(g).all() and torch.all(g[mask == 0] == 0)
    assert_close(g, w, torch.float32)


def _videomae_op_cases():
    videos = torch.randn(2, 3, 4, 4, 4)
    pred = torch.randn(2, 8, 24, requires_grad=True)
    mask = (torch.rand(2, 8) > 0.3).float()
    mask[0, 0] = 1
    affine = torch.tensor([IMAGENET_MEAN, IMAGENET_STD])
    ops = torch.ops.mae_kernels
    return {
        "forward": (ops.mae_loss, (videos, pred, mask, 2, 2, True, True, affine)),
        "forward_no_affine": (ops.mae_loss, (videos, pred, mask, 2, 2, True, True, None)),
        "forward_pixels": (ops.mae_loss, (videos, pred, mask, 2, 2, False, True, affine)),
        "backward": (ops.mae_loss_backward, (torch.tensor(1.0), videos, pred.detach(), mask, 2,
                                             2, True, True, affine)),
    }


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", sorted(_videomae_op_cases()))
def test_opcheck_videomae_loss(impl, case):
    op, args = _videomae_op_cases()[case]
    with running(impl):
        torch.library.opcheck(op, args)


def test_gradcheck_videomae_loss_float64(implementation):
    videos = torch.randn(2, 3, 4, 2, 4, dtype=torch.float64)
    mask = torch.tensor([[1.0, 0, 1, 1], [0, 1, 1, 0]])
    pred = torch.randn(2, 4, 24, dtype=torch.float64, requires_grad=True)
    for norm_pix_loss in (True, False):
        assert torch.autograd.gradcheck(
            lambda x, n=norm_pix_loss: mk.mae_loss(videos, x, mask, 2, n, 2, mean=IMAGENET_MEAN,
                                                   std=IMAGENET_STD), (pred,))


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
    (lambda: mk.mae_loss(torch.randn(1, 3, 4, 8, 8), torch.randn(1, 8, 96), torch.ones(1, 8), 4,
                         True, 2, mean=IMAGENET_MEAN), ValueError, "std"),
    (lambda: mk.mae_loss(torch.randn(1, 3, 4, 8, 8), torch.randn(1, 8, 96), torch.ones(1, 8), 4,
                         True, 2, mean=(0.5, 0.5), std=IMAGENET_STD), ValueError, "mean"),
    (lambda: mk.mae_loss(torch.randn(1, 3, 4, 8, 8), torch.randn(1, 8, 96), torch.ones(1, 8), 4,
                         True, 2, mean=IMAGENET_MEAN, std="wide"), TypeError, "std"),
    (lambda: mk.mae_loss(torch.randn(1, 3, 8, 8), torch.randn(1, 4, 48), torch.ones(1, 4), 4,
                         mean=IMAGENET_MEAN, std=IMAGENET_STD), ValueError, "mean and std"),
])
def test_video_bad_input_names_the_argument(call, error, argument):
    with pytest.raises(error, match=argument):
        call()
