"""Past one GPU's memory: FSDP2 (`fully_shard` on every encoder and decoder block and on the
root), non-reentrant activation checkpointing per block, and the memory arithmetic of the README's
table. Its checkpoints are sharded ones (mae.checkpoints.sharded).
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist


def set_grad_checkpointing(model: torch.nn.Module, enable: bool = True) -> int:
    """Non-reentrant activation checkpointing in every transformer block of an MAE or VideoMAE
    (encoder and decoder): each block keeps its input only and recomputes the rest in the
    backward pass. Returns the number of blocks."""
    from ..models.image import Block

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
    norms, heads). The frozen sin-cos tables stay out of FSDP, whole on every rank and fp32
    (the policy would round them to bf16, where autocast leaves them fp32). With
    `compile_blocks` each block is compiled first, as torchtitan does, so the compiled regions
    end where FSDP's communication starts."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ensure_process_group(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for blocks in (model.blocks, model.decoder_blocks):
        for block in blocks:
            if compile_blocks:
                block.compile()
            fully_shard(block, mesh=mesh, mp_policy=mixed_precision(amp))
    frozen = {p for p in model.parameters() if not p.requires_grad}
    fully_shard(model, mesh=mesh, mp_policy=mixed_precision(amp, root=True),
                ignored_params=frozen)
    return model


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
    from ..models.image import MODEL_CONFIGS

    return _counts(MODEL_CONFIGS[name])


def _counts(config: dict) -> dict:
    from ..models import build_model
    from ..models.image import resolve_config

    with torch.device("meta"):
        model = build_model(resolve_config(config))
    params = dict(model.named_parameters())
    encoder = sum(p.numel() for k, p in params.items()
                  if not k.startswith(("decoder", "mask_token", "dec_norms", "wfm")))
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
    unit = config.get("mask_grid", 1) ** 2  # Pixio masks units of patches
    kept = (patches // unit - int(patches // unit * config["mask_ratio"])) * unit
    prefix = config.get("n_cls_tokens", 1)
    # MAE's decoder runs over every token; CrossMAE's queries are the predicted patches (its
    # keys and values, the encoder's tokens, are not counted)
    queries = patches + prefix if config.get("decoder", "mae") == "mae" else (
        patches - kept if config["predict_ratio"] is None
        else round(patches * config["predict_ratio"]))
    encoder_mlp = config["encoder_mlp_dim"] or int(config["encoder_dim"] * config["mlp_ratio"])
    decoder_mlp = int(config["decoder_dim"] * config["mlp_ratio"])
    stacks = [(config["encoder_layers"], kept + prefix, config["encoder_dim"], encoder_mlp),
              (config["decoder_layers"], queries, config["decoder_dim"], decoder_mlp)]
    per_block = [(tokens * (9 * dim + 2 * mlp), tokens * dim) for _, tokens, dim, mlp in stacks]
    if not grad_checkpointing:
        return size * sum(depth * full for (depth, *_), (full, _) in zip(stacks, per_block))
    kept_inputs = sum(depth * inputs for (depth, *_), (_, inputs) in zip(stacks, per_block))
    return size * (kept_inputs + max(full for full, _ in per_block))


def memory_estimate(name_or_config, world_size: int = 1, fsdp: bool = False,
                    grad_checkpointing: bool = False, batch_per_gpu: int = 64,
                    amp: str = "bf16", accum_iter: int = 1) -> dict:
    """Bytes per GPU of one training step (AdamW, fp32 master weights), by part: `weights`
    (fp32, frozen ones too), `gradients` (fp32) and `optimizer` (two fp32 AdamW moments) of
    the trainable parameters, FSDP dividing all three by the world size (the frozen sin-cos
    tables stay whole); `buckets`, DDP's fp32 gradient buckets; under FSDP `gathered`, two
    blocks unsharded in flight in the parameter dtype, and `unsharded_gradients`, one block's
    fp32 gradients before their reduce-scatter, or with `accum_iter` > 1 every parameter's,
    kept unsharded between micro-batches (FSDP2's no-sync); `activations` of `batch_per_gpu`
    images. `states` sums all but the activations, `total` all. Not counted: the CUDA context,
    the allocator's fragmentation, the data loader."""
    counts = parameter_counts(name_or_config)
    trainable, frozen = counts["trainable"], counts["total"] - counts["trainable"]
    shards = world_size if fsdp else 1
    parts = {"weights": trainable * MASTER_BYTES / shards + frozen * MASTER_BYTES,
             "gradients": trainable * GRAD_BYTES / shards,
             "optimizer": trainable * ADAMW_STATE_BYTES / shards,
             "buckets": trainable * GRAD_BYTES if world_size > 1 and not fsdp else 0,
             "gathered": 0, "unsharded_gradients": 0}
    if fsdp:
        parts["gathered"] = counts["block"] * 2 * (2 if amp == "bf16" else 4)
        parts["unsharded_gradients"] = (trainable if accum_iter > 1 else counts["block"]) \
            * GRAD_BYTES
    parts = {k: int(v) for k, v in parts.items()}
    activations = batch_per_gpu * activation_bytes_per_image(counts["config"], amp,
                                                             grad_checkpointing)
    states = sum(parts.values())
    return {"params": counts["total"], **parts, "states": states,
            "activations": activations, "total": states + activations}


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
                "mae_vit_giant_patch14", "mae_vit_gigantic_patch14",
                # Pixio's, at its 256 px (its 5B/16 trains under --fsdp only)
                "pixio_vith16_enc1280x32h16_dec512x32h16",
                "pixio_vit1b16_enc1536x48h24_dec512x32h16",
                "pixio_vit5b16_enc3072x48h32_dec512x32h16")


def memory_table(models=TABLE_MODELS, batch_per_gpu: int = 64, world_size: int = 8) -> str:
    """The README's table (GiB per GPU at 224px, Pixio's at 256px; bf16 autocast, AdamW), as
    Markdown."""
    gib = 2**30
    rows = [f"| model | params | states DDP | states FSDP/{world_size} | activations per image "
            f"(ckpt) | DDP | DDP + ckpt | FSDP | FSDP + ckpt | FSDP + ckpt, --accum-iter > 1 |",
            "|---" * 10 + "|"]
    for name in models:
        cells = [memory_estimate(name, world_size, fsdp, ckpt, batch_per_gpu)
                 for fsdp in (False, True) for ckpt in (False, True)]
        cells.append(memory_estimate(name, world_size, True, True, batch_per_gpu, accum_iter=2))
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


if __name__ == "__main__":  # python -m mae.train.fsdp: the README's tables
    print(memory_table(), communication_table(), sep="\n\n")
