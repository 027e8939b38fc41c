"""The same checks on CUDA at MAE sizes: the Triton kernels (what the dispatcher runs for CUDA
tensors) and the CUDA extension vs the reference, and vs the CPU kernels."""
import pytest
import torch

import mae_kernels as mk
from mae_kernels import reference as ref
from mae_kernels import tokens
from mae_kernels.augment import IMAGENET_MEAN, IMAGENET_STD

from .utils import TOLERANCES, assert_close, count_launches, running

gpu = pytest.mark.gpu
# the last one is longer than the fused sort handles: torch.sort + the extension's gather
SHAPES = [(256, 196, 768), (256, 196, 1024), (256, 196, 512), (3, 5000, 40)]


@pytest.fixture
def gpu_backend():
    """Every test here runs Triton kernels (checked after it)."""
    with count_launches() as launches:
        yield launches
    assert sum(launches.values()) > 0, "no Triton kernel ran"


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ratio", [0.0, 0.75, 0.9])
def test_random_masking_cuda(dtype, shape, ratio):
    x = torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=True)
    noise = torch.rand(shape[:2], device="cuda")
    got = mk.random_masking(x, ratio, noise)
    want = ref.random_masking(x, ratio, noise)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    grad = torch.randn_like(got[0])
    (ga,) = torch.autograd.grad(got[0], x, grad)
    (gb,) = torch.autograd.grad(want[0], x, grad)
    assert torch.equal(ga, gb)


@gpu
def test_random_masking_seeded_cuda(gpu_backend):
    x = torch.randn(64, 196, 768, device="cuda")
    torch.manual_seed(7)
    got = mk.random_masking(x, 0.75)
    torch.manual_seed(7)
    want = ref.random_masking(x, 0.75)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [512, 768, 1024, 33])
@pytest.mark.parametrize("P", [0, 1])
@pytest.mark.parametrize("ratio", [0.0, 0.75, 0.9])
def test_unshuffle_cuda(gpu_backend, dtype, D, P, ratio):
    B, L = 256, 196
    _, _, ids_restore = ref.random_masking(torch.empty(B, L, 1, device="cuda"), ratio)
    K = int(L * (1 - ratio))
    x = torch.randn(B, P + K, D, device="cuda", dtype=dtype, requires_grad=True)
    mt = torch.randn(1, 1, D, device="cuda", dtype=dtype, requires_grad=True)
    pos = torch.randn(1, P + L, D, device="cuda", dtype=dtype, requires_grad=True)
    out = mk.unshuffle(x, mt, ids_restore, P, pos)
    f32 = [t.detach().float().requires_grad_() for t in (x, mt, pos)]
    want = ref.unshuffle(f32[0], f32[1], ids_restore, P, f32[2])
    assert_close(out, want, dtype)
    grad = torch.randn_like(want)
    got_grads = torch.autograd.grad(out, [x, mt, pos], grad.to(dtype))
    want_grads = torch.autograd.grad(want, f32, grad.to(dtype).float())
    for g, w in zip(got_grads, want_grads):
        rtol = 1e-4 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(g.float(), w, rtol=rtol, atol=rtol * max(1.0, w.abs().max()))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_pix_loss", [True, False])
@pytest.mark.parametrize("size,p", [((224, 224), 16), ((224, 224), 14), ((160, 96), 16)])
def test_mae_loss_and_patchify_cuda(gpu_backend, dtype, norm_pix_loss, size, p):
    B = 64
    imgs = torch.randn(B, 3, *size, device="cuda", dtype=dtype)
    L = (size[0] // p) * (size[1] // p)
    pred = torch.randn(B, L, p * p * 3, device="cuda", dtype=dtype, requires_grad=True)
    mask = (torch.rand(B, L, device="cuda") < 0.75).float()
    assert torch.equal(mk.patchify(imgs, p), ref.patchify(imgs, p))
    loss = mk.mae_loss(imgs, pred, mask, p, norm_pix_loss)
    f32 = pred.detach().float().requires_grad_()
    want = ref.mae_loss(imgs.float(), f32, mask, p, norm_pix_loss)
    torch.testing.assert_close(loss, want, rtol=1e-4, atol=1e-5)
    (g,) = torch.autograd.grad(loss, pred)
    (w,) = torch.autograd.grad(want, f32)
    assert_close(g, w, dtype) if dtype != torch.float32 else torch.testing.assert_close(
        g, w, rtol=1e-4, atol=1e-9)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [768, 1024, 33, 1])
