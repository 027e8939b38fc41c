"""The decoder side's ops (Pixio, CrossMAE) against the PyTorch reference, eager and compiled, with
the bandwidth floor: Pixio's masking in 4x4 units, CrossMAE's three-way split, the decoder queries
and the loss over the predicted subset, forward and forward+backward.

GPU: Pixio at 256 px (16x16 patches, L = 256) with ViT-B and ViT-H widths; CrossMAE-B (L = 196,
75% masked, 25% of the patches predicted: 49), decoder width 512; float32 and bfloat16.
CPU: one small size of each, as a smoke test.
"""
from __future__ import annotations

import pytest
import torch

import mae_kernels
from mae_kernels import reference

from .common import GPU_SIZES, Compiled, run_case
from .test_ops import DEVICE, DTYPES, IMPLS, PATCH, VIT_B, _grad_of, _randn, _select

DECODER_SIDE = pytest.mark.decoder_side  # the GPU plan selects these with -m decoder_side
if GPU_SIZES:
    PIXIO_TOKENS = [pytest.param((256, 256, 768), marks=VIT_B), (64, 256, 1280)]
    CROSS_TOKENS = [pytest.param((256, 196, 768), marks=VIT_B)]
    CROSS_DECODER = [pytest.param((256, 196, 512), marks=VIT_B), (64, 196, 512)]
    IMAGES = [pytest.param(256, marks=VIT_B), 64]
else:
    PIXIO_TOKENS, CROSS_TOKENS, CROSS_DECODER, IMAGES = ([(8, 256, 768)], [(8, 196, 768)],
                                                         [(8, 196, 512)], [8])
RATIO, PREDICT, GRID = 0.75, 0.25, 4


def cases(shapes):
    marks = [DECODER_SIDE,
             pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"]),
             pytest.mark.parametrize("dtype", DTYPES, ids=str),
             pytest.mark.parametrize("shape", shapes, ids=lambda s: "x".join(map(str, s))),
             pytest.mark.parametrize("impl", IMPLS)]

    def apply(fn):
        for mark in marks:
            fn = mark(fn)
        return fn

    return apply


def _predicted_ids(B, L, device=DEVICE):
    """CrossMAE's predicted positions at 75% / 25%: the last 49 of each noise order, sorted."""
    order = torch.rand(B, L, device=device).argsort(dim=1)
    count = L - int(L * (1 - RATIO)) - int(L * (RATIO - PREDICT))
    return torch.sort(order[:, L - count:], dim=1).values


def _masking(benchmark, impl, name, shape, dtype, backward, call, units):
    """x (B, L, D) -> (x_masked, mask, ids_restore); moved: the noise read, mask and
    ids_restore written, the kept rows read and written (backward: the gradient read and
    scattered into a zeroed x-sized gradient)."""
    op = _select(benchmark, impl, name)
    B, L, D = shape
    K = int(units * (1 - RATIO)) * (L // units)

    def make():
        return (_randn(B, L, D, dtype=dtype, grad=backward),
                torch.rand(B, units, device=DEVICE),
                _randn(B, K, D, dtype=dtype) if backward else None)

    def run(x, noise, grad):
        out = call(op, x, noise)
        return _grad_of(out[0], x, grad) if backward else out

    es = torch.tensor([], dtype=dtype).element_size()
    moved = (B * units * 4 + B * L * (4 + 8) + 2 * B * K * D * es
             + (B * K * D * es + B * L * D * es) * backward)
    run_case(benchmark, run, make, moved, op=name, impl=impl, shape=list(shape),
             dtype=str(dtype), direction="fwd+bwd" if backward else "fwd")


@cases(PIXIO_TOKENS)
def test_pixio_masking(benchmark, impl, shape, dtype, backward):
    units = shape[1] // GRID**2
    _masking(benchmark, impl, "pixio_masking", shape, dtype, backward,
             lambda op, x, noise: op(x, RATIO, GRID, noise), units)


@cases(CROSS_TOKENS)
def test_crossmae_masking(benchmark, impl, shape, dtype, backward):
    _masking(benchmark, impl, "crossmae_masking", shape, dtype, backward,
             lambda op, x, noise: op(x, RATIO, PREDICT, noise), shape[1])


@cases(CROSS_DECODER)
def test_decoder_queries(benchmark, impl, shape, dtype, backward):
    """The queries of the 49 predicted patches (mask token + a learned position embedding, so
    the backward sums both gradients); moved: ids read, the queries written, the table read
    once (backward: the gradient read, the table's and the mask token's written)."""
    op = _select(benchmark, impl, "decoder_queries")
    B, L, D = shape
    N = _predicted_ids(1, L).shape[1]

    def make():
        return (_randn(1, 1, D, dtype=dtype, grad=backward),
                _randn(1, 1 + L, D, dtype=dtype, grad=backward), _predicted_ids(B, L),
                _randn(B, N, D, dtype=dtype) if backward else None)

    def run(mask_token, pos, ids_pred, grad):
        out = op(mask_token, pos, ids_pred, 1)
        return _grad_of(out, (mask_token, pos), grad) if backward else out

    es = torch.tensor([], dtype=dtype).element_size()
    table = (1 + L) * D * es + D * es
    moved = B * N * 8 + B * N * D * es + table + (B * N * 8 + B * N * D * es + table) * backward
    run_case(benchmark, run, make, moved, op="decoder_queries", impl=impl, shape=list(shape),
             dtype=str(dtype), direction="fwd+bwd" if backward else "fwd")


def _predicted_loss(impl: str, smoke: bool):
    """mae_loss over the predicted subset (ours), or its reference, eager or compiled."""
    if impl == "ours":
        def ours(imgs, pred, ids_pred, p, norm_pix_loss):
            with mae_kernels.skip_index_checks():
                return mae_kernels.mae_loss(imgs, pred, None, p, norm_pix_loss,
                                            ids_pred=ids_pred)
        return ours
    if impl == "compiled":
        return Compiled(reference.predicted_loss, "aot_eager" if smoke else "inductor",
                        dynamic=False)
    return reference.predicted_loss


@DECODER_SIDE
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", IMAGES)
@pytest.mark.parametrize("impl", IMPLS)
def test_predicted_loss(benchmark, impl, B, dtype, backward):
    """CrossMAE-B's loss: 49 predicted patches of 196, norm-pix targets; moved: those patches
    of the image and of pred read (backward: again, and the gradient written)."""
    benchmark.group = "predicted_loss"
    op = _predicted_loss(impl, benchmark.disabled and DEVICE == "cpu")
    L, E = (224 // PATCH) ** 2, PATCH * PATCH * 3

    def make():
        ids_pred = _predicted_ids(B, L)
        return (_randn(B, 3, 224, 224, dtype=dtype),
                _randn(B, ids_pred.shape[1], E, dtype=dtype, grad=backward), ids_pred)

    def run(imgs, pred, ids_pred):
        loss = op(imgs, pred, ids_pred, PATCH, True)
        return _grad_of(loss, pred, None) if backward else loss

    es = torch.tensor([], dtype=dtype).element_size()
    N = _predicted_ids(1, L).shape[1]
    subset = B * N * E * es
    moved = 2 * subset + B * N * 8 + (3 * subset + B * N * 8) * backward
    run_case(benchmark, run, make, moved, op="predicted_loss", impl=impl, shape=[B, 3, 224, 224],
             dtype=str(dtype), direction="fwd+bwd" if backward else "fwd")
