"""MaskedAutoencoderViT: official names, shapes, tables and init; kernels == reference; compile."""
import numpy as np
import pytest
import torch

from mae import MaskedAutoencoderViT, interpolate_pos_embed, mae_vit_tiny_patch16
from mae.models import image as mae_models

from .utils import assert_same_grads


def small(**kwargs):
    config = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                  decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    return MaskedAutoencoderViT(**{**config, **kwargs})


def official_sincos(dim, h, w, cls_token):
    """The MAE paper's table, as its numpy code builds it (meshgrid with w first)."""
    grid = np.stack(np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)))

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    if cls_token:
        table = np.concatenate([np.zeros([1, dim]), table], axis=0)
    return torch.from_numpy(table).float()


def official_keys(depth, decoder_depth):
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias",
             "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
             "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias", "decoder_embed.weight", "decoder_embed.bias",
            "mask_token", "decoder_pos_embed", "decoder_norm.weight", "decoder_norm.bias",
            "decoder_pred.weight", "decoder_pred.bias"}
    keys |= {f"blocks.{i}.{k}" for i in range(depth) for k in block}
    keys |= {f"decoder_blocks.{i}.{k}" for i in range(decoder_depth) for k in block}
    return keys


@pytest.mark.parametrize("name,dims", [
    ("mae_vit_base_patch16", (768, 12, 512, 8, 16)),
    ("mae_vit_large_patch16", (1024, 24, 512, 8, 16)),
    ("mae_vit_huge_patch14", (1280, 32, 512, 8, 14)),
])
def test_official_configs_names_and_shapes(name, dims):
    embed, depth, dec, dec_depth, p = dims
    with torch.device("meta"):
        model = mae_models.MODELS[name]()
    state = model.state_dict()
    assert set(state) == official_keys(depth, dec_depth)
    L = (224 // p) ** 2
    assert state["pos_embed"].shape == (1, L + 1, embed)
    assert state["decoder_pos_embed"].shape == (1, L + 1, dec)
    assert state["patch_embed.proj.weight"].shape == (embed, 3, p, p)
    assert state["blocks.0.attn.qkv.weight"].shape == (3 * embed, embed)
    assert state["blocks.0.mlp.fc1.weight"].shape == (4 * embed, embed)
    assert state["decoder_pred.weight"].shape == (p * p * 3, dec)
    assert model.norm.eps == 1e-6 and model.decoder_blocks[0].norm1.eps == 1e-6


@pytest.mark.parametrize("img_size", [32, (32, 48)])
def test_pos_embed_is_the_official_table_and_frozen(img_size):
    model = small(img_size=img_size)
    h, w = model.grid_size
    assert torch.equal(model.pos_embed[0], official_sincos(32, h, w, True))
    assert torch.equal(model.decoder_pos_embed[0], official_sincos(16, h, w, True))
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


def test_state_dict_roundtrips_strict():
    a, b = small(), small()
    b.load_state_dict(a.state_dict(), strict=True)
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    assert torch.equal(a(imgs, 0.75, noise)[0], b(imgs, 0.75, noise)[0])


@pytest.mark.parametrize("norm_pix_loss", [False, True])
@pytest.mark.parametrize("img_size", [32, (24, 40)])
def test_kernels_match_reference(implementation, norm_pix_loss, img_size):
    fused = small(img_size=img_size, norm_pix_loss=norm_pix_loss)
    plain = small(img_size=img_size, norm_pix_loss=norm_pix_loss, use_kernels=False)
    plain.load_state_dict(fused.state_dict())
    H, W = fused.patch_embed.img_size
    imgs = torch.randn(3, 3, H, W)
    noise = torch.rand(3, fused.patch_embed.num_patches)
    loss_f, pred_f, mask_f = fused(imgs, 0.75, noise)
    loss_p, pred_p, mask_p = plain(imgs, 0.75, noise)
    assert torch.equal(mask_f, mask_p)
    torch.testing.assert_close(loss_f, loss_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred_f, pred_p, rtol=1e-4, atol=1e-5)
    loss_f.backward()
    loss_p.backward()
    assert_same_grads(fused, plain)


def test_seeded_forward_without_noise_matches_reference():
    fused, plain = small(), small(use_kernels=False)
    plain.load_state_dict(fused.state_dict())
    imgs = torch.randn(2, 3, 32, 32)
    torch.manual_seed(5)
    a = fused(imgs)
    torch.manual_seed(5)
    b = plain(imgs)
    assert torch.equal(a[2], b[2])
    torch.testing.assert_close(a[0], b[0])


def test_pred_unpatchifies_to_an_image():
    model = small(img_size=(32, 48))
    _, pred, _ = model(torch.randn(2, 3, 32, 48))
    assert pred.shape == (2, 24, 8 * 8 * 3)
    assert model.unpatchify(pred).shape == (2, 3, 32, 48)


def test_encode_features_are_the_official_cls_token_and_global_pool():
    """cls: the encoder's norm of the cls token; global pool: models_vit.py's, the mean of the
    patch tokens before the norm through a fresh fc_norm (LayerNorm, weight 1, bias 0)."""
    model = small()
    imgs = torch.randn(2, 3, 32, 32)
    feats = model.encode(imgs)
    x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1),
                   model.patch_embed(imgs) + model.pos_embed[:, 1:]], dim=1)
    for blk in model.blocks:
        x = blk(x)
    fc_norm = torch.nn.LayerNorm(32, eps=1e-6)
    torch.testing.assert_close(feats.cls_token, model.norm(x)[:, 0])
    torch.testing.assert_close(feats.patch_mean, fc_norm(x[:, 1:].mean(dim=1)))


