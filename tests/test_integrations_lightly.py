"""patch_lightly against the real lightly package: its MAE example (encoder, decoder, loss) gives
the same masks, predictions, targets, loss and gradients on the fused ops, for the same draws."""
import copy
import warnings
from collections import Counter

import pytest
import torch

from mae_kernels import integrations, masking
from mae_kernels.integrations import lightly_mae_loss, patch_lightly, unpatch_lightly

pytest.importorskip("timm")
lightly_utils = pytest.importorskip("lightly.models.utils")
from lightly.models.modules import (  # noqa: E402
    MaskedVisionTransformerDecoderTIMM,
    MaskedVisionTransformerTIMM,
)
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from .utils import assert_same_grads  # noqa: E402

ORIGINALS = {name: getattr(lightly_utils, name) for name in integrations._LIGHTLY_UTILS}
ORIGINAL_PREPROCESS = MaskedVisionTransformerDecoderTIMM.preprocess
# what the patched functions call: each must run (counted) for the test to pass
FUSED = {integrations: ("gather_tokens", "scatter_tokens", "unshuffle", "patchify"),
         masking: ("random_masking_with_ids",)}


@pytest.fixture
def patched(monkeypatch):
    """lightly patched for the test, and the calls of the fused ops counted."""
    calls = Counter()

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    for module, names in FUSED.items():
        for name in names:
            monkeypatch.setattr(module, name, counting(name, getattr(module, name)))
    patch_lightly()
    yield calls
    unpatch_lightly()
    assert all(getattr(lightly_utils, n) is f for n, f in ORIGINALS.items())
    assert MaskedVisionTransformerDecoderTIMM.preprocess is ORIGINAL_PREPROCESS


class LightlyMAE(torch.nn.Module):
    """lightly's examples/pytorch/mae.py, at CPU size; `deprecated` builds the decoder as lightly
    < 1.6 did (MAEDecoderTIMM, its mask tokens put in with repeat_token + set_at_index)."""

    def __init__(self, mask_ratio=0.75, deprecated=False):
        super().__init__()
        vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4)
        self.mask_ratio, self.patch_size, self.deprecated = mask_ratio, 8, deprecated
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)
        self.sequence_length = self.backbone.sequence_length
        if deprecated:
            from lightly.models.modules import MAEDecoderTIMM

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecated in lightly 1.6
                self.decoder = MAEDecoderTIMM(num_patches=16, patch_size=8, embed_dim=64,
                                              decoder_embed_dim=32, decoder_depth=1,
                                              decoder_num_heads=4)
            return
        self.decoder_embed = torch.nn.Linear(64, 32)
        self.decoder = MaskedVisionTransformerDecoderTIMM(num_patches=16, embed_dim=32, depth=1,
                                                          num_heads=4)
        self.prediction_head = torch.nn.Linear(32, 8 * 8 * 3)

    def forward_decoder(self, x_encoded, idx_keep, idx_mask):
        utils = lightly_utils
        if self.deprecated:
            x_decode = self.decoder.embed(x_encoded)
            x_masked = utils.repeat_token(self.decoder.mask_token,
                                          (x_encoded.shape[0], self.sequence_length))
            x_masked = utils.set_at_index(x_masked, idx_keep, x_decode.type_as(x_masked))
            x_decoded = self.decoder.decode(x_masked)
            return self.decoder.predict(utils.get_at_index(x_decoded, idx_mask))
        x_decode = self.decoder_embed(x_encoded)
        x_masked = x_decode.new_zeros(x_encoded.shape[0], self.sequence_length, x_decode.shape[-1])
        x_masked = utils.set_at_index(x_masked, idx_keep, x_decode.type_as(x_masked))
        x_decoded = self.decoder(x_masked, idx_mask=idx_mask)
        return self.prediction_head(utils.get_at_index(x_decoded, idx_mask))

    def forward(self, images):
        utils = lightly_utils
        idx_keep, idx_mask = utils.random_token_mask(
            size=(images.shape[0], self.sequence_length), mask_ratio=self.mask_ratio,
            device=images.device)
        x_encoded = self.backbone.encode(images=images, idx_keep=idx_keep)
        x_pred = self.forward_decoder(x_encoded, idx_keep, idx_mask)
        target = utils.get_at_index(utils.patchify(images, self.patch_size), idx_mask - 1)
        return x_pred, target, idx_keep, idx_mask


