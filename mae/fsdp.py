"""Past one GPU's memory: FSDP2 (`fully_shard` on every encoder and decoder block and on the
root), non-reentrant activation checkpointing per block, sharded checkpoints through
`torch.distributed.checkpoint` (DCP), and the memory arithmetic of the README's table.

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

from .checkpoint_format import (
    LAST_CHECKPOINT,
    SHARDED_META,
    TRUST_FLAG,
    CheckpointError,
    atomic_save,
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


def set_grad_checkpointing(model: torch.nn.Module, enable: bool = True) -> int:
    """Non-reentrant activation checkpointing in every transformer block of an MAE or VideoMAE
    (encoder and decoder): each block keeps its input only and recomputes the rest in the
    backward pass. Returns the number of blocks."""
    from .models import Block

    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.grad_checkpointing = enable
    return len(blocks)


def check_args(args) -> None:
    """The flag combinations --fsdp cannot run (ValueError, one line)."""
    if not getattr(args, "fsdp", False):
        return
    if args.amp == "fp16":
        # FSDP2 shards the gradients, which torch.amp.GradScaler cannot unscale and check
        raise ValueError("--fsdp takes --amp bf16 or none, not fp16: fp16 needs loss scaling "
                         "of sharded gradients, which mae does not do (bf16 needs none)")
    if getattr(args, "online_probe", False):
        raise ValueError("--online-probe does not run under --fsdp: its evaluation calls the "
                         "encoder on rank 0 alone, which a sharded model cannot do")
    if torch.device(args.device).type not in ("cpu", "cuda"):
        raise ValueError(f"--fsdp runs on cpu (gloo) or cuda (nccl), not --device "
                         f"{args.device}")


def mixed_precision(amp: str, root: bool = False):
    """FSDP2's policy: under --amp bf16, bf16 parameters in forward and backward, gradients
    reduced in fp32 (fp32 master weights and AdamW states stay sharded). The root keeps its
    inputs as they come (the images stay fp32 for the loss's targets; autocast casts them for
    the patch embedding)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if amp != "bf16":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                cast_forward_inputs=not root)


def ensure_process_group(device: torch.device) -> None:
    """A group of one for a single process (no torchrun): FSDP2 then shards over one rank,
    which changes nothing in memory but trains and checkpoints exactly as on many."""
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def shard_model(model: torch.nn.Module, device: torch.device, amp: str,
                compile_blocks: bool) -> torch.nn.Module:
    """FSDP2 in place: each encoder and decoder block its own unit (all-gathered for its
    forward and backward, resharded after), then the root for the rest (embeddings, tokens,
    norms, heads). With `compile_blocks` each block is compiled first, as torchtitan does, so
    the compiled regions end where FSDP's communication starts."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ensure_process_group(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for blocks in (model.blocks, model.decoder_blocks):
        for block in blocks:
            if compile_blocks:
                block.compile()
            fully_shard(block, mesh=mesh, mp_policy=mixed_precision(amp))
    fully_shard(model, mesh=mesh, mp_policy=mixed_precision(amp, root=True))
    return model


def is_sharded(path) -> bool:
    """A directory of DCP's files (or a save of ours that did not finish)."""
    path = Path(path)
    return path.is_dir() and ((path / DCP_METADATA).exists() or (path / SHARDED_META).exists())


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


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
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_sharded(model, optimizer, extras: dict, path) -> Path:
    """Every rank: its shards of the model and optimizer into the directory `path` through
    DCP, `extras` (epoch, step, scaler, args) beside them; complete or not there at all."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = Path(path)
    partial = path.parent / f".{path.name}.partial"
    if _rank0():
        shutil.rmtree(partial, ignore_errors=True)  # a save that was killed
        restore_stepped_aside(path)  # or killed between its renames: the newest complete one
        partial.mkdir(parents=True)
    _barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    with _one_process_is_intended():
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=partial,
                 no_dist=not dist.is_initialized())
    if _rank0():
        atomic_save(extras, partial / SHARDED_META)
        _replace_dir(partial, path)
    _barrier()
    return path


def save_training_state(model, optimizer, extras: dict, output_dir, epoch: int, epochs: int,
                        save_every: int) -> None:
    """Every rank: checkpoint.save_training_state's cadence in sharded form, `checkpoint-last/`
    every epoch and `checkpoint-<epoch>/` (a copy of it) at epoch 0, every `save_every`
    epochs and the last."""

    output_dir = Path(output_dir)
    last = save_sharded(model, optimizer, extras, output_dir / Path(LAST_CHECKPOINT).stem)
    if epoch % save_every == 0 or epoch + 1 == epochs:
        if _rank0():
            copy_sharded(last, output_dir / f"checkpoint-{epoch}")
        _barrier()


def copy_sharded(source, target) -> Path:
    """Rank 0: a finished sharded checkpoint copied to another name, as atomically."""
    source, target = Path(source), Path(target)
    partial = target.parent / f".{target.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    restore_stepped_aside(target)
    shutil.copytree(source, partial)
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
    an unpickler that builds DCP's own classes only (or refuses), then left to DCP."""
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


