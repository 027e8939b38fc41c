"""The whole pre-training step (forward, backward, AdamW) of MAE ViT-B/16 and ViT-L/16 with the
fused ops versus the reference ops, eager and compiled, under bf16 autocast; and HF
transformers' ViTMAEForPreTraining (SDPA attention) built from the same config (encoder,
decoder, patch size, image size, mask ratio). Reports images/s and peak memory. CPU: the tiny
model at 32x32 with 4x4 patches, as a smoke test."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from mae.models import build_model
from mae.models.image import MAE, config_of
from mae_kernels.integrations import patch_vit_mae

from .common import CUDA, GPU_SIZES, Compiled, cuda_median_ms

pytestmark = pytest.mark.step
DEVICE = "cuda" if CUDA else "cpu"
CONFIGS = {  # model: (batch, config overrides)
    "mae_vit_base_patch16": (256, {"img_size": 224}),
    "mae_vit_large_patch16": (64, {"img_size": 224}),
} if GPU_SIZES else {"mae_vit_tiny_patch16": (8, {"img_size": 32, "patch_size": 4})}
# marks as in test_ops.py: the GPU plan (scripts/gpu_plan.py) measures the ViT-B/16 step first
MODELS = [pytest.param(name, marks=pytest.mark.vit_b) if name == "mae_vit_base_patch16" else name
          for name in CONFIGS]
COMPILED = pytest.mark.compiled
VARIANTS = ["kernels", pytest.param("kernels+compile", marks=COMPILED), "reference",
            pytest.param("reference+compile", marks=COMPILED)]
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def hf_vit_mae(config: dict):
    """ViTMAEForPreTraining with the architecture and loss of one of our configs."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    hf = ViTMAEConfig(
        hidden_size=config["encoder_dim"], num_hidden_layers=config["encoder_layers"],
        num_attention_heads=config["encoder_heads"],
        intermediate_size=int(config["mlp_ratio"] * config["encoder_dim"]),
        decoder_hidden_size=config["decoder_dim"],
        decoder_num_hidden_layers=config["decoder_layers"],
        decoder_num_attention_heads=config["decoder_heads"],
        decoder_intermediate_size=int(config["mlp_ratio"] * config["decoder_dim"]),
        image_size=config["img_size"], patch_size=config["patch_size"],
        num_channels=config["in_chans"], mask_ratio=config["mask_ratio"],
        norm_pix_loss=config["norm_pix_loss"], layer_norm_eps=1e-6, qkv_bias=True,
        attn_implementation="sdpa")
    return ViTMAEForPreTraining(hf)


def _step_fn(model, optimizer, forward):
    def step(imgs):
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=CUDA):
            loss = forward(model, imgs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _measure(benchmark, model, forward, batch, size, compiled):
    model = model.to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=CUDA)
    if compiled:
        # the CPU smoke run checks that dynamo captures the step, without Inductor's codegen
        forward = Compiled(forward, "inductor" if CUDA or not benchmark.disabled else "aot_eager")
    step = _step_fn(model, optimizer, forward)
    imgs = torch.randn(batch, 3, size, size, device=DEVICE)
    benchmark.extra_info.update(batch=batch, image_size=size)
    if not CUDA or benchmark.disabled:
        benchmark.pedantic(step, args=(imgs,), rounds=1 if benchmark.disabled else 3,
                           warmup_rounds=0 if benchmark.disabled else 1)
        return
    torch.cuda.reset_peak_memory_stats()
    ms = cuda_median_ms(step, [(imgs,)], warmup=5, reps=20)
    benchmark.extra_info.update(cuda_median_ms=ms, images_per_sec=batch / (ms * 1e-3),
                                peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30)

    def synced(x):
        step(x)
        torch.cuda.synchronize()

    benchmark.pedantic(synced, args=(imgs,), rounds=3, iterations=1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MODELS)
def test_pretrain_step(benchmark, name, variant):
    batch, overrides = CONFIGS[name]
    config = config_of(name, **overrides, use_kernels=variant.startswith("kernels"))
    benchmark.group = f"pretrain step {name}"
    benchmark.extra_info.update(model=name, variant=variant)
    _measure(benchmark, MAE(config), lambda m, x: m(x).loss, batch, config["img_size"],
             variant.endswith("compile"))


# ViT-B/16 MAE against CrossMAE (its recipe: 12 cross-attention blocks over weighted feature
# maps, 25% of the patches predicted) and a Pixio-shaped ViT-B (8 cls tokens, 4x4 masking units,
# its 32-block decoder, 256 px); the GPU plan's step stage selects them with -m decoder_side.
DECODER_SIDE = {  # case: (model, batch, config overrides)
    "mae": ("mae_vit_base_patch16", 256, {"img_size": 224}),
    "crossmae": ("crossmae_vit_base_patch16", 256, {"img_size": 224}),
    "pixio": ("pixio_vit_tiny_patch16", 128, {"encoder_dim": 768, "encoder_heads": 12,
                                               "decoder_dim": 512, "decoder_layers": 32,
                                               "decoder_heads": 16}),
} if GPU_SIZES else {
    "mae": ("mae_vit_tiny_patch16", 8, {"img_size": 32, "patch_size": 4}),
    "crossmae": ("crossmae_vit_tiny_patch16", 8, {"img_size": 32, "patch_size": 4}),
    "pixio": ("pixio_vit_tiny_patch16", 8, {"img_size": 32, "patch_size": 4, "mask_grid": 2,
                                             "decoder_layers": 4}),
}


@pytest.mark.decoder_side
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(DECODER_SIDE))
def test_decoder_side_step(benchmark, case, variant):
    name, batch, overrides = DECODER_SIDE[case]
    config = config_of(name, **overrides, use_kernels=variant.startswith("kernels"))
    size = "ViT-B/16" if GPU_SIZES else "tiny"
    benchmark.group = f"pretrain step: MAE vs CrossMAE vs Pixio ({size})"
    benchmark.extra_info.update(model=name, case=case, variant=variant, overrides=overrides)
    _measure(benchmark, build_model(config), lambda m, x: m(x).loss, batch, config["img_size"],
             variant.endswith("compile"))


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers not installed")
@pytest.mark.parametrize("patched", [False, True], ids=["hf", "hf+patch_vit_mae"])
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=COMPILED)],
                         ids=["eager", "compile"])
@pytest.mark.parametrize("name", MODELS)
def test_pretrain_step_hf_vitmae(benchmark, name, compiled, patched):
    """HF ViTMAE as the outside baseline, as is and with `patch_vit_mae`."""
    batch, overrides = CONFIGS[name]
    config = config_of(name, **overrides)
    benchmark.group = f"pretrain step {name}"
    variant = "hf-vitmae" + ("+patched" * patched) + ("+compile" * compiled)
    benchmark.extra_info.update(model=name, variant=variant)
    model = hf_vit_mae(config)
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in MAE(config).parameters())  # like with like
    if patched:
        model = patch_vit_mae(model)
    _measure(benchmark, model, lambda m, x: m(pixel_values=x).loss, batch, config["img_size"],
             compiled)
