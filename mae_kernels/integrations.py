"""One-line swaps of the fused ops into the MAE code people already run.

    from mae_kernels.integrations import patch_lightly, patch_official_mae, patch_vit_mae
    model = patch_vit_mae(ViTMAEForPreTraining.from_pretrained(...))   # HF transformers
    model = patch_official_mae(models_mae.mae_vit_base_patch16())       # facebookresearch/mae
    patch_lightly()                                                     # lightly, process-wide
    model = patch_pixio(models_pixio.pixio_vith16_enc1280x32h16_dec512x32h16())  # Pixio
    model = patch_crossmae(models_cross.mae_vit_base_patch16(weight_fm=True))   # CrossMAE

Patching the official and HF models sets methods on the instance (the class is untouched), so
`unpatch_*` restores the original behaviour by deleting them. lightly's MAE is the user's own
module calling `lightly.models.utils`, so `patch_lightly` swaps those functions (and the TIMM
decoder's input step) for the whole process; `unpatch_lightly` puts them back. Paths the fused ops
do not cover (HF's `interpolate_pos_encoding=True`, attention or hidden-state outputs, lightly
calls outside the ops' contracts) run the original code.
"""
from __future__ import annotations

import math
import types

import torch

from . import _checks, masking, reference
from ._checks import skip_index_checks
from .loss import mae_loss
from .patches import patchify, unpatchify
from .queries import decoder_queries
from .tokens import gather_tokens, scatter_tokens
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


def _set_patchify(model) -> None:
    """The official `patchify` (and `unpatchify`, where the model has one) on the fused ops."""
    _set(model, "patchify", _official_patchify)
    if hasattr(model, "unpatchify"):
        _set(model, "unpatchify", _official_unpatchify)


def _check_methods(model, required: tuple[str, ...], whose: str) -> None:
    missing = [name for name in required if not hasattr(model, name)]
    if missing:
        raise TypeError(f"model lacks {whose} methods {missing}")


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
    prefix = getattr(self, "n_cls_tokens", 1)  # Pixio's models have 8
    x = self.decoder_embed(x)
    with skip_index_checks():
        x = unshuffle(x, self.mask_token, ids_restore, prefix, self.decoder_pos_embed)
    for blk in self.decoder_blocks:
        x = blk(x)
    # the head over the patch tokens only (the official code runs it over all, then slices)
    return self.decoder_pred(self.decoder_norm(x[:, prefix:, :]))


def _official_forward_loss(self, imgs, pred, mask):
    return mae_loss(imgs, pred, mask, _official_patch_size(self, imgs, pred),
                    bool(getattr(self, "norm_pix_loss", False)))


_DECODER_PARTS = ("decoder_embed", "mask_token", "decoder_pos_embed", "decoder_blocks",
                  "decoder_norm", "decoder_pred")


def patch_official_mae(model):
    """Route a facebookresearch/mae-style model (one exposing `random_masking`,
    `forward_decoder`, `forward_loss`, `patchify`) through the fused ops, without importing it.
    A method the model lacks, or a decoder without the official attributes, is left alone."""
    _check_methods(model, ("random_masking", "forward_decoder", "forward_loss", "patchify"),
                   "the official MAE")
    if _is_patched(model):
        return model
    _set(model, "random_masking", _official_random_masking)
    _set_patchify(model)
    if all(hasattr(model, part) for part in _DECODER_PARTS):
        _set(model, "forward_decoder", _official_forward_decoder)
    _set(model, "forward_loss", _official_forward_loss)
    return model


def unpatch_official_mae(model):
    """Undo `patch_official_mae`."""
    _unset(model)
    return model


# ---------------------------------------------------------------- lightly
# lightly's MAE (its examples and benchmarks) is a module the user writes around
# `lightly.models.utils`: random_token_mask draws (idx_keep, idx_mask) with the class token always
# kept, MaskedVisionTransformerTIMM gathers idx_keep (get_at_index), the encoded tokens are put
# back with set_at_index, MaskedVisionTransformerDecoderTIMM puts its mask token at idx_mask and
# adds its positional embedding, and the targets are get_at_index(patchify(images), idx_mask - 1).
_LIGHTLY_UTILS = ("random_token_mask", "get_at_index", "set_at_index", "patchify")
_lightly_originals: dict = {}


