"""Pixio's and CrossMAE's models on our ops against references written from their code
(tests/upstream.py names the files and commits): the state dicts' keys and shapes (so their
checkpoints load with strict=True), the same loss for the same weights and noise, the drop-in
patches of their models, and the configs' checks."""
import pytest
import torch

from mae.models import MODEL_CONFIGS, MODELS, CrossMAE, build_model
from mae.models.image import MAE, config_of, resolve_config
from mae_kernels.integrations import (
    patch_crossmae,
    patch_pixio,
    unpatch_crossmae,
    unpatch_pixio,
)

from . import upstream
from .utils import running


def _shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("name", sorted(upstream.PIXIO_SIZES))
def test_pixio_factories_hold_pixios_state_dict(name):
    """Pixio's H/16, 1B/16 and 5B/16 (built on the meta device): the same keys and shapes as
    Pixio's PixioViT, which loads into ours with strict=True; the encoder's are those of its
    released encoders."""
    with torch.device("meta"):
        ours = MODELS[name]()
        theirs = upstream.pixio(name)
    assert _shapes(ours.state_dict()) == _shapes(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    encoder = {k for k in ours.state_dict() if not k.startswith(("decoder", "mask_token"))}
    assert encoder == set(upstream.pixio_encoder_keys(theirs))
    assert ours.cls_token.shape[1] == 8 and ours.pos_embed.requires_grad


CROSSMAE_RECIPES = {  # (our model, CrossMAE's factory, its constructor arguments)
    "released": ("crossmae_vit_base_patch16", "mae_vit_base_patch16",
                 dict(weight_fm=True, use_input=True, decoder_depth=12)),
    "self_attn_two_blocks": ("crossmae_vit_small_patch16", "mae_vit_small_patch16",
                             dict(weight_fm=True, use_fm=[-2, 11], self_attn=True,
                                  use_input=False, decoder_depth=4)),
    "huge": ("crossmae_vit_huge_patch14", "mae_vit_huge_patch14",
             dict(weight_fm=True, use_input=True, decoder_depth=12)),
}


@pytest.mark.parametrize("recipe", sorted(CROSSMAE_RECIPES))
def test_crossmae_factories_hold_crossmaes_state_dict(recipe):
    name, theirs_name, kwargs = CROSSMAE_RECIPES[recipe]
    with torch.device("meta"):
        ours = MODELS[name](**kwargs)
        theirs = upstream.crossmae(theirs_name, **kwargs)
    assert _shapes(ours.state_dict()) == _shapes(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    assert "norm.weight" not in ours.state_dict() and "decoder_embed.weight" not in \
        ours.state_dict()


TINY = dict(img_size=64, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2,
            decoder_embed_dim=16, decoder_depth=2, decoder_num_heads=2)
TINY_CONFIG = dict(img_size=64, patch_size=8, encoder_dim=32, encoder_layers=2, encoder_heads=2,
                   decoder_dim=16, decoder_layers=2, decoder_heads=2)


def _pixio_pair(use_kernels: bool):
    theirs = upstream.PixioViT(**TINY, n_cls_tokens=8, mask_grid=2).eval()
    ours = MAE({**TINY_CONFIG, "n_cls_tokens": 8, "mask_grid": 2, "pos_embed": "learned",
                "norm_pix_loss": True, "use_kernels": use_kernels}).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.parametrize("use_kernels", [False, True], ids=["reference", "kernels"])
def test_pixio_same_loss_for_the_same_weights_and_noise(use_kernels):
    """Pixio's weights in our model: the same mask (bit for bit) and loss for the same noise
    (our model takes the noise Pixio draws with the same seed)."""
    ours, theirs = _pixio_pair(use_kernels)
    imgs = torch.randn(3, 3, 64, 64)
    torch.manual_seed(5)
    want = theirs(imgs, 0.75)
    torch.manual_seed(5)
    _, want_mask, _ = theirs.forward_encoder(imgs, 0.75)
    torch.manual_seed(5)
    noise = ours.draw_noise(3)
    got = ours(imgs, 0.75, noise)
    assert torch.equal(got.mask, want_mask)
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recipe", [dict(weight_fm=True, use_input=True),
                                    dict(weight_fm=True, use_fm=[-1, 0], self_attn=True)],
                         ids=["wfm_input", "wfm_self_attn"])
