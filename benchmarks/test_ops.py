"""Every fused op against the PyTorch reference, eager and compiled, forward and forward+backward.

GPU: the MAE shapes (B in {64, 256}, L=196, D in {768, 1024} encoder side, 512 decoder side,
224x224 images, p=16; float32 and bfloat16), with GB/s and the fraction of the bandwidth floor.
CPU: one realistic masking size (B=64, L=196, D=768) and small sizes for the rest.
"""
from __future__ import annotations

import pytest
import torch

import mae_kernels
from mae_kernels import reference

from .common import CUDA, GPU_SIZES, Compiled, run_case, tensor_bytes

DEVICE = "cuda" if CUDA else "cpu"
# The marks say which cases the GPU plan (scripts/gpu_plan.py) measures first: `vit_b` is MAE's
# ViT-B/16 size (B=256, L=196, encoder D=768, decoder D=512, 224x224 images), `bf16` bfloat16,
# `video` the VideoMAE ops, `compiled` the torch.compile'd reference, `long_compile` the ops whose
# compiled reference takes minutes to build.
VIT_B, BF16, VIDEO_OPS = pytest.mark.vit_b, pytest.mark.bf16, pytest.mark.video
# block masking's reference loops over one rectangle attempt per token: dynamo unrolls the 196
# iterations (about 4000 ops; 2-3 minutes to trace on the CPU machine)
LONG_COMPILE = {"block_masking"}
if GPU_SIZES:
    ENCODER = [pytest.param((256, 196, 768), marks=VIT_B), (256, 196, 1024), (64, 196, 768),
               (64, 196, 1024)]
    DECODER = [pytest.param((256, 196, 512), marks=VIT_B), (64, 196, 512)]
    IMAGES = [pytest.param(256, marks=VIT_B), 64]
    DTYPES = [pytest.param(torch.bfloat16, marks=BF16), torch.float32]
else:
    ENCODER = [(64, 196, 768)]
    DECODER = [(8, 196, 512)]
    IMAGES = [8]
    DTYPES = [torch.float32]
# "ours" is what the dispatcher runs for the device: the Triton kernels on CUDA (the extension's
# CUDA kernels for gather/scatter), the CPU kernels (PyTorch + the C++ extension) on CPU.
IMPLS = ["reference", pytest.param("compiled", marks=pytest.mark.compiled), "ours"]
RATIO = 0.75
PATCH = 16


def implementation(impl: str, name: str, smoke: bool = False):
    if impl == "reference":
        return getattr(reference, name)
    if impl == "compiled":
        # the CPU smoke run checks that dynamo captures each case, without Inductor's codegen
        return Compiled(getattr(reference, name), "aot_eager" if smoke else "inductor",
                        dynamic=False)
    public = getattr(mae_kernels, name)

    def call(*args, **kwargs):
        # the model calls the ops with index checks off (its indices come from random_masking)
        with mae_kernels.skip_index_checks():
            return public(*args, **kwargs)

    return call


def _select(benchmark, impl, name):
    benchmark.group = f"{name}"
    smoke = not CUDA and benchmark.disabled
    if smoke and impl == "compiled" and name in LONG_COMPILE:
        pytest.skip(f"compiling {name}'s reference takes minutes: too slow for the smoke run")
    return implementation(impl, name, smoke=smoke)


def token_cases(shapes):
    """Every implementation x (B, L, D) shape x dtype x direction."""
    marks = [
        pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"]),
        pytest.mark.parametrize("dtype", DTYPES, ids=str),
        pytest.mark.parametrize("shape", shapes, ids=lambda s: "x".join(map(str, s))),
        pytest.mark.parametrize("impl", IMPLS),
    ]

    def apply(fn):
        for mark in marks:
            fn = mark(fn)
        return fn

    return apply


def _grad_of(out, inputs, grad):
    return torch.autograd.grad(out, inputs, grad)


def _randn(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, device=DEVICE, dtype=dtype, requires_grad=grad)


# name -> (call, noise shape for (B, L), grid-dependent): how each masking op is called at MAE-B
# sizes (a 14x14 grid; grid masking keeps 1 in 4 = the 75% ratio of the others)
MASKINGS = {
    "random_masking": (lambda op, x, noise: op(x, RATIO, noise), lambda B, L: (B, L)),
    "block_masking": (lambda op, x, noise: op(x, RATIO, (14, 14), noise),
                      lambda B, L: (B, L, 5)),
    "grid_masking": (lambda op, x, noise: op(x, (14, 14)), None),
}
# VideoMAE-B: 16 frames in tubelets of 2 -> 8 temporal positions of 14x14, 90% masked; 32 clips
# hold as many tokens as 256 images (as B // 8 clips do in the video loss and patchify3d)
if GPU_SIZES:
    VIDEO = [pytest.param((32, 8 * 196, 768), marks=VIT_B), (16, 8 * 196, 768)]
