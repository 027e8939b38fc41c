"""Argument checks shared by the public ops: each error names the offending argument."""
from __future__ import annotations

import contextlib
import numbers
import threading

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_state = threading.local()


@contextlib.contextmanager
def skip_index_checks():
    """Skip the data-dependent index range checks (a host sync on CUDA) inside the block.

    For callers whose indices come from `random_masking` itself, such as the MAE model.
    """
    previous = getattr(_state, "skip", False)
    _state.skip = True
    try:
        yield
    finally:
        _state.skip = previous


def tensor(name: str, value, ndim: int | None = None, *, floating: bool = False,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if floating and value.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")
    if dtype is not None and value.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {value.dtype}")
    return value


def same_device(**tensors: torch.Tensor | None) -> None:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def integer(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _checking(index: torch.Tensor) -> bool:
    """Data-dependent checks run in eager mode unless the caller opted out."""
    return not (index.numel() == 0 or getattr(_state, "skip", False)
                or torch.compiler.is_compiling())


def index_range(name: str, index: torch.Tensor, upper: int) -> None:
    """Every entry of `index` lies in [0, upper)."""
    if not _checking(index):
        return
    lo, hi = torch.aminmax(index)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= upper:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds {bad}, out of range [0, {upper})")


def patch_grid(name: str, imgs: torch.Tensor, patch_size: int) -> tuple[int, int]:
    integer("patch_size", patch_size, 1)
    H, W = imgs.shape[-2:]
    if H % patch_size or W % patch_size:
        raise ValueError(
            f"patch_size {patch_size} does not divide the size of {name} ({H}x{W})"
        )
    return H // patch_size, W // patch_size


def tubelet_size(value) -> tuple[int, int]:
    """(t, p) of a tubelet size given as (t, p, p): t frames by p x p pixels."""
    if (not isinstance(value, (tuple, list)) or len(value) != 3 or value[1] != value[2]):
        raise TypeError(f"tubelet_size must be (frames, p, p), a square patch over some frames, "
                        f"got {value!r}")
    integer("tubelet_size[0]", value[0], 1)
    integer("tubelet_size[1]", value[1], 1)
    return value[0], value[1]


def tubelet(name: str, videos: torch.Tensor, value) -> tuple[int, int]:
    """(t, p) of a tubelet size that divides the (T, H, W) of `videos`."""
    t, p = tubelet_size(value)
    T, H, W = videos.shape[-3:]
    if T % t or H % p or W % p:
        raise ValueError(f"tubelet_size {(t, p, p)} does not divide the size of {name} "
                         f"({T}x{H}x{W})")
    return t, p


def distinct(name: str, index: torch.Tensor, upper: int) -> None:
    """No row of `index` (entries in [0, upper)) repeats a position."""
    if not _checking(index):
        return
    counts = torch.zeros(index.shape[0], upper, dtype=torch.int32, device=index.device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.int32))
    most = counts.amax(dim=1)
    row = int(most.argmax())
    if int(most[row]) > 1:
        position = int(counts[row].argmax())
        raise ValueError(f"{name} repeats position {position} in row {row}: its rows must hold "
                         "distinct positions")


def permutation(name: str, index: torch.Tensor) -> None:
    """Every row of `index` is a permutation of 0..L-1."""
    index_range(name, index, index.shape[1])
    distinct(name, index, index.shape[1])


def real_number(name: str, value) -> float:
    """A Python or NumPy real number (not a bool), as the official code accepts."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)