@pytest.mark.parametrize("use_kernels", [False, True], ids=["reference", "kernels"])
def test_crossmae_same_loss_for_the_same_weights_and_noise(recipe, use_kernels):
    theirs = upstream.CrossMAEViT(**TINY, norm_pix_loss=True, **recipe).eval()
    ours = CrossMAE({**TINY_CONFIG, "norm_pix_loss": True, "predict_ratio": 0.25,
                     "use_kernels": use_kernels, **recipe}).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    imgs = torch.randn(3, 3, 64, 64)
    torch.manual_seed(5)
    want = theirs(imgs, 0.75, 0.25)
    torch.manual_seed(5)
    want_mask = theirs.forward_encoder(imgs, 0.75, 0.25)[1]
    torch.manual_seed(5)
    got = ours(imgs, 0.75, ours.draw_noise(3))
    assert torch.equal(got.mask, want_mask)
    assert got.mask.sum(1).eq(64 - 16 - int(64 * 0.5)).all()
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-6)


def test_crossmae_without_weight_fm_builds_its_norm():
    """CrossMAE's code would fail there (its `norm` is never built); ours builds one."""
    model = CrossMAE({**TINY_CONFIG, "predict_ratio": 0.5})
    assert "norm.weight" in model.state_dict()
    out = model(torch.randn(2, 3, 64, 64))
    out.loss.backward()
    assert model.norm.weight.grad is not None


def _patched_loss(model, patch, imgs, *ratios):
    torch.manual_seed(9)
    want = model(imgs, *ratios)
    patch(model)
    with running("cpu"):
        torch.manual_seed(9)
        got = model(imgs, *ratios)
    return got, want


def test_patch_pixio_gives_pixios_loss():
    theirs = upstream.PixioViT(**TINY, n_cls_tokens=8, mask_grid=2).eval()
    imgs = torch.randn(2, 3, 64, 64)
    got, want = _patched_loss(theirs, patch_pixio, imgs, 0.75)
    assert "random_masking" in theirs.__dict__
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    unpatch_pixio(theirs)
    assert "random_masking" not in theirs.__dict__


def test_patch_crossmae_gives_crossmaes_loss():
    theirs = upstream.CrossMAEViT(**TINY, norm_pix_loss=True, weight_fm=True,
                                  use_input=True).eval()
    imgs = torch.randn(2, 3, 64, 64)
    got, want = _patched_loss(theirs, patch_crossmae, imgs, 0.75, 0.25)
    assert "mask_tokens_grid" in theirs.__dict__
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # a mask the patched masking did not make: its predicted positions are found from it
    with torch.no_grad():
        mask = torch.zeros(2, 64)
        mask[0, ::8], mask[1, 3::8] = 1, 1
        ids_restore = torch.arange(64).expand(2, 64)
        queries = theirs.mask_tokens_grid(mask, ids_restore)
        unpatch_crossmae(theirs)
        assert torch.equal(queries, theirs.mask_tokens_grid(mask, ids_restore))