else:
    VIDEO = [(4, 8 * 196, 768)]
TUBE_FRAMES, TUBE_RATIO = 8, 0.9


def _masking_case(benchmark, impl, name, shape, dtype, backward, call, noise_shape):
    """One masking op: x (B, L, D) -> (x_masked, mask, ids_restore); bytes moved: the noise
    read, mask and ids_restore written, the kept rows read and written (and, backward, the
    gradient read and scattered into a zeroed x-sized gradient)."""
    op = _select(benchmark, impl, name)
    B, L, D = shape
    noise_numel = 0 if noise_shape is None else torch.Size(noise_shape).numel()

    def noise():
        return None if noise_shape is None else torch.rand(noise_shape, device=DEVICE)

    K = call(getattr(reference, name), _randn(B, L, D, dtype=dtype), noise())[0].shape[1]

    def make():
        return (_randn(B, L, D, dtype=dtype, grad=backward), noise(),
                _randn(B, K, D, dtype=dtype) if backward else None)

    def run(x, noise, grad):
        out = call(op, x, noise)
        return _grad_of(out[0], x, grad) if backward else out

    es = torch.tensor([], dtype=dtype).element_size()
    moved = (noise_numel * 4 + B * L * (4 + 8) + 2 * B * K * D * es
             + (B * K * D * es + B * L * D * es) * backward)
    run_case(benchmark, run, make, moved, op=name, impl=impl, shape=list(shape),
             dtype=str(dtype), direction="fwd+bwd" if backward else "fwd")


@token_cases(ENCODER)
@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.long_compile)
                                  if name in LONG_COMPILE else name for name in MASKINGS])
def test_masking(benchmark, name, impl, shape, dtype, backward):
    call, noise_shape = MASKINGS[name]
    B, L, _ = shape
    _masking_case(benchmark, impl, name, shape, dtype, backward, call,
                  noise_shape(B, L) if noise_shape else None)