def _lightly_utils():
    try:
        from lightly.models import utils
    except ImportError as error:
        raise ImportError("patch_lightly needs lightly (pip install lightly)") from error
    return utils


def _lightly_decoder_class():
    """MaskedVisionTransformerDecoderTIMM, or None where lightly or timm lacks it."""
    try:
        from lightly.models.modules.masked_vision_transformer_decoder_timm import (
            MaskedVisionTransformerDecoderTIMM,
        )
    except ImportError:
        return None
    return MaskedVisionTransformerDecoderTIMM


def _distinct_rows(index: torch.Tensor, length: int) -> bool:
    """Whether no row of `index` repeats a position: the fused gather's backward and scatter
    write each position once. Trusted without a look under skip_index_checks()."""
    try:
        _checks.distinct("index", index, length)
    except ValueError:
        return False
    return True


def _token_rows(tokens, index) -> bool:
    """The case the token ops take: (B, L, D) floating tokens, (B, K) int64 positions."""
    return (isinstance(tokens, torch.Tensor) and isinstance(index, torch.Tensor)
            and tokens.dim() == 3 and tokens.dtype in _checks._FLOAT_DTYPES
            and index.dim() == 2 and index.dtype == torch.int64
            and index.shape[0] == tokens.shape[0] and index.device == tokens.device)


def _positions_hit(index: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) bool: True at the positions each row of `index` names."""
    hit = torch.zeros(index.shape[0], length, dtype=torch.bool, device=index.device)
    return hit.scatter_(1, index, True)


def _inverse(order: torch.Tensor) -> torch.Tensor:
    """The inverse permutation of each row."""
    ranks = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, ranks)


def _lightly_random_token_mask(size, mask_ratio=0.6, mask_class_token=False, device=None):
    """lightly's random_token_mask on the fused masking op: the same torch.rand draw, the same
    (idx_keep, idx_mask). Ties in the noise keep the lower index (a stable sort)."""
    batch_size, sequence_length = size
    first = 0 if mask_class_token else 1  # lightly keeps token 0 (the class token) unless asked
    try:
        len_keep = masking.keep_count(sequence_length - first, mask_ratio)
    except (TypeError, ValueError):  # a ratio the op refuses, e.g. one that keeps the class only
        return _lightly_originals["random_token_mask"](size, mask_ratio, mask_class_token, device)
    noise = torch.rand(batch_size, sequence_length, device=device)[:, first:]
    # the op gathers the kept rows of its input as well: give it the noise itself, one column
    _, _, ids_restore, ids_keep = masking.random_masking_with_ids(noise.unsqueeze(-1), mask_ratio,
                                                                  noise)
    idx_mask = _inverse(ids_restore)[:, len_keep:] + first
    idx_keep = ids_keep + first
    if first:
        idx_keep = torch.cat([torch.zeros_like(idx_keep[:, :1]), idx_keep], dim=1)
    return idx_keep, idx_mask


def _lightly_get_at_index(tokens, index):
    """get_at_index through gather_tokens (whose backward writes each position once)."""
    if not _token_rows(tokens, index) or (
            tokens.requires_grad and not _distinct_rows(index, tokens.shape[1])):
        return _lightly_originals["get_at_index"](tokens, index)
    return gather_tokens(tokens, index)


def _lightly_set_at_index(tokens, index, value):
    """set_at_index through scatter_tokens: `value`'s rows at `index`, `tokens` elsewhere."""
    if not (_token_rows(tokens, index) and isinstance(value, torch.Tensor)
            and value.dtype == tokens.dtype and value.device == tokens.device
            and tuple(value.shape) == (*index.shape, tokens.shape[2])
            and _distinct_rows(index, tokens.shape[1])):
        return _lightly_originals["set_at_index"](tokens, index, value)
    length = tokens.shape[1]
    placed = scatter_tokens(value, index, length)
    return torch.where(_positions_hit(index, length).unsqueeze(-1), placed, tokens)


