"""Checkpoints that never lose work and never run code.

Writing: to a temporary file in the same folder, flushed to disk, then renamed over the old one,
so a kill mid-write leaves the previous checkpoint intact. Each run keeps the official cadence
(`checkpoint-<epoch>.pth` every `--save-every` epochs and at the last) plus one rolling
`checkpoint-last.pth`, rewritten every epoch, that `--resume auto` continues from.

Reading: `torch.load(weights_only=True)`, which unpickles tensors, plain containers and the
classes allowed below, and nothing that could execute code. Allowed beyond PyTorch's own list:
`argparse.Namespace`, which the official facebookresearch/mae checkpoints hold their `args` in.
`trust=True` (the CLI's `--unsafe-trust-checkpoint`) loads arbitrary pickles, for files whose
source you trust. `.safetensors` files (from `mae export`) load as weights plus their saved args.

Every way a file can fail to be a usable checkpoint (missing, empty, not a checkpoint, corrupt,
a full disk while writing) is a one-line `CheckpointError` naming the file.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import pickle
import re
import shutil
import socket
import tempfile
import time
import zipfile
from pathlib import Path

import torch

CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)\.pth$")
LAST_CHECKPOINT = "checkpoint-last.pth"
# what write_atomically's mkstemp leaves behind when the process is killed mid-save
# (host and process in the name, so that a run deletes only what a dead writer left)
STALE_TEMPORARY = re.compile(r"\.(checkpoint-(\d+|last)\.pth|log\.jsonl)\.(?P<host>[^/]+)\."
                             r"(?P<pid>\d+)\.[A-Za-z0-9_]{8}\.tmp")
STALE_ELSEWHERE_S = 3600  # another host's temporary this old is no save in progress
SAFE_GLOBALS = [argparse.Namespace]
TRUST_FLAG = "--unsafe-trust-checkpoint"


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


def save_training_state(state: dict, output_dir, epoch: int, epochs: int, save_every: int):
    """The rolling `checkpoint-last.pth` every epoch; `checkpoint-<epoch>.pth` at the official
    cadence (epoch 0, every `save_every` epochs, and the last)."""
    output_dir = Path(output_dir)
    atomic_save(state, output_dir / LAST_CHECKPOINT)
    if epoch % save_every == 0 or epoch + 1 == epochs:
        atomic_save(state, output_dir / f"checkpoint-{epoch}.pth")


def remove_stale_temporaries(output_dir) -> list[Path]:
    """Deletes the partial checkpoints (and logs) a write killed mid-way left in `output_dir`:
    only the temporary files `write_atomically` names. Returns them."""
    stale = sorted(p for p in Path(output_dir).glob(".*.tmp") if _abandoned(p))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _abandoned(path: Path) -> bool:
    """A write_atomically temporary whose writer is gone: a dead process of this host, or, on a
    shared file system, another host's file older than any save takes."""
    match = STALE_TEMPORARY.fullmatch(path.name)
    if match is None:
        return False
    if match["host"] != socket.gethostname():
        return time.time() - path.stat().st_mtime > STALE_ELSEWHERE_S
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def checkpoints_newest_first(output_dir) -> list[Path]:
    """The run's checkpoints, newest first: `checkpoint-last.pth`, then by epoch."""
    output_dir = Path(output_dir)
    found = []
    for p in output_dir.glob("checkpoint-*.pth"):
        match = CHECKPOINT_PATTERN.search(p.name)
        if match:
            found.append((int(match.group(1)), p))
    last = [output_dir / LAST_CHECKPOINT] if (output_dir / LAST_CHECKPOINT).is_file() else []
    return last + [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(output_dir) -> Path | None:
    """`checkpoint-last.pth` if the run wrote one, else its highest-epoch checkpoint, or None."""
    found = checkpoints_newest_first(output_dir)
    return found[0] if found else None


def _check_format(path: Path) -> None:
    """torch.save writes a zip archive (a legacy one: a pickle); anything else is not ours to
    unpickle, trusted or not."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): its save never finished "
                              "or it was truncated")
    with path.open("rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile as exc:
            raise CheckpointError(f"checkpoint {path} is a damaged archive ({exc}); it was "
                                  f"probably truncated") from exc
        if not any(name.endswith("data.pkl") for name in names):
            raise CheckpointError(f"{path} is not a checkpoint: a zip archive without the "
                                  f"data.pkl that torch.save writes")
    elif not head.startswith(b"\x80"):
        raise CheckpointError(f"{path} is not a checkpoint: neither a torch.save archive nor a "
                              f"pickle (it starts with {head!r})")


def load_checkpoint(path, map_location="cpu", trust: bool = False) -> dict:
    """The checkpoint's contents, read without running any code from it (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return _load_safetensors(path, map_location)
    _check_format(path)
    try:
        if trust:
            state = torch.load(path, map_location=map_location, weights_only=False)
        else:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if trust:  # nothing was refused: the pickle itself is broken
            raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
        detail = str(exc).split("\n")[-1].strip() or str(exc)[:300]
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors, plain containers and "
            f"argparse.Namespace, so loading it could run code from the file; it was not "
            f"loaded ({detail}). If you trust where it came from, pass {TRUST_FLAG}."
        ) from exc
    except (RuntimeError, EOFError, OSError, ImportError, AttributeError) as exc:
        # a trusted pickle may name classes this environment lacks
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    if isinstance(state.get("args"), argparse.Namespace):
        state["args"] = vars(state["args"])
    return state


def export_safetensors(state: dict, path) -> Path:
    """The model weights of a checkpoint as a .safetensors file, its args in the metadata."""
    from safetensors.torch import save

    weights = {k: v.detach().contiguous().clone() for k, v in model_weights(state).items()}
    metadata = {"format": "pt"}
    if state.get("args") is not None:
        metadata["args"] = json.dumps(state["args"], default=str)
    return write_atomically(path, lambda f: f.write(save(weights, metadata=metadata)))


def _load_safetensors(path: Path, map_location) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            weights = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
    try:
        args = json.loads(metadata["args"]) if "args" in metadata else None
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: its metadata 'args' is not JSON ({exc})") \
            from exc
    return {"model": weights, "args": args}


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


def load_weights(model, state: dict, source: str, expected: str) -> None:
    """The checkpoint's weights into `model`, strictly; a mismatch is one line: `source` (the
    flag and file), then what differs from `expected` (what the model is)."""
    weights = model_weights(state)
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    reshaped = [k for k in own if k in weights
                and tuple(getattr(weights[k], "shape", ())) != tuple(own[k].shape)]
    problems = []
    if reshaped:
        k = reshaped[0]
        problems.append(f"{len(reshaped)} of another shape (e.g. {k}: "
                        f"{tuple(getattr(weights[k], 'shape', ()))} in the file, "
                        f"{tuple(own[k].shape)} in the model)")
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} not in the model (e.g. {unexpected[0]})")
    if problems:
        raise CheckpointError(f"{source}: its weights do not fit {expected}: "
                              f"{'; '.join(problems)}")
    model.load_state_dict(weights)
