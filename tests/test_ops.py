"""Every public op against the reference: forward, backward, dtypes, odd shapes, layouts.

The `implementation` fixture runs each test on the ops' CPU kernels and on their Triton launchers
(interpreted), and checks which one ran; gather/scatter have the C++ kernels only.
"""
import numpy as np
import pytest
import torch

import mae_kernels as mk
from mae_kernels import reference as ref
from mae_kernels import tokens

from .utils import DTYPES, assert_close, count_launches, triton_on_cpu

# (B, L, D): B=1, L=1, L not a power of two, D=1, D not a multiple of 8
TOKEN_SHAPES = [(1, 1, 1), (2, 7, 5), (3, 16, 8), (2, 49, 33)]
RATIOS = [0.0, 0.75, 0.9]
# the (shape, ratio) pairs that keep at least one token
MASKINGS = [(s, r) for s in TOKEN_SHAPES for r in RATIOS if int(s[1] * (1 - r)) > 0]


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _non_contiguous(t):
    """The same values, laid out with a stride: a slice of a wider tensor."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,C,H,W,p", [(1, 3, 8, 8, 4), (2, 3, 12, 8, 4), (2, 1, 5, 5, 5),
                                      (1, 2, 6, 9, 3)])
def test_patchify_roundtrip(implementation, dtype, B, C, H, W, p):
    imgs = torch.randn(B, C, H, W, dtype=dtype)
    x = mk.patchify(imgs, p)
    assert torch.equal(x, ref.patchify(imgs, p))
    assert torch.equal(mk.unpatchify(x, p, (H // p, W // p), C), imgs)
    assert torch.equal(mk.patchify(imgs.transpose(2, 3).contiguous().transpose(2, 3), p), x)
    leaf = _leaf(imgs)
    grad = torch.randn_like(x)
    (g,) = torch.autograd.grad(mk.patchify(leaf, p), leaf, grad)
    assert torch.equal(g, ref.unpatchify(grad, p, (H // p, W // p), C))


def test_unpatchify_square_default(implementation):
    x = torch.randn(2, 9, 2 * 2 * 3)
    assert torch.equal(mk.unpatchify(x, 2), ref.unpatchify(x, 2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,ratio", MASKINGS)
def test_random_masking(implementation, dtype, shape, ratio):
    B, L, D = shape
    x = torch.randn(B, L, D, dtype=dtype)
    noise = torch.rand(B, L)
    got, want = mk.random_masking(x, ratio, noise), ref.random_masking(x, ratio, noise)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)
    leaf_a, leaf_b = _leaf(x), _leaf(x)
    grad = torch.randn_like(got[0])
    (ga,) = torch.autograd.grad(mk.random_masking(leaf_a, ratio, noise)[0], leaf_a, grad)
    (gb,) = torch.autograd.grad(ref.random_masking(leaf_b, ratio, noise)[0], leaf_b, grad)
    assert torch.equal(ga, gb)


def test_random_masking_wide_rows(implementation):
    """D spread over several programs and several tiles per program."""
    x = torch.randn(2, 40, 300)
    noise = torch.rand(2, 40)
    got, want = mk.random_masking(x, 0.75, noise), ref.random_masking(x, 0.75, noise)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_random_masking_seeded_is_bitwise_reference(implementation):
    x = torch.randn(4, 49, 16)
    torch.manual_seed(123)
    got = mk.random_masking(x, 0.75)
    torch.manual_seed(123)
    want = ref.random_masking(x, 0.75)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("noise_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_random_masking_ties_and_signs(implementation, noise_dtype):
    """Ties keep the lower index; negative noise, -0.0, inf and NaN sort as torch.argsort."""
    x = torch.randn(3, 12, 4)
    noise = torch.randn(3, 12).to(noise_dtype)
    noise[0] = 0.5
    noise[1, :4] = torch.tensor([0.0, -0.0, -1.0, 0.0])
    noise[2, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -2.0])
    for got, want in zip(mk.random_masking(x, 0.5, noise), ref.random_masking(x, 0.5, noise)):
        assert torch.equal(got, want)


def test_random_masking_non_contiguous(implementation):
    x = torch.randn(2, 10, 6)
    noise = torch.rand(10, 2).t()
    got = mk.random_masking(_non_contiguous(x), 0.6, noise)
    want = ref.random_masking(x, 0.6, noise.contiguous())
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def _unshuffle_inputs(B, L, D, P, ratio, dtype, with_pos):
    _, _, ids_restore = ref.random_masking(torch.empty(B, L, 1), ratio, torch.rand(B, L))
    K = int(L * (1 - ratio))
    x = torch.randn(B, P + K, D, dtype=dtype)
    mask_token = torch.randn(1, 1, D, dtype=dtype)
    pos = torch.randn(1, P + L, D, dtype=dtype) if with_pos else None
    return x, mask_token, ids_restore, pos


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,ratio", MASKINGS)
@pytest.mark.parametrize("P", [0, 1])
@pytest.mark.parametrize("with_pos", [False, True])
def test_unshuffle(implementation, dtype, shape, ratio, P, with_pos):
    B, L, D = shape
    x, mask_token, ids_restore, pos = _unshuffle_inputs(B, L, D, P, ratio, dtype, with_pos)
    leaves = [_leaf(t) for t in (x, mask_token) + ((pos,) if with_pos else ())]
    out = mk.unshuffle(leaves[0], leaves[1], ids_restore, P, leaves[2] if with_pos else None)
    f32 = [_leaf(t.float()) for t in leaves]
    want = ref.unshuffle(f32[0], f32[1], ids_restore, P, f32[2] if with_pos else None)
    assert out.dtype == dtype and out.shape == want.shape
    assert_close(out, want, dtype)
    grad = torch.randn_like(want)
    got_grads = torch.autograd.grad(out, leaves, grad.to(dtype))
    want_grads = torch.autograd.grad(want, f32, grad.to(dtype).float())
    for g, w, leaf in zip(got_grads, want_grads, leaves):
        assert g.dtype == leaf.dtype
        assert_close(g, w, dtype)


def test_unshuffle_mixed_dtypes_promote(implementation):
    """Under autocast the encoder output is bf16 while mask token and pos embed stay float32."""
    x, _, ids_restore, _ = _unshuffle_inputs(2, 9, 4, 1, 0.5, torch.bfloat16, False)
    mask_token, pos = torch.randn(1, 1, 4), torch.randn(1, 10, 4)
    out = mk.unshuffle(x, mask_token, ids_restore, 1, pos)
    want = ref.unshuffle(x, mask_token, ids_restore, 1, pos)
    assert out.dtype == want.dtype == torch.float32
    assert_close(out, want, torch.float32)


def test_unshuffle_non_contiguous(implementation):
    x, mask_token, ids_restore, pos = _unshuffle_inputs(2, 9, 4, 1, 0.5, torch.float32, True)
    out = mk.unshuffle(_non_contiguous(x), mask_token, ids_restore.t().contiguous().t(), 1,
                       _non_contiguous(pos))
    assert torch.equal(out, ref.unshuffle(x, mask_token, ids_restore, 1, pos))


def test_unshuffle_pos_embed_without_grad(implementation):
    x, mask_token, ids_restore, pos = _unshuffle_inputs(2, 9, 4, 1, 0.5, torch.float32, True)
    leaf = _leaf(x)
    out = mk.unshuffle(leaf, mask_token, ids_restore, 1, pos)
    (g,) = torch.autograd.grad(out.sum(), leaf)
    assert torch.equal(g, torch.ones_like(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_pix_loss", [True, False])
@pytest.mark.parametrize("B,C,H,W,p", [(1, 3, 8, 8, 4), (2, 3, 12, 8, 4), (2, 1, 10, 5, 5)])
def test_mae_loss(implementation, dtype, norm_pix_loss, B, C, H, W, p):
    imgs = torch.randn(B, C, H, W, dtype=dtype)
    L = (H // p) * (W // p)
    pred = torch.randn(B, L, p * p * C, dtype=dtype)
    mask = (torch.rand(B, L) < 0.75).float()
    mask[0, 0] = 1.0
    leaf = _leaf(pred)
    loss = mk.mae_loss(imgs, leaf, mask, p, norm_pix_loss)
    f32 = _leaf(pred.float())
    want = ref.mae_loss(imgs.float(), f32, mask, p, norm_pix_loss)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, want, dtype)
    (g,) = torch.autograd.grad(loss, leaf)
    (w,) = torch.autograd.grad(want, f32)
    assert g.dtype == dtype
    assert_close(g, w, dtype)
    assert torch.all(g[mask == 0] == 0)


def test_mae_loss_non_contiguous(implementation):
    imgs = torch.randn(2, 3, 8, 8).transpose(2, 3)
    pred = _non_contiguous(torch.randn(2, 4, 48))
    mask = torch.tensor([[1.0, 0, 1, 1], [0, 1, 1, 0]])
    assert_close(mk.mae_loss(imgs, pred, mask, 4), ref.mae_loss(imgs, pred, mask, 4),
                 torch.float32)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_mae_loss_reads_removed_patches_only(implementation, norm_pix_loss):
    """A NaN or inf in a kept patch of pred or of the image reaches neither the loss nor its
    gradient, on the CPU kernel and the Triton launcher alike, so a non-finite loss does not
    depend on the device; the reference (the official code) returns NaN."""
    imgs = torch.randn(2, 3, 8, 8)
    pred = torch.randn(2, 4, 48)
    mask = torch.tensor([[1.0, 0, 1, 1], [0, 1, 1, 0]])
    want_leaf = _leaf(pred)
    want = ref.mae_loss(imgs, want_leaf, mask, 4, norm_pix_loss)
    poisoned, dirty = pred.clone(), imgs.clone()
    poisoned[0, 1, 5], poisoned[1, 3] = float("nan"), float("inf")
    dirty[0, :, 0:4, 4:8] = float("nan")  # patch 1 of image 0: kept
    assert torch.isnan(ref.mae_loss(imgs, poisoned, mask, 4, norm_pix_loss))
    leaf = _leaf(poisoned)
    loss = mk.mae_loss(dirty, leaf, mask, 4, norm_pix_loss)
    assert_close(loss, want, torch.float32)
    (g,) = torch.autograd.grad(loss, leaf)
    (w,) = torch.autograd.grad(want, want_leaf)
    assert torch.isfinite(g).all() and torch.all(g[mask == 0] == 0)
    assert_close(g, w, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", TOKEN_SHAPES)
def test_gather_scatter_tokens(dtype, shape):
    B, L, D = shape
    K = max(1, L // 2)
    index = torch.stack([torch.randperm(L)[:K] for _ in range(B)])
    x = torch.randn(B, L, D, dtype=dtype)
    assert torch.equal(mk.gather_tokens(x, index), ref.gather_tokens(x, index))
    assert torch.equal(mk.gather_tokens(_non_contiguous(x), index), ref.gather_tokens(x, index))
    src = torch.randn(B, K, D, dtype=dtype)
    assert torch.equal(mk.scatter_tokens(src, index, L), ref.scatter_tokens(src, index, L))
    leaf = _leaf(x)
    grad = torch.randn(B, K, D, dtype=dtype)
    (g,) = torch.autograd.grad(mk.gather_tokens(leaf, index), leaf, grad)
    assert torch.equal(g, ref.scatter_tokens(grad, index, L))
    leaf = _leaf(src)
    grad = torch.randn(B, L, D, dtype=dtype)
    (g,) = torch.autograd.grad(mk.scatter_tokens(leaf, index, L), leaf, grad)
    assert torch.equal(g, ref.gather_tokens(grad, index))


@pytest.mark.parametrize("noise_dtype", [torch.float64, torch.int64])
def test_random_masking_noise_float32_cannot_order(noise_dtype):
    """float64 and integer noise keep their exact order: the Triton launcher sorts them with
    torch.sort instead of its float32 keys."""
    x = torch.randn(2, 12, 4)
    noise = (torch.rand(2, 12, dtype=torch.float64) * 1e-9 + 0.5) if noise_dtype.is_floating_point \
        else torch.randint(0, 5, (2, 12))
    with count_launches() as launches, triton_on_cpu():
        got = mk.random_masking(x, 0.5, noise)
    assert not launches
    assert all(torch.equal(g, w) for g, w in zip(got, ref.random_masking(x, 0.5, noise)))


def test_mask_ratio_accepts_numpy_reals(implementation):
    x = torch.randn(2, 196, 3)
    noise = torch.rand(2, 196)
    for ratio in (np.float32(0.75), np.float64(0.9), 0.5, 0):
        got = mk.random_masking(x, ratio, noise)
        for g, w in zip(got, ref.random_masking(x, ratio, noise)):
            assert torch.equal(g, w)


def test_float64_is_float64_end_to_end(implementation):
    """unshuffle's mask-token / pos-embed sums and the loss are exact to float64 precision."""
    B, L, D, P, ratio = 3, 16, 5, 1, 0.75
    x, mask_token, ids_restore, pos = _unshuffle_inputs(B, L, D, P, ratio, torch.float64, True)
    x, mask_token, pos = (_leaf(t * 1e3 + 1) for t in (x, mask_token, pos))
    want_leaves = [_leaf(t) for t in (x, mask_token, pos)]
    out = mk.unshuffle(x, mask_token, ids_restore, P, pos)
    want = ref.unshuffle(*want_leaves[:2], ids_restore, P, want_leaves[2])
    grad = torch.randn_like(want) * 1e3
    for g, w in zip(torch.autograd.grad(out, [x, mask_token, pos], grad),
                    torch.autograd.grad(want, want_leaves, grad)):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, w, rtol=1e-14, atol=1e-10)
    imgs = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    pred = _leaf(torch.randn(2, 4, 48, dtype=torch.float64))
    mask = torch.tensor([[1.0, 0, 1, 1], [0, 1, 1, 0]])
    loss = mk.mae_loss(imgs, pred, mask, 4)
    want_pred = _leaf(pred)
    want_loss = ref.mae_loss(imgs, want_pred, mask, 4)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, want_loss, rtol=1e-14, atol=0)
    torch.testing.assert_close(torch.autograd.grad(loss, pred)[0],
                               torch.autograd.grad(want_loss, want_pred)[0], rtol=1e-12, atol=1e-15)


def test_gather_scatter_run_the_extension():
    assert "cpu" in tokens.KERNEL_DEVICES, "the C++ extension was not loaded"
    index = torch.tensor([[2, 0]])
    x = torch.randn(1, 3, 4)
    with torch.profiler.profile() as prof:
        mk.gather_tokens(x, index)
        mk.scatter_tokens(x[:, :2], index, 3)
    names = {event.name for event in prof.events()}
    assert {"mae_kernels::gather_tokens", "mae_kernels::scatter_tokens"} <= names


def test_unchecked_non_permutation_fails_loudly_on_cpu():
    """With the index checks skipped (as the model does), an ids_restore that repeats a position
    leaves a kept token with no slot: the CPU backward raises instead of reading garbage."""
    x = torch.randn(1, 1 + 2, 3, requires_grad=True)
    ids_restore = torch.tensor([[0, 0, 2, 3]])  # kept token 1 has no position
    with mk.skip_index_checks():
        out = mk.unshuffle(x, torch.zeros(1, 1, 3), ids_restore, 1)
    with pytest.raises(IndexError, match="out of range"):
        out.sum().backward()
