"""Checkpoints that never lose work: written to a temporary file in the same folder, flushed to
disk, then renamed over the old one, so a kill mid-write leaves the previous checkpoint intact."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)\.pth$")


def atomic_save(obj, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
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


def latest_checkpoint(output_dir) -> Path | None:
    """The checkpoint of the highest epoch in `output_dir`, or None."""
    found = []
    for p in Path(output_dir).glob("checkpoint-*.pth"):
        match = CHECKPOINT_PATTERN.search(p.name)
        if match:
            found.append((int(match.group(1)), p))
    return max(found)[1] if found else None


def load_checkpoint(path, map_location="cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=False)
