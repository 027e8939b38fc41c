"""The decoder side's ops (Pixio, CrossMAE) against references written from the upstream code:
Pixio's masking in g x g units and CrossMAE's three-way split (bit for bit), the decoder queries
(CrossMAE's `mask_tokens_grid`, bit for bit in float32) and the loss over the predicted subset
(CrossMAE's `forward_loss`), on each op's CPU kernel and Triton launcher (interpreted): forward,
backward, dtypes, layouts, the torch.library contract, bad input, fullgraph compile.

Upstream: facebookresearch/pixio pretraining/models_pixio.py at b83555d6581f4906f6f1fc1ae0abb04
f622db32f; TonyLianLong/CrossMAE models_cross.py at ed0677a978a54c4dac3d28d54efb6b687c9d3dec.
`reference.pixio_masking` / `reference.crossmae_masking` follow them line for line (with the
noise as an argument and a stable sort); the CrossMAE decoder-query and loss lines are below.
"""
import pytest
import torch

import mae_kernels as mk
from mae_kernels import masking
from mae_kernels import reference as ref

from .test_custom_ops import assert_compiles_as_eager
from .test_mask_sampling import _assert_same, _leaf
from .utils import DTYPES, IMPLEMENTATIONS, assert_close, running

ops = torch.ops.mae_kernels


def crossmae_queries(mask_token, decoder_pos_embed, mask):
    """CrossMAE's `mask_tokens_grid` (models_cross.py), line for line."""
    N = mask.shape[0]
    x = decoder_pos_embed[:, 1:].masked_select(mask.bool().unsqueeze(-1)).reshape(
        N, -1, mask_token.shape[-1])
    return x + mask_token


def crossmae_loss(imgs, pred, mask, patch_size, norm_pix_loss):
    """CrossMAE's `forward_loss` (models_cross.py), line for line (patchify: MAE's)."""
    target = ref.patchify(imgs, patch_size)
    target = target.masked_select(mask.bool().unsqueeze(-1)).reshape(target.shape[0], -1,
                                                                     target.shape[-1])
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.e-6)**.5
    loss = (pred - target) ** 2
    return loss.mean()


# (grid (H, W), mask_grid, D, mask_ratio): Pixio's 16x16 at 4x4 units, rectangles, units of 1
PIXIO_CASES = [((16, 16), 4, 8, 0.75), ((8, 12), 2, 5, 0.5), ((6, 6), 3, 33, 0.3),
               ((4, 4), 1, 3, 0.75), ((8, 8), 8, 4, 0.0)]


