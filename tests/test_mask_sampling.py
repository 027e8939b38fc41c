"""block_masking, grid_masking and tube_masking against the reference: forward bitwise, backward,
dtypes, odd grids, non-contiguous input, seeding, the properties each strategy promises, and the
model's mask_type. Each runs on the op's CPU kernel and on its Triton launcher (interpreted)."""
import pytest
import torch

import mae_kernels as mk
from mae import MAE
from mae_kernels import reference as ref

from .utils import DTYPES, assert_same_grads, running


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _assert_same(got, want):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)


def _same_backward(op, reference_op, x):
    """The gradient reaching x through x_masked equals the reference's, bit for bit."""
    a, b = _leaf(x), _leaf(x)
    out = op(a)[0]
    grad = torch.randn_like(out)
    (ga,) = torch.autograd.grad(out, a, grad)
    (gb,) = torch.autograd.grad(reference_op(b)[0], b, grad)
    assert torch.equal(ga, gb)


# (grid, D): 1x2, odd non-square grids, D not a multiple of 8 (ViT-B/16's 14x14: below)
BLOCK_GRIDS = [((1, 2), 3), ((3, 5), 4), ((7, 7), 33)]


# every dtype on the widest case (the gather is the copy random_masking's dtype tests cover);
# float32 on the rest
BLOCK_CASES = [(torch.float32, g, D, r) for g, D in BLOCK_GRIDS for r in (0.0, 0.4, 0.75)
               if int(g[0] * g[1] * (1 - r))]
BLOCK_CASES += [(dtype, (7, 7), 33, 0.75) for dtype in DTYPES[1:]]


@pytest.mark.parametrize("dtype,grid,D,ratio", BLOCK_CASES)
def test_block_masking(implementation, dtype, grid, D, ratio):
    L = grid[0] * grid[1]
    x = torch.randn(3, L, D, dtype=dtype)
    noise = torch.rand(3, L, 5)
    _assert_same(mk.block_masking(x, ratio, grid, noise), ref.block_masking(x, ratio, grid, noise))
    _same_backward(lambda t: mk.block_masking(t, ratio, grid, noise),
                   lambda t: ref.block_masking(t, ratio, grid, noise), x)


def test_block_masking_vit_b_grid(implementation):
    """14x14 patches (ViT-B/16 at 224px): 196 rectangle attempts per sample."""
    x = torch.randn(2, 196, 8)
    noise = torch.rand(2, 196, 5)
    _assert_same(mk.block_masking(x, 0.75, (14, 14), noise),
                 ref.block_masking(x, 0.75, (14, 14), noise))


def test_block_masking_options_and_seed(implementation):
    x = torch.randn(4, 64, 6)
    noise = torch.rand(4, 64, 5)
    for options in (dict(min_patches=1), dict(min_patches=16, aspect_ratio=(0.5, 2.0))):
        got = mk.block_masking(x, 0.6, (8, 8), noise, **options)
        want = ref.block_masking(x, 0.6, (8, 8), noise, **options)
        _assert_same(got, want)
    torch.manual_seed(7)
    got = mk.block_masking(x, 0.5, (8, 8))
    torch.manual_seed(7)
    _assert_same(got, ref.block_masking(x, 0.5, (8, 8)))


def test_block_masking_masks_blocks(implementation):
    """Masked tokens come in rectangles: far more masked neighbours than random masking gives,
    and exactly L - len_keep masked in every sample."""
    B, h, w, ratio = 4, 10, 10, 0.5
    x = torch.randn(B, h * w, 4)
    _, mask, ids_restore = mk.block_masking(x, ratio, (h, w))
    assert torch.equal(mask.sum(1), torch.full((B,), h * w - int(h * w * (1 - ratio)),
                                               dtype=mask.dtype))
    assert torch.equal(torch.sort(ids_restore, 1).values,
                       torch.arange(h * w).expand(B, -1))

    def same_neighbour_fraction(m):
        m = m.view(B, h, w)
        return ((m[:, 1:] == m[:, :-1]).float().mean() + (m[:, :, 1:] == m[:, :, :-1]).float()
                .mean()).item() / 2

    random_mask = mk.random_masking(x, ratio)[1]
    assert same_neighbour_fraction(mask) > same_neighbour_fraction(random_mask) + 0.2


def test_block_masking_non_contiguous(implementation):
    x = torch.randn(2, 20, 12)[:, :, ::2]
    noise = torch.rand(5, 20, 2).permute(2, 1, 0)
    _assert_same(mk.block_masking(x, 0.5, (4, 5), noise),
                 ref.block_masking(x.contiguous(), 0.5, (4, 5), noise.contiguous()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid,keep_every,D", [((2, 2), 2, 3), ((6, 4), 2, 33), ((6, 9), 3, 8),
                                               ((3, 3), 1, 4)])
