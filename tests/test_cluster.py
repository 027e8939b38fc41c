"""What a cluster shows and one process does not (#33): the ranks resume from the checkpoint rank 0
chose, DCP's failures are one line, `--device cuda` maps the local rank onto the GPUs a task
sees, SLURM's rendezvous per step, and stops that fit the grace time.

The two-process cases run in spawned processes joined in a gloo group (`in_two_processes`)."""
import argparse
import json
import multiprocessing
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from mae.checkpoints.files import CheckpointError
from mae.cli import main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_and_run(fn, rank: int, port: int, results, group: bool, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    if group:
        dist.init_process_group("gloo")
    try:
        results.put((rank, fn(rank, *args)))
    except BaseException as exc:  # noqa: BLE001 (reported to the test, which fails on it)
        results.put((rank, f"raised {type(exc).__name__}: {exc}"))
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def in_two_processes(fn, *args, group: bool = True, timeout: float = 240) -> list:
    """`fn(rank, *args)` on two spawned processes with torchrun's variables set, joined in one
    gloo group (unless not `group`: `mae` forms it); what each returned."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    procs = [context.Process(target=_join_and_run,
                             args=(fn, rank, port, results, group, args))
             for rank in (0, 1)]
    for p in procs:
        p.start()
    try:
        returned = dict(results.get(timeout=timeout) for _ in procs)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    return [returned[0], returned[1]]


def _resume_auto_where_one_rank_cannot_read(rank: int, out: str, unreadable_on: int):
    """--resume auto in `out`, where process `unreadable_on` cannot read checkpoint-last.pth
    (a stale NFS handle, say); (path, step) it resumes from, or its error."""
    from mae.train import engine

    real = engine.load_checkpoint

    def load_checkpoint(path, **kwargs):
        if rank == unreadable_on and Path(path).name == "checkpoint-last.pth":
            raise CheckpointError(f"checkpoint {path} cannot be read: Stale file handle")
        return real(path, **kwargs)

    engine.load_checkpoint = load_checkpoint
    args = argparse.Namespace(resume="auto", output_dir=out, unsafe_trust_checkpoint=False)
    try:
        state, path = engine.resume_state(args, rank == 0)
    except CheckpointError as exc:
        return f"error: {exc}"
    return Path(path).name, state["step"]


@pytest.mark.parametrize("unreadable_on", [0, 1])
def test_every_rank_resumes_from_the_checkpoint_rank_0_chose(tmp_path, unreadable_on):
    for name, epoch, step in (("checkpoint-1.pth", 1, 4), ("checkpoint-last.pth", 2, 2)):
        torch.save({"epoch": epoch, "epoch_step": step, "steps_per_epoch": 4,
                    "step": 4 * epoch + step, "model": {"w": torch.zeros(2)}}, tmp_path / name)
    ranks = in_two_processes(_resume_auto_where_one_rank_cannot_read, str(tmp_path),
                             unreadable_on)
    if unreadable_on == 0:  # rank 0 passes over the newest: so does every rank
        assert ranks == [("checkpoint-1.pth", 8)] * 2, ranks
    else:  # the one rank 0 chose does not load on process 1: every rank stops, same line
        last = tmp_path / "checkpoint-last.pth"
        assert ranks == [f"error: checkpoint {last} cannot be read: Stale file handle "
                         f"(process 1 of 2)"] * 2, ranks


SMALL = {"encoder_dim": 32, "encoder_layers": 1, "encoder_heads": 2, "decoder_dim": 32,
         "decoder_layers": 2, "decoder_heads": 2}


def tiny(tmp_path, out, *extra, config=SMALL):
    """A 1-epoch pre-training of a one-block MAE at 16px, 4 steps, on one process."""
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.json"
    path.write_text(json.dumps(config))
    return ["pretrain", "--config", str(path), "--input-size", "16", "--patch-size", "4",
            "--batch-size", "4", "--dataset-size", "16", "--num-workers", "0", "--log-every",
            "2", "--blr", "1e-3", "--warmup-epochs", "1", "--epochs", "1", "--quiet",
            "--device", "cpu", "--output-dir", str(out), *extra]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def test_dcp_failures_are_one_error_line(tmp_path, capsys, monkeypatch):
    """DCP gathers the ranks' failures in a CheckpointException, a BaseException: a sharded
    checkpoint that does not fit, and a full disk under the shards, are one `error:` line."""
    import errno

    import torch.distributed.checkpoint.filesystem as dcp_files

    run = tmp_path / "run"
    assert main(tiny(tmp_path, run, "--fsdp")) == 0
    saved = run / "checkpoint-0"
    for config, why in (({**SMALL, "decoder_layers": 3}, "12 missing (e.g. decoder_blocks.2."),
                        ({**SMALL, "decoder_layers": 1}, "not in the model (e.g. decoder_block"),
                        ({**SMALL, "encoder_dim": 48}, "of another shape (e.g. ")):
        capsys.readouterr()
        code = main(tiny(tmp_path, tmp_path / "other", "--fsdp", "--epochs", "2", "--resume",
                         str(saved), config=config))
        err = one_error_line(capsys)
        assert code == 1 and err.startswith(f"error: --resume {saved}: its weights do not fit "
                                            f"the model this run builds") and why in err, err

    shard = saved / "__0_0.distcp"
    truncated = shard.read_bytes()[:100]
    shard.unlink()  # a file of its own: checkpoint-last may share the shard (a hard link)
    shard.write_bytes(truncated)
    capsys.readouterr()
    assert main(tiny(tmp_path, tmp_path / "other", "--fsdp", "--epochs", "2", "--resume",
                     str(saved))) == 1
    err = one_error_line(capsys)
    assert err.startswith(f"error: --resume {saved}: its shards did not load into this run's "
                          f"model and optimizer ("), err

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp_files, "_write_item", disk_full)
    capsys.readouterr()
    assert main(tiny(tmp_path, run, "--fsdp", "--epochs", "2", "--resume", "auto")) == 1
    err = one_error_line(capsys)
    assert err.startswith(f"error: cannot write {run / 'checkpoint-last'}: no space left on "
                          f"the disk (") and err.endswith("(the one there before is intact)")
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("visible, local_rank, chosen", [
    (8, 0, "cuda:0"), (8, 5, "cuda:5"),  # a node's processes share its GPUs: one each
    (1, 3, "cuda:0"),  # srun --gpus-per-task=1: each task sees its own GPU only
    (2, 3, "local process 3 (LOCAL_RANK), but it sees 2 GPU(s) (CUDA_VISIBLE_DEVICES=4,5)"),
])
def test_device_cuda_maps_the_local_rank_onto_the_gpus_the_task_sees(monkeypatch, visible,
                                                                      local_rank, chosen):
    from mae.train import distributed

    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    if chosen.startswith("cuda"):
        assert distributed.device_for_rank("cuda", local_rank) == torch.device(chosen)
    else:
        with pytest.raises(ValueError, match=f"^--device cuda: this is {re.escape(chosen)}: "):
            distributed.device_for_rank("cuda", local_rank)
    # an explicit device is taken as given
    assert distributed.device_for_rank("cuda:1", local_rank) == torch.device("cuda:1")
    assert distributed.device_for_rank("cpu", local_rank) == torch.device("cpu")


@pytest.mark.gpu
def test_a_task_that_sees_one_gpu_trains_on_it_whatever_its_local_rank(tmp_path):
    """srun --gpus-per-task=1: the task of local rank 1 sees one GPU, cuda:0 (cuda:1 would
    fail at startup)."""
    out = tmp_path / "run"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES",
                                                                "0").split(",")[0],
           "LOCAL_RANK": "1"}
    done = subprocess.run([sys.executable, "-m", "mae.cli", *tiny(tmp_path, out, "--device",
                                                                   "cuda")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 process(es) on cuda" in done.stdout


@pytest.mark.gpu
def test_two_processes_that_see_the_same_gpu_stop_with_one_line(tmp_path):
    """Two processes under torchrun that each see one GPU, the same one: each would take it as
    its own and NCCL would fail at its first collective with a traceback; they stop before
    training with one error line naming the GPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "mae.cli",
                           *tiny(tmp_path, tmp_path / "run", "--device", "cuda")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": visible})
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors and all(line.startswith("error: --device cuda: processes [0, 1] all use the "
                                          "GPU ") for line in errors), done.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_each_srun_step_meets_on_its_own_nodes_and_port(tmp_path, monkeypatch):
    from mae.train import distributed

    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol: our own expansion
    task = {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_NUM_NODES": "1",
            "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}
    # two steps of one job, each on one of its nodes (`srun -N1 ... &` twice)
    steps = [distributed.slurm_environment({**task, "SLURM_STEP_ID": str(step),
                                            "SLURM_STEP_NODELIST": node})
             for step, node in ((0, "gpu07"), (1, "gpu08"))]
    assert [s["MASTER_ADDR"] for s in steps] == ["gpu07", "gpu08"]
    assert steps[0]["MASTER_PORT"] != steps[1]["MASTER_PORT"]
    # the step's tasks agree; no port of any job falls in Linux's ephemeral range
    assert distributed.slurm_environment({**task, "SLURM_PROCID": "5", "SLURM_STEP_ID": "1",
                                          "SLURM_STEP_NODELIST": "gpu08"}) == {
        **steps[1], "RANK": "5"}
    ports = {int(distributed.slurm_environment({**task, "SLURM_JOB_ID": str(job)})
                 ["MASTER_PORT"]) for job in range(300)}
    assert len(ports) > 250 and 20000 <= min(ports) and max(ports) < 32768


def test_the_sbatch_script_gives_srun_the_cpus_of_each_task(tmp_path):
    """Since Slurm 22.05 srun does not inherit sbatch's --cpus-per-task: without it each task
    may get one core beside its 8 loader workers."""
    recorded = tmp_path / "srun-args"
    srun = tmp_path / "srun"
    srun.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {recorded}\n")
    srun.chmod(0o755)
    script = Path(__file__).resolve().parents[1] / "scripts" / "slurm" / "pretrain.sbatch"
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
           "SLURM_JOB_ID": "42", "SLURM_CPUS_PER_TASK": "10"}
    done = subprocess.run(["bash", str(script), "/data/imagenet", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    args = recorded.read_text().splitlines()
    assert "--cpus-per-task=10" in args[:args.index("mae")], args


def test_a_numbered_sharded_checkpoint_is_hard_links_of_the_rolling_one(tmp_path):
    from mae import MAE
    from mae.checkpoints import sharded
    from mae.train.optim import build_optimizer

    model = MAE({**SMALL, "img_size": 16, "patch_size": 4})
    optimizer = build_optimizer(model, 1e-3, 0.05)
    last = sharded.save_sharded(model, optimizer, {"epoch": 0, "step": 4},
                                tmp_path / "checkpoint-last")
    numbered = sharded.copy_sharded(last, tmp_path / "checkpoint-0")
    names = sorted(p.name for p in last.iterdir())
    assert names == sorted(p.name for p in numbered.iterdir()) and len(names) == 3
    for name in names:  # no byte written twice
        assert (last / name).stat().st_ino == (numbered / name).stat().st_ino, name
    sharded.save_sharded(model, optimizer, {"epoch": 1, "step": 8}, last)  # the next epoch
    assert sharded.read_extras(numbered)["step"] == 4 and sharded.read_extras(last)["step"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0", "checkpoint-last"]


def test_a_stop_at_an_epoch_end_saves_checkpoint_last_alone(tmp_path, monkeypatch, capsys):
    """A signal in an epoch's last step: that epoch's end writes checkpoint-last and nothing
    else (no online-probe evaluation, no figure, no numbered copy: the resumed run makes the
    copy), then stops."""
    from mae.checkpoints import files as ckpt
    from mae.train import pretrain as pretrain_module

    figures = []
    monkeypatch.setattr(pretrain_module, "save_reconstruction_figure",
                        lambda *a, **kw: figures.append(a[2]))
    run = tmp_path / "run"
    argv = tiny(tmp_path, run, "--epochs", "2", "--save-every", "1", "--online-probe",
                "--probe-val-size", "8")
    monkeypatch.setenv("MAE_TEST_SIGNAL_AT_STEP", "3")  # epoch 0's last step
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("stopped by SIGTERM at epoch 0 step 4; saved "), out
    assert "stopping: saving checkpoint-last only" in out
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-last.pth"]
    assert figures == []
    epoch = [json.loads(line) for line in open(run / "log.jsonl")][-1]
    assert epoch["kind"] == "epoch" and "probe_top1" not in epoch
    (run / ".checkpoint-1.partial").mkdir()  # a sharded copy killed mid-way, say
    monkeypatch.delenv("MAE_TEST_SIGNAL_AT_STEP")
    loads, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **kw: loads.append(
        (Path(f).name, kw.get("mmap")) if isinstance(f, (str, Path)) else None)
        or real_load(f, *a, **kw))
    assert main([*argv, "--resume", "auto"]) == 0
    # the resume maps its checkpoint (read as the model takes its tensors), never reads it whole
    assert {mmap for name, mmap in filter(None, loads) if name == "checkpoint-last.pth"} == {True}
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("checkpoint", "."))) == [
        "checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-last.pth"]
    assert ckpt.load_checkpoint(run / "checkpoint-0.pth")["step"] == 4  # made by the resume
    assert len(figures) == 1


def test_a_mid_epoch_resume_refuses_another_seed_accumulation_or_data(tmp_path, monkeypatch,
                                                                      capsys):
    run = tmp_path / "run"
    monkeypatch.setenv("MAE_TEST_SIGNAL_AT_STEP", "1")
    assert main(tiny(tmp_path, run, "--epochs", "2")) == 0  # stopped at epoch 0 step 2
    monkeypatch.delenv("MAE_TEST_SIGNAL_AT_STEP")
    for flag, saved, other in (("--seed", 0, 1), ("--accum-iter", 1, 2),
                               ("--dataset-size", 16, 17)):  # 17 images: 4 steps still
        capsys.readouterr()
        assert main(tiny(tmp_path, run, "--epochs", "2", "--resume", "auto", flag,
                         str(other))) == 1
        err = one_error_line(capsys)
        assert err.startswith(f"error: --resume {run / 'checkpoint-last.pth'} stopped mid-epoch "
                              f"(epoch 0 step 2) with {flag} {saved}, not {other}: "), err


def trained_small_model():
    """A one-block MAE and its AdamW after one step, the same in every process."""
    from mae import MAE
    from mae.train.optim import build_optimizer

    torch.manual_seed(0)
    model = MAE({**SMALL, "img_size": 16, "patch_size": 4})
    optimizer = build_optimizer(model, 1e-3, 0.05)
    imgs = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the spawned processes: the sums' order follows the threads
    try:
        model(imgs).loss.backward()
    finally:
        torch.set_num_threads(threads)
    optimizer.step()
    return model, optimizer


def _save_a_stop(rank: int, out: str, threshold: int):
    import signal

    from mae.train import engine
    from mae.train.preemption import Preempted

    engine.PARALLEL_SAVE_BYTES = threshold
    model, optimizer = trained_small_model()
    args = argparse.Namespace(output_dir=out, fsdp=False, world_size=2, command="pretrain")
    stopped = Preempted(signal.SIGTERM, 1, 2, 4, [{"rank": 0}, {"rank": 1}] if rank == 0 else None)
    engine.save_stopped(args, model, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                        stopped)
    return str(stopped.path)


@pytest.mark.parametrize("large", [True, False])
def test_a_large_stop_save_is_written_by_every_rank(tmp_path, large):
    """Past PARALLEL_SAVE_BYTES a mid-epoch stop of a DDP run saves through DCP, each rank its
    share of the (replicated) model and AdamW state in parallel; it loads back exactly."""
    from mae.checkpoints import sharded
    from mae.checkpoints.files import load_checkpoint
    from mae.train.engine import state_bytes

    model, optimizer = trained_small_model()
    ranks = in_two_processes(_save_a_stop, str(tmp_path), 0 if large else 2**40)
    if not large:  # rank 0 alone, one file
        assert ranks == [str(tmp_path / "checkpoint-last.pth")] * 2
        assert load_checkpoint(ranks[0])["rng"] == [{"rank": 0}, {"rank": 1}]
        return
    last = tmp_path / "checkpoint-last"
    assert ranks == [str(last)] * 2
    shards = [(last / f"__{rank}_0.distcp").stat().st_size for rank in (0, 1)]
    total = state_bytes(model, optimizer)
    assert sum(shards) > total and min(shards) > total / 4, (shards, total)  # both wrote
    from mae import MAE
    from mae.train.optim import build_optimizer

    reloaded = MAE({**SMALL, "img_size": 16, "patch_size": 4})
    reloaded_optimizer = build_optimizer(reloaded, 1e-3, 0.05)
    extras = sharded.load_sharded(reloaded, reloaded_optimizer, last)
    assert (extras["epoch"], extras["epoch_step"], extras["rng"]) == (1, 2, [{"rank": 0},
                                                                              {"rank": 1}])
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    for saved, loaded in zip(optimizer.state.values(), reloaded_optimizer.state.values(),
                             strict=True):
        assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_deterministic_sets_what_cuda_needs_while_the_run_lasts(tmp_path, monkeypatch, capsys):
    from mae.train import pretrain as pretrain_module

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen, real = [], pretrain_module.train_one_epoch

    def recording(*args, **kwargs):
        cudnn = torch.backends.cudnn
        seen.append((torch.are_deterministic_algorithms_enabled(), cudnn.deterministic,
                     cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain_module, "train_one_epoch", recording)
    for flag, during in (([], (False, False, False, None)),
                         (["--deterministic"], (True, True, False, ":4096:8"))):
        capsys.readouterr()
        assert main(tiny(tmp_path, tmp_path / f"run{len(flag)}", *flag)) == 0
        assert seen.pop() == during
        recipe = next(line for line in capsys.readouterr().out.splitlines()
                      if line.strip().startswith("deterministic"))
        assert ("on: deterministic algorithms" if flag else "off: ") in recipe, recipe
        # as they were after the run
        assert not torch.are_deterministic_algorithms_enabled()
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    assert main(tiny(tmp_path, tmp_path / "bad", "--deterministic")) == 2
    assert one_error_line(capsys) == ("error: --deterministic: CUBLAS_WORKSPACE_CONFIG=:0:0 "
                                      "does not make cuBLAS deterministic; unset it or set "
                                      ":4096:8 or :16:8")


@pytest.mark.gpu
def test_deterministic_resume_on_a_gpu_is_bit_for_bit(tmp_path, monkeypatch):
    """--deterministic --amp bf16 on CUDA: stopped mid-epoch and resumed, the weights are an
    uninterrupted run's, bit for bit (the README's determinism statement)."""
    from mae.checkpoints.files import load_checkpoint

    def run(out, *extra):
        return main(tiny(tmp_path, out, "--device", "cuda", "--amp", "bf16", "--deterministic",
                         "--epochs", "2", *extra))

    assert run(tmp_path / "straight") == 0
    monkeypatch.setenv("MAE_TEST_SIGNAL_AT_STEP", "4")
    assert run(tmp_path / "stopped") == 0
    monkeypatch.delenv("MAE_TEST_SIGNAL_AT_STEP")
    assert load_checkpoint(tmp_path / "stopped" / "checkpoint-last.pth")["epoch_step"] == 2
    assert run(tmp_path / "stopped", "--resume", "auto") == 0
    straight, resumed = (load_checkpoint(tmp_path / name / "checkpoint-1.pth")
                         for name in ("straight", "stopped"))
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key


def test_seed_epoch_streams_stay_distinct_past_1009_ranks():
    from mae.train.engine import seed_epoch

    def streams(epoch, rank):
        seed_epoch(0, epoch, rank)
        return torch.initial_seed(), np.random.random(), random.random()

    drawn = {(epoch, rank): streams(epoch, rank) for epoch in (0, 1) for rank in range(2100)}
    for i in range(3):  # torch's, NumPy's and Python's streams: no two ranks or epochs share
        assert len({values[i] for values in drawn.values()}) == len(drawn), i
    assert drawn[(1, 5)][0] == 1 * 1_009 + 5  # below 1,009 ranks as it always was


def _leave_with_an_agreement_in_flight(rank: int):
    import time

    from mae.train.preemption import StopSignals

    with StopSignals() as stop:
        if rank == 1:
            time.sleep(1.5)  # rank 0 ends its run first, its last agreement still in flight
        stop.after_step(0, may_stop=True)
        work = stop._pending[0]
    return work.is_completed()


def test_a_run_that_ends_waits_for_its_last_stop_agreement():
    assert in_two_processes(_leave_with_an_agreement_in_flight) == [True, True]


def test_compile_wraps_ddp_so_the_all_reduce_overlaps_the_backward():
    """torch.compile(DDP(model)), as PyTorch recommends: dynamo splits the graph at DDP's
    buckets; DDP(torch.compile(model)) would reduce only after the whole compiled backward."""
    from torch.nn.parallel import DistributedDataParallel

    from mae.train import fsdp
    from mae.train.engine import wrap_for_training

    model = trained_small_model()[0]
    args = argparse.Namespace(compile=True, fsdp=False, grad_checkpointing=False)
    fsdp.ensure_process_group(torch.device("cpu"))
    try:
        wrapped = wrap_for_training(model, args, 2, torch.device("cpu"))
        assert isinstance(wrapped._orig_mod, DistributedDataParallel)
        assert wrapped._orig_mod.module is model
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/outside.safetensors"])
def test_an_index_naming_a_file_outside_the_checkpoint_is_refused(tmp_path, name):
    """A crafted HF index, or DCP .metadata, that names a file elsewhere would have the loader
    read any file of the machine as weights."""
    import pickle

    from safetensors.torch import save_file

    from mae.checkpoints import sharded
    from mae.checkpoints.files import load_checkpoint

    hf = tmp_path / "hf"
    hf.mkdir()
    save_file({"w": torch.zeros(1)}, tmp_path / "outside.safetensors")
    (hf / "config.json").write_text(json.dumps({"model_type": "vit_mae"}))
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": name}}))
    with pytest.raises(CheckpointError, match=f"^{hf}: its model.safetensors.index.json names "
                                              f"'{re.escape(name)}', not a file in the "):
        load_checkpoint(hf)
    model, optimizer = trained_small_model()
    path = sharded.save_sharded(model, optimizer, {"epoch": 0, "step": 0}, tmp_path / "dcp")
    metadata = pickle.loads((path / ".metadata").read_bytes())  # our own save: trusted here
    first = next(iter(metadata.storage_data))
    metadata.storage_data[first].relative_path = name
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=f"^{path}: its .metadata names "
                                              f"'{re.escape(name)}', not a file in the "):
        sharded.read_extras(path)


def test_a_directory_fsync_the_file_system_refuses_does_not_stop_the_run(tmp_path, monkeypatch):
    """Some FUSE mounts answer a directory's fsync with EINVAL: the run goes on (the renames
    are as durable as that file system makes them), and checkpoints still land."""
    import errno
    import stat

    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    run = tmp_path / "run"
    assert main(tiny(tmp_path, run, "--fsdp")) == 0  # sharded checkpoints: renamed folders
    assert main(tiny(tmp_path, run / "plain")) == 0  # .pth files: renamed, hard-linked
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-0",
                                                                "checkpoint-last"]
    assert sorted(p.name for p in (run / "plain").glob("checkpoint-*")) == [
        "checkpoint-0.pth", "checkpoint-last.pth"]


