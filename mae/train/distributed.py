"""Multi-process training: DistributedDataParallel with NCCL on GPUs and gloo on CPUs, launched
by torchrun or by SLURM's srun (no torchrun needed: `srun mae pretrain ...`).

Under srun the process group comes from SLURM_PROCID (rank), SLURM_STEP_NUM_TASKS (world size),
SLURM_LOCALID (local rank) and the first host of the step's SLURM_STEP_NODELIST (the master;
the job's SLURM_JOB_NODELIST where srun did not set it), with MASTER_PORT, unless set, drawn
from the job id (as submitit's TorchDistributedEnvironment draws it) and moved on by the step
id: every task of a step picks the same port, two steps of one job (`srun ... &` twice)
different ones. The ports lie in 20000-32767, below Linux's ephemeral range (32768-60999 by
default), where an outgoing connection may hold the port already.
torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) take precedence.
"""
from __future__ import annotations

import gc
import hashlib
import os
import random
import re
import shutil
import subprocess

import torch
import torch.distributed as dist

from ..checkpoints.format import is_main  # noqa: F401 (rank 0 or no group; the commands ask here)

MIN_PORT, MAX_PORT = 20000, 32767  # below Linux's ephemeral ports (ip_local_port_range)


def device_for_rank(requested: str, local_rank: int) -> torch.device:
    """`--device cuda` means this process's own GPU: the only one it sees (srun's
    --gpus-per-task=1, or CUDA_VISIBLE_DEVICES set per task), else cuda:LOCAL_RANK of the GPUs
    the node's processes share; fewer GPUs than that is a ValueError (one line). An explicit
    index or another device type is taken as given."""
    device = torch.device(requested)
    if device.type != "cuda" or device.index is not None:
        return device
    visible = torch.cuda.device_count()
    if visible == 1:
        return torch.device("cuda", 0)
    if local_rank >= visible:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ValueError(f"--device cuda: this is local process {local_rank} (LOCAL_RANK), but "
                         f"it sees {visible} GPU(s)"
                         + (f" (CUDA_VISIBLE_DEVICES={shown})" if shown is not None else "")
                         + ": start at most one process per GPU, or give each its own GPU "
                           "(srun --gpus-per-task=1)")
    return torch.device("cuda", local_rank)


def expand_hostnames(nodelist: str) -> list[str]:
    """SLURM's compact host list as host names: `node[01-04,07]` -> node01 .. node04, node07;
    `gpu-a[1-2],gpu-b3` -> gpu-a1, gpu-a2, gpu-b3; several brackets (`r[1-2]n[1-2]`) multiply;
    a range keeps its zero padding."""
    hosts = []
    for group in _top_level_groups(nodelist):
        expanded = [""]
        for literal, ranges in re.findall(r"([^\[\]]*)(?:\[([^\[\]]*)\])?", group):
            if not literal and not ranges:
                continue
            choices = _expand_ranges(ranges, nodelist) if ranges else [""]
            expanded = [head + literal + choice for head in expanded for choice in choices]
        hosts.extend(expanded)
    if not hosts:
        raise ValueError(f"SLURM_JOB_NODELIST {nodelist!r} names no host")
    return hosts