def test_interpolate_pos_embed_loads_at_new_size():
    source = small(img_size=32)
    target = small(img_size=48)
    state = interpolate_pos_embed(target, dict(source.state_dict()))
    target.load_state_dict(state, strict=True)
    assert target.pos_embed.shape == (1, 37, 32)
    assert torch.equal(target.pos_embed[:, 0], source.pos_embed[:, 0])


def test_wrong_image_size_is_a_clear_error():
    with pytest.raises(ValueError, match="imgs"):
        small()(torch.randn(1, 3, 40, 40))


def test_compile_fullgraph_trains_on_cpu():
    model = small()
    compiled = torch.compile(model, fullgraph=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    imgs = torch.randn(4, 3, 32, 32)
    losses = []
    for _ in range(3):
        loss, _, _ = compiled(imgs, 0.75, torch.rand(4, 16))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    plain = small(use_kernels=False)
    plain.load_state_dict(model.state_dict())
    noise = torch.rand(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(imgs, 0.75, noise)[0], plain(imgs, 0.75, noise)[0],
                                   rtol=1e-4, atol=1e-5)


def test_tiny_factory_runs():
    model = mae_vit_tiny_patch16(img_size=32)
    loss, pred, mask = model(torch.randn(1, 3, 32, 32))
    assert pred.shape == (1, 4, 768) and mask.sum() == 3


@pytest.mark.gpu
@pytest.mark.gpu
def test_bf16_autocast_kernels_match_reference_cuda():
    fused = mae_models.mae_vit_base_patch16().cuda()
    plain = mae_models.mae_vit_base_patch16(use_kernels=False).cuda()
    plain.load_state_dict(fused.state_dict())
    imgs = torch.randn(16, 3, 224, 224, device="cuda")
    noise = torch.rand(16, 196, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_f, _, mask_f = fused(imgs, 0.75, noise)
        loss_p, _, mask_p = plain(imgs, 0.75, noise)
    assert torch.equal(mask_f, mask_p)
    torch.testing.assert_close(loss_f.float(), loss_p.float(), rtol=2e-2, atol=2e-2)
    loss_f.backward()
    loss_p.backward()
    for (name, pf), pp in zip(fused.named_parameters(), plain.parameters()):
        if pf.grad is not None:
            cos = torch.nn.functional.cosine_similarity(pf.grad.flatten().float(),
                                                        pp.grad.flatten().float(), dim=0)
            assert cos > 0.99, name


class PatchMeans(torch.nn.Module):
    """A small feature network: per 8x8 patch, the mean of each channel through a linear layer
    (F = 5) that must stay frozen."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Linear(3, 5)

    def forward(self, imgs):
        patches = imgs.unfold(2, 8, 8).unfold(3, 8, 8).mean(dim=(-1, -2))  # (B, C, h, w)
        return self.mix(patches.flatten(2).transpose(1, 2))


def test_feature_target_predicts_a_user_module_s_features():
    from mae import MAE

    config = {"img_size": 32, "patch_size": 8, "encoder_dim": 32, "encoder_layers": 1,
              "decoder_dim": 32, "decoder_layers": 1}
    features = PatchMeans()
    model = MAE(config, feature_target=features)
    assert model.decoder_pred.out_features == 5
    assert not any(n.startswith("feature") for n in model.state_dict())  # not saved
    assert len(list(model.parameters())) == len(list(MAE(config).parameters()))  # not trained
    imgs = torch.randn(2, 3, 32, 32)
    loss, predicted, mask = model(imgs)
    assert predicted.shape == (2, 16, 5)
    with torch.no_grad():
        want = (((predicted - features(imgs)) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert features.mix.weight.grad is None and model.decoder_pred.weight.grad is not None
    with pytest.raises(ValueError, match="feature_target"):
        MAE(config, feature_target=lambda imgs: imgs.mean(dim=1))