def test_grid_masking(implementation, dtype, grid, keep_every, D):
    L = grid[0] * grid[1]
    x = torch.randn(3, L, D, dtype=dtype)
    offsets = torch.randint(0, keep_every, (3, 2))
    for offset in (None, (keep_every - 1, 0), offsets):
        got = mk.grid_masking(x, grid, keep_every, offset)
        reference_offsets = offsets if offset is offsets else torch.tensor(
            offset or (0, 0)).expand(3, 2)
        _assert_same(got, ref.grid_masking(x, grid, keep_every, reference_offsets))
    _same_backward(lambda t: mk.grid_masking(t, grid, keep_every, offsets),
                   lambda t: ref.grid_masking(t, grid, keep_every, offsets), x)


def test_grid_masking_keeps_one_in_four(implementation):
    x = torch.arange(16.0).view(1, 16, 1)
    x_masked, mask, _ = mk.grid_masking(x, (4, 4))
    assert x_masked.flatten().tolist() == [0.0, 2.0, 8.0, 10.0]
    assert mask.view(4, 4).tolist() == [[0, 1, 0, 1], [1, 1, 1, 1], [0, 1, 0, 1], [1, 1, 1, 1]]
    x_masked, _, _ = mk.grid_masking(x, (4, 4), offset=(1, 1))
    assert x_masked.flatten().tolist() == [5.0, 7.0, 13.0, 15.0]


TUBES = [(1, 1, 1, 1), (2, 2, 7, 5), (3, 8, 16, 8), (2, 3, 49, 33)]  # B, frames, S, D


@pytest.mark.parametrize("dtype", DTYPES)
# VideoMAE's count keeps a token at every ratio below 1 (one of one at 0.9)
@pytest.mark.parametrize("B,frames,S,D,ratio", [(*t, r) for t in TUBES for r in (0.0, 0.75, 0.9)])
def test_tube_masking(implementation, dtype, B, frames, S, D, ratio):
    x = torch.randn(B, frames * S, D, dtype=dtype)
    noise = torch.rand(B, S)
    _assert_same(mk.tube_masking(x, ratio, frames, noise),
                 ref.tube_masking(x, ratio, frames, noise))
    _same_backward(lambda t: mk.tube_masking(t, ratio, frames, noise),
                   lambda t: ref.tube_masking(t, ratio, frames, noise), x)


def test_tube_masking_shares_one_mask_across_frames(implementation):
    B, frames, S = 2, 8, 49
    x = torch.randn(B, frames * S, 16)
    x_masked, mask, ids_restore = mk.tube_masking(x, 0.9, frames)
    per_frame = mask.view(B, frames, S)
    assert torch.equal(per_frame, per_frame[:, :1].expand_as(per_frame))
    assert x_masked.shape == (B, frames * (S - int(S * 0.9)), 16)
    # unshuffle puts every kept token back where it came from
    cls = torch.zeros(B, 1, 16)
    restored = mk.unshuffle(torch.cat([cls, x_masked], 1), torch.zeros(1, 1, 16), ids_restore)
    kept = mask == 0
    assert torch.equal(restored[:, 1:][kept], x[kept])


def test_tube_masking_one_frame_is_videomae_random_masking(implementation):
    """One frame is random masking with VideoMAE's count: 20 of 196 kept at 0.9, the reference's
    first 19 (the MAE rule's count) and the next in noise order."""
    x = torch.randn(3, 196, 6)
    noise = torch.rand(3, 196)
    got = mk.tube_masking(x, 0.9, 1, noise)
    _assert_same(got, ref.tube_masking(x, 0.9, 1, noise))
    mae = ref.random_masking(x, 0.9, noise)
    assert got[0].shape[1] == 20 and mae[0].shape[1] == 19
    assert torch.equal(got[0][:, :19], mae[0])
    assert torch.equal(got[1], mae[1] * (torch.argsort(noise, 1).argsort(1) != 19))


@pytest.mark.parametrize("S,ratio", [(196, 0.9), (16, 0.9), (196, 0.75), (49, 0.55), (10, 0.0)])
def test_tube_masking_keeps_videomae_count(implementation, S, ratio):
    """VideoMAE's TubeMaskingGenerator masks int(mask_ratio * S) positions of every frame; the
    image MAE keeps int(L * (1 - mask_ratio)) (19 of 196 at 0.9, one of 16)."""
    frames = 2
    x = torch.randn(2, frames * S, 3)
    x_masked, mask, _ = mk.tube_masking(x, ratio, frames)
    assert x_masked.shape[1] == frames * (S - int(ratio * S))
    assert mask.view(2, frames, S).sum(2).eq(int(ratio * S)).all()
    assert mk.random_masking(x[:, :S], ratio)[0].shape[1] == int(S * (1 - ratio))