def _mae(rank: int, argv: list, signal_at: int | None, parallel_save: bool):
    """`mae` as one of two processes torchrun started: (exit code, stdout)."""
    import contextlib
    import io

    from mae.train import engine

    if parallel_save:
        engine.PARALLEL_SAVE_BYTES = 0
    if signal_at is not None:
        os.environ["MAE_TEST_SIGNAL_AT_STEP"] = str(signal_at)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(argv)
    return code, printed.getvalue()


@pytest.mark.slow
def test_two_processes_stopped_at_the_first_last_and_epoch_end_boundaries_resume_bit_for_bit(
        tmp_path):
    """One run of 2 processes (4 steps an epoch, 2 epochs) stopped three times and resumed
    each time: after the first step at which the ranks can agree, at an epoch's end (a signal
    in its last step), and at the last boundary of an epoch (its save written by both ranks,
    as a large model's is); its weights are then an uninterrupted run's, bit for bit."""
    from mae.checkpoints.files import load_checkpoint

    def run(out, signal_at=None, parallel_save=False, *extra):
        argv = tiny(tmp_path, out, "--dataset-size", "32", "--epochs", "2", "--save-every",
                    "1", *extra)
        ranks = in_two_processes(_mae, argv, signal_at, parallel_save, group=False)
        assert all(isinstance(r, tuple) and r[0] == 0 for r in ranks), ranks
        return ranks[0][1].splitlines()[-1]

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(straight)
    # the agreement is asynchronous: the ranks stop one step after rank 0 saw the signal
    for signal_at, parallel_save, epoch, step, saved in (
            (0, False, 0, 2, "checkpoint-last.pth"),  # the first boundary
            (3, False, 0, 4, "checkpoint-last.pth"),  # the epoch's last step: at its end
            (5, True, 1, 3, "checkpoint-last")):  # the last boundary, saved by both ranks
        resume = ["--resume", "auto"] if signal_at else []
        line = run(stopped, signal_at, parallel_save, *resume)
        assert line == (f"stopped by SIGTERM at epoch {epoch} step {step}; saved "
                        f"{stopped / saved}; resume with --resume auto"), line
    assert sorted(p.name for p in (stopped / "checkpoint-last").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pth"]
    run(stopped, None, False, "--resume", "auto")
    assert sorted(p.name for p in stopped.glob("checkpoint-*")) == [
        "checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-last.pth"]
    for name in ("checkpoint-0.pth", "checkpoint-1.pth"):
        a, b = (load_checkpoint(run_dir / name) for run_dir in (straight, stopped))
        assert a["step"] == b["step"]
        for key, value in a["model"].items():
            assert torch.equal(b["model"][key], value), (name, key)
        for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                          strict=True):
            assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    losses = [[(r["step"], r["loss"]) for r in map(json.loads, open(d / "log.jsonl"))
               if r["kind"] == "step"] for d in (straight, stopped)]
    assert losses[0] == losses[1] and len(losses[0]) == 4


