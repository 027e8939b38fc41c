"""The torch.library contract: opcheck, gradcheck in float64, torch.compile without breaks."""
import pytest
import torch

import mae_kernels as mk
from mae_kernels import reference as ref

from .utils import DEVICE_OPS, IMPLEMENTATIONS, running

ops = torch.ops.mae_kernels


def _masking_inputs(dtype=torch.float32, B=2, L=9, D=5, P=1, ratio=0.5):
    x = torch.randn(B, L, D, dtype=dtype)
    noise = torch.rand(B, L)
    _, mask, ids_restore = ref.random_masking(x, ratio, noise)
    K = int(L * (1 - ratio))
    _, ids_keep = torch.sort(noise, dim=1, stable=True)
    return x, noise, mask, ids_restore, ids_keep[:, :K].contiguous(), K


def _opcheck_cases():
    x, noise, mask, ids_restore, ids_keep, K = _masking_inputs()
    P, D = 1, x.shape[2]
    enc = torch.randn(2, P + K, D, requires_grad=True)
    mask_token = torch.randn(1, 1, D, requires_grad=True)
    pos = torch.randn(1, P + x.shape[1], D, requires_grad=True)
    imgs = torch.randn(2, 3, 1, 6, 6)  # the ops take videos: an image is one frame
    pred = torch.randn(2, 9, 12, requires_grad=True)
    # dense but not contiguous: the layout a transposed matmul output has
    dense_pred = torch.randn(9, 2, 12).transpose(0, 1).requires_grad_()
    loss_mask = (torch.rand(2, 9) > 0.5).float()
    loss_mask[0, 0] = 1
    return {
        "gather_tokens": (ops.gather_tokens, (x.requires_grad_(), ids_keep)),
        "scatter_tokens": (ops.scatter_tokens, (torch.randn(2, K, D, requires_grad=True),
                                                ids_keep, x.shape[1])),
        "patchify": (ops.patchify, (torch.randn(2, 3, 1, 6, 4, requires_grad=True), 1, 2)),
        "unpatchify": (ops.unpatchify, (torch.randn(2, 6, 12, requires_grad=True), 1, 2, 1, 3, 2,
                                        3)),
        "patchify_video": (ops.patchify, (torch.randn(2, 3, 4, 6, 4, requires_grad=True), 2, 2)),
        "unpatchify_video": (ops.unpatchify, (torch.randn(2, 12, 24, requires_grad=True), 2, 2, 2,
                                              3, 2, 3)),
        "mae_loss_video": (ops.mae_loss, (torch.randn(2, 3, 4, 4, 4), torch.randn(
            2, 8, 24, requires_grad=True), (torch.rand(2, 8) > 0.3).float(), 2, 2, True)),
        "masking_random": (ops.masking, (x, noise, None, None, K, 1, 1, 0, 0, torch.float32)),
        **_sampling_cases(),
        "unshuffle": (ops.unshuffle, (enc, mask_token, ids_restore, P, pos)),
        "unshuffle_no_pos": (ops.unshuffle, (enc, mask_token, ids_restore, P, None)),
        "unshuffle_backward": (ops.unshuffle_backward, (torch.randn(2, P + 9, D), ids_restore, K,
                                                        P, torch.float32)),
        "mae_loss": (ops.mae_loss, (imgs, pred, loss_mask, 1, 2, True)),
        "mae_loss_dense_pred": (ops.mae_loss, (imgs, dense_pred, loss_mask, 1, 2, True)),
        "mae_loss_backward": (ops.mae_loss_backward, (torch.tensor(1.0), imgs, pred.detach(),
                                                      loss_mask, 1, 2, False)),
        "mae_loss_backward_dense_pred": (ops.mae_loss_backward, (
            torch.tensor(1.0), imgs, dense_pred.detach(), loss_mask, 1, 2, True)),
    }


def _sampling_cases():
    """The masking op with the tube, block and grid strategies (masking.py's argument order)."""
    tube_x = torch.randn(2, 3 * 6, 5, requires_grad=True)
    block_x = torch.randn(2, 12, 5, requires_grad=True)
    order, draws = ref.block_draws(torch.rand(2, 12, 5), (0.3, 1 / 0.3))
    grid_x = torch.randn(2, 16, 5, requires_grad=True)
    offsets = torch.tensor([[0, 1], [1, 1]])
    return {
        "hog_targets": (ops.hog_targets, (torch.randn(2, 3, 16, 8), torch.tensor(
            [[1.0, 0.0], [1.0, 1.0]]), 8, 9, 4)),
        "masking_tube": (ops.masking, (tube_x, torch.rand(2, 6), None, None, 2, 3, 1, 0, 0,
                                       torch.float32)),
        "masking_block": (ops.masking, (block_x, order, draws, None, 5, 1, 4, 1, 2,
                                        torch.float32)),
        "masking_grid": (ops.masking, (grid_x, None, None, offsets, 4, 1, 4, 2, 2,
                                       torch.float32)),
    }


def _implemented(case: str) -> list[str]:
    """The implementations an opcheck case's op has: gather/scatter are C++ only."""
    op_name = str(_opcheck_cases()[case][0]).split(".")[-1]
    return IMPLEMENTATIONS if op_name in DEVICE_OPS else ["cpu"]


