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
        if out_of_space(exc):
            raise cannot_write(path, exc) from exc
        raise
    fsync_directory(path.parent)
    return path


def link_or_copy(source, target) -> None:
    """`target` as a second name of the file `source` (a hard link: no byte is written again),
    or a copy where the file system has no hard links. Safe for checkpoints because no save
    ever writes into a finished file: each replaces it by a rename."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def link_atomically(source, path) -> Path:
    """`path` as a second name of the finished file `source` (`link_or_copy`), complete or not
    there at all, as write_atomically leaves its files."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{socket.gethostname()}.{os.getpid()}.",
                               suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)  # its name, free for the link
    try:
        link_or_copy(source, tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise cannot_write(path, exc) from exc
        raise
    fsync_directory(path.parent)
    return path


def fsync_directory(directory) -> None:
    """Makes a rename in `directory` durable; a file system that cannot sync a directory (some
    FUSE mounts answer EINVAL) is left to make it durable in its own time."""
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP,
                             errno.EBADF, errno.EACCES, errno.EPERM):
            raise
    finally:
        os.close(dir_fd)


def cannot_write(path, exc: BaseException) -> CheckpointError:
    """One line for a save of `path` that failed with `exc`; a full disk says what is free."""
    path = Path(path)
    kept = " (the one there before is intact)" if path.exists() else ""
    if out_of_space(exc):
        free = shutil.disk_usage(path.parent).free
        return CheckpointError(f"cannot write {path}: no space left on the disk "
                               f"({free / 2**20:.1f} MiB free in {path.parent}){kept}")
    return CheckpointError(f"cannot write {path}: {first_line(exc)}{kept}")


def first_line(exc: BaseException) -> str:
    """`exc` as `Type: first line of its message`, at most 300 characters."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else 'no message'}"


def weights_mismatch(own: dict, saved: dict) -> list[str]:
    """How the shapes of `saved` weights (name -> shape) differ from a model's `own`: the
    reshaped, the missing and the extra ones, each counted with an example; [] if they fit."""
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    reshaped = [k for k in own if k in saved and tuple(saved[k]) != tuple(own[k])]
    problems = []
    if reshaped:
        k = reshaped[0]
        problems.append(f"{len(reshaped)} of another shape (e.g. {k}: {tuple(saved[k])} in the "
                        f"file, {tuple(own[k])} in the model)")
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} not in the model (e.g. {unexpected[0]})")
    return problems


def out_of_space(exc: BaseException | None) -> bool:
    """Whether a full disk (or quota) caused `exc`: torch.save's zip writer reports a failed
    write as a RuntimeError whose context is the file's OSError."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def atomic_save(obj, path) -> Path:
    return write_atomically(path, lambda f: torch.save(obj, f))


def inside(directory: Path, name, listed_in: str) -> Path:
    """`directory / name` for a file name a checkpoint's own index lists; a name that leaves
    the directory (absolute, `..`, not a string) is a CheckpointError: a crafted index would
    have the loader read any file of the machine."""
    parts = Path(name).parts if isinstance(name, str) else ()
    if not parts or Path(name).is_absolute() or ".." in parts:
        raise CheckpointError(f"{directory}: its {listed_in} names {name!r}, not a file in "
                              f"the checkpoint's directory; it was not loaded")
    return directory / name


def model_weights(state: dict) -> dict:
    """The model state dict of a checkpoint: ours and the official ones keep it under 'model';
    Pixio's released encoders are a bare state dict (pixio/pixio.py loads the file as one)."""
    if "model" not in state and "patch_embed.proj.weight" in state \
            and all(isinstance(v, torch.Tensor) for v in state.values()):
        return state
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