def test_gather_scatter_cuda(dtype, D):
    assert "cuda" in tokens.KERNEL_DEVICES, "the extension was built without CUDA kernels"
    B, L, K = 256, 196, 49
    index = torch.rand(B, L, device="cuda").argsort(1)[:, :K].contiguous()
    x = torch.randn(B, L, D, device="cuda", dtype=dtype)
    assert torch.equal(torch.ops.mae_kernels.gather_tokens(x, index), ref.gather_tokens(x, index))
    src = torch.randn(B, K, D, device="cuda", dtype=dtype)
    assert torch.equal(torch.ops.mae_kernels.scatter_tokens(src, index, L),
                       ref.scatter_tokens(src, index, L))
    # a strided view (copied to a contiguous buffer first)
    odd = x[:, :, 1:] if D > 1 else x
    assert torch.equal(torch.ops.mae_kernels.gather_tokens(odd, index),
                       ref.gather_tokens(odd.contiguous(), index))
    # an odd byte offset into the storage: rows start unaligned, so narrower vectors are used
    flat = torch.randn(B * L * D + 1, device="cuda", dtype=dtype)[1:].view(B, L, D)
    assert torch.equal(torch.ops.mae_kernels.gather_tokens(flat, index),
                       ref.gather_tokens(flat, index))


@gpu
def test_compile_fullgraph_cuda(gpu_backend):
    from .test_custom_ops import _mae_step

    B, L, D = 8, 16, 32
    dev = dict(device="cuda")
    args = (torch.randn(B, L, D, requires_grad=True, **dev),
            torch.randn(1, 1, D, requires_grad=True, **dev),
            torch.randn(1, L + 1, D, requires_grad=True, **dev), torch.randn(B, 3, 16, 16, **dev),
            torch.nn.Linear(D, 48).cuda(), torch.rand(B, L, **dev))
    eager = _mae_step(*args)
    torch._dynamo.reset()
    compiled = torch.compile(_mae_step, fullgraph=True)(*args)
    torch.testing.assert_close(compiled, eager)
    compiled.backward()


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ops_run_on_the_tensors_device_not_the_current_one(gpu_backend):
    torch.cuda.set_device(0)
    dev = torch.device("cuda:1")
    x = torch.randn(8, 196, 64, device=dev, requires_grad=True)
    noise = torch.rand(8, 196, device=dev)
    got = mk.random_masking(x, 0.75, noise)
    for g, w in zip(got, ref.random_masking(x, 0.75, noise)):
        assert g.device == dev and torch.equal(g, w)
    imgs = torch.randn(8, 3, 32, 32, device=dev)
    assert torch.equal(mk.patchify(imgs, 16), ref.patchify(imgs, 16))
    enc, mask_token = torch.randn(8, 1 + 49, 64, device=dev), torch.randn(1, 1, 64, device=dev)
    assert torch.equal(mk.unshuffle(enc, mask_token, got[2], 1),
                       ref.unshuffle(enc, mask_token, got[2], 1))
    assert torch.cuda.current_device() == 0


