"""Each bad argument gets a ValueError/TypeError that names it; nothing crashes the process."""
import numpy as np
import pytest
import torch

import mae_kernels as mk
from mae_kernels import tokens

torch.manual_seed(0)  # fixed inputs: a case must not depend on the order tests ran in
x = torch.randn(2, 8, 4)
ids = torch.stack([torch.randperm(8), torch.randperm(8)])
keep = ids[:, :4].contiguous()
imgs = torch.randn(2, 3, 8, 8)
pred = torch.randn(2, 4, 48)
mask = torch.ones(2, 4)
meta = torch.randn(2, 8, 4, device="meta")

CASES = {
    # patchify / unpatchify
    "patchify rank": (lambda: mk.patchify(torch.randn(3, 8, 8), 4), ValueError, "imgs"),
    "patchify indivisible": (lambda: mk.patchify(torch.randn(1, 3, 8, 6), 4), ValueError,
                             "patch_size"),
    "patchify zero patch": (lambda: mk.patchify(imgs, 0), ValueError, "patch_size"),
    "patchify float patch": (lambda: mk.patchify(imgs, 4.0), TypeError, "patch_size"),
    "patchify int dtype": (lambda: mk.patchify(imgs.long(), 4), TypeError, "imgs"),
    "patchify not tensor": (lambda: mk.patchify(imgs.numpy(), 4), TypeError, "imgs"),
    "unpatchify not square": (lambda: mk.unpatchify(torch.randn(1, 6, 12), 2), ValueError, "grid"),
    "unpatchify grid": (lambda: mk.unpatchify(torch.randn(1, 6, 12), 2, (2, 2)), ValueError,
                        "grid"),
    "unpatchify channels": (lambda: mk.unpatchify(torch.randn(1, 4, 12), 2, channels=1),
                            ValueError, "channels"),
    # random_masking
    "masking rank": (lambda: mk.random_masking(torch.randn(8, 4), 0.5), ValueError, "x"),
    "masking ratio 1": (lambda: mk.random_masking(x, 1.0), ValueError, "mask_ratio"),
    "masking ratio negative": (lambda: mk.random_masking(x, -0.1), ValueError, "mask_ratio"),
    "masking keeps none": (lambda: mk.random_masking(x, 0.95), ValueError, "mask_ratio"),
    "masking ratio type": (lambda: mk.random_masking(x, "0.5"), TypeError, "mask_ratio"),
    "masking noise shape": (lambda: mk.random_masking(x, 0.5, torch.rand(2, 7)), ValueError,
                            "noise"),
    "masking noise device": (lambda: mk.random_masking(x, 0.5, torch.rand(2, 8, device="meta")),
                             ValueError, "noise"),
    "masking int x": (lambda: mk.random_masking(x.long(), 0.5), TypeError, "x"),
    # unshuffle
    "unshuffle ids dtype": (lambda: mk.unshuffle(x[:, :5], torch.randn(1, 1, 4), ids.int()),
                            TypeError, "ids_restore"),
    "unshuffle ids range": (lambda: mk.unshuffle(x[:, :5], torch.randn(1, 1, 4), ids + 1),
                            ValueError, "ids_restore"),
    "unshuffle negative ids": (lambda: mk.unshuffle(x[:, :5], torch.randn(1, 1, 4), ids - 1),
                               ValueError, "ids_restore"),
    "unshuffle mask token": (lambda: mk.unshuffle(x[:, :5], torch.randn(1, 1, 3), ids),
                             ValueError, "mask_token"),
    "unshuffle too many tokens": (lambda: mk.unshuffle(torch.randn(2, 10, 4),
                                                       torch.randn(1, 1, 4), ids), ValueError,
                                  "x"),
    "unshuffle batch": (lambda: mk.unshuffle(x[:1, :5], torch.randn(1, 1, 4), ids), ValueError,
                        "ids_restore"),
    "unshuffle pos embed": (lambda: mk.unshuffle(x[:, :5], torch.randn(1, 1, 4), ids, 1,
                                                 torch.randn(1, 8, 4)), ValueError, "pos_embed"),
    "unshuffle prefix": (lambda: mk.unshuffle(x[:, :5], torch.randn(1, 1, 4), ids, -1),
                         ValueError, "num_prefix_tokens"),
    "unshuffle device": (lambda: mk.unshuffle(x[:, :5], torch.randn(1, 1, 4, device="meta"), ids),
                         ValueError, "mask_token"),
    # mae_loss
    "loss pred shape": (lambda: mk.mae_loss(imgs, pred[:, :3], mask, 4), ValueError, "pred"),
    "loss mask shape": (lambda: mk.mae_loss(imgs, pred, mask[:, :3], 4), ValueError, "mask"),
    "loss patch": (lambda: mk.mae_loss(imgs, pred, mask, 3), ValueError, "patch_size"),
    "loss imgs rank": (lambda: mk.mae_loss(imgs[0], pred, mask, 4), ValueError, "imgs"),
    "loss norm flag": (lambda: mk.mae_loss(imgs, pred, mask, 4, "yes"), TypeError,
                       "norm_pix_loss"),
    "loss device": (lambda: mk.mae_loss(imgs, pred.to("meta"), mask, 4), ValueError, "pred"),
    # gather / scatter
    "gather index range": (lambda: mk.gather_tokens(x, keep + 8), ValueError, "index"),
    "gather index dtype": (lambda: mk.gather_tokens(x, keep.float()), TypeError, "index"),
    "gather index rank": (lambda: mk.gather_tokens(x, keep[0]), ValueError, "index"),
    "gather batch": (lambda: mk.gather_tokens(x[:1], keep), ValueError, "index"),
    "gather device": (lambda: mk.gather_tokens(meta, keep), ValueError, "index"),
    "scatter length": (lambda: mk.scatter_tokens(torch.randn(2, 4, 4), keep, 3), ValueError,
                       "length"),
    "scatter index range": (  # index 7 in a sequence of 5
        lambda: mk.scatter_tokens(torch.randn(2, 4, 4), torch.tensor([[0, 1, 2, 7], [3, 4, 5, 6]]),
                                  5), ValueError, "index"),
    "scatter tokens": (lambda: mk.scatter_tokens(torch.randn(2, 3, 4), keep, 8), ValueError,
                       "index"),
    "unshuffle ids not a permutation": (
        lambda: mk.unshuffle(x[:, :5], torch.randn(1, 1, 4), torch.stack([ids[0], ids[0] * 0])),
        ValueError, "ids_restore repeats"),
    "scatter repeated positions": (lambda: mk.scatter_tokens(torch.randn(2, 4, 4),
                                                             keep[:, [0, 1, 1, 2]], 8),
                                   ValueError, "index repeats"),
    # block / grid / tube masking (x: 8 tokens)
    "block grid size": (lambda: mk.block_masking(x, 0.5, (3, 3)), ValueError, "grid"),
    "block grid type": (lambda: mk.block_masking(x, 0.5, (2, 4.0)), TypeError, "grid"),
    "block noise shape": (lambda: mk.block_masking(x, 0.5, (2, 4), torch.rand(2, 8)), ValueError,
                          "noise"),
    "block min patches": (lambda: mk.block_masking(x, 0.5, (2, 4), min_patches=0), ValueError,
                          "min_patches"),
    "block aspect ratio": (lambda: mk.block_masking(x, 0.5, (2, 4), aspect_ratio=(0, 1)),
                           ValueError, "aspect_ratio"),
    "block ratio": (lambda: mk.block_masking(x, 1.0, (2, 4)), ValueError, "mask_ratio"),
    "grid keep_every": (lambda: mk.grid_masking(x, (2, 4), 3), ValueError, "keep_every"),
    "grid offset range": (lambda: mk.grid_masking(x, (2, 4), 2, (2, 0)), ValueError, "offset"),
    "grid offset float": (lambda: mk.grid_masking(x, (2, 4), 2, torch.zeros(2, 2)), ValueError,
                          "offset"),
    "grid offset type": (lambda: mk.grid_masking(x, (2, 4), 2, 1), TypeError, "offset"),
    "tube frames divide": (lambda: mk.tube_masking(x, 0.5, 3), ValueError, "frames"),
    "tube frames zero": (lambda: mk.tube_masking(x, 0.5, 0), ValueError, "frames"),
    "tube noise shape": (lambda: mk.tube_masking(x, 0.5, 2, torch.rand(2, 8)), ValueError,
                         "noise"),
    "masking ratio complex": (lambda: mk.random_masking(x, 0.5j), TypeError, "mask_ratio"),
    "masking ratio numpy out of range": (lambda: mk.random_masking(x, np.float32(1.5)),
                                         ValueError, "mask_ratio"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_raises_naming_argument(name):
    call, error, argument = CASES[name]
    with pytest.raises(error, match=argument):
        call()


def test_extension_ops_raise_clear_errors_when_called_directly():
    """The registered ops check their arguments too (c10 errors map to Python's)."""
    assert tokens.LIBRARY is not None, "the C++ extension was not loaded"
    with pytest.raises(ValueError, match="index"):
        torch.ops.mae_kernels.gather_tokens(x, keep[0])
    with pytest.raises(TypeError, match="index"):
        torch.ops.mae_kernels.gather_tokens(x, keep.int())
    with pytest.raises(IndexError, match="out of range"):
        torch.ops.mae_kernels.gather_tokens(x, keep + 8)
    with pytest.raises(ValueError, match="length"):
        torch.ops.mae_kernels.scatter_tokens(torch.randn(2, 4, 4), keep, 2)
