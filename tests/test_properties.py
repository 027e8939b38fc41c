"""Property tests: random shapes, dtypes, ratios and index sets, every CPU path vs the reference."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mae_kernels as mk
from mae_kernels import reference as ref

from .utils import DTYPES, IMPLEMENTATIONS, assert_close, running

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def token_problems(draw):
    B = draw(st.integers(1, 3))
    L = draw(st.integers(1, 40))
    D = draw(st.integers(1, 24))
    ratio = draw(st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.9]).filter(lambda r: int(L * (1 - r))))
    dtype = draw(st.sampled_from(DTYPES))
    impl = draw(st.sampled_from(IMPLEMENTATIONS))
    seed = draw(st.integers(0, 2**31 - 1))
    return B, L, D, ratio, dtype, impl, seed


@SETTINGS
@given(token_problems(), st.integers(0, 2))
def test_masking_and_unshuffle_match_reference(problem, P):
    B, L, D, ratio, dtype, impl, seed = problem
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D, generator=gen).to(dtype)
    noise = torch.rand(B, L, generator=gen)
    if seed % 3 == 0:  # coarse noise: many ties
        noise = (noise * 4).floor()
    with running(impl):
        got = mk.random_masking(x, ratio, noise)
        K = got[0].shape[1]
        enc = torch.randn(B, P + K, D, generator=gen).to(dtype)
        mask_token = torch.randn(1, 1, D, generator=gen).to(dtype)
        pos = torch.randn(1, P + L, D, generator=gen).to(dtype)
        out = mk.unshuffle(enc, mask_token, got[2], P, pos)
    for g, w in zip(got, ref.random_masking(x, ratio, noise)):
        assert torch.equal(g, w)
    want = ref.unshuffle(enc.float(), mask_token.float(), got[2], P, pos.float())
    assert_close(out, want, dtype)


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 30), st.integers(1, 16), st.data())
def test_gather_scatter_match_reference(B, L, D, data):
    K = data.draw(st.integers(1, L))
    dtype = data.draw(st.sampled_from(DTYPES + [torch.float64]))
    perms = [data.draw(st.permutations(range(L))) for _ in range(B)]
    index = torch.tensor([p[:K] for p in perms], dtype=torch.int64)
    x = torch.randn(B, L, D).to(dtype)
    src = torch.randn(B, K, D).to(dtype)
    # the extension's kernels only: gather/scatter have no Triton implementation
    with running("cpu"):
        gathered = mk.gather_tokens(x, index)
        scattered = mk.scatter_tokens(src, index, L)
    assert torch.equal(gathered, ref.gather_tokens(x, index))
    assert torch.equal(scattered, ref.scatter_tokens(src, index, L))


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3),
       st.sampled_from([1, 2, 3, 4]), st.booleans(), st.sampled_from(DTYPES),
       st.sampled_from(IMPLEMENTATIONS), st.integers(0, 2**31 - 1))
def test_patchify_and_loss_match_reference(B, C, h, w, p, norm, dtype, impl, seed):
    gen = torch.Generator().manual_seed(seed)
    imgs = torch.randn(B, C, h * p, w * p, generator=gen).to(dtype)
    L, E = h * w, p * p * C
    pred = torch.randn(B, L, E, generator=gen).to(dtype)
    mask = (torch.rand(B, L, generator=gen) < 0.6).float()
    mask[0, 0] = 1.0
    norm = norm and E > 1  # the unbiased variance of one value is undefined
    with running(impl):
        patches = mk.patchify(imgs, p)
        restored = mk.unpatchify(patches, p, (h, w), C)
        loss = mk.mae_loss(imgs, pred, mask, p, norm)
    assert torch.equal(patches, ref.patchify(imgs, p))
    assert torch.equal(restored, imgs)
    assert_close(loss, ref.mae_loss(imgs.float(), pred.float(), mask, p, norm), dtype)