# The checks below run on CUDA at MAE sizes, and in the normal suite on CPU tensors through the
# Triton interpreter at small sizes: one body, so the CUDA path's test is known to run. Each
# compares the Triton kernels with the CPU kernels on the same inputs; copy ops bit for bit.
TARGETS = [pytest.param("cuda", marks=gpu), "interpreter"]
COPY_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _on_cpu(out):
    return tuple(t.cpu() for t in out) if isinstance(out, tuple) else out.cpu()


def on_triton(target, fn, *args, **kwargs):
    """fn on the target's Triton kernels (tensor arguments moved to its device), the outputs
    back on the CPU; checks that Triton kernels ran."""
    device = "cuda" if target == "cuda" else "cpu"
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    if target == "interpreter":
        with running("triton"):
            return _on_cpu(fn(*args, **kwargs))
    with count_launches() as launches:
        out = _on_cpu(fn(*args, **kwargs))
    assert sum(launches.values()) > 0, "no Triton kernel ran"
    return out


def on_cpu_kernel(fn, *args, **kwargs):
    """fn on the CPU kernels (PyTorch + the C++ extension); checks that no Triton kernel ran."""
    with running("cpu"):
        return fn(*args, **kwargs)


def _masking_and_grad(masking, x, grad, *args):
    """A masking op's outputs, and the gradient that `grad` on x_masked sends back to x."""
    x = x.detach().requires_grad_()
    x_masked, mask, ids_restore = masking(x, *args)
    (grad_x,) = torch.autograd.grad(x_masked, x, grad)
    return x_masked, mask, ids_restore, grad_x


# kind -> (op, its arguments after x for a batch B on a grid, tokens per sample)
MASKINGS = {
    "block": (mk.block_masking,
              lambda B, grid: (0.75, grid, torch.rand(B, grid[0] * grid[1], 5)), 1),
    "grid": (mk.grid_masking,
             lambda B, grid: (grid, 2, torch.randint(0, 2, (B, 2))), 1),
    "tube": (mk.tube_masking, lambda B, grid: (0.9, 4, torch.rand(B, grid[0] * grid[1])), 4),
}


@pytest.mark.parametrize("kind", list(MASKINGS))
@pytest.mark.parametrize("dtype", COPY_DTYPES, ids=str)
@pytest.mark.parametrize("target", TARGETS)
def test_masking_family_is_the_cpu_kernels_bit_for_bit(target, dtype, kind):
    """block / grid / tube masking, forward and backward (ViT-B/16's 14x14 grid, D=768 on
    CUDA)."""
    B, grid, D = (256, (14, 14), 768) if target == "cuda" else (2, (4, 4), 8)
    op, arguments, frames = MASKINGS[kind]
    args = arguments(B, grid)
    x = torch.randn(B, frames * grid[0] * grid[1], D, dtype=dtype)
    K = on_cpu_kernel(op, x, *args)[0].shape[1]
    grad = torch.randn(B, K, D, dtype=dtype)
    want = on_cpu_kernel(_masking_and_grad, op, x, grad, *args)
    got = on_triton(target, _masking_and_grad, op, x, grad, *args)
    for name, g, w in zip(["x_masked", "mask", "ids_restore", "grad_x"], got, want):
        assert g.dtype == w.dtype and torch.equal(g, w), name


def _patchify3d_round_trip(videos, grad, tubelet, grid):
    """patchify3d of videos, unpatchify3d of its tokens, and the gradient of patchify3d."""
    videos = videos.detach().requires_grad_()
    tokens_ = mk.patchify3d(videos, tubelet)
    (grad_videos,) = torch.autograd.grad(tokens_, videos, grad)
    return tokens_.detach(), mk.unpatchify3d(tokens_.detach(), tubelet, grid), grad_videos


