"""Our MAE weights to and from the layouts researchers publish in: a Hugging Face ViTMAE
directory (`transformers.ViTMAEForPreTraining.from_pretrained`) and a timm ViT encoder; official
facebookresearch/mae checkpoints already share our parameter names.

The HF layout is the one the Hub's ViTMAE checkpoints use (transformers' own
`convert_vit_mae_to_pytorch.py`): `vit.embeddings.*`, `vit.encoder.layer.N.*` with the fused qkv
split into `attention.attention.{query,key,value}`, `decoder.decoder_layers.N.*`, position
embeddings in the official sin-cos layout (cls row first). transformers 5 renames these keys
on load to its `vit.layers.N.attention.q_proj` names, which we also read. Reading never
unpickles: config.json through `json`, weights through safetensors.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch

from .format import CheckpointError, inside, model_weights, weights_kind, write_atomically

HF_CONFIG, HF_WEIGHTS, HF_INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
# our block's names -> the Hub ViTMAE layer's (qkv is split in three, see _block_pairs)
HF_BLOCK = {"norm1": "layernorm_before", "norm2": "layernorm_after",
            "attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense",
            "mlp.fc2": "output.dense"}
HF_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
HF_TOP = {"cls_token": "vit.embeddings.cls_token",
          "pos_embed": "vit.embeddings.position_embeddings",
          "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
          "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
          "norm.weight": "vit.layernorm.weight", "norm.bias": "vit.layernorm.bias",
          "mask_token": "decoder.mask_token", "decoder_pos_embed": "decoder.decoder_pos_embed"}
for _name in ("decoder_embed", "decoder_norm", "decoder_pred"):
    for _p in ("weight", "bias"):
        HF_TOP[f"{_name}.{_p}"] = f"decoder.{_name}.{_p}"
# transformers 5's module names -> the Hub's (applied in this order); its save_pretrained
# writes the decoder's blocks as decoder.decoder_encoder.layer.N (its rename undone blindly)
HF5_TO_HUB = (("decoder.decoder_encoder.layer.", "decoder.decoder_layers."),
              ("vit.layers.", "vit.encoder.layer."), (".attention.q_proj.", HF_QKV[0] + "."),
              (".attention.k_proj.", HF_QKV[1] + "."), (".attention.v_proj.", HF_QKV[2] + "."),
              (".attention.o_proj.", ".attention.output.dense."),
              (".mlp.fc1.", ".intermediate.dense."), (".mlp.fc2.", ".output.dense."))
# timm's named ViTs by (width, depth, heads): (name, its patch size)
TIMM_NAMES = {(192, 12, 3): ("vit_tiny_patch16_224", 16),
              (384, 12, 6): ("vit_small_patch16_224", 16),
              (768, 12, 12): ("vit_base_patch16_224", 16),
              (1024, 24, 16): ("vit_large_patch16_224", 16),
              (1280, 32, 16): ("vit_huge_patch14_224", 14)}
HF_LAYER_NORM_EPS = 1e-12  # ViTMAEConfig's default, where a config.json does not say
TIMM_LAYER_NORM_EPS = 1e-6  # the eps of timm's MAE ViTs (another: create_model(norm_layer=))


def _square(config: dict, what: str) -> int:
    img = config["img_size"]
    if isinstance(img, list):
        if img[0] != img[1]:
            raise CheckpointError(f"{what} takes square images (its position embeddings are a "
                                  f"square grid); this model is {img[0]}x{img[1]}")
        img = img[0]
    return img


def _image_model(config: dict, what: str) -> None:
    from ..models.image import is_video

    if is_video(config):
        raise CheckpointError(f"{what} holds image MAEs; this checkpoint is a VideoMAE")
    if config["target"] != "pixel":
        raise CheckpointError(f"{what} predicts pixels; this model predicts "
                              f"{config['target']} features")


def _block_pairs(prefix: str, hf_prefix: str):
    for ours, theirs in HF_BLOCK.items():
        for p in ("weight", "bias"):
            yield f"{prefix}.{ours}.{p}", f"{hf_prefix}.{theirs}.{p}"


def encoder_mlp_dim(config: dict) -> int:
    """The encoder blocks' MLP width: `encoder_mlp_dim` where set (ViT-g/14's 6144, not
    1408 * 4), else encoder_dim * mlp_ratio (the decoder's is always decoder_dim * mlp_ratio)."""
    return config["encoder_mlp_dim"] or int(config["encoder_dim"] * config["mlp_ratio"])


def hf_config(config: dict) -> dict:
    """The config.json of ViTMAEForPreTraining for our resolved model config."""
    what = "a Hugging Face ViTMAE"
    _image_model(config, what)
    if config["n_cls_tokens"] != 1 or config["decoder"] != "mae":
        raise CheckpointError(f"{what} has one cls token and MAE's decoder; this model has "
                              f"{config['n_cls_tokens']} and the {config['decoder']!r} decoder "
                              f"(export its encoder with --format timm)")
    image = _square(config, what)
    return {
        "architectures": ["ViTMAEForPreTraining"], "model_type": "vit_mae",
        "image_size": image, "patch_size": config["patch_size"],
        "num_channels": config["in_chans"], "hidden_size": config["encoder_dim"],
        "num_hidden_layers": config["encoder_layers"],
        "num_attention_heads": config["encoder_heads"],
        "intermediate_size": encoder_mlp_dim(config),
        "decoder_hidden_size": config["decoder_dim"],
        "decoder_num_hidden_layers": config["decoder_layers"],
        "decoder_num_attention_heads": config["decoder_heads"],
        "decoder_intermediate_size": int(config["decoder_dim"] * config["mlp_ratio"]),
        "hidden_act": "gelu", "qkv_bias": True, "layer_norm_eps": config["norm_eps"],
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02, "mask_ratio": config["mask_ratio"],
        "norm_pix_loss": config["norm_pix_loss"],
    }


def to_hf(weights: dict, config: dict) -> dict:
    """Our MAE state dict as ViTMAEForPreTraining's (Hub key names)."""
    out = {theirs: weights[ours] for ours, theirs in HF_TOP.items()}
    dim = {"blocks": config["encoder_dim"], "decoder_blocks": config["decoder_dim"]}
    for ours_root, hf_root, depth in (("blocks", "vit.encoder.layer", config["encoder_layers"]),
                                      ("decoder_blocks", "decoder.decoder_layers",
                                       config["decoder_layers"])):
        for i in range(depth):
            prefix, hf_prefix = f"{ours_root}.{i}", f"{hf_root}.{i}"
            out.update({t: weights[o] for o, t in _block_pairs(prefix, hf_prefix)})
            for p in ("weight", "bias"):  # the fused (3D, D) qkv: q, k, v rows in that order
                parts = weights[f"{prefix}.attn.qkv.{p}"].split(dim[ours_root], dim=0)
                out.update({f"{hf_prefix}.{name}.{p}": part for name, part in zip(HF_QKV, parts)})
    return out


def from_hf(weights: dict, hf: dict) -> tuple[dict, dict]:
    """(our state dict, our model config) from ViTMAEForPreTraining's weights (Hub or
    transformers 5 names) and its config.json; a key that fits neither is a CheckpointError."""
    config = config_from_hf(hf)
    renamed = {}
    for key, value in weights.items():
        for new, hub in HF5_TO_HUB:
            key = key.replace(new, hub)
        renamed[key] = value
    pairs = dict(HF_TOP)
    for ours_root, hf_root, depth in (("blocks", "vit.encoder.layer", config["encoder_layers"]),
                                      ("decoder_blocks", "decoder.decoder_layers",
                                       config["decoder_layers"])):
        for i in range(depth):
            prefix, hf_prefix = f"{ours_root}.{i}", f"{hf_root}.{i}"
            pairs.update(_block_pairs(prefix, hf_prefix))
            for p in ("weight", "bias"):
                names = [f"{hf_prefix}.{name}.{p}" for name in HF_QKV]
                missing = [n for n in names if n not in renamed]
                if missing:
                    raise CheckpointError(f"the ViTMAE weights have no {missing[0]}")
                pairs[f"{prefix}.attn.qkv.{p}"] = names
    out = {}
    for ours, theirs in pairs.items():
        if isinstance(theirs, list):
            out[ours] = torch.cat([renamed.pop(n) for n in theirs], dim=0)
        elif theirs in renamed:
            out[ours] = renamed.pop(theirs)
        else:
            raise CheckpointError(f"the ViTMAE weights have no {theirs}")
    if renamed:
        raise CheckpointError(f"the ViTMAE weights hold {len(renamed)} key(s) a ViTMAE "
                              f"of this config.json does not have (e.g. {sorted(renamed)[0]})")
    return out, config


def config_from_hf(hf: dict) -> dict:
    """Our resolved model config for a ViTMAE config.json."""
    from ..models.image import resolve_config

    if not isinstance(hf, dict) or hf.get("model_type", "vit_mae") != "vit_mae":
        raise CheckpointError(f"config.json is not a ViTMAE's (model_type "
                              f"{hf.get('model_type') if isinstance(hf, dict) else hf!r})")
    if hf.get("hidden_act", "gelu") != "gelu" or not hf.get("qkv_bias", True):
        raise CheckpointError("config.json: our MAE has GELU blocks with qkv biases (hidden_act "
                              f"{hf.get('hidden_act')!r}, qkv_bias {hf.get('qkv_bias')!r})")
    try:
        # our mlp_ratio is the decoder's; an encoder MLP of another ratio is encoder_mlp_dim
        ratio = hf["decoder_intermediate_size"] / hf["decoder_hidden_size"]
        width = hf["intermediate_size"]
        mlp_dim = None if width == int(hf["hidden_size"] * ratio) else width
        config = {"img_size": hf["image_size"], "patch_size": hf["patch_size"],
                  "in_chans": hf.get("num_channels", 3), "encoder_dim": hf["hidden_size"],
                  "encoder_layers": hf["num_hidden_layers"],
                  "encoder_heads": hf["num_attention_heads"],
                  "decoder_dim": hf["decoder_hidden_size"],
                  "decoder_layers": hf["decoder_num_hidden_layers"],
                  "decoder_heads": hf["decoder_num_attention_heads"],
                  "mlp_ratio": ratio, "encoder_mlp_dim": mlp_dim,
                  "mask_ratio": hf.get("mask_ratio", 0.75),
                  "norm_pix_loss": bool(hf.get("norm_pix_loss", False)),
                  "norm_eps": hf.get("layer_norm_eps", HF_LAYER_NORM_EPS)}
        return resolve_config(config)
    except KeyError as exc:
        raise CheckpointError(f"config.json has no {exc}") from exc
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise CheckpointError(f"config.json does not describe a ViTMAE we can build: {exc}") \
            from exc


def is_hf_dir(path) -> bool:
    return Path(path).is_dir() and (Path(path) / HF_CONFIG).is_file()


def load_hf_dir(path) -> dict:
    """A checkpoint's contents (weights in our names, `args` naming the model) from an HF
    ViTMAE directory: config.json plus model.safetensors (or its shards)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        hf = json.loads((path / HF_CONFIG).read_text())
        if (path / HF_WEIGHTS).is_file():
            files = [path / HF_WEIGHTS]
        elif (path / HF_INDEX).is_file():
            index = json.loads((path / HF_INDEX).read_text())["weight_map"]
            files = [inside(path, name, HF_INDEX) for name in sorted(set(index.values()))]
        else:
            pickled = " (it has pytorch_model.bin, a pickle we do not load: save it with " \
                      "safe_serialization)" if (path / "pytorch_model.bin").exists() else ""
            raise CheckpointError(f"{path}: a Hugging Face directory without {HF_WEIGHTS}"
                                  f"{pickled}")
        weights = {}
        for file in files:
            weights.update(load_file(str(file)))
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: cannot read the Hugging Face directory ({exc})") from exc
    try:
        ours, config = from_hf(weights, hf)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    img = config["img_size"]
    return {"model": ours, "format": "hf",
            "args": {"model_config": config, "input_size": img,
                     "norm_pix_loss": config["norm_pix_loss"]}}


def _config_of_state(state: dict, path) -> dict:
    from ..models.image import model_config_of

    saved = state.get("args")
    if weights_kind(state) == "fine-tuning":
        raise CheckpointError(f"{path} holds fine-tuning weights (a classifier); --format hf "
                              f"and timm export pre-training checkpoints")
    if not isinstance(saved, dict) or not (saved.get("model_config") or saved.get("model")):
        raise CheckpointError(f"{path} does not say which model it holds (no saved `mae "
                              f"pretrain` arguments)")
    try:
        return model_config_of(saved)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its saved arguments name no MAE we know ({exc})") \
            from exc


def export_hf(state: dict, out_dir, path="the checkpoint") -> Path:
    """An HF ViTMAE directory (config.json, model.safetensors) from a pre-training checkpoint."""
    from safetensors.torch import save


    config = _config_of_state(state, path)
    hf = hf_config(config)
    try:
        weights = {k: v.detach().contiguous().clone()
                   for k, v in to_hf(model_weights(state), config).items()}
    except KeyError as exc:
        raise CheckpointError(f"{path} has no {exc}: --format hf needs the whole MAE (encoder "
                              f"and decoder); an encoder alone exports with --format timm") \
            from exc
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"-o {out_dir} is a file; --format hf writes a directory")
    write_atomically(out_dir / HF_WEIGHTS,
                     lambda f: f.write(save(weights, metadata={"format": "pt"})))
    write_atomically(out_dir / HF_CONFIG,
                     lambda f: f.write(json.dumps(hf, indent=2).encode()))
    return out_dir


def _ratio_of(width: int, dim: int) -> float:
    """The mlp_ratio timm's Mlp, int(dim * mlp_ratio) wide, makes `width` of: width / dim, one
    float step up where rounding leaves the product just under `width` (11 * (15 / 11))."""
    ratio = width / dim
    while int(dim * ratio) < width:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def timm_model(config: dict) -> tuple[str, dict]:
    """(timm model name, create_model kwargs) of the ViT that holds our encoder."""
    _image_model(config, "a timm ViT")
    key = (config["encoder_dim"], config["encoder_layers"], config["encoder_heads"])
    kwargs = {"num_classes": 0, "img_size": config["img_size"]}
    if key not in TIMM_NAMES:  # ViT-B's entry, resized
        kwargs.update(embed_dim=key[0], depth=key[1], num_heads=key[2])
    name, patch = TIMM_NAMES.get(key, TIMM_NAMES[(768, 12, 12)])
    if config["patch_size"] != patch:
        kwargs["patch_size"] = config["patch_size"]
    width = encoder_mlp_dim(config)
    if width != int(key[0] * 4.0):
        kwargs["mlp_ratio"] = _ratio_of(width, key[0])
    if config["in_chans"] != 3:
        kwargs["in_chans"] = config["in_chans"]
    if config["n_cls_tokens"] > 1:  # Pixio's: timm's cls token and register tokens
        kwargs["reg_tokens"] = config["n_cls_tokens"] - 1
    if config["decoder"] == "cross" and config["weight_fm"]:
        # no last norm was trained (CrossMAE's): timm's mean-pooled head with a fresh fc_norm
        kwargs.update(global_pool="avg", fc_norm=True)
    if config["norm_eps"] != TIMM_LAYER_NORM_EPS:  # an HF ViTMAE's (1e-12): timm's outputs
        kwargs["norm_layer"] = functools.partial(torch.nn.LayerNorm, eps=config["norm_eps"])
    return name, kwargs


def timm_call(name: str, kwargs: dict, file) -> str:
    """The `timm.create_model(...)` call, as text, whose ViT loads the export `file` with
    strict=True."""
    options = "".join(
        f", {k}=functools.partial(torch.nn.LayerNorm, eps={v.keywords['eps']!r})"
        if k == "norm_layer" else f", {k}={v!r}" for k, v in kwargs.items())
    return (f"timm.create_model({name!r}{options}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file={str(file)!r}))")


def to_timm(weights: dict, config: dict | None = None) -> dict:
    """The encoder of our MAE state dict, as timm's VisionTransformer names it (the same names:
    the decoder and mask token dropped, so timm does not take it for DINOv2; Pixio's cls
    tokens split into timm's cls and register tokens; CrossMAE's decoder parts dropped, and
    without a last norm a fresh fc_norm, as main_finetune.py's)."""
    out = {k: v for k, v in weights.items()
           if not k.startswith(("decoder", "mask_token", "dec_norms", "wfm"))}
    if out["cls_token"].shape[1] > 1:
        out["reg_token"] = out["cls_token"][:, 1:]
        out["cls_token"] = out["cls_token"][:, :1]
    if config is not None and timm_model(config)[1].get("fc_norm"):
        width = out["cls_token"].shape[-1]
        out["fc_norm.weight"], out["fc_norm.bias"] = torch.ones(width), torch.zeros(width)
    return out


def export_timm(state: dict, out, path="the checkpoint") -> tuple[Path, str, dict]:
    """The encoder as a .safetensors file timm's matching ViT loads with strict=True; returns
    (file, timm model name, create_model kwargs), also kept in the file's metadata (a
    norm_layer as its `norm_eps`)."""
    from safetensors.torch import save


    config = _config_of_state(state, path)
    name, kwargs = timm_model(config)
    weights = {k: v.detach().contiguous().clone()
               for k, v in to_timm(model_weights(state), config).items()}
    plain = {k: v for k, v in kwargs.items() if k != "norm_layer"}  # (its eps below)
    metadata = {"format": "pt", "timm_model": name, "timm_kwargs": json.dumps(plain),
                "norm_eps": repr(config["norm_eps"])}
    out = write_atomically(out, lambda f: f.write(save(weights, metadata=metadata)))
    return out, name, kwargs


def describe(state: dict, path) -> str:
    """What a loaded checkpoint is, in a few words, for the line each command prints."""
    if state.get("format") == "hf":
        return "a Hugging Face ViTMAE directory (config.json + safetensors)"
    if Path(path).suffix == ".safetensors":
        return "a safetensors export of a mae checkpoint"
    saved = state.get("args")
    if isinstance(saved, dict) and ("model_config" in saved or "command" in saved):
        return "a sharded mae checkpoint" if Path(path).is_dir() else "a mae checkpoint"
    return "an official MAE checkpoint (facebookresearch/mae layout)"