def run(model, images, seed=3):
    torch.manual_seed(seed)
    pred, target, idx_keep, idx_mask = model(images)
    loss = torch.nn.functional.mse_loss(pred, target)
    loss.backward()
    return pred, target, idx_keep, idx_mask, loss


@pytest.mark.parametrize("deprecated", [False, True], ids=["decoder", "MAEDecoderTIMM"])
def test_lightly_mae_example_on_the_fused_ops(implementation, patched, deprecated):
    torch.manual_seed(0)
    plain = LightlyMAE(deprecated=deprecated)
    fused = copy.deepcopy(plain)
    images = torch.randn(3, 3, 32, 32)
    unpatch_lightly()
    want = run(plain, images)
    patch_lightly()
    got = run(fused, images)
    for name, g, w in zip(("pred", "target", "idx_keep", "idx_mask"), got, want):
        assert torch.equal(g, w), name  # every step is a copy, a sort or the same matmuls
    torch.testing.assert_close(got[4], want[4], rtol=0, atol=0)
    assert_same_grads(fused, plain, rtol=1e-6, atol=1e-7)
    assert got[2].shape == (3, 1 + 4) and (got[2][:, 0] == 0).all()  # the class token is kept
    fused_ran = {"random_masking_with_ids", "gather_tokens", "scatter_tokens", "patchify"}
    if not deprecated:
        fused_ran.add("unshuffle")  # the TIMM decoder's mask tokens and positions
    assert fused_ran <= set(patched), patched


@pytest.mark.parametrize("size, ratio, mask_class_token", [
    ((4, 197), 0.75, False), ((5, 50), 0.6, False), ((2, 17), 0.9, True), ((3, 9), 0.0, False)])
def test_random_token_mask_is_lightlys(implementation, patched, size, ratio, mask_class_token):
    torch.manual_seed(7)
    want = ORIGINALS["random_token_mask"](size, ratio, mask_class_token)
    want_next = torch.rand(())
    torch.manual_seed(7)
    got = lightly_utils.random_token_mask(size, ratio, mask_class_token)
    assert patched["random_masking_with_ids"] == 1
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert torch.rand(()) == want_next  # the same draws, no more


def test_what_the_ops_do_not_take_runs_lightlys_code(patched):
    # a ratio that masks every patch: lightly keeps the class token only
    torch.manual_seed(1)
    idx_keep, idx_mask = lightly_utils.random_token_mask((2, 5), 1.0)
    assert idx_keep.tolist() == [[0], [0]] and idx_mask.shape == (2, 4)
    # repeated positions: lightly's gather, whose backward sums
    tokens = torch.randn(2, 4, 3, requires_grad=True)
    index = torch.tensor([[1, 1], [0, 3]])
    lightly_utils.get_at_index(tokens, index).sum().backward()
    assert tokens.grad[0, 1].eq(2).all()
    # mask_at_index's scalar set_at_index
    ones = lightly_utils.set_at_index(torch.zeros(2, 4, 3), index, 1)
    assert ones[0, 1].eq(1).all() and ones[0, 0].eq(0).all()
    assert set(patched) <= {"random_masking_with_ids"}, patched


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_lightly_mae_loss_is_the_examples_loss(implementation, norm_pix_loss):
    images = torch.randn(3, 3, 32, 32)
    _, idx_mask = ORIGINALS["random_token_mask"]((3, 17), 0.75)
    pred = torch.randn(3, idx_mask.shape[1], 8 * 8 * 3, requires_grad=True)
    target = ORIGINALS["get_at_index"](ORIGINALS["patchify"](images, 8), idx_mask - 1)
    if norm_pix_loss:
        target = lightly_utils.normalize_mean_var(target)
    want = torch.nn.functional.mse_loss(pred, target)
    got = lightly_mae_loss(images, pred, idx_mask, 8, norm_pix_loss)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, pred)[0],
                               torch.autograd.grad(want, pred)[0])