@pytest.mark.parametrize("dtype", COPY_DTYPES, ids=str)
@pytest.mark.parametrize("target", TARGETS)
def test_patchify3d_unpatchify3d_are_the_cpu_kernels_bit_for_bit(target, dtype):
    """VideoMAE-B's 16 frames of 224x224 in 2x16x16 tubelets on CUDA; frames transposed, so
    the input is not contiguous."""
    B, T, side, tubelet = (8, 16, 224, (2, 16, 16)) if target == "cuda" else (2, 4, 16, (2, 8, 8))
    grid = (T // tubelet[0], side // tubelet[1], side // tubelet[2])
    videos = torch.randn(B, 3, T, side, side, dtype=dtype).transpose(3, 4)
    grad = torch.randn(B, grid[0] * grid[1] * grid[2], tubelet[0] * tubelet[1] ** 2 * 3,
                       dtype=dtype)
    want = on_cpu_kernel(_patchify3d_round_trip, videos, grad, tubelet, grid)
    got = on_triton(target, _patchify3d_round_trip, videos, grad, tubelet, grid)
    for name, g, w in zip(["tokens", "unpatchify3d", "grad_videos"], got, want):
        assert torch.equal(g, w), name
    assert torch.equal(got[1], videos)


def _loss_and_grad(videos, pred, mask, patch_size, norm_pix_loss, tubelet_size):
    pred = pred.detach().requires_grad_()
    # un-normalised with ImageNet's statistics, as VideoMAE.predict calls it
    loss = mk.mae_loss(videos, pred, mask, patch_size, norm_pix_loss, tubelet_size=tubelet_size,
                       mean=IMAGENET_MEAN, std=IMAGENET_STD)
    (grad,) = torch.autograd.grad(loss, pred)
    return loss.detach(), grad


@pytest.mark.parametrize("norm_pix_loss", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("target", TARGETS)
def test_tubelet_loss_matches_the_cpu_kernel(target, dtype, norm_pix_loss):
    """VideoMAE's loss over 2x16x16 tubelets, 90% masked, value and gradient (both accumulate
    in float32, in another order)."""
    B, T, side, p = (8, 16, 224, 16) if target == "cuda" else (2, 4, 16, 8)
    L = (T // 2) * (side // p) ** 2
    videos = torch.randn(B, 3, T, side, side, dtype=dtype)
    pred = torch.randn(B, L, 2 * p * p * 3, dtype=dtype)
    mask = (torch.rand(B, L) < 0.9).float()
    want_loss, want_grad = on_cpu_kernel(_loss_and_grad, videos, pred, mask, p, norm_pix_loss, 2)
    loss, grad = on_triton(target, _loss_and_grad, videos, pred, mask, p, norm_pix_loss, 2)
    torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=1e-6)
    rtol = 1e-4 if dtype == torch.float32 else TOLERANCES[dtype][0]
    torch.testing.assert_close(grad.float(), want_grad.float(), rtol=rtol,
                               atol=rtol * want_grad.float().abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("target", TARGETS)
def test_hog_targets_match_the_cpu_kernel(target, dtype):
    """MaskFeat's HOG of the masked patches (ViT-B/16 images on CUDA). Hard binning: a pixel
    whose orientation lies on a bin boundary to within rounding may vote into the neighbouring
    bin under the GPU's arithmetic (fused multiply-adds), which changes its cell's histogram,
    so a few cells in a million may differ; every other value agrees to float32 rounding."""
    B, side = (16, 224) if target == "cuda" else (2, 32)
    L = (side // 16) ** 2
    imgs = torch.randn(B, 3, side, side, dtype=dtype)
    mask = (torch.rand(B, L) < 0.75).float()
    want = on_cpu_kernel(mk.hog_targets, imgs, 16, mask=mask)
    got = on_triton(target, mk.hog_targets, imgs, 16, mask=mask)
    assert got.shape == want.shape and got.dtype == want.dtype
    kept = mask == 0
    assert torch.equal(got[kept], torch.zeros_like(got[kept]))
    close = torch.isclose(got, want, rtol=1e-4, atol=1e-5)
    assert close.float().mean() > 0.999, f"{(~close).sum()} of {close.numel()} values differ"
