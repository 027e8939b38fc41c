"""Sharded checkpoints through `torch.distributed.checkpoint` (DCP), as an `--fsdp` run writes
them, and reading them back consolidated or resharded.

A sharded checkpoint is a directory `checkpoint-<epoch>/` (or `checkpoint-last/`) beside the usual
files: DCP's `.metadata` and one `__<rank>_0.distcp` per rank holding `{"model", "optimizer"}` as
`get_state_dict` gives them (parameter names as the plain model's, so any world size, with or
without FSDP, loads it; DCP reshards), and `meta.pth` with everything else (epoch, step, loss
scaler, arguments). It is written into `.<name>.partial/` and renamed into place once complete.
Reading one unpickles nothing that could run code: `.metadata` is checked against DCP's own
classes first, and the shards' non-tensor entries load as weights-only pickles.
"""
from __future__ import annotations

import contextlib
import functools
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from .format import (
    SHARDED_META,
    TRUST_FLAG,
    CheckpointError,
    atomic_save,
    cannot_write,
    first_line,
    fsync_directory,
    inside,
    is_main,
    link_or_copy,
    weights_mismatch,
)

DCP_METADATA = ".metadata"
# Beside torch's dtypes, every global DCP's pickled .metadata of our saves names (torch
# 2.13/2.14, listed by unpickling real ones; pathlib._local is Python 3.13's home of the paths):
# anything else is refused before DCP unpickles the file
_METADATA_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    *((module, name) for module in ("pathlib", "pathlib._local")
      for name in ("PosixPath", "WindowsPath"))}


def is_sharded(path) -> bool:
    """A directory of DCP's files (or a save of ours that did not finish)."""
    path = Path(path)
    return path.is_dir() and ((path / DCP_METADATA).exists() or (path / SHARDED_META).exists())


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _one_process_is_intended():
    """Without a process group DCP warns that it assumes one process: here that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def _stepped_aside(target: Path) -> Path:
    return target.parent / f".{target.name}.old"


def restore_stepped_aside(target) -> bool:
    """Puts back the checkpoint directory `target` that a save killed between _replace_dir's
    two renames left as `.<name>.old/` only; True if it did."""
    target = Path(target)
    old = _stepped_aside(target)
    if target.exists() or not old.is_dir():
        return False
    try:
        os.replace(old, target)
    except OSError:  # another rank put it back first
        return target.is_dir()
    return True


def _replace_dir(source: Path, target: Path) -> None:
    """Renames the finished `source` over `target` (a directory cannot be renamed over a full
    one: the old one steps aside first and goes once the new one is in place)."""
    old = _stepped_aside(target)
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(source, target)
    shutil.rmtree(old, ignore_errors=True)
    fsync_directory(target.parent)


def save_sharded(model, optimizer, extras: dict, path) -> Path:
    """Every rank: its shards of the model and optimizer into the directory `path` through
    DCP, `extras` (epoch, step, scaler, args) beside them; complete or not there at all."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = Path(path)
    partial = path.parent / f".{path.name}.partial"
    if is_main():
        shutil.rmtree(partial, ignore_errors=True)  # a save that was killed
        restore_stepped_aside(path)  # or killed between its renames: the newest complete one
        partial.mkdir(parents=True)
    _barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    try:
        with _one_process_is_intended():
            dcp.save({"model": model_state, "optimizer": optimizer_state},
                     checkpoint_id=partial, no_dist=not dist.is_initialized())
    except (CheckpointException, OSError, RuntimeError) as exc:  # every rank raises
        if is_main():
            shutil.rmtree(partial, ignore_errors=True)
        raise cannot_write(path, _failures(exc)[0]) from exc
    if is_main():
        atomic_save(extras, partial / SHARDED_META)
        _replace_dir(partial, path)
    _barrier()
    return path


def copy_sharded(source, target) -> Path:
    """Rank 0: a finished sharded checkpoint under another name, as atomically; its files hard
    links (`link_or_copy`: a save replaces a checkpoint directory by a rename, never writes
    into its files), so the copy costs no write."""
    source, target = Path(source), Path(target)
    partial = target.parent / f".{target.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    restore_stepped_aside(target)
    try:
        shutil.copytree(source, partial, copy_function=link_or_copy)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise cannot_write(target, exc) from exc
    _replace_dir(partial, target)
    return target


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes and torch's plain values, nothing else."""

    def find_class(self, module: str, name: str):
        # a dotted name reaches through a module's attributes (protocol 4): `os.system` from
        # any module that imports os
        dotted = "." in name
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if not dotted and (dtype or (module, name) in _METADATA_GLOBALS):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a DCP checkpoint")