def _lightly_patchify(images, patch_size):
    if not (isinstance(images, torch.Tensor) and images.dim() == 4
            and images.dtype in _checks._FLOAT_DTYPES):
        return _lightly_originals["patchify"](images, patch_size)
    return patchify(images, patch_size)


def _lightly_decoder_preprocess(self, x, idx_mask=None, idx_keep=None, mask=None):
    """The TIMM decoder's input, mask tokens at idx_mask and + pos_embed, as one unshuffle: the
    positions not in idx_mask are the kept ones (in ascending order), and ids_restore says where
    each goes."""
    decoder_class = _lightly_decoder_class()
    fused = (idx_mask is not None and mask is None
             and type(self).add_pos_embed is decoder_class.add_pos_embed
             and _token_rows(x, idx_mask) and 0 < idx_mask.shape[1] < x.shape[1]
             and self.pos_embed.shape == (1, *x.shape[1:])
             and _distinct_rows(idx_mask, x.shape[1]))
    if not fused:
        return _lightly_originals["decoder_preprocess"](self, x, idx_mask=idx_mask,
                                                        idx_keep=idx_keep, mask=mask)
    length = x.shape[1]
    # kept positions first (a stable sort keeps each group ascending), then the masked ones
    order = torch.sort(_positions_hit(idx_mask, length).to(torch.uint8), dim=1,
                       stable=True).indices
    with skip_index_checks():  # order is a permutation built just above
        kept = gather_tokens(x, order[:, :length - idx_mask.shape[1]])
        x = unshuffle(kept, self.mask_token, _inverse(order), 0, self.pos_embed)
    if idx_keep is not None:
        x = _lightly_utils().get_at_index(x, idx_keep)
    return x


def patch_lightly():
    """Route lightly's MAE through the fused ops, for the whole process: in
    `lightly.models.utils`, `random_token_mask` (the masking op's sort), `get_at_index` and
    `set_at_index` (the extension's gather and scatter), `patchify`; and the input step of
    `MaskedVisionTransformerDecoderTIMM` (its mask token and positional embedding, one
    `unshuffle`). Outputs are lightly's for the same random draws. Calls outside the ops'
    contracts (other dtypes or shapes, repeated positions) run lightly's own code. Call it before
    `from lightly.models.utils import ...` binds the old functions; lightly's own modules and its
    examples look them up as `utils.<name>` on each call."""
    utils = _lightly_utils()
    if _lightly_originals:
        return
    for name in _LIGHTLY_UTILS:
        _lightly_originals[name] = getattr(utils, name)
        setattr(utils, name, globals()[f"_lightly_{name}"])
    decoder_class = _lightly_decoder_class()
    if decoder_class is not None:
        _lightly_originals["decoder_preprocess"] = decoder_class.preprocess
        decoder_class.preprocess = _lightly_decoder_preprocess


def unpatch_lightly():
    """Undo `patch_lightly`."""
    if not _lightly_originals:
        return
    utils = _lightly_utils()
    for name in _LIGHTLY_UTILS:
        setattr(utils, name, _lightly_originals.pop(name))
    preprocess = _lightly_originals.pop("decoder_preprocess", None)
    if preprocess is not None:
        _lightly_decoder_class().preprocess = preprocess


def lightly_mae_loss(images, predictions, idx_mask, patch_size, norm_pix_loss=False,
                     num_prefix_tokens=1):
    """lightly's MAE loss, `MSELoss()(predictions, get_at_index(patchify(images), idx_mask - 1))`,
    as one fused `mae_loss` that reads the images once (no patch tensor, no gathered targets);
    with `norm_pix_loss`, each target patch normalised as MAE does (lightly's
    `normalize_mean_var`). predictions: (B, M, p*p*C) at idx_mask's positions, which count
    `num_prefix_tokens` first, as lightly's sequences do."""
    _checks.tensor("predictions", predictions, 3, floating=True)
    _checks.tensor("idx_mask", idx_mask, 2, dtype=torch.int64)
    rows, cols = _checks.patch_grid("images", images, patch_size)
    positions = idx_mask - _checks.integer("num_prefix_tokens", num_prefix_tokens, 0)
    full = scatter_tokens(predictions, positions, rows * cols)
    mask = _positions_hit(positions, rows * cols).to(torch.get_default_dtype())
    return mae_loss(images, full, mask, patch_size, norm_pix_loss)


