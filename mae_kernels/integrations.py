"""One-line swaps of the fused ops into the MAE code people already run.

    from mae_kernels.integrations import patch_vit_mae, patch_official_mae
    model = patch_vit_mae(ViTMAEForPreTraining.from_pretrained(...))   # HF transformers
    model = patch_official_mae(models_mae.mae_vit_base_patch16())       # facebookresearch/mae

Patching sets methods on the instance (the class is untouched), so `unpatch_*` restores the
original behaviour by deleting them. Paths the fused ops do not cover (HF's
`interpolate_pos_encoding=True`, attention or hidden-state outputs) run the original code.
"""
from __future__ import annotations

import math
import types

import torch

from . import masking
from ._checks import skip_index_checks
from .loss import mae_loss
from .patches import patchify, unpatchify
from .unshuffling import unshuffle

_PATCHED = "_mae_kernels_patched"


def _set(module: torch.nn.Module, name: str, fn) -> None:
    setattr(module, name, types.MethodType(fn, module))
    module.__dict__.setdefault(_PATCHED, []).append(name)


def _unset(module: torch.nn.Module) -> None:
    for name in module.__dict__.pop(_PATCHED, []):
        module.__dict__.pop(name, None)


def _is_patched(module: torch.nn.Module) -> bool:
    return bool(module.__dict__.get(_PATCHED))


def _layer_output(out):
    # transformers 4.x layers return tuples, 5.x a tensor
    return out[0] if isinstance(out, tuple) else out


# ---------------------------------------------------------------- HF transformers ViTMAE
def _hf_random_masking(self, sequence, noise=None):
    return masking.random_masking(sequence, self.config.mask_ratio, noise)


def _hf_decoder_forward(self, hidden_states, ids_restore, *args, interpolate_pos_encoding=False,
                        **kwargs):
    wants_extras = args or kwargs.get("output_attentions") or kwargs.get("output_hidden_states")
    if interpolate_pos_encoding or wants_extras:
        return type(self).forward(self, hidden_states, ids_restore, *args,
                                  interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAEDecoderOutput

    x = self.decoder_embed(hidden_states)
    with skip_index_checks():  # ids_restore comes from random_masking
        x = unshuffle(x, self.mask_token, ids_restore, 1, self.decoder_pos_embed)
    for layer in self.decoder_layers:
        x = _layer_output(layer(x))
    logits = self.decoder_pred(self.decoder_norm(x))[:, 1:, :]
    if kwargs.get("return_dict") is False:
        return (logits,)
    return ViTMAEDecoderOutput(logits=logits)


def _hf_patch_size(config) -> int:
    return config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]


def _hf_pretraining_forward(self, pixel_values=None, noise=None, interpolate_pos_encoding=None,
                            *args, **kwargs):
    return_dict = kwargs.get("return_dict")
    if interpolate_pos_encoding or args or kwargs.get("output_attentions") \
            or kwargs.get("output_hidden_states"):
        return type(self).forward(self, pixel_values, noise, interpolate_pos_encoding, *args,
                                  **kwargs)
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAEForPreTrainingOutput

    kwargs.pop("return_dict", None)
    outputs = self.vit(pixel_values, noise=noise, interpolate_pos_encoding=False, **kwargs)
    latent = outputs[0]
    mask, ids_restore = outputs.mask, outputs.ids_restore
    logits = self.decoder(latent, ids_restore).logits
    loss = mae_loss(pixel_values, logits, mask, _hf_patch_size(self.config),
                    bool(self.config.norm_pix_loss))
    output = ViTMAEForPreTrainingOutput(loss=loss, logits=logits, mask=mask,
                                        ids_restore=ids_restore)
    return output.to_tuple() if return_dict is False else output


def patch_vit_mae(model):
    """Route an HF `ViTMAEForPreTraining` or `ViTMAEModel` through the fused ops: masking
    (with its `noise` argument and `config.mask_ratio`), the decoder's mask-token unshuffle with
    the positional embedding, and the pre-training loss (`config.norm_pix_loss`)."""
    vit = getattr(model, "vit", model)
    embeddings = getattr(vit, "embeddings", None)
    if embeddings is None or not hasattr(embeddings, "random_masking"):
        raise TypeError(f"model must be a ViTMAEForPreTraining or ViTMAEModel, "
                        f"got {type(model).__name__}")
    if _is_patched(embeddings):
        return model
    _set(embeddings, "random_masking", _hf_random_masking)
    decoder = getattr(model, "decoder", None)
    if decoder is not None:
        _set(decoder, "forward", _hf_decoder_forward)
        _set(model, "forward", _hf_pretraining_forward)
    return model


def unpatch_vit_mae(model):
    """Undo `patch_vit_mae`."""
    vit = getattr(model, "vit", model)
    _unset(vit.embeddings)
    if getattr(model, "decoder", None) is not None:
        _unset(model.decoder)
        _unset(model)
    return model


# ---------------------------------------------------------------- facebookresearch/mae
def _official_patch_size(self, imgs=None, pred=None) -> int:
    patch_embed = getattr(self, "patch_embed", None)
    size = getattr(patch_embed, "patch_size", None)
    if size is not None:
        return size if isinstance(size, int) else size[0]
    return round(math.sqrt(imgs.shape[2] * imgs.shape[3] / pred.shape[1]))


def _official_random_masking(self, x, mask_ratio, noise=None):
    return masking.random_masking(x, mask_ratio, noise)


def _official_patchify(self, imgs):
    return patchify(imgs, _official_patch_size(self))


def _official_unpatchify(self, x):
    p = _official_patch_size(self)
    return unpatchify(x, p, None, x.shape[-1] // (p * p))


def _official_forward_decoder(self, x, ids_restore):
    x = self.decoder_embed(x)
    with skip_index_checks():
        x = unshuffle(x, self.mask_token, ids_restore, 1, self.decoder_pos_embed)
    for blk in self.decoder_blocks:
        x = blk(x)
    x = self.decoder_pred(self.decoder_norm(x))
    return x[:, 1:, :]


def _official_forward_loss(self, imgs, pred, mask):
    return mae_loss(imgs, pred, mask, _official_patch_size(self, imgs, pred),
                    bool(getattr(self, "norm_pix_loss", False)))


_DECODER_PARTS = ("decoder_embed", "mask_token", "decoder_pos_embed", "decoder_blocks",
                  "decoder_norm", "decoder_pred")


def patch_official_mae(model):
    """Route a facebookresearch/mae-style model (one exposing `random_masking`,
    `forward_decoder`, `forward_loss`, `patchify`) through the fused ops, without importing it.
    A method the model lacks, or a decoder without the official attributes, is left alone."""
    required = ("random_masking", "forward_decoder", "forward_loss", "patchify")
    missing = [name for name in required if not hasattr(model, name)]
    if missing:
        raise TypeError(f"model lacks the official MAE methods {missing}")
    if _is_patched(model):
        return model
    _set(model, "random_masking", _official_random_masking)
    _set(model, "patchify", _official_patchify)
    if hasattr(model, "unpatchify"):
        _set(model, "unpatchify", _official_unpatchify)
    if all(hasattr(model, part) for part in _DECODER_PARTS):
        _set(model, "forward_decoder", _official_forward_decoder)
    _set(model, "forward_loss", _official_forward_loss)
    return model


def unpatch_official_mae(model):
    """Undo `patch_official_mae`."""
    _unset(model)
    return model