def _refusal(exc: BaseException) -> CheckpointError | None:
    """The CheckpointError a shard's refused entry raised, as such or as DCP gathers the ranks'
    failures (a CheckpointException, whenever a process group exists)."""
    if isinstance(exc, CheckpointError):
        return exc
    for failure, _ in getattr(exc, "failures", {}).values():
        if isinstance(failure, CheckpointError):
            return failure
    return None


def load_sharded(model, optimizer, path, trust: bool = False) -> dict:
    """Every rank: the model and optimizer state of a sharded checkpoint into `model` (FSDP2 or
    plain, any world size: DCP reads each rank's part) and `optimizer`; returns the extras.
    Its non-tensor entries are read as weights-only pickles unless `trust`
    (--unsafe-trust-checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    extras = read_extras(path)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        with _one_process_is_intended():
            dcp.load(state, checkpoint_id=Path(path), no_dist=not dist.is_initialized(),
                     planner=None if trust else _weights_only_planner()())
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
    except (CheckpointError, CheckpointException) as exc:
        refused = _refusal(exc)
        if refused is None:
            raise
        raise CheckpointError(f"--resume {path}: a shard's {refused}; it was not loaded. If "
                              f"you trust where it came from, pass {TRUST_FLAG}.") from exc
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"--resume {path}: its state does not fit the model and "
                              f"optimizer this run builds (pass the flags or --config it was "
                              f"trained with): {str(exc).splitlines()[0][:300]}") from exc
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


# --- memory arithmetic (the README's "Model sizes and memory" table) ---
ADAMW_STATE_BYTES = 8  # exp_avg and exp_avg_sq in fp32
MASTER_BYTES = GRAD_BYTES = 4  # fp32 weights and gradients (autocast and FSDP's reduce dtype)


def parameter_counts(name_or_config) -> dict:
    """Parameter counts of a model (a MODEL_CONFIGS name or a config dict), built on the meta
    device (nothing allocated): total, trainable, encoder, and the largest block's."""
    if isinstance(name_or_config, str):
        return dict(_named_counts(name_or_config))  # a named model is built once
    return _counts(name_or_config)


@functools.lru_cache
def _named_counts(name: str) -> dict:
    from .models import MODEL_CONFIGS

    return _counts(MODEL_CONFIGS[name])


def _counts(config: dict) -> dict:
    from .models import MAE

    with torch.device("meta"):
        model = MAE(config)
    params = dict(model.named_parameters())
    encoder = sum(p.numel() for k, p in params.items()
                  if not k.startswith(("decoder", "mask_token")))
    return {"total": sum(p.numel() for p in params.values()),
            "trainable": sum(p.numel() for p in params.values() if p.requires_grad),
            "encoder": encoder,
            "block": max(sum(p.numel() for p in b.parameters()) for b in model.blocks),
            "config": model.config}