def _top_level_groups(nodelist: str) -> list[str]:
    """Splits at the commas outside brackets."""
    groups, depth, current = [], 0, ""
    for char in nodelist.strip():
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise ValueError(f"SLURM_JOB_NODELIST {nodelist!r}: unbalanced brackets")
        if char == "," and depth == 0:
            groups.append(current)
            current = ""
        else:
            current += char
    if depth:
        raise ValueError(f"SLURM_JOB_NODELIST {nodelist!r}: unbalanced brackets")
    return [g for g in [*groups, current] if g]


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    out = []
    for part in ranges.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if match is None:
            raise ValueError(f"SLURM_JOB_NODELIST {nodelist!r}: {part!r} is not a number or "
                             f"a range")
        first, last = match.group(1), match.group(2) or match.group(1)
        out.extend(str(n).zfill(len(first)) for n in range(int(first), int(last) + 1))
    return out


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `scontrol show hostnames` where SLURM is installed,
    else our own expansion."""
    scontrol = shutil.which("scontrol")
    if scontrol is not None:
        result = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True,
                                text=True)
        names = result.stdout.split()
        if result.returncode == 0 and names:
            return names[0]
    return expand_hostnames(nodelist)[0]


def slurm_job_id(environ) -> str:
    """The job id as submitit names it: ARRAYJOB_TASK for an array task, else SLURM_JOB_ID."""
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return _required(environ, "SLURM_JOB_ID")


def _required(environ, name: str) -> str:
    if not environ.get(name):
        raise ValueError(f"{name} is not set, but SLURM_PROCID is: mae takes its process group "
                         f"from srun's variables (run it as `srun mae ...`, or set {name})")
    return environ[name]


def master_port_for_step(job_id: str, step_id: int) -> int:
    """A port drawn from the job id, moved on by the step id: the same for every task of a
    step, another for each step of the job."""
    ports = MAX_PORT - MIN_PORT + 1
    return MIN_PORT + (random.Random(job_id).randrange(ports) + step_id) % ports


def slurm_environment(environ) -> dict[str, str]:
    """The env:// variables a task launched by srun lacks (none under torchrun, or outside a
    multi-task SLURM step). The world size is the step's SLURM_STEP_NUM_TASKS, which srun
    sets: the batch script itself sees only the allocation's SLURM_NTASKS, and `mae` started
    there directly is one process, not one of tasks that never start."""
    if "WORLD_SIZE" in environ or "SLURM_PROCID" not in environ:
        return {}
    tasks = int(environ.get("SLURM_STEP_NUM_TASKS", "1"))
    if tasks <= 1:
        return {}
    nodes = int(environ.get("SLURM_STEP_NUM_NODES", environ.get("SLURM_JOB_NUM_NODES", "1")))
    wanted = {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": str(tasks),
              "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
              "LOCAL_WORLD_SIZE": str(max(1, tasks // max(1, nodes))),
              "MASTER_ADDR": first_host(environ.get("SLURM_STEP_NODELIST")
                                        or _required(environ, "SLURM_JOB_NODELIST")),
              "MASTER_PORT": str(master_port_for_step(slurm_job_id(environ),
                                                      int(environ.get("SLURM_STEP_ID", "0"))))}
    return {k: v for k, v in wanted.items() if k not in environ}


def init(requested_device: str) -> tuple[int, int, torch.device]:
    """Joins the process group when launched by torchrun or srun; returns (rank, world_size,
    device). Under NCCL the group also has a gloo side, for the CPU tensors of the stop-signal
    agreement (`preemption`), which then costs the GPU no synchronisation."""
    os.environ.update(slurm_environment(os.environ))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = device_for_rank(requested_device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        check_one_process_per_gpu(device)
    return dist.get_rank(), dist.get_world_size(), device


def check_one_process_per_gpu(device: torch.device) -> None:
    """Processes that each see the same single GPU (a per-task CUDA_VISIBLE_DEVICES or srun
    binding that did not split the node's GPUs) would all take it as their own, and NCCL would
    stop at the first collective with a traceback: one line instead, before training. The GPUs'
    UUIDs are compared over the gloo side (NCCL itself cannot start)."""
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    mine = torch.tensor([int.from_bytes(hashlib.sha256(uuid.encode()).digest()[:7], "big")])
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)  # CPU tensors: gloo
    sharing = [rank for rank, other in enumerate(every) if torch.equal(other, mine)]
    if len(sharing) > 1:
        raise ValueError(f"--device cuda: processes {sharing} all use the GPU {uuid}: give each "
                         f"process its own GPU (srun --gpus-per-task=1, or one "
                         f"CUDA_VISIBLE_DEVICES per task)")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


_data_group = None


def data_group():
    """A gloo group of its own for the data loader thread's agreement (a collective on CPU
    tensors per batch, `mae.data.prefetch`): beside the training thread's collectives on the
    default group, one group per thread keeps each group's collectives in one order on every
    rank. Every rank creates it at the same call, the first; None in one process."""
    global _data_group
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    if _data_group is None:
        _data_group = dist.new_group(backend="gloo")
    return _data_group


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def all_reduce_max(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def broadcast_from_main(obj):
    """Rank 0's `obj` on every rank (`obj` itself in one process)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank; `[obj]` in one process."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_to_main(obj) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere); `[obj]` in one process."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def shutdown(synchronize: bool = False) -> None:
    """Destroy the process group; `synchronize` (every rank finished the same work) first
    waits for all of them: a gloo rank tearing its connections down while a peer is still in
    its last collective aborts that peer (`terminate called without an active exception`,
    SIGABRT, seen in about one in fifteen 2-process FSDP runs on a loaded CPU). Then the
    garbage a run left is collected: FSDP's hooks hold its modules, their device mesh and so
    the group in reference cycles, which the interpreter would otherwise free during its
    finalization, where gloo's threads abort in the same way (seen once after the barrier)."""
    global _data_group
    if dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
    _data_group = None
    gc.collect()
