"""The same checks on CUDA at MAE sizes: the Triton kernels (what the dispatcher runs for CUDA
tensors) and the CUDA extension vs the reference, and vs the CPU kernels. The `smoke` cases (one
per op, and one compiled model step) are the GPU plan's smoke stage; scripts/gpu_sanitize.py runs
the same op cases under compute-sanitizer."""
import dataclasses
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import mae_kernels as mk
from mae_kernels import augment, tokens
from mae_kernels import reference as ref
from mae_kernels.augment import IMAGENET_MEAN, IMAGENET_STD

from .utils import TOLERANCES, assert_close, count_launches, running

gpu = pytest.mark.gpu
smoke = pytest.mark.smoke
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
# MAE's rows, odd ones, and rows longer than a warp's pass (8 vectors a lane): several warps
# share each of them
@pytest.mark.parametrize("B,L,K,D", [(256, 196, 49, 768), (256, 196, 49, 1024),
                                     (256, 196, 49, 33), (256, 196, 49, 1), (2, 5, 3, 70001),
                                     (2, 5, 3, 65536)])
def test_gather_scatter_cuda(dtype, B, L, K, D):
    assert "cuda" in tokens.KERNEL_DEVICES, "the extension was built without CUDA kernels"
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


# One case per op (forward and backward), at small odd sizes (D=40, a 7x9 grid of patches) so
# that partial blocks and row tails run: the plan's smoke stage compares each on CUDA with its
# CPU kernel, and its sanitizer stage runs them all under compute-sanitizer.
B, GRID, D = 3, (7, 9), 40
L = GRID[0] * GRID[1]


def _images(g, *shape):
    return torch.randn(*shape, generator=g)


def _removed(g, B, L, ratio=0.75):
    return (torch.rand(B, L, generator=g) < ratio).float()


def _positions(g, B, L, n):
    """(B, n) distinct positions in [0, L) per row, in order."""
    return torch.rand(B, L, generator=g).argsort(1)[:, :n].sort(1).values


def _photos(g):
    """Three packed uint8 images of different sizes (data, offsets, shapes), a box in each,
    and which to flip: resized_crop's inputs."""
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
              for h, w in ((20, 30), (25, 17), (32, 32))]
    boxes = torch.tensor([[2, 3, 15, 20], [0, 0, 25, 17], [5, 9, 11, 13]])
    return (*augment.pack(images), boxes, torch.tensor([True, False, True]))


@dataclasses.dataclass
class OpCase:
    """One call of a public op on inputs drawn from a seeded generator (CPU tensors): its
    outputs, then the gradients that a seeded cotangent on its first output sends back to the
    arguments numbered in `grad`."""
    op: Callable
    inputs: Callable[[torch.Generator], tuple]
    grad: tuple[int, ...] = (0,)
    exact: bool = True  # copies: bit for bit; sums: to float32 rounding
    triton: bool = True  # its kernels are Triton's; False: the extension's (CUDA only)
    mostly: float = 1.0  # the fraction of values that must agree (HOG's hard binning)

    def draw(self) -> tuple:
        return self.inputs(torch.Generator().manual_seed(0))

    def __call__(self, *args) -> tuple[torch.Tensor, ...]:
        args = [a.detach().requires_grad_() if i in self.grad else a for i, a in enumerate(args)]
        out = self.op(*args)
        outs = out if isinstance(out, tuple) else (out,)
        if not self.grad:
            return tuple(o.detach() for o in outs)
        cotangent = torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad(outs[0], [args[i] for i in self.grad],
                                    cotangent.to(outs[0].device, outs[0].dtype))
        return (*(o.detach() for o in outs), *grads)


