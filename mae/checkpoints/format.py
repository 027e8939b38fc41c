"""What every checkpoint writer and reader shares (the files, the sharded checkpoints, the HF and
timm formats): the error, atomic writes, the rolling checkpoint's name, which weights a loaded
state holds, and which process speaks for the run."""
from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

LAST_CHECKPOINT = "checkpoint-last.pth"
TRUST_FLAG = "--unsafe-trust-checkpoint"  # loads a pickle that could run code
SHARDED_META = "meta.pth"  # a sharded checkpoint's epoch, step and arguments, beside its shards


def is_main() -> bool:
    """Rank 0 of the process group, or the only process."""
    return not dist.is_initialized() or dist.get_rank() == 0


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely, or does not hold what the command needs."""


def write_atomically(path, write) -> Path:
    """`write(f)` into a temporary file beside `path`, flushed to disk, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{socket.gethostname()}.{os.getpid()}.",
                               suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if _out_of_space(exc):
            free = shutil.disk_usage(path.parent).free
            kept = " (the file there before is intact)" if path.exists() else ""
            raise CheckpointError(f"cannot write {path}: no space left on the disk "
                                  f"({free / 2**20:.1f} MiB free in {path.parent}){kept}") from exc
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def _out_of_space(exc: BaseException | None) -> bool:
    """Whether a full disk (or quota) caused `exc`: torch.save's zip writer reports a failed
    write as a RuntimeError whose context is the file's OSError."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def atomic_save(obj, path) -> Path:
    return write_atomically(path, lambda f: torch.save(obj, f))


def model_weights(state: dict) -> dict:
    """The model state dict of a checkpoint: ours and the official ones keep it under 'model'."""
    weights = state.get("model")
    if not isinstance(weights, dict):
        raise CheckpointError(f"the checkpoint has no 'model' weights (keys: {sorted(state)})")
    return weights


def weights_kind(state: dict) -> str | None:
    """"pre-training" for an MAE's weights (it has a decoder), "fine-tuning" for a classifier's,
    None when neither shows (the official checkpoints hold one or the other)."""
    weights = state.get("model")
    if not isinstance(weights, dict):
        return None
    if "mask_token" in weights or any(k.startswith("decoder") for k in weights):
        return "pre-training"
    return "fine-tuning" if "head.weight" in weights else None