@VIDEO_OPS
@token_cases(VIDEO)
def test_tube_masking(benchmark, impl, shape, dtype, backward):
    B, L, _ = shape
    _masking_case(benchmark, impl, "tube_masking", shape, dtype, backward,
                  lambda op, x, noise: op(x, TUBE_RATIO, TUBE_FRAMES, noise),
                  (B, L // TUBE_FRAMES))


@token_cases(DECODER)
def test_unshuffle(benchmark, impl, shape, dtype, backward):
    op = _select(benchmark, impl, "unshuffle")
    B, L, D = shape
    K, P = int(L * (1 - RATIO)), 1

    def make():
        ids_restore = torch.rand(B, L, device=DEVICE).argsort(dim=1).argsort(dim=1)
        return (_randn(B, P + K, D, dtype=dtype, grad=backward),
                _randn(1, 1, D, dtype=dtype, grad=backward), ids_restore,
                _randn(1, P + L, D, dtype=dtype, grad=backward),
                _randn(B, P + L, D, dtype=dtype) if backward else None)

    def run(x, mask_token, ids_restore, pos, grad):
        out = op(x, mask_token, ids_restore, P, pos)
        return _grad_of(out, (x, mask_token, pos), grad) if backward else out

    es = torch.tensor([], dtype=dtype).element_size()
    small = (P + L) * D * es + D * es  # pos embed and mask token (or their gradients)
    moved = B * (P + K) * D * es + B * L * 8 + small + B * (P + L) * D * es
    if backward:
        moved += B * (P + L) * D * es + B * L * 8 + B * (P + K) * D * es + small
    run_case(benchmark, run, make, moved, op="unshuffle", impl=impl, shape=list(shape),
             dtype=str(dtype), direction="fwd+bwd" if backward else "fwd")


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("norm_pix_loss", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", IMAGES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("video", [False, pytest.param(True, marks=VIDEO_OPS)],
                         ids=["image", "video"])
def test_mae_loss(benchmark, video, impl, B, dtype, norm_pix_loss, backward):
    """Images: ViT-B/16 at 75%; videos: VideoMAE-B (16 frames, 2x16x16 tubelets) at 90%."""
    op = _select(benchmark, impl, "mae_loss")
    ratio, tubelet = (TUBE_RATIO, 2) if video else (RATIO, 1)
    shape = (max(1, B // 8), 3, 16, 224, 224) if video else (B, 3, 224, 224)
    L = (224 // PATCH) ** 2 * (shape[2] // tubelet if video else 1)
    E = tubelet * PATCH * PATCH * 3

    def make():
        mask = (torch.rand(shape[0], L, device=DEVICE).argsort(1)
                >= int(L * (1 - ratio))).float()
        return _randn(*shape, dtype=dtype), _randn(shape[0], L, E, dtype=dtype, grad=backward), mask

    def run(imgs, pred, mask):
        loss = op(imgs, pred, mask, PATCH, norm_pix_loss, tubelet)
        return _grad_of(loss, pred, None) if backward else loss

    es = torch.tensor([], dtype=dtype).element_size()
    masked = ratio * shape[0] * L * E * es  # the removed patches of the input and of pred
    moved = int(2 * masked + shape[0] * L * 4 + (2 * masked + shape[0] * L * E * es) * backward)
    run_case(benchmark, run, make, moved, op="mae_loss_video" if video else "mae_loss",
             impl=impl, shape=list(shape), dtype=str(dtype),
             direction="fwd+bwd" if backward else "fwd", norm_pix_loss=norm_pix_loss)


# name -> (input shape for a batch B, the call): ViT-B/16 images, VideoMAE-B videos (16 frames
# of 224x224 in 2x16x16 tubelets)
PATCHIFIES = {
    "patchify": (lambda B: (B, 3, 224, 224), lambda op, x: op(x, PATCH)),
    "patchify3d": (lambda B: (max(1, B // 8), 3, 16, 224, 224),
                   lambda op, x: op(x, (2, PATCH, PATCH))),
}
PATCHIFY_NAMES = ["patchify", pytest.param("patchify3d", marks=VIDEO_OPS)]


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", IMAGES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", PATCHIFY_NAMES)
def test_patchify(benchmark, name, impl, B, dtype, backward):
    op = _select(benchmark, impl, name)
    shape, call = PATCHIFIES[name]

    def make():
        x = _randn(*shape(B), dtype=dtype, grad=backward)
        return x, (torch.randn_like(call(getattr(reference, name), x.detach()))
                   if backward else None)

    def run(x, grad):
        out = call(op, x)
        return _grad_of(out, x, grad) if backward else out

    moved = 2 * tensor_bytes(make()[0]) * (1 + backward)
    run_case(benchmark, run, make, moved, op=name, impl=impl, shape=list(shape(B)),
             dtype=str(dtype), direction="fwd+bwd" if backward else "fwd")


@token_cases(ENCODER)
@pytest.mark.parametrize("name", ["gather_tokens", "scatter_tokens"])
def test_gather_scatter(benchmark, name, impl, shape, dtype, backward):
    op = _select(benchmark, impl, name)
    B, L, D = shape
    K = int(L * (1 - RATIO))
    gather = name == "gather_tokens"

    def make():
        index = torch.rand(B, L, device=DEVICE).argsort(dim=1)[:, :K].contiguous()
        data = _randn(B, L if gather else K, D, dtype=dtype, grad=backward)
        grad = _randn(B, K if gather else L, D, dtype=dtype) if backward else None
        return data, index, grad

    def run(data, index, grad):
        out = op(data, index) if gather else op(data, index, L)
        return _grad_of(out, data, grad) if backward else out

    es = torch.tensor([], dtype=dtype).element_size()
    one_way = B * K * 8 + B * K * D * es + B * (K if gather else L) * D * es
    other_way = B * K * 8 + B * K * D * es + B * (L if gather else K) * D * es
    run_case(benchmark, run, make, one_way + other_way * backward, op=name, impl=impl,
             shape=list(shape), dtype=str(dtype), direction="fwd+bwd" if backward else "fwd")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", IMAGES)
@pytest.mark.parametrize("impl", IMPLS)
def test_hog_targets(benchmark, impl, B, dtype):
    """MaskFeat's HOG targets at ViT-B/16 sizes (9 bins, 8x8 cells): ours computes only the 75%
    masked patches, as the loss asks; the reference computes every patch, as one would
    without the kernel."""
    op = _select(benchmark, impl, "hog_targets")
    L = (224 // PATCH) ** 2
    F = 3 * (PATCH // 8) ** 2 * 9

    def make():
        mask = (torch.rand(B, L, device=DEVICE).argsort(1) >= int(L * (1 - RATIO))).float()
        return _randn(B, 3, 224, 224, dtype=dtype), mask

    def run(imgs, mask):
        return op(imgs, PATCH, mask=mask) if impl == "ours" else op(imgs, PATCH)

    es = torch.tensor([], dtype=dtype).element_size()
    moved = int(RATIO * B * 3 * 224 * 224 * es + B * L * 4 + B * L * F * 4)
    run_case(benchmark, run, make, moved, op="hog_targets", impl=impl, shape=[B, 3, 224, 224],
             dtype=str(dtype), direction="fwd")
