"""FLOPs per image of a pre-training step (forward and backward), the whole model and its decoder,
counted by torch.utils.flop_counter (matmuls, convolutions, attention): MAE against CrossMAE at
predict ratios 0.25 / 0.5 / 0.75 and Pixio's decoder, at ViT-B/16 224 px and at the CPU demo's
size. Deterministic: the counts follow from the shapes, whatever the machine.

    python3 -m benchmarks.decoder_flops            # the table of docs/decoders.md
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from mae.models import build_model
from mae.models.image import config_of

# (label, model, config overrides) at ViT-B/16 224 px, and at the demo's size (ViT-Tiny, 32 px,
# patch 8); CrossMAE with its recipe's decoder (12 blocks over weighted feature maps) and with
# MAE-B's (8 blocks over the last block), Pixio's with its 32-block decoder
VIT_B = [
    ("MAE-B (decoder 512x8)", "mae_vit_base_patch16", {}),
    *[(f"CrossMAE-B, predict {r} (12 blocks, wfm)", "crossmae_vit_base_patch16",
       {"predict_ratio": r}) for r in (0.25, 0.5, 0.75)],
    *[(f"CrossMAE-B, predict {r} (8 blocks)", "crossmae_vit_base_patch16",
       {"predict_ratio": r, "decoder_layers": 8, "weight_fm": False, "use_input": False})
      for r in (0.25, 0.5, 0.75)],
    # at 224 px a 14x14 grid: 2x2 units (Pixio's 4x4 need 256 px; the count of FLOPs barely
    # moves: 48 patches kept instead of 49)
    ("Pixio's decoder on ViT-B/16 (512x32, 8 cls tokens, 2x2 units)", "pixio_vit_tiny_patch16",
     {"img_size": 224, "mask_grid": 2, "encoder_dim": 768, "encoder_heads": 12,
      "decoder_dim": 512, "decoder_layers": 32, "decoder_heads": 16}),
    ("Pixio-H/16 (256 px)", "pixio_vith16_enc1280x32h16_dec512x32h16", {}),
]
DEMO = {"img_size": 32, "patch_size": 8}
DEMO_SIZE = [
    ("MAE-Tiny demo (decoder 128x2)", "mae_vit_tiny_patch16", DEMO),
    *[(f"CrossMAE-Tiny, predict {r}", "crossmae_vit_tiny_patch16", {**DEMO, "predict_ratio": r})
      for r in (0.25, 0.5, 0.75)],
    ("Pixio-shaped Tiny (decoder 128x12, 2x2 units)", "pixio_vit_tiny_patch16",
     {**DEMO, "mask_grid": 2}),
]


def step_flops(model: torch.nn.Module, batch: int = 1) -> dict:
    """{"total", "decoder"}: the FLOPs per image of one forward and backward at mask ratio 0.75
    (the reference ops: the same matmuls as the fused ones). The decoder's are the step's less
    the encoder's alone (its forward, and its backward from every feature the decoder reads):
    the counter's per-module figures would credit the encoder's backward to the module that
    consumed its features (CrossMAE's weighted feature maps)."""
    size = model.patch_embed.img_size
    imgs = torch.randn(batch, model.in_chans, *size)
    with FlopCounterMode(display=False) as step:
        model(imgs, 0.75).loss.backward()
    with FlopCounterMode(display=False) as encoder:
        features = model.forward_encoder(imgs, 0.75)[0]
        features = features if isinstance(features, list) else [features]
        torch.autograd.backward(features, [torch.ones_like(f) for f in features])
    total = step.get_total_flops()
    return {"total": total / batch, "decoder": (total - encoder.get_total_flops()) / batch}


def flops_of(name: str, overrides: dict) -> dict:
    torch.manual_seed(0)
    model = build_model(config_of(name, **overrides, use_kernels=False))
    return step_flops(model)


def table(cases) -> str:
    rows = ["| model | training GFLOPs / image | decoder GFLOPs / image | decoder share |",
            "|---|---|---|---|"]
    for label, name, overrides in cases:
        f = flops_of(name, overrides)
        rows.append(f"| {label} | {f['total'] / 1e9:.2f} | {f['decoder'] / 1e9:.2f} | "
                    f"{f['decoder'] / f['total']:.0%} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print("ViT-B/16, 224 px (Pixio-H/16: 256 px)\n")
    print(table(VIT_B))
    print("\nThe CPU demo's size (ViT-Tiny encoder, 32 px, patch 8)\n")
    print(table(DEMO_SIZE))