def test_pixio_and_crossmae_names_and_configs():
    """Pixio's names with Pixio's options; CrossMAE's recipe; checks name the key."""
    pixio = config_of("pixio_vith16_enc1280x32h16_dec512x32h16")
    assert (pixio["img_size"], pixio["n_cls_tokens"], pixio["mask_grid"], pixio["pos_embed"],
            pixio["decoder_layers"], pixio["norm_pix_loss"]) == (256, 8, 4, "learned", 32, True)
    cross = config_of("crossmae_vit_base_patch16")
    assert (cross["decoder"], cross["predict_ratio"], cross["weight_fm"], cross["use_input"],
            cross["decoder_layers"]) == ("cross", 0.25, True, True, 12)
    assert isinstance(build_model(cross | {"img_size": 32}), CrossMAE)
    assert "crossmae_vit_tiny_patch16" in MODEL_CONFIGS
    bad = {"mask_grid": ({"mask_grid": 3}, "mask_grid"),
           "grid and block": ({"mask_grid": 2, "mask_type": "block"}, "mask_grid"),
           "pos_embed": ({"pos_embed": "rope"}, "pos_embed"),
           "drop_path": ({"drop_path": 1.0}, "drop_path"),
           "cross key on mae": ({"weight_fm": True}, "weight_fm"),
           "predict above mask": ({"decoder": "cross", "predict_ratio": 0.8}, "predict_ratio"),
           "use_fm range": ({"decoder": "cross", "weight_fm": True, "use_fm": [12]}, "use_fm"),
           "use_fm without wfm": ({"decoder": "cross", "use_fm": [0]}, "use_fm"),
           "cross hog": ({"decoder": "cross", "target": "hog"}, "cross"),
           "cls tokens": ({"n_cls_tokens": 0}, "n_cls_tokens")}
    for overrides, name in bad.values():
        with pytest.raises(ValueError, match=name):
            resolve_config({"img_size": 32, "patch_size": 8, **overrides})
    with pytest.raises(ValueError, match="build_model"):
        MAE({"decoder": "cross"})


def test_pixio_units_and_cls_tokens_through_the_model():
    """A Pixio-shaped model masks whole units, keeps its 8 cls tokens through the decoder, and
    its features average the cls tokens (Pixio's k-NN feature, after the norm)."""
    model = MAE({**TINY_CONFIG, "n_cls_tokens": 8, "mask_grid": 4, "pos_embed": "learned"})
    imgs = torch.randn(2, 3, 64, 64)
    out = model(imgs)
    units = out.mask.view(2, 2, 4, 2, 4)
    assert torch.equal(units.amax(dim=(2, 4)), units.amin(dim=(2, 4)))
    assert out.reconstructed.shape == imgs.shape
    out.loss.backward()
    assert model.pos_embed.grad.abs().sum() > 0 and model.decoder_pos_embed.grad.abs().sum() > 0
    features = model.encode(imgs)
    assert features.cls_token.shape == (2, 32)


def test_crossmae_reconstruction_and_backward():
    """`mask` marks the predicted patches only; `reconstructed` holds their predictions and
    zeros elsewhere; every trained parameter gets a gradient (the fixed tables none)."""
    model = CrossMAE({**TINY_CONFIG, "predict_ratio": 0.25, "weight_fm": True,
                      "use_input": True})
    imgs = torch.randn(2, 3, 64, 64)
    out = model(imgs)
    assert out.mask.sum(1).tolist() == [16.0, 16.0]
    patches = model.patchify(out.reconstructed)
    assert patches[out.mask == 0].abs().sum() == 0 and patches[out.mask == 1].abs().sum() > 0
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing and model.pos_embed.grad is None


def test_decoder_flops_follow_the_predicted_patches():
    """benchmarks/decoder_flops.py's counts at the demo's size (2 encoder blocks here, for
    time): the same on every call, CrossMAE's decoder grows with the patches it predicts and
    costs less than MAE's at 0.25, a Pixio-shaped deep decoder the most."""
    from benchmarks.decoder_flops import DEMO, flops_of

    small = {**DEMO, "encoder_layers": 2}
    mae = flops_of("mae_vit_tiny_patch16", small)
    assert flops_of("mae_vit_tiny_patch16", small) == mae
    cross = [flops_of("crossmae_vit_tiny_patch16", {**small, "predict_ratio": r})["decoder"]
             for r in (0.25, 0.5, 0.75)]
    assert 0 < cross[0] < cross[1] < cross[2] < mae["decoder"] < mae["total"]
    pixio = flops_of("pixio_vit_tiny_patch16", {**small, "mask_grid": 2, "decoder_layers": 6})
    assert pixio["decoder"] > 2.5 * mae["decoder"]