# ---------------------------------------------------------------- facebookresearch/pixio
def _pixio_random_masking(self, x, mask_ratio, grid):
    return masking.pixio_masking(x, mask_ratio, grid)


def patch_pixio(model):
    """Route a Pixio pre-training model (pretraining/models_pixio.py `PixioViT`) through the
    fused ops, as `patch_official_mae` does for MAE: masking in `grid` x `grid` units (its
    `random_masking(x, mask_ratio, grid)`, drawing the same noise), patchify, the decoder's
    unshuffle with its `n_cls_tokens` and position embedding, and the loss."""
    patch_official_mae(model)
    if model.__dict__.get("random_masking") is not None:
        model.__dict__["random_masking"] = types.MethodType(_pixio_random_masking, model)
    return model


def unpatch_pixio(model):
    """Undo `patch_pixio`."""
    return unpatch_official_mae(model)


# ---------------------------------------------------------------- TonyLianLong/CrossMAE
_PREDICTED = "_mae_kernels_predicted"  # (mask, ids_pred) of the last masking


def _crossmae_random_masking(self, x, mask_ratio, kept_mask_ratio):
    x_masked, mask, ids_restore, _, ids_pred = masking.masking_with_ids(
        x, mask_ratio, predict_ratio=kept_mask_ratio)
    self.__dict__[_PREDICTED] = (mask, ids_pred)
    return x_masked, mask, ids_restore


def _ids_pred(self, mask):
    """The predicted positions of `mask`, in CrossMAE's masked_select order: as the patched
    masking listed them, or (a mask from elsewhere) found from it, a host sync."""
    last = self.__dict__.get(_PREDICTED)
    if last is not None and last[0] is mask:
        return last[1]
    B, L = mask.shape
    return torch.arange(L, device=mask.device).expand(B, L).masked_select(mask.bool()).view(B, -1)


def _crossmae_mask_tokens_grid(self, mask, ids_restore):
    with skip_index_checks():
        return decoder_queries(self.mask_token, self.decoder_pos_embed, _ids_pred(self, mask))


def _crossmae_forward_loss(self, imgs, pred, mask, coords):
    ids_pred = _ids_pred(self, mask)
    p = _official_patch_size(self)
    norm_pix_loss = bool(getattr(self, "norm_pix_loss", False))
    with skip_index_checks():
        loss = mae_loss(imgs, pred, None, p, norm_pix_loss, ids_pred=ids_pred)
    with torch.no_grad():  # the target CrossMAE returns beside the loss (its visualisation)
        target = reference.gather_tokens(patchify(imgs, p), ids_pred)
        target = reference.norm_pix(target) if norm_pix_loss else target
    return loss, target


def patch_crossmae(model):
    """Route a CrossMAE model (models_cross.py `MaskedAutoencoderViT`) through the fused ops:
    the three-way masking (`random_masking(x, mask_ratio, kept_mask_ratio)`, drawing the same
    noise), the decoder queries (`mask_tokens_grid`), the loss over the predicted patches
    (`forward_loss`, reading those only) and patchify / unpatchify."""
    _check_methods(model, ("random_masking", "mask_tokens_grid", "forward_loss", "patchify"),
                   "CrossMAE's")
    if _is_patched(model):
        return model
    _set(model, "random_masking", _crossmae_random_masking)
    _set(model, "mask_tokens_grid", _crossmae_mask_tokens_grid)
    _set(model, "forward_loss", _crossmae_forward_loss)
    _set_patchify(model)
    return model


def unpatch_crossmae(model):
    """Undo `patch_crossmae`."""
    model.__dict__.pop(_PREDICTED, None)
    _unset(model)
    return model
