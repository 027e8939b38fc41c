"""Drop-in helpers: HF transformers' ViTMAE and facebookresearch/mae-style models."""
import pytest
import torch
import torch.nn as nn

from mae_kernels.integrations import (
    patch_official_mae,
    patch_vit_mae,
    unpatch_official_mae,
    unpatch_vit_mae,
)

transformers = pytest.importorskip("transformers")
from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel  # noqa: E402

from .utils import assert_same_grads  # noqa: E402


def hf_config(**kwargs):
    base = dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=128, decoder_hidden_size=32,
                decoder_num_hidden_layers=1, decoder_num_attention_heads=4,
                decoder_intermediate_size=64, mask_ratio=0.75, attn_implementation="sdpa")
    return ViTMAEConfig(**{**base, **kwargs})


def twin(model_cls, config):
    torch.manual_seed(0)
    a = model_cls(config)
    b = model_cls(config)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_patched_hf_matches_unpatched(implementation, norm_pix_loss):
    plain, fused = twin(ViTMAEForPreTraining, hf_config(norm_pix_loss=norm_pix_loss))
    patch_vit_mae(fused)
    pixels = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 64)
    want, got = plain(pixel_values=pixels, noise=noise), fused(pixel_values=pixels, noise=noise)
    assert torch.equal(got.mask, want.mask) and torch.equal(got.ids_restore, want.ids_restore)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    want.loss.backward()
    got.loss.backward()
    assert_same_grads(fused, plain)


def test_patched_hf_seeded_without_noise():
    plain, fused = twin(ViTMAEForPreTraining, hf_config())
    patch_vit_mae(fused)
    pixels = torch.randn(2, 3, 32, 32)
    torch.manual_seed(11)
    want = plain(pixel_values=pixels)
    torch.manual_seed(11)
    got = fused(pixel_values=pixels)
    assert torch.equal(got.mask, want.mask)
    torch.testing.assert_close(got.loss, want.loss)


def test_patched_hf_mask_ratio_and_tuple_output():
    plain, fused = twin(ViTMAEForPreTraining, hf_config(mask_ratio=0.5))
    patch_vit_mae(fused)
    pixels, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    got = fused(pixel_values=pixels, noise=noise, return_dict=False)
    want = plain(pixel_values=pixels, noise=noise, return_dict=False)
    assert isinstance(got, tuple) and got[2].sum() == 2 * 32
    torch.testing.assert_close(got[0], want[0])


def test_interpolate_pos_encoding_falls_back():
    plain, fused = twin(ViTMAEForPreTraining, hf_config())
    patch_vit_mae(fused)
    pixels, noise = torch.randn(2, 3, 48, 48), torch.rand(2, 144)
    want = plain(pixel_values=pixels, noise=noise, interpolate_pos_encoding=True)
    got = fused(pixel_values=pixels, noise=noise, interpolate_pos_encoding=True)
    torch.testing.assert_close(got.loss, want.loss)
    torch.testing.assert_close(got.logits, want.logits)


def test_patch_hf_encoder_only_and_unpatch():
    plain, fused = twin(ViTMAEModel, hf_config())
    patch_vit_mae(fused)
    pixels, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    torch.testing.assert_close(fused(pixels, noise=noise).last_hidden_state,
                               plain(pixels, noise=noise).last_hidden_state)
    unpatch_vit_mae(fused)
    assert "random_masking" not in vars(fused.embeddings)
    pretraining = patch_vit_mae(ViTMAEForPreTraining(hf_config()))
    unpatch_vit_mae(pretraining)
    assert "forward" not in vars(pretraining) and "forward" not in vars(pretraining.decoder)


def test_patch_vit_mae_rejects_other_models():
    with pytest.raises(TypeError, match="ViTMAE"):
        patch_vit_mae(nn.Linear(2, 2))


# ------------------------------------------------------------- the official model's methods
class OfficialStyleMAE(nn.Module):
    """The methods of facebookresearch/mae's MaskedAutoencoderViT, re-implemented from the
    paper's description: embed, add positions, random-mask by argsort of noise, encode, then
    decode with mask tokens put back in place, and an MSE on the removed patches."""

    def __init__(self, img=32, p=4, dim=48, dec=32, norm_pix_loss=False):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, p, p)
        self.patch_embed.patch_size = (p, p)
        L = (img // p) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, L + 1, dim) * 0.02, requires_grad=False)
        self.blocks = nn.ModuleList([nn.TransformerEncoderLayer(dim, 4, 2 * dim, 0.0,
                                                                batch_first=True)])
        self.norm = nn.LayerNorm(dim)
        self.decoder_embed = nn.Linear(dim, dec)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dec) * 0.02)
        self.decoder_pos_embed = nn.Parameter(torch.randn(1, L + 1, dec) * 0.02,
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([nn.TransformerEncoderLayer(dec, 4, 2 * dec, 0.0,
                                                                        batch_first=True)])
        self.decoder_norm = nn.LayerNorm(dec)
        self.decoder_pred = nn.Linear(dec, p * p * 3)
        self.norm_pix_loss = norm_pix_loss

    def patchify(self, imgs):
        p = self.patch_embed.patch_size[0]
        h = w = imgs.shape[2] // p
        x = imgs.reshape(imgs.shape[0], 3, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(imgs.shape[0], h * w, p * p * 3)

    def unpatchify(self, x):
        p = self.patch_embed.patch_size[0]
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, 3)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], 3, h * p, h * p)

    def random_masking(self, x, mask_ratio):
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        noise = torch.rand(N, L, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones([N, L], device=x.device)
        mask[:, :len_keep] = 0
        return x_masked, torch.gather(mask, dim=1, index=ids_restore), ids_restore

    def forward_encoder(self, x, mask_ratio):
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_patched_official_matches_unpatched(implementation, norm_pix_loss):
    torch.manual_seed(0)
    plain = OfficialStyleMAE(norm_pix_loss=norm_pix_loss).eval()
    fused = OfficialStyleMAE(norm_pix_loss=norm_pix_loss).eval()
    fused.load_state_dict(plain.state_dict())
    patch_official_mae(fused)
    imgs = torch.randn(3, 3, 32, 32)
    torch.manual_seed(3)
    want = plain(imgs)
    torch.manual_seed(3)
    got = fused(imgs)
    assert torch.equal(got[2], want[2])
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    want[0].backward()
    got[0].backward()
    assert_same_grads(fused, plain)
    assert torch.equal(fused.unpatchify(fused.patchify(imgs)), imgs)
    unpatch_official_mae(fused)
    assert "forward_loss" not in vars(fused)


def test_patch_official_requires_the_methods():
    with pytest.raises(TypeError, match="forward_decoder"):
        patch_official_mae(nn.Linear(2, 2))


@pytest.mark.gpu
@pytest.mark.gpu
def test_patched_hf_trains_in_bf16_cuda():
    config = hf_config(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=2,
                       num_attention_heads=12, intermediate_size=3072, decoder_hidden_size=512,
                       decoder_num_hidden_layers=2, decoder_num_attention_heads=16,
                       decoder_intermediate_size=2048)
    model = patch_vit_mae(ViTMAEForPreTraining(config)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixels = torch.randn(32, 3, 224, 224, device="cuda")
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(pixel_values=pixels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