OP_CASES = {
    "random_masking": OpCase(lambda x, noise: mk.random_masking(x, 0.75, noise),
                             lambda g: (_images(g, B, L, D), torch.rand(B, L, generator=g))),
    "block_masking": OpCase(lambda x, noise: mk.block_masking(x, 0.75, GRID, noise),
                            lambda g: (_images(g, B, L, D), torch.rand(B, L, 5, generator=g))),
    # grid masking keeps one token of every 2x2 square: both sides even
    "grid_masking": OpCase(lambda x, offset: mk.grid_masking(x, (6, 8), 2, offset),
                           lambda g: (_images(g, B, 48, D), torch.randint(0, 2, (B, 2),
                                                                           generator=g))),
    "tube_masking": OpCase(lambda x, noise: mk.tube_masking(x, 0.9, 4, noise),
                           lambda g: (_images(g, B, 4 * L, D), torch.rand(B, L, generator=g))),
    "pixio_masking": OpCase(lambda x, noise: mk.pixio_masking(x, 0.75, 2, noise, grid=(6, 8)),
                            lambda g: (_images(g, B, 48, D), torch.rand(B, 12, generator=g))),
    "crossmae_masking": OpCase(lambda x, noise: mk.crossmae_masking(x, 0.75, 0.5, noise),
                               lambda g: (_images(g, B, L, D), torch.rand(B, L, generator=g))),
    "unshuffle": OpCase(
        lambda x, mask_token, ids_restore, pos: mk.unshuffle(x, mask_token, ids_restore, 1, pos),
        lambda g: (_images(g, B, 1 + L // 4, D), _images(g, 1, 1, D),
                   torch.rand(B, L, generator=g).argsort(1).argsort(1), _images(g, 1, 1 + L, D)),
        grad=(0, 1, 3), exact=False),  # the position embedding is added in float32
    "decoder_queries": OpCase(
        lambda mask_token, pos, ids_pred: mk.decoder_queries(mask_token, pos, ids_pred, 1),
        lambda g: (_images(g, 1, 1, D), _images(g, 1, 1 + L, D), _positions(g, B, L, 20)),
        grad=(0, 1), exact=False),
    "patchify": OpCase(lambda imgs: mk.patchify(imgs, 8), lambda g: (_images(g, B, 3, 56, 72),)),
    "unpatchify": OpCase(lambda x: mk.unpatchify(x, 8, GRID), lambda g: (_images(g, B, L, 192),)),
    "patchify3d": OpCase(lambda videos: mk.patchify3d(videos, (2, 8, 8)),
                         lambda g: (_images(g, B, 3, 4, 16, 24),)),
    "unpatchify3d": OpCase(lambda x: mk.unpatchify3d(x, (2, 8, 8), (2, 2, 3)),
                           lambda g: (_images(g, B, 12, 384),)),
    "mae_loss": OpCase(lambda imgs, pred, mask: mk.mae_loss(imgs, pred, mask, 8, True),
                       lambda g: (_images(g, B, 3, 56, 72), _images(g, B, L, 192),
                                  _removed(g, B, L)), grad=(1,), exact=False),
    "mae_loss_video": OpCase(
        lambda videos, pred, mask: mk.mae_loss(videos, pred, mask, 8, True, tubelet_size=2),
        lambda g: (_images(g, B, 3, 4, 16, 24), _images(g, B, 12, 384), _removed(g, B, 12)),
        grad=(1,), exact=False),
    "hog_targets": OpCase(lambda imgs, mask: mk.hog_targets(imgs, 16, mask=mask),
                          lambda g: (_images(g, B, 3, 32, 48), _removed(g, B, 6)), grad=(),
                          exact=False, mostly=0.99),
    "resized_crop": OpCase(
        lambda data, offsets, shapes, boxes, flips: mk.resized_crop(
            data, boxes, 16, flips, shapes=shapes, offsets=offsets),
        lambda g: _photos(g), grad=(), exact=False),
    "gather_tokens": OpCase(mk.gather_tokens,
                            lambda g: (_images(g, B, L, D), _positions(g, B, L, 20)),
                            triton=False),
}


def _smoke_params():
    for name, case in OP_CASES.items():
        yield pytest.param("cuda", name, marks=[gpu, smoke], id=f"cuda-{name}")
        if case.triton:
            yield pytest.param("interpreter", name, id=f"interpreter-{name}")


@pytest.mark.parametrize("target,name", list(_smoke_params()))
def test_each_op_matches_its_cpu_kernel(target, name):
    """One case per op, forward and backward: the device's kernels (Triton's; the extension's
    for gather/scatter) against the CPU kernels on the same inputs."""
    case = OP_CASES[name]
    inputs = case.draw()
    want = on_cpu_kernel(case, *inputs)
    if case.triton:
        got = on_triton(target, case, *inputs)
    else:
        assert "cuda" in tokens.KERNEL_DEVICES, "the extension was built without CUDA kernels"
        got = _on_cpu(case(*[a.cuda() for a in inputs]))
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, f"output {i}"
        if case.exact:
            assert torch.equal(g, w), f"output {i}"
            continue
        g, w = g.double(), w.double()
        close = torch.isclose(g, w, rtol=1e-4, atol=1e-5 * max(1.0, w.abs().max().item()))
        assert close.double().mean() >= case.mostly, \
            f"output {i}: {(~close).sum()} of {close.numel()} values differ"


# the kernels of a training step: masking, the decoder's input, the loss, and their backwards
STEP_KERNELS = ["_masking_kernel", "_gather_kept_kernel", "_unshuffle_kernel",
                "_unshuffle_backward_kernel", "_loss_forward_kernel", "_loss_backward_kernel"]


@gpu
@smoke
def test_compiled_model_step_runs_our_kernels_cuda():
    """torch.compile(fullgraph=True) of a small MAE's training step: Inductor re-emits our
    Triton kernels (registered through triton_op) in its own code, and the loss and the
    gradients are eager's."""
    from torch._inductor.utils import run_and_get_code

    from mae.models.image import MAE, config_of

    from .utils import assert_same_grads

    config = config_of("mae_vit_tiny_patch16", img_size=32, patch_size=4)
    eager = MAE(config).cuda()
    compiled = MAE(config).cuda()
    compiled.load_state_dict(eager.state_dict())
    imgs = torch.randn(8, 3, 32, 32, device="cuda")
    noise = torch.rand(8, 64, device="cuda")

    def step(forward):
        loss = forward(imgs, 0.75, noise)[0]
        loss.backward()
        return loss.detach()

    want = step(eager)
    torch._dynamo.reset()
    got, code = run_and_get_code(step, torch.compile(compiled, fullgraph=True))
    code = "\n".join(code)
    assert [k for k in STEP_KERNELS if k not in code] == [], "Inductor did not emit these"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert_same_grads(compiled, eager, rtol=1e-3, atol=1e-5)


@gpu
def test_grid_masking_with_a_fixed_offset_never_waits_for_the_host():
    """The offsets of a fixed pair are filled on the device: `torch.tensor(pair, device=cuda)`
    copied them from pageable memory, a host-device sync in every `--mask-type grid` step."""
    x = torch.randn(256, 196, 768, device="cuda")
    mk.grid_masking(x, (14, 14))  # the kernels' first compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with mk.skip_index_checks():
            for offset in (None, (1, 0)):
                mk.grid_masking(x, (14, 14), 2, offset)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def big_strides(target: str) -> None:
    """patchify and mae_loss of a (1, 3, 16, 16) image whose channels lie 2^30 + 64 elements
    apart: the offset of channel 2 passes 2^31, which int32 products wrap (a read before the
    image: a crash or garbage). On the interpreter the storage is a sparse file (only the
    touched pages take memory); on CUDA 8.6 GB of device memory."""
    stride_c = 2**30 + 64
    n = 2 * stride_c + 16 * 16
    if target == "cuda":
        storage = torch.empty(n, device="cuda")
    else:
        with tempfile.NamedTemporaryFile() as f:  # the mapping outlives the name
            f.truncate(n * 4)
            storage = torch.from_file(f.name, shared=False, size=n, dtype=torch.float32)
    imgs = storage.as_strided((1, 3, 16, 16), (0, stride_c, 16, 1))
    imgs.copy_(torch.randn(1, 3, 16, 16))
    pred, mask = torch.randn(1, 4, 192, device=imgs.device), torch.ones(1, 4, device=imgs.device)
    with running("triton") if target == "interpreter" else count_launches() as launches:
        tokens_, loss = mk.patchify(imgs, 8), mk.mae_loss(imgs, pred, mask, 8)
    if target == "cuda":
        assert launches["_patch_rows_kernel"] and launches["_loss_forward_kernel"]
    assert torch.equal(tokens_, ref.patchify(imgs, 8))
    torch.testing.assert_close(loss, ref.mae_loss(imgs, pred, mask, 8))
    print("big strides: ok")


@pytest.mark.parametrize("target", [pytest.param("cuda", marks=gpu), "interpreter"])
def test_patchify_and_loss_address_past_2_31_elements(target):
    """In a fresh interpreter: a wrapped offset crashes it."""
    env = {**os.environ, "TRITON_INTERPRET": "1" if target == "interpreter" else "0"}
    done = subprocess.run([sys.executable, "-c", f"from tests.test_gpu import big_strides; "
                           f"big_strides({target!r})"], cwd=Path(__file__).parents[1], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "big strides: ok" in done.stdout, done.stderr[-3000:]