# each strategy (grid with each kind of offset) on (2, 16, D): a 4x4 grid, or 2 frames of 8
STRATEGIES = {
    "random": lambda x, n: mk.random_masking(x, 0.75, n[..., 0]),
    "tube": lambda x, n: mk.tube_masking(x, 0.75, 2, n[:, :8, 0]),
    "block": lambda x, n: mk.block_masking(x, 0.75, (4, 4), n),
    "grid": lambda x, n: mk.grid_masking(x, (4, 4)),
    "grid_pair": lambda x, n: mk.grid_masking(x, (4, 4), 2, (1, 1)),
    "grid_tensor": lambda x, n: mk.grid_masking(x, (4, 4), 2, torch.tensor([[1, 0], [0, 1]])),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_compile_fullgraph(implementation, strategy):
    """Each strategy compiles into one graph (no host sync, no break) and gives eager's outputs
    and gradient."""
    op = STRATEGIES[strategy]
    x = torch.randn(2, 16, 8, requires_grad=True)
    noise = torch.rand(2, 16, 5)

    def step(x, noise):
        x_masked, mask, ids_restore = op(x, noise)
        return x_masked.square().sum(), mask, ids_restore

    eager = step(x, noise)
    (eager_grad,) = torch.autograd.grad(eager[0], x)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)(x, noise)
    (grad,) = torch.autograd.grad(compiled[0], x)
    _assert_same(compiled[1:], eager[1:])
    torch.testing.assert_close(compiled[0], eager[0])
    assert torch.equal(grad, eager_grad)


def test_grid_offset_checks():
    """Host-side offsets are checked on the host; a tensor's range in eager mode."""
    x = torch.randn(2, 16, 3)
    with pytest.raises(ValueError, match="offset"):
        mk.grid_masking(x, (4, 4), 2, (0, 2))
    with pytest.raises(ValueError, match="offset"):
        mk.grid_masking(x, (4, 4), 2, torch.tensor([[0, 0], [2, 0]]))


def test_model_grid_compiles_fullgraph():
    """MAE(mask_type="grid") trains under torch.compile(fullgraph=True) on the CPU kernels, with
    eager's loss and gradients."""
    config = {"img_size": 32, "patch_size": 8, "encoder_dim": 32, "encoder_layers": 1,
              "decoder_dim": 32, "decoder_layers": 1, "mask_type": "grid"}
    model, plain = MAE(config), MAE(config)
    plain.load_state_dict(model.state_dict())
    imgs = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    with running("cpu"):
        compiled = torch.compile(model, fullgraph=True)(imgs)
        compiled.loss.backward()
        want = plain(imgs)
        want.loss.backward()
    torch.testing.assert_close(compiled.loss, want.loss)
    assert torch.equal(compiled.mask, want.mask)
    assert_same_grads(model, plain)


@pytest.mark.parametrize("mask_type", ["block", "grid"])
def test_model_mask_type(implementation, mask_type):
    """The model trains with each mask sampling, kernels (each implementation) or reference, to
    the same loss."""
    config = {"img_size": 32, "patch_size": 8, "encoder_dim": 32, "encoder_layers": 1,
              "decoder_dim": 32, "decoder_layers": 1, "mask_type": mask_type}
    fused, plain = MAE(config), MAE({**config, "use_kernels": False})
    plain.load_state_dict(fused.state_dict())
    imgs = torch.randn(2, 3, 32, 32)
    noise = fused.draw_noise(2)
    got, want = fused(imgs, noise=noise), plain(imgs, noise=noise)
    assert torch.equal(got.mask, want.mask)
    torch.testing.assert_close(got.loss, want.loss)
    assert got.mask.sum(1).tolist() == [12.0, 12.0]
    got.loss.backward()
    assert fused.patch_embed.proj.weight.grad.abs().sum() > 0


def test_model_grid_needs_a_grid_ratio():
    with pytest.raises(ValueError, match="mask_ratio"):
        MAE({"img_size": 32, "patch_size": 8, "mask_type": "grid", "mask_ratio": 0.6})
    with pytest.raises(ValueError, match="mask_type"):
        MAE({"mask_type": "tube"})


def test_block_cover_follows_the_documented_draws():
    """Two rectangles worked out by hand from the documented algorithm (4x4 grid, 6 to mask)."""
    draws = torch.rand(1, 16, 4)
    # area 4 + floor(0.5 * 3) = 5, aspect 1: a 2x2 square at top 0, left floor(0.99 * 3) = 2
    draws[0, 0] = torch.tensor([0.5, 1.0, 0.0, 0.99])
    # 2 left: area 2, aspect 2: h = 2, w = 1 at top floor(0.7 * 3) = 2, left 0
    draws[0, 1] = torch.tensor([0.5, 2.0, 0.7, 0.0])
    covered = ref.block_cover(draws, (4, 4), num_mask=6, min_patches=4).view(4, 4).int()
    assert covered.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [1, 0, 0, 0], [1, 0, 0, 0]]
