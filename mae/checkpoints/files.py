"""Checkpoints that never lose work and never run code.

Writing: to a temporary file in the same folder, flushed to disk, then renamed over the old one,
so a kill mid-write leaves the previous checkpoint intact. Each run keeps the official cadence
(`checkpoint-<epoch>.pth` every `--save-every` epochs and at the last) plus one rolling
`checkpoint-last.pth`, rewritten every epoch, that `--resume auto` continues from; a numbered
one is a hard link of that epoch's checkpoint-last (serialised once). An `--fsdp` run writes
the same names as sharded directories (`checkpoint-<epoch>/`, .sharded), which
`load_checkpoint` reads consolidated.

Reading: `torch.load(weights_only=True)`, memory-mapped (the tensors are read from the file
as they are used), which unpickles tensors, plain containers and the
classes allowed below, and nothing that could execute code. Allowed beyond PyTorch's own list:
`argparse.Namespace`, which the official facebookresearch/mae checkpoints hold their `args` in.
`trust=True` (the CLI's `--unsafe-trust-checkpoint`) loads arbitrary pickles, for files whose
source you trust. `.safetensors` files (from `mae export`) load as weights plus their saved args.

Every way a file can fail to be a usable checkpoint (missing, empty, not a checkpoint, corrupt,
a full disk while writing) is a one-line `CheckpointError` naming the file.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import socket
import time
import zipfile
from pathlib import Path

import torch

from .format import (
    LAST_CHECKPOINT,
    SHARDED_META,
    TRUST_FLAG,
    CheckpointError,
    atomic_save,  # noqa: F401 (the commands import the writers from here, with the rest)
    is_main,
    link_atomically,  # noqa: F401
    model_weights,
    weights_kind,  # noqa: F401 (the commands import it from here, with the rest)
    weights_mismatch,
    write_atomically,
)

# a file, or (no suffix) a sharded checkpoint's directory (mae.checkpoints.sharded)
CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)(\.pth)?$")
# what write_atomically's mkstemp leaves behind when the process is killed mid-save
# (host and process in the name, so that a run deletes only what a dead writer left)
STALE_TEMPORARY = re.compile(r"\.(checkpoint-(\d+|last)\.pth|log\.jsonl)\.(?P<host>[^/]+)\."
                             r"(?P<pid>\d+)\.[A-Za-z0-9_]{8}\.tmp")
STALE_ELSEWHERE_S = 3600  # another host's temporary this old is no save in progress
SAFE_GLOBALS = [argparse.Namespace]


def remove_stale_temporaries(output_dir) -> list[Path]:
    """Deletes the partial checkpoints (and logs) a write killed mid-way left in `output_dir`:
    the temporary files `write_atomically` names, and the `.checkpoint-<name>.partial/` folder
    of a sharded save or copy (called as a run starts, before it saves). Returns them."""
    output_dir = Path(output_dir)
    stale = sorted(p for p in output_dir.glob(".*.tmp") if _abandoned(p))
    for p in stale:
        p.unlink(missing_ok=True)
    partial = sorted(p for p in output_dir.glob(".checkpoint-*.partial") if p.is_dir())
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return stale + partial


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
    """The run's checkpoints, newest first by the (epoch, step within it) each holds: a
    `checkpoint-last.pth` (or sharded `checkpoint-last/`) saved mid-epoch by a stop signal comes
    after a numbered checkpoint of that epoch's end, one saved at an epoch's end before the
    numbered one of that epoch. Files whose position cannot be read keep their names' order."""
    from .sharded import restore_stepped_aside

    output_dir = Path(output_dir)
    for old in output_dir.glob(".checkpoint-*.old"):  # a sharded save killed between renames
        restore_stepped_aside(output_dir / old.name[1:].removesuffix(".old"))
    found = []
    for p in output_dir.glob("checkpoint-*"):
        match = CHECKPOINT_PATTERN.search(p.name)
        if match and (p.is_file() if match.group(2) else p.is_dir()):
            found.append((int(match.group(1)), p))
    last = [output_dir / LAST_CHECKPOINT] if (output_dir / LAST_CHECKPOINT).is_file() else []
    sharded_last = output_dir / Path(LAST_CHECKPOINT).stem
    last += [sharded_last] if sharded_last.is_dir() else []
    by_name = last + [p for _, p in sorted(found, reverse=True)]
    return sorted(by_name, key=_position, reverse=True)  # stable: ties keep the names' order


def _position(path: Path) -> tuple[float, float]:
    """(epoch, steps done in it) a checkpoint records, read without its tensors (mmap); for a
    file that does not say, its name's epoch (last: newest) and a complete epoch."""
    match = CHECKPOINT_PATTERN.search(path.name)
    by_name = (float(match.group(1)) if match else float("inf"), float("inf"))
    try:
        if path.is_dir():
            path = path / SHARDED_META
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        epoch = state["epoch"]
        return float(epoch), float(state.get("epoch_step", float("inf")))
    except Exception:  # noqa: BLE001 (unreadable here: reported when it is loaded for real)
        return by_name


def _check_format(path: Path) -> bool:
    """torch.save writes a zip archive (a legacy one: a pickle); anything else is not ours to
    unpickle, trusted or not. Returns whether it is an archive (which torch can map)."""
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
        return True
    if not head.startswith(b"\x80"):
        raise CheckpointError(f"{path} is not a checkpoint: neither a torch.save archive nor a "
                              f"pickle (it starts with {head!r})")
    return False


def load_checkpoint(path, map_location="cpu", trust: bool = False) -> dict:
    """The checkpoint's contents, read without running any code from it (see the module doc)."""
    state = _read_checkpoint(Path(path), map_location, trust)
    from .interop import describe

    if is_main():
        print(f"read {path}: {describe(state, path)}")
    return state


def _read_checkpoint(path: Path, map_location, trust: bool) -> dict:
    from .interop import is_hf_dir, load_hf_dir

    if is_hf_dir(path):
        return load_hf_dir(path)
    if path.is_dir():  # a sharded checkpoint (--fsdp): its model consolidated in memory
        from .sharded import consolidate

        return consolidate(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return _load_safetensors(path, map_location)
    # an archive is mapped, not read: its tensors come from the file as they are copied into
    # the model (no second copy of the whole checkpoint in memory)
    mmap = _check_format(path) and str(map_location) == "cpu"
    try:
        if trust:
            state = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
        else:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                state = torch.load(path, map_location=map_location, weights_only=True,
                                   mmap=mmap)
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


def load_weights(model, state: dict, source: str, expected: str) -> None:
    """The checkpoint's weights into `model`, strictly; a mismatch is one line: `source` (the
    flag and file), then what differs from `expected` (what the model is)."""
    weights = model_weights(state)
    problems = weights_mismatch({k: v.shape for k, v in model.state_dict().items()},
                                {k: getattr(v, "shape", ()) for k, v in weights.items()})
    if problems:
        raise CheckpointError(f"{source}: its weights do not fit {expected}: "
                              f"{'; '.join(problems)}")
    model.load_state_dict(weights)