@pytest.mark.parametrize("grid,g,D,ratio", PIXIO_CASES)
def test_pixio_masking(implementation, grid, g, D, ratio):
    H, W = grid
    x = torch.randn(3, H * W, D)
    noise = torch.rand(3, (H // g) * (W // g))
    got = mk.pixio_masking(x, ratio, g, noise, grid if H != W else None)
    _assert_same(got, ref.pixio_masking(x, ratio, g, noise, grid))
    a, b = _leaf(x), _leaf(x)
    out = mk.pixio_masking(a, ratio, g, noise, grid)[0]
    grad = torch.randn_like(out)
    (ga,) = torch.autograd.grad(out, a, grad)
    (gb,) = torch.autograd.grad(ref.pixio_masking(b, ratio, g, noise, grid)[0], b, grad)
    assert torch.equal(ga, gb)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noise_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pixio_masking_dtypes(implementation, dtype, noise_dtype):
    """Every x dtype; noise in any float dtype orders the units as the reference's argsort."""
    x = torch.randn(2, 64, 6, dtype=dtype)
    noise = torch.rand(2, 4).to(noise_dtype)
    noise[1, 2] = noise[1, 0]  # a tie: the lower unit first
    _assert_same(mk.pixio_masking(x, 0.5, 4, noise), ref.pixio_masking(x, 0.5, 4, noise))


def test_pixio_masking_keeps_whole_units(implementation):
    """Each sample keeps int(units * (1 - ratio)) whole 4x4 units, each unit's 16 patches
    together and row-major (Pixio's x_masked), and unshuffle puts them back."""
    B, side, g = 2, 16, 4
    x = torch.arange(side * side, dtype=torch.float32).view(1, -1, 1).repeat(B, 1, 1)
    x_masked, mask, ids_restore = mk.pixio_masking(x, 0.75, g)
    assert x_masked.shape == (B, 4 * g * g, 1)
    units = mask.view(B, side // g, g, side // g, g)
    assert torch.equal(units.amax(dim=(2, 4)), units.amin(dim=(2, 4)))  # whole units
    first = x_masked[0, :g * g, 0].long()
    rows, cols = first // side, first % side
    assert torch.equal(rows, rows[0] + torch.arange(g).repeat_interleave(g))
    assert torch.equal(cols, cols[0] + torch.arange(g).repeat(g))
    restored = mk.unshuffle(torch.cat([torch.zeros(B, 1, 1), x_masked], 1),
                            torch.full((1, 1, 1), -1.0), ids_restore)
    assert torch.equal(restored[:, 1:][mask == 0], x[mask == 0])


def test_pixio_masking_seed(implementation):
    x = torch.randn(2, 64, 4)
    torch.manual_seed(3)
    got = mk.pixio_masking(x, 0.75, 4)
    torch.manual_seed(3)
    _assert_same(got, ref.pixio_masking(x, 0.75, 4))


CROSS_CASES = [(196, 0.75, 0.25), (196, 0.75, 0.75), (64, 0.75, 0.5), (50, 0.6, 0.1),
               (9, 0.5, 0.2)]


@pytest.mark.parametrize("L,ratio,kept", CROSS_CASES)
def test_crossmae_masking(implementation, L, ratio, kept):
    x = torch.randn(3, L, 5)
    noise = torch.rand(3, L)
    got = mk.crossmae_masking(x, ratio, kept, noise)
    want = ref.crossmae_masking(x, ratio, kept, noise)
    _assert_same(got, want)
    len_keep = int(L * (1 - ratio))
    predicted = L - len_keep - int(L * (ratio - kept))
    assert got[0].shape[1] == len_keep and got[1].sum(1).eq(predicted).all()
    # ids_pred: the predicted positions in masked_select's (position) order
    ids_pred = masking.masking_with_ids(x, ratio, noise, predict_ratio=kept)[4]
    positions = torch.arange(L).expand(3, L).masked_select(want[1].bool()).view(3, -1)
    assert torch.equal(ids_pred, positions)


def test_crossmae_masking_dtypes_and_backward(implementation):
    for dtype in DTYPES:
        x = torch.randn(2, 49, 7, dtype=dtype)
        noise = torch.rand(2, 49)
        _assert_same(mk.crossmae_masking(x, 0.75, 0.25, noise),
                     ref.crossmae_masking(x, 0.75, 0.25, noise))
    a, b = _leaf(x), _leaf(x)
    out = mk.crossmae_masking(a, 0.75, 0.25, noise)[0]
    grad = torch.randn_like(out)
    (ga,) = torch.autograd.grad(out, a, grad)
    (gb,) = torch.autograd.grad(ref.crossmae_masking(b, 0.75, 0.25, noise)[0], b, grad)
    assert torch.equal(ga, gb)


def test_units_with_a_predicted_subset(implementation):
    """Pixio's units split three ways: the predicted subset is the last whole units of the
    order, listed in position order; the kept tokens are Pixio's."""
    x = torch.randn(2, 256, 3)
    noise = torch.rand(2, 16)
    got = masking.masking_with_ids(x, 0.75, noise, mask_grid=4, predict_ratio=0.25)
    pixio = ref.pixio_masking(x, 0.75, 4, noise)
    assert torch.equal(got[0], pixio[0]) and torch.equal(got[2], pixio[2])
    predicted_units = 16 - 4 - int(16 * 0.5)
    order = torch.argsort(pixio[2], dim=1)
    want = torch.sort(order[:, 256 - 16 * predicted_units:], dim=1).values
    assert torch.equal(got[4], want)
    assert torch.equal(got[1], torch.zeros(2, 256).scatter_(1, want, 1))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("P,learned", [(1, False), (1, True), (8, True), (0, True)])
def test_decoder_queries(implementation, dtype, P, learned):
    """CrossMAE's mask_tokens_grid: bit for bit in float32 and float64, the gradients of the
    mask token and (when learned) of the position embedding."""
    B, L, D = 3, 49, 20
    _, mask, _, _, ids_pred = masking.masking_with_ids(torch.randn(B, L, 1), 0.75,
                                                       torch.rand(B, L), predict_ratio=0.5)
    mask_token = torch.randn(1, 1, D, dtype=dtype, requires_grad=True)
    pos = torch.randn(1, P + L, D, dtype=dtype, requires_grad=learned)
    out = mk.decoder_queries(mask_token, pos, ids_pred, P)

    def one_prefix(t):  # CrossMAE's table has one cls row
        return torch.cat([t.new_zeros(1, 1, D), t[:, P:]], 1)

    wide = torch.promote_types(dtype, torch.float32)  # the reference's precision
    f32 = [_leaf(mask_token.to(wide)), pos.detach().to(wide).requires_grad_(learned)]
    want = crossmae_queries(f32[0], one_prefix(f32[1]), mask)
    assert out.dtype == dtype and out.shape == (B, ids_pred.shape[1], D)
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(out, crossmae_queries(mask_token, one_prefix(pos), mask))
    assert_close(out, want, dtype)
    grad = torch.randn_like(want)
    leaves = [mask_token] + ([pos] if learned else [])
    got_grads = torch.autograd.grad(out, leaves, grad.to(dtype))
    want_grads = torch.autograd.grad(want, f32[:len(leaves)], grad.to(dtype).to(wide))
    for g, w, leaf in zip(got_grads, want_grads, leaves):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        assert_close(g, w, dtype)


def test_decoder_queries_mixed_dtypes_and_layouts(implementation):
    """A bf16 mask token with a float32 table promotes to float32; strided inputs read right."""
    L, D = 16, 8
    ids_pred = torch.tensor([[0, 3, 9, 15], [1, 2, 4, 8]])
    pos = torch.randn(1, 1 + L, 2 * D)[..., ::2]
    mask_token = torch.randn(1, 1, D, dtype=torch.bfloat16)
    out = mk.decoder_queries(mask_token, pos, ids_pred.t().contiguous().t())
    assert out.dtype == torch.float32
    assert torch.equal(out, ref.decoder_queries(mask_token, pos.contiguous(), ids_pred))


def test_predicted_loss(implementation):
    """mae_loss over the predicted subset: CrossMAE's forward_loss and its gradient; only the
    predicted patches of the image are read (NaN elsewhere does not reach the loss)."""
    B, p = 3, 4
    imgs = torch.randn(B, 3, 28, 28)
    _, mask, _, _, ids_pred = masking.masking_with_ids(torch.randn(B, 49, 1), 0.75,
                                                       torch.rand(B, 49), predict_ratio=0.25)
    pred = torch.randn(B, ids_pred.shape[1], p * p * 3)
    for norm_pix_loss in (True, False):
        a, b = _leaf(pred), _leaf(pred)
        loss = mk.mae_loss(imgs, a, None, p, norm_pix_loss, ids_pred=ids_pred)
        want = crossmae_loss(imgs, b, mask, p, norm_pix_loss)
        assert loss.dtype == torch.float32 and loss.dim() == 0
        torch.testing.assert_close(loss, want)
        (ga,) = torch.autograd.grad(loss, a)
        (gb,) = torch.autograd.grad(want, b)
        torch.testing.assert_close(ga, gb)
    hidden = ref.unpatchify(torch.where(mask.bool().unsqueeze(-1), ref.patchify(imgs, p),
                                        float("nan")), p)
    assert torch.equal(mk.mae_loss(hidden, pred, None, p, ids_pred=ids_pred),
                       mk.mae_loss(imgs, pred, None, p, ids_pred=ids_pred))
    weights = torch.rand(B, ids_pred.shape[1])
    torch.testing.assert_close(
        mk.mae_loss(imgs, pred, weights, p, ids_pred=ids_pred),
        ref.predicted_loss(imgs, pred, ids_pred, p, True, weights))


@pytest.mark.parametrize("dtype", DTYPES)
def test_predicted_loss_dtypes(implementation, dtype):
    imgs = torch.randn(2, 3, 16, 16, dtype=dtype)
    ids_pred = torch.tensor([[0, 5, 7], [1, 2, 15]])
    pred = torch.randn(2, 3, 48, dtype=dtype)
    loss = mk.mae_loss(imgs, pred, None, 4, ids_pred=ids_pred)
    assert loss.dtype == torch.float32
    assert_close(loss, ref.predicted_loss(imgs.float(), pred.float(), ids_pred, 4), dtype)


def _crossmae_step(x, mask_token, pos, imgs, head, noise):
    x_masked, mask, _, _, ids_pred = masking.masking_with_ids(x, 0.75, noise, mask_grid=2,
                                                              predict_ratio=0.5)
    queries = mk.decoder_queries(mask_token, pos, ids_pred)
    pred = head(queries + x_masked.mean(1, keepdim=True))
    return mk.mae_loss(imgs, pred, None, 4, True, ids_pred=ids_pred), mask


def test_compile_fullgraph_decoder_chain(implementation):
    """Units + the three-way split, the queries and the subset loss compile into one graph
    (no host sync, no break) with eager's loss, mask and gradients."""
    assert_compiles_as_eager(_crossmae_step, (2, 4))


def _opcheck_cases():
    x = torch.randn(2, 16, 5, requires_grad=True)
    ids_pred = torch.tensor([[1, 4, 6], [0, 2, 15]])
    grad = torch.randn(2, 3, 6)
    imgs = torch.randn(2, 3, 1, 16, 16)  # the op takes videos: an image is one frame
    return {
        "masking_units": (ops.masking, (x, torch.rand(2, 4), None, None, 4, 1, 4,
                                        masking.UNITS, 2, torch.float32)),
        "masking_predicted": (ops.masking, (x, torch.rand(2, 16), None, None, 4, 1, 16,
                                            masking.RANDOM, 0, torch.float32, 6)),
        "masking_units_predicted": (ops.masking, (x, torch.rand(2, 4), None, None, 4, 1, 4,
                                                  masking.UNITS, 2, torch.float32, 8)),
        "decoder_queries": (ops.decoder_queries, (torch.randn(1, 1, 6, requires_grad=True),
                                                  torch.randn(1, 17, 6, requires_grad=True),
                                                  ids_pred, 1)),
        "decoder_queries_backward": (ops.decoder_queries_backward, (grad, ids_pred, 16)),
        "mae_loss_predicted": (ops.mae_loss, (imgs, torch.randn(2, 3, 48, requires_grad=True),
                                              torch.ones(2, 3), 1, 4, True, False, None,
                                              ids_pred)),
        "mae_loss_backward_predicted": (ops.mae_loss_backward, (
            torch.tensor(1.0), imgs, torch.randn(2, 3, 48), torch.ones(2, 3), 1, 4, True, False,
            None, ids_pred)),
    }


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", sorted(_opcheck_cases()))
def test_opcheck(impl, name):
    op, args = _opcheck_cases()[name]
    with running(impl):
        torch.library.opcheck(op, args)


def test_gradcheck_float64():
    f64 = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 16, 3, **f64)
    ids_pred = torch.tensor([[1, 4, 6], [0, 2, 15]])
    imgs = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    noise = torch.rand(2, 16)
    checks = {
        "pixio_masking": (lambda t: mk.pixio_masking(t, 0.5, 2, noise[:, :4])[0], (x,)),
        "crossmae_masking": (lambda t: mk.crossmae_masking(t, 0.75, 0.25, noise)[0], (x,)),
        "decoder_queries": (lambda m, p: mk.decoder_queries(m, p, ids_pred),
                            (torch.randn(1, 1, 3, **f64), torch.randn(1, 17, 3, **f64))),
        "predicted_loss": (lambda p: mk.mae_loss(imgs, p, None, 2, ids_pred=ids_pred),
                           (torch.randn(2, 3, 12, **f64),)),
    }
    for name, (fn, args) in checks.items():
        assert torch.autograd.gradcheck(fn, args), name


x = torch.randn(2, 16, 4)
BAD = {
    "pixio grid not square": (lambda: mk.pixio_masking(torch.randn(2, 12, 4), 0.5, 2),
                              ValueError, "grid"),
    "pixio mask_grid divides": (lambda: mk.pixio_masking(x, 0.5, 3), ValueError, "mask_grid"),
    "pixio mask_grid type": (lambda: mk.pixio_masking(x, 0.5, 2.0), TypeError, "mask_grid"),
    "pixio noise per unit": (lambda: mk.pixio_masking(x, 0.5, 2, torch.rand(2, 16)), ValueError,
                             "noise"),
    "pixio keeps no unit": (lambda: mk.pixio_masking(x, 0.8, 2), ValueError, "mask_ratio"),
    "crossmae kept above ratio": (lambda: mk.crossmae_masking(x, 0.5, 0.75), ValueError,
                                  "kept_mask_ratio"),
    "crossmae predicts none": (lambda: mk.crossmae_masking(x, 0.5, 0.0), ValueError,
                               "kept_mask_ratio"),
    "crossmae kept type": (lambda: mk.crossmae_masking(x, 0.5, "0.25"), TypeError,
                           "kept_mask_ratio"),
    "queries ids dtype": (lambda: mk.decoder_queries(torch.randn(1, 1, 4), torch.randn(1, 17, 4),
                                                     torch.zeros(2, 3, dtype=torch.int32)),
                          TypeError, "ids_pred"),
    "queries ids range": (lambda: mk.decoder_queries(torch.randn(1, 1, 4), torch.randn(1, 17, 4),
                                                     torch.tensor([[0, 16]])), ValueError,
                          "ids_pred"),
    "queries ids repeated": (lambda: mk.decoder_queries(torch.randn(1, 1, 4),
                                                        torch.randn(1, 17, 4),
                                                        torch.tensor([[3, 3]])), ValueError,
                             "ids_pred"),
    "queries mask token": (lambda: mk.decoder_queries(torch.randn(1, 1, 3), torch.randn(1, 17, 4),
                                                      torch.tensor([[0]])), ValueError,
                           "mask_token"),
    "queries pos embed": (lambda: mk.decoder_queries(torch.randn(1, 1, 4), torch.randn(2, 17, 4),
                                                     torch.tensor([[0]])), ValueError,
                          "pos_embed"),
    "queries prefix": (lambda: mk.decoder_queries(torch.randn(1, 1, 4), torch.randn(1, 17, 4),
                                                  torch.tensor([[0]]), 17), ValueError,
                       "pos_embed"),
    "queries device": (lambda: mk.decoder_queries(torch.randn(1, 1, 4), torch.randn(1, 17, 4),
                                                  torch.tensor([[0]], device="meta")),
                       ValueError, "ids_pred"),
    "loss ids pred shape": (lambda: mk.mae_loss(torch.randn(2, 3, 8, 8), torch.randn(2, 3, 48),
                                                None, 4, ids_pred=torch.zeros(2, 2,
                                                                              dtype=torch.long)),
                            ValueError, "pred"),
    "loss ids range": (lambda: mk.mae_loss(torch.randn(2, 3, 8, 8), torch.randn(2, 1, 48), None,
                                           4, ids_pred=torch.tensor([[0], [4]])), ValueError,
                       "ids_pred"),
    "loss ids video": (lambda: mk.mae_loss(torch.randn(2, 3, 2, 8, 8), torch.randn(2, 1, 48),
                                           None, 4, ids_pred=torch.tensor([[0], [1]])),
                       ValueError, "ids_pred"),
    "loss ids hog": (lambda: mk.mae_loss(torch.randn(2, 3, 8, 8), torch.randn(2, 1, 27), None, 8,
                                         target="hog", ids_pred=torch.tensor([[0], [0]])),
                     ValueError, "ids_pred"),
    "loss weights shape": (lambda: mk.mae_loss(torch.randn(2, 3, 8, 8), torch.randn(2, 1, 48),
                                               torch.ones(2, 4), 4,
                                               ids_pred=torch.tensor([[0], [1]])), ValueError,
                           "mask"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_names_the_argument(case):
    fn, error, name = BAD[case]
    with pytest.raises(error, match=name):
        fn()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_are_the_cpu_kernels(dtype):
    """On CUDA (the Triton kernels) at Pixio-B and CrossMAE-B sizes: the masking outputs bit for
    bit as the CPU kernels', the queries bit for bit (float32) and their gradients, the subset
    loss and its gradient within tolerance."""
    from .utils import count_launches

    cuda = torch.device("cuda")
    x = torch.randn(64, 256, 768, dtype=dtype)
    noise = torch.rand(64, 16)
    with count_launches() as launches:
        got = mk.pixio_masking(x.to(cuda), 0.75, 4, noise.to(cuda))
        want = mk.pixio_masking(x, 0.75, 4, noise)
        _assert_same([g.cpu() for g in got], want)
        x, noise = torch.randn(64, 196, 768, dtype=dtype), torch.rand(64, 196)
        got = masking.masking_with_ids(x.to(cuda), 0.75, noise.to(cuda), predict_ratio=0.25)
        want = masking.masking_with_ids(x, 0.75, noise, predict_ratio=0.25)
        _assert_same([g.cpu() for g in got], want)
        ids_pred = want[4]
        mask_token = torch.randn(1, 1, 512, dtype=dtype, requires_grad=True)
        pos = torch.randn(1, 197, 512, dtype=dtype, requires_grad=True)
        grad = torch.randn(64, ids_pred.shape[1], 512, dtype=dtype)
        leaves = [_leaf(mask_token.to(cuda)), _leaf(pos.to(cuda))]
        out = mk.decoder_queries(*leaves, ids_pred.to(cuda))
        cuda_grads = torch.autograd.grad(out, leaves, grad.to(cuda))
        want = mk.decoder_queries(mask_token, pos, ids_pred)
        assert torch.equal(out.cpu(), want)
        for g, w in zip(cuda_grads, torch.autograd.grad(want, [mask_token, pos], grad)):
            assert_close(g.cpu(), w, dtype)
        imgs = torch.randn(64, 3, 224, 224, dtype=dtype)
        pred = torch.randn(64, ids_pred.shape[1], 768, dtype=dtype)
        a, b = _leaf(pred.to(cuda)), _leaf(pred)
        loss = mk.mae_loss(imgs.to(cuda), a, None, 16, ids_pred=ids_pred.to(cuda))
        want = mk.mae_loss(imgs, b, None, 16, ids_pred=ids_pred)
        assert_close(loss.cpu(), want, torch.float32)
        (ga,), (gb,) = torch.autograd.grad(loss, a), torch.autograd.grad(want, b)
        assert_close(ga.cpu(), gb, dtype)
    assert {"_masking_kernel", "_queries_kernel", "_queries_backward_kernel",
            "_loss_forward_kernel", "_loss_backward_kernel"} <= set(launches)