@pytest.mark.parametrize("impl,name", [(impl, name) for name in sorted(_opcheck_cases())
                                       for impl in _implemented(name)])
def test_opcheck(impl, name):
    op, args = _opcheck_cases()[name]
    with running(impl):
        torch.library.opcheck(op, args)


def test_every_device_op_routes_by_device():
    """One Triton launcher as the default kernel, one CPU kernel, nothing else choosing."""
    for name in DEVICE_OPS:
        qualname = f"mae_kernels::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CompositeExplicitAutograd")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd"), name


def test_gradcheck_float64():
    f64 = dict(dtype=torch.float64, requires_grad=True)
    x, noise, _, ids_restore, ids_keep, K = _masking_inputs(torch.float64)
    x.requires_grad_()
    D = x.shape[2]
    block_noise = torch.rand(2, 9, 5)
    videos = torch.randn(2, 3, 4, 2, 4, dtype=torch.float64)
    imgs = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    loss_mask = torch.tensor([[1.0, 0, 1, 1], [0, 1, 1, 0]])
    checks = {
        "gather_tokens": (mk.gather_tokens, (x, ids_keep)),
        "scatter_tokens": (lambda s: mk.scatter_tokens(s, ids_keep, 9),
                           (torch.randn(2, K, D, **f64),)),
        "patchify": (lambda i: mk.patchify(i, 2), (torch.randn(2, 3, 4, 6, **f64),)),
        "unpatchify": (lambda t: mk.unpatchify(t, 2, (2, 3), 3), (torch.randn(2, 6, 12, **f64),)),
        "random_masking": (lambda t: mk.random_masking(t, 0.5, noise)[0], (x,)),
        "tube_masking": (lambda t: mk.tube_masking(t, 0.5, 3, noise[:, :3])[0], (x,)),
        "block_masking": (lambda t: mk.block_masking(t, 0.5, (3, 3), block_noise)[0], (x,)),
        "grid_masking": (lambda t: mk.grid_masking(t, (3, 3), 3, (1, 2))[0], (x,)),
        "unshuffle": (lambda e, m, p: mk.unshuffle(e, m, ids_restore, 1, p),
                      (torch.randn(2, 1 + K, D, **f64), torch.randn(1, 1, D, **f64),
                       torch.randn(1, 10, D, **f64))),
        "mae_loss": (lambda p: mk.mae_loss(imgs, p, loss_mask, 2), (torch.randn(2, 4, 12, **f64),)),
        "patchify3d": (lambda v: mk.patchify3d(v, (2, 2, 2)), (torch.randn(1, 2, 4, 2, 4, **f64),)),
        "unpatchify3d": (lambda t: mk.unpatchify3d(t, (2, 2, 2), (2, 1, 2), 2),
                         (torch.randn(1, 4, 16, **f64),)),
        "mae_loss_video": (lambda p: mk.mae_loss(videos, p, loss_mask, 2, True, 2),
                           (torch.randn(2, 4, 24, **f64),)),
    }
    for name, (fn, args) in checks.items():
        assert torch.autograd.gradcheck(fn, args), name
        assert torch.autograd.gradgradcheck(fn, args) if name == "patchify" else True


def _mae_step(x, mask_token, pos, imgs, pred_head, noise):
    if noise.dim() == 3:  # block masking's noise
        x_masked, mask, ids_restore = mk.block_masking(x, 0.75, (4, 4), noise)
    else:
        x_masked, mask, ids_restore = mk.random_masking(x, 0.75, noise)
    cls = x[:, :1]
    decoded = mk.unshuffle(torch.cat([cls, x_masked], 1), mask_token, ids_restore, 1, pos)
    pred = pred_head(decoded[:, 1:])
    return mk.mae_loss(imgs, pred, mask, 4, True)


def assert_compiles_as_eager(step, noise_shape):
    """`step(x (2, 16, 8), mask_token, pos, imgs (2, 3, 16, 16), head, noise) -> loss` or
    `(loss, *outputs)` compiled with fullgraph=True (no host sync, no break) gives eager's
    loss, outputs and gradients."""
    B, L, D = 2, 16, 8
    x = torch.randn(B, L, D, requires_grad=True)
    mask_token = torch.randn(1, 1, D, requires_grad=True)
    pos = torch.randn(1, L + 1, D, requires_grad=True)
    inputs = (x, mask_token, pos, torch.randn(B, 3, 16, 16), torch.nn.Linear(D, 48),
              torch.rand(noise_shape))
    eager = step(*inputs)
    eager = eager if isinstance(eager, tuple) else (eager,)
    eager_grads = torch.autograd.grad(eager[0], [x, mask_token, pos])
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)(*inputs)
    compiled = compiled if isinstance(compiled, tuple) else (compiled,)
    grads = torch.autograd.grad(compiled[0], [x, mask_token, pos])
    torch.testing.assert_close(compiled[0], eager[0])
    for out, want in zip(compiled[1:], eager[1:], strict=True):
        assert torch.equal(out, want)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("noise_shape", [(2, 16), (2, 16, 5)], ids=["random", "block"])
def test_compile_fullgraph_chain(implementation, noise_shape):
    assert_compiles_as_eager(_mae_step, noise_shape)