def activation_bytes_per_image(config: dict, amp: str = "bf16",
                               grad_checkpointing: bool = False) -> int:
    """Estimated activation memory one image keeps for the backward pass: per block and token
    the saved inputs of its two norms, qkv, attention (q, k, v and out; SDPA keeps no L x L
    scores), projection, fc1, GELU and fc2, i.e. 9 * dim + 2 * mlp elements (Korthikanti et
    al.'s 34 * dim for mlp = 4 * dim, without dropout). With checkpointing a block keeps its
    input only, and one block's worth is recomputed at a time."""
    size = 2 if amp == "bf16" else 4
    side = config["img_size"] if isinstance(config["img_size"], int) else config["img_size"][0]
    patches = (side // config["patch_size"]) ** 2
    kept = patches - int(patches * config["mask_ratio"])
    encoder_mlp = config["encoder_mlp_dim"] or int(config["encoder_dim"] * config["mlp_ratio"])
    decoder_mlp = int(config["decoder_dim"] * config["mlp_ratio"])
    stacks = [(config["encoder_layers"], kept + 1, config["encoder_dim"], encoder_mlp),
              (config["decoder_layers"], patches + 1, config["decoder_dim"], decoder_mlp)]
    per_block = [(tokens * (9 * dim + 2 * mlp), tokens * dim) for _, tokens, dim, mlp in stacks]
    if not grad_checkpointing:
        return size * sum(depth * full for (depth, *_), (full, _) in zip(stacks, per_block))
    kept_inputs = sum(depth * inputs for (depth, *_), (_, inputs) in zip(stacks, per_block))
    return size * (kept_inputs + max(full for full, _ in per_block))


def memory_estimate(name_or_config, world_size: int = 1, fsdp: bool = False,
                    grad_checkpointing: bool = False, batch_per_gpu: int = 64,
                    amp: str = "bf16") -> dict:
    """Bytes per GPU of one training step (AdamW, fp32 master weights): the states
    (weights + gradients + AdamW: 16 bytes per trainable parameter, 4 per frozen one; DDP adds
    its fp32 gradient buckets, 4 more; FSDP divides all of it by the world size and holds two
    blocks unsharded in flight, in the parameter dtype, with one block's unsharded gradients)
    and the activations of `batch_per_gpu` images. Not counted: the CUDA context, the
    allocator's fragmentation, the data loader."""
    counts = parameter_counts(name_or_config)
    trainable, frozen = counts["trainable"], counts["total"] - counts["trainable"]
    states = trainable * (MASTER_BYTES + GRAD_BYTES + ADAMW_STATE_BYTES) + frozen * MASTER_BYTES
    if fsdp:
        param_size = 2 if amp == "bf16" else 4
        states = states / world_size + counts["block"] * (2 * param_size + GRAD_BYTES)
    elif world_size > 1:
        states += trainable * GRAD_BYTES  # DDP's buckets
    activations = batch_per_gpu * activation_bytes_per_image(counts["config"], amp,
                                                             grad_checkpointing)
    return {"params": counts["total"], "states": int(states), "activations": activations,
            "total": int(states) + activations}


def communication_bytes(name_or_config, world_size: int, fsdp: bool = False,
                        amp: str = "bf16") -> int:
    """Bytes each GPU sends (and receives) per optimizer step, ring algorithms: DDP all-reduces
    the fp32 gradients, 2 (N-1)/N x 4 bytes per parameter; FSDP2 all-gathers the parameters
    (bf16 under --amp bf16) for the forward and again for the backward, then reduce-scatters
    the fp32 gradients, (N-1)/N x (2 + 2 + 4) bytes per parameter."""
    counts = parameter_counts(name_or_config)
    share = (world_size - 1) / world_size
    if not fsdp:
        return int(2 * share * GRAD_BYTES * counts["trainable"])
    gathered = 2 if amp == "bf16" else 4
    return int(share * (2 * gathered * counts["total"] + GRAD_BYTES * counts["trainable"]))


TABLE_MODELS = ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14",
                "mae_vit_giant_patch14", "mae_vit_gigantic_patch14")


def memory_table(models=TABLE_MODELS, batch_per_gpu: int = 64, world_size: int = 8) -> str:
    """The README's table (GiB per GPU at 224px, bf16 autocast, AdamW), as Markdown."""
    gib = 2**30
    rows = [f"| model | params | states DDP | states FSDP/{world_size} | activations per image "
            f"(ckpt) | DDP | DDP + ckpt | FSDP | FSDP + ckpt |", "|---" * 9 + "|"]
    for name in models:
        cells = [memory_estimate(name, world_size, fsdp, ckpt, batch_per_gpu)
                 for fsdp in (False, True) for ckpt in (False, True)]
        config = parameter_counts(name)["config"]
        per_image = [activation_bytes_per_image(config, "bf16", ckpt) / 2**20
                     for ckpt in (False, True)]
        rows.append(f"| {name} | {cells[0]['params'] / 1e6:.0f}M | "
                    f"{cells[0]['states'] / gib:.1f} | {cells[2]['states'] / gib:.2f} | "
                    f"{per_image[0]:.0f} MiB ({per_image[1]:.0f}) | "
                    + " | ".join(f"{c['total'] / gib:.1f}" for c in cells) + " |")
    return "\n".join(rows)


def communication_table(models=TABLE_MODELS[:4], world_size: int = 8) -> str:
    """The README's per-step communication table (GB each GPU sends), as Markdown."""
    rows = [f"| model | DDP fp32 all-reduce, {world_size} GPUs | FSDP2 bf16 gather x2 + fp32 "
            f"reduce-scatter | FSDP2 fp32 |", "|---|---|---|---|"]
    for name in models:
        cells = [communication_bytes(name, world_size, fsdp, amp) / 1e9
                 for fsdp, amp in ((False, "bf16"), (True, "bf16"), (True, "none"))]
        rows.append(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m mae.fsdp: the README's tables
    print(memory_table(), communication_table(), sep="\n\n")