def _check_metadata(path: Path) -> None:
    """DCP reads `.metadata` with pickle, which could run code: it is first unpickled here by
    an unpickler that builds DCP's own classes only (or refuses), then left to DCP. The shard
    files it names must lie in the checkpoint's directory."""
    file = path / DCP_METADATA
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} is a directory without DCP's {DCP_METADATA}: "
                              f"not a sharded checkpoint, or its save never finished")
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with file.open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise TypeError(f"it holds a {type(metadata).__name__}")
    except (pickle.UnpicklingError, ValueError, EOFError, AttributeError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: its {DCP_METADATA} is not DCP metadata "
                              f"({exc}); it was not loaded") from exc
    for info in (metadata.storage_data or {}).values():  # the shard files DCP would read
        inside(path, getattr(info, "relative_path", None), DCP_METADATA)


def read_extras(path) -> dict:
    """A sharded checkpoint's `meta.pth` (epoch, step, scaler, args), its DCP metadata checked;
    a CheckpointError naming the directory if either is not there."""
    path = Path(path)
    _check_metadata(path)
    if not (path / SHARDED_META).is_file():
        raise CheckpointError(f"checkpoint {path} has no {SHARDED_META}: its save never finished")
    try:  # tensors and plain containers only, as checkpoint.load_checkpoint reads
        extras = torch.load(path / SHARDED_META, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path}: its {SHARDED_META} cannot be read safely "
                              f"({str(exc).splitlines()[0][:300]})") from exc
    if not isinstance(extras, dict) or "epoch" not in extras:
        raise CheckpointError(f"checkpoint {path}: its {SHARDED_META} holds no training state")
    return extras


@functools.cache
def _weights_only_planner() -> type:
    """DCP's DefaultLoadPlanner, its non-tensor entries (the optimizer's param_groups: lr,
    betas, ...) read with torch.load(weights_only=True) where DCP's own would run any pickle in
    a shard; placed as DefaultLoadPlanner.load_bytes places them (torch 2.13/2.14)."""
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            fqn = read_item.dest_index.fqn
            try:
                loaded = torch.load(value, map_location="cpu", weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
                lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
                detail = next((line for line in lines if "GLOBAL" in line), lines[0])
                raise CheckpointError(f"entry {fqn} holds more than tensors and plain values, "
                                      f"so loading it could run code ({detail[:300]})") from exc
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], loaded)
            else:
                self.state_dict[fqn] = loaded

    return WeightsOnlyLoadPlanner


def _failures(exc: BaseException) -> list[BaseException]:
    """What failed: `exc`, or the ranks' exceptions a CheckpointException gathers (DCP raises
    one, a BaseException, on every rank whenever a process group exists)."""
    failures = getattr(exc, "failures", None)
    return [failure for failure, _ in failures.values()] if failures else [exc]


def _saved_weights(path: Path) -> dict:
    """name -> shape of the model weights a sharded checkpoint holds (its metadata only)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(path)).read_metadata()
    return {key.removeprefix("model."): meta.size
            for key, meta in metadata.state_dict_metadata.items()
            if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}


def load_sharded(model, optimizer, path, trust: bool = False) -> dict:
    """Every rank: the model and optimizer state of a sharded checkpoint into `model` (FSDP2 or
    plain, any world size: DCP reads each rank's part) and `optimizer`; returns the extras.
    Its weights must fit the model strictly (DCP alone would leave out the ones the model
    lacks). Its non-tensor entries are read as weights-only pickles unless `trust`
    (--unsafe-trust-checkpoint). Every failure is one line naming the checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    extras = read_extras(path)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    problems = weights_mismatch({k: v.shape for k, v in model_state.items()},
                                _saved_weights(Path(path)))
    if problems:
        raise CheckpointError(f"--resume {path}: its weights do not fit the model this run "
                              f"builds (pass the flags or --config it was trained with): "
                              f"{'; '.join(problems)}")
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        with _one_process_is_intended():
            dcp.load(state, checkpoint_id=Path(path), no_dist=not dist.is_initialized(),
                     planner=None if trust else _weights_only_planner()())
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
    except (CheckpointError, CheckpointException, RuntimeError, ValueError, KeyError) as exc:
        failures = _failures(exc)
        refused = next((f for f in failures if isinstance(f, CheckpointError)), None)
        if refused is not None:
            raise CheckpointError(f"--resume {path}: a shard's {refused}; it was not loaded. "
                                  f"If you trust where it came from, pass {TRUST_FLAG}.") from exc
        raise CheckpointError(f"--resume {path}: its shards did not load into this run's "
                              f"model and optimizer ({first_line(failures[0])})") from exc
    return extras


def consolidate(path) -> dict:
    """One process, no group: a sharded checkpoint as the contents of a `.pth` one (full model
    weights, epoch, step, args; not the optimizer), as `load_checkpoint` returns them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    extras = read_extras(path)
    metadata = FileSystemReader(str(path)).read_metadata()
    weights = {key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
               for key, meta in metadata.state_dict_metadata.items()
               if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    if not weights:
        raise CheckpointError(f"checkpoint {path} holds no model weights")
    with _one_process_is_intended():
        dcp.load({"model": weights}, checkpoint_id=path, no_dist=True,
                 planner=_weights_only_planner()())
    extras.pop("scaler", None)
    return {"model": weights, **extras}