@pytest.mark.slow
def test_fsdp_on_two_processes_stops_mid_epoch_and_resumes_bit_for_bit(tmp_path):
    from mae.checkpoints.files import load_checkpoint

    def run(out, signal_at=None, *extra):
        argv = tiny(tmp_path, out, "--dataset-size", "32", "--epochs", "2", "--fsdp", *extra)
        ranks = in_two_processes(_mae, argv, signal_at, False, group=False)
        assert all(isinstance(r, tuple) and r[0] == 0 for r in ranks), ranks
        return ranks[0][1].splitlines()[-1]

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(straight)
    assert run(stopped, 4) == (f"stopped by SIGTERM at epoch 1 step 2; saved "
                               f"{stopped / 'checkpoint-last'}; resume with --resume auto")
    assert sorted(p.name for p in (stopped / "checkpoint-last").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]
    run(stopped, None, "--resume", "auto")
    a, b = (load_checkpoint(d / "checkpoint-1") for d in (straight, stopped))  # consolidated
    assert a["step"] == b["step"] == 8
    for key, value in a["model"].items():
        assert torch.equal(b["model"][key], value), key


@pytest.mark.slow
@pytest.mark.parametrize("wrap", [["--fsdp"], []], ids=["fsdp", "ddp"])
def test_compile_trains_on_two_processes(tmp_path, wrap):
    """--compile on two CPU processes: under --fsdp each block compiled, then sharded; under DDP
    the DDP-wrapped model compiled (the mae_kernels ops compile with them); an epoch trains to
    the uncompiled run's losses."""
    def losses(out, *extra):
        argv = tiny(tmp_path, out, "--dataset-size", "32", *wrap, *extra)
        ranks = in_two_processes(_mae, argv, None, False, group=False, timeout=900)
        assert all(isinstance(r, tuple) and r[0] == 0 for r in ranks), ranks
        return [r["loss"] for r in map(json.loads, open(out / "log.jsonl"))
                if r["kind"] == "step"]

    eager = losses(tmp_path / "eager")
    compiled = losses(tmp_path / "compiled", "--compile")
    assert len(compiled) == len(eager) == 2
    # the whole compiled model draws its masks from inductor's generator, not eager's: other
    # masks of the same images (the blocks alone compile under --fsdp: the same masks)
    close = dict(rtol=1e-4, atol=1e-5) if wrap else dict(rtol=0.05, atol=0)
    torch.testing.assert_close(compiled, eager, **close)


