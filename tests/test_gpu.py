"""The same checks on CUDA at MAE sizes: the Triton kernels (what the dispatcher runs for CUDA
tensors) and the CUDA extension vs the reference."""
import pytest
import torch

import mae_kernels as mk
from mae_kernels import reference as ref
from mae_kernels import tokens

from .utils import assert_close, count_launches

pytestmark = pytest.mark.gpu
# the last one is longer than the fused sort handles: torch.sort + the extension's gather
SHAPES = [(256, 196, 768), (256, 196, 1024), (256, 196, 512), (3, 5000, 40)]


@pytest.fixture
def gpu_backend():
    """Every test here runs Triton kernels (checked after it)."""
    with count_launches() as launches:
        yield launches
    assert sum(launches.values()) > 0, "no Triton kernel ran"


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


def test_random_masking_seeded_cuda(gpu_backend):
    x = torch.randn(64, 196, 768, device="cuda")
    torch.manual_seed(7)
    got = mk.random_masking(x, 0.75)
    torch.manual_seed(7)
    want = ref.random_masking(x, 0.75)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


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
