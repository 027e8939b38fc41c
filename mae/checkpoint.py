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
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import tempfile
from pathlib import Path

import torch

CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)\.pth$")
LAST_CHECKPOINT = "checkpoint-last.pth"
SAFE_GLOBALS = [argparse.Namespace]
TRUST_FLAG = "--unsafe-trust-checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely, or does not hold what the command needs."""


def _write_atomically(path, write) -> Path:
    """`write(f)` into a temporary file beside `path`, flushed to disk, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def atomic_save(obj, path) -> Path:
    return _write_atomically(path, lambda f: torch.save(obj, f))


def save_training_state(state: dict, output_dir, epoch: int, epochs: int, save_every: int):
    """The rolling `checkpoint-last.pth` every epoch; `checkpoint-<epoch>.pth` at the official
    cadence (epoch 0, every `save_every` epochs, and the last)."""
    output_dir = Path(output_dir)
    atomic_save(state, output_dir / LAST_CHECKPOINT)
    if epoch % save_every == 0 or epoch + 1 == epochs:
        atomic_save(state, output_dir / f"checkpoint-{epoch}.pth")


def latest_checkpoint(output_dir) -> Path | None:
    """`checkpoint-last.pth` if the run wrote one, else its highest-epoch checkpoint, or None."""
    output_dir = Path(output_dir)
    if (output_dir / LAST_CHECKPOINT).is_file():
        return output_dir / LAST_CHECKPOINT
    found = []
    for p in output_dir.glob("checkpoint-*.pth"):
        match = CHECKPOINT_PATTERN.search(p.name)
        if match:
            found.append((int(match.group(1)), p))
    return max(found)[1] if found else None


def load_checkpoint(path, map_location="cpu", trust: bool = False) -> dict:
    """The checkpoint's contents, read without running any code from it (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return _load_safetensors(path, map_location)
    if trust:
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = str(exc).split("\n")[-1].strip() or str(exc)[:300]
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors, plain containers and "
            f"argparse.Namespace, so loading it could run code from the file; it was not "
            f"loaded ({detail}). If you trust where it came from, pass {TRUST_FLAG}."
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
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
    return _write_atomically(path, lambda f: f.write(save(weights, metadata=metadata)))


def _load_safetensors(path: Path, map_location) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            weights = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
    args = json.loads(metadata["args"]) if "args" in metadata else None
    return {"model": weights, "args": args}


def model_weights(state: dict) -> dict:
    """The model state dict of a checkpoint: ours and the official ones keep it under 'model'."""
    weights = state.get("model")
    if not isinstance(weights, dict):
        raise CheckpointError(f"the checkpoint has no 'model' weights (keys: {sorted(state)})")
    return weights
