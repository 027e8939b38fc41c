"""The whole pre-training step (forward, backward, AdamW) of MAE ViT-B/16 and ViT-L/16 with the
fused ops versus the reference ops, eager and compiled, under bf16 autocast; and HF
transformers' ViTMAEForPreTraining (SDPA attention) at the same configuration. Reports
images/s and peak memory. CPU: a tiny model at 32x32, as a smoke test."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from mae.models import MODELS
from mae_kernels.integrations import patch_vit_mae

from .common import CUDA, cuda_median_ms

DEVICE = "cuda" if CUDA else "cpu"
CONFIGS = {  # model: (batch, image size, patch-size override)
    "mae_vit_base_patch16": (128, 224, None),
    "mae_vit_large_patch16": (64, 224, None),
} if CUDA else {"mae_vit_tiny_patch16": (8, 32, 4)}
VARIANTS = ["kernels", "kernels+compile", "reference", "reference+compile"]
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def hf_vit_mae(name: str, image_size: int):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    embed, depth, heads = {"mae_vit_base_patch16": (768, 12, 12),
                           "mae_vit_large_patch16": (1024, 24, 16),
                           "mae_vit_tiny_patch16": (192, 12, 3)}[name]
    config = ViTMAEConfig(hidden_size=embed, num_hidden_layers=depth, num_attention_heads=heads,
                          intermediate_size=4 * embed, decoder_hidden_size=512,
                          decoder_num_hidden_layers=8, decoder_num_attention_heads=16,
                          decoder_intermediate_size=2048, image_size=image_size,
                          patch_size=16, mask_ratio=0.75, attn_implementation="sdpa")
    return ViTMAEForPreTraining(config)


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
    run = forward if not compiled else torch.compile(forward)
    step = _step_fn(model, optimizer, run)
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
@pytest.mark.parametrize("name", list(CONFIGS))
def test_pretrain_step(benchmark, name, variant):
    if variant.endswith("compile") and not CUDA and benchmark.disabled:
        pytest.skip("compiling on CPU is too slow for the smoke run")
    batch, size, patch = CONFIGS[name]
    kwargs = {"img_size": size, "use_kernels": variant.startswith("kernels")}
    if patch:
        kwargs["patch_size"] = patch
    benchmark.group = f"pretrain step {name}"
    benchmark.extra_info.update(model=name, variant=variant)
    model = MODELS[name](**kwargs)
    _measure(benchmark, model, lambda m, x: m(x, 0.75)[0], batch, size,
             variant.endswith("compile"))


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers not installed")
@pytest.mark.parametrize("patched", [False, True], ids=["hf", "hf+patch_vit_mae"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_pretrain_step_hf_vitmae(benchmark, name, compiled, patched):
    """HF ViTMAE as the outside baseline, as is and with `patch_vit_mae`."""
    if not CUDA and compiled:
        pytest.skip("compiling on CPU is too slow for the smoke run")
    batch, size, _ = CONFIGS[name]
    benchmark.group = f"pretrain step {name}"
    variant = "hf-vitmae" + ("+patched" * patched) + ("+compile" * compiled)
    benchmark.extra_info.update(model=name, variant=variant)
    model = hf_vit_mae(name, size)
    if patched:
        model = patch_vit_mae(model)
    _measure(benchmark, model, lambda m, x: m(pixel_values=x).loss, batch, size, compiled)