def test_a_resumed_run_purges_what_a_killed_one_logged_and_keeps_its_wandb_run(tmp_path,
                                                                              monkeypatch):
    """Killed after epoch 1 logged its steps, before it saved: TensorBoard drops those points
    on the resume (purge_step), as log.jsonl does; W&B continues the run the checkpoint
    names."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mae.train import pretrain as pretrain_module
    from mae.train import tracking

    real_save = pretrain_module.save_epoch

    def killed_saving_epoch_one(args, model, optimizer, scaler, epoch, *rest):
        if epoch == 1:
            raise KeyboardInterrupt
        real_save(args, model, optimizer, scaler, epoch, *rest)

    run, events = tmp_path / "run", tmp_path / "tb"
    argv = tiny(tmp_path, run, "--epochs", "2", "--log-dir", str(events))
    monkeypatch.setattr(pretrain_module, "save_epoch", killed_saving_epoch_one)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    monkeypatch.setattr(pretrain_module, "save_epoch", real_save)
    tracking.close_all()
    assert main([*argv, "--resume", "auto"]) == 0
    acc = EventAccumulator(str(events))
    acc.Reload()
    # 4 steps an epoch, a point every 2: epoch 1's points once, from the resumed run
    assert [s.step for s in acc.Scalars("train_loss")] == [250, 750, 1250, 1750]
    assert [s.step for s in acc.Scalars("epoch_loss")] == [1000, 2000]

    started = []

    class Run:
        id = "run-from-the-checkpoint"

        def define_metric(self, *args, **kwargs):
            pass

    fake = type("wandb", (), {"init": staticmethod(lambda **kw: started.append(kw) or Run())})
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(tracking, "wandb_mode", lambda: ("offline", None))
    args = argparse.Namespace(output_dir=str(tmp_path), wandb="mae")
    sink = tracking.WandbSink("mae", args)
    sink.continue_from(1001, {"wandb": "mae", "wandb_run_id": "run-from-the-checkpoint"})
    sink._start()
    assert (started[0]["id"], started[0]["resume"]) == ("run-from-the-checkpoint", "allow")
    assert args.wandb_run_id == "run-from-the-checkpoint"  # saved with the next checkpoint


def test_finetune_stops_without_evaluating_and_eval_resume_auto_finds_it(tmp_path, capsys,
                                                                          monkeypatch):
    """A stop signal in the epoch's last step: the epoch saves checkpoint-last without its
    evaluation; `--eval --resume auto` then scores that checkpoint."""
    pytest.importorskip("timm", reason="the [finetune] extra (timm, torchvision) is not installed")
    run = tmp_path / "run"
    argv = ["finetune", "--model", "vit_tiny_patch16", "--input-size", "16", "--patch-size", "4",
            "--batch-size", "8", "--dataset-size", "16", "--val-size", "8", "--num-workers",
            "0", "--epochs", "2", "--quiet", "--device", "cpu", "--output-dir", str(run)]
    monkeypatch.setenv("MAE_TEST_SIGNAL_AT_STEP", "1")  # the last of 2 steps
    assert main(argv) == 0
    monkeypatch.delenv("MAE_TEST_SIGNAL_AT_STEP")
    out = capsys.readouterr().out.splitlines()
    assert out[-2].endswith("stopping: no evaluation, checkpoint-last alone"), out
    assert out[-1].startswith("stopped by SIGTERM at epoch 0 step 2; saved ")
    epoch = [json.loads(line) for line in open(run / "log.jsonl")][-1]
    assert epoch["kind"] == "epoch" and "val_top1" not in epoch
    assert main([*argv, "--eval", "--resume", "auto"]) == 0
    scored = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert scored["checkpoint"] == str(run / "checkpoint-last.pth") and scored["images"] == 8
