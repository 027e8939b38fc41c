"""Stopping on SIGTERM/SIGUSR1/SIGINT and continuing mid-epoch bit for bit (one process here; two
in tests/test_cluster.py), the requeue under SLURM, no DataLoader worker left behind,
checkpoints ordered by the step they hold, and process groups formed from SLURM's variables
(srun, no torchrun)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mae.checkpoints import files as ckpt
from mae.cli import main
from mae.train import distributed, preemption
from mae.train.engine import JsonLog

SMALL = {"encoder_dim": 32, "encoder_layers": 1, "encoder_heads": 2, "decoder_dim": 32,
         "decoder_layers": 1, "decoder_heads": 2}
REPO = str(Path(__file__).resolve().parents[1])  # the subprocesses import this checkout
STOP_LINE = "stopped by {} at epoch {} step {}; saved {}; resume with --resume auto"


def tiny(tmp_path, out, *extra):
    """A 2-epoch pre-training of a one-block MAE at 16px: 4 steps an epoch in one process."""
    config = tmp_path / "small.json"
    config.write_text(json.dumps(SMALL))
    return ["pretrain", "--config", str(config), "--input-size", "16", "--patch-size", "4",
            "--batch-size", "8", "--dataset-size", "32", "--num-workers", "0", "--log-every",
            "3", "--blr", "1e-3", "--warmup-epochs", "1", "--epochs", "2", "--quiet",
            "--device", "cpu", "--output-dir", str(out), *extra]


def assert_same_weights(a, b):
    a, b = ckpt.load_checkpoint(a), ckpt.load_checkpoint(b)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert len(a["optimizer"]["state"]) == len(b["optimizer"]["state"]) > 0
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["step"] == b["step"]


def records(out, kind):
    lines = (out / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


def env_for_subprocess(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    return env


@pytest.mark.slow
def test_sigint_in_one_process_saves_the_step_and_resumes_bit_for_bit(tmp_path, monkeypatch,
                                                                       capsys):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(tiny(tmp_path, straight)) == 0
    monkeypatch.setenv("MAE_TEST_SIGNAL_AT_STEP", "5")  # epoch 1, after its second step
    monkeypatch.setenv("MAE_TEST_SIGNAL", "INT")
    capsys.readouterr()
    assert main(tiny(tmp_path, stopped)) == 130
    out, err = capsys.readouterr()
    last = stopped / "checkpoint-last.pth"
    assert out.splitlines()[-1] == STOP_LINE.format("SIGINT", 1, 2, last), out
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    state = ckpt.load_checkpoint(last)
    assert (state["epoch"], state["epoch_step"], state["step"]) == (1, 2, 6)
    assert {"torch", "python", "numpy"} <= set(state["rng"][0])
    monkeypatch.delenv("MAE_TEST_SIGNAL_AT_STEP")
    assert main(tiny(tmp_path, stopped, "--resume", "auto")) == 0
    assert_same_weights(straight / "checkpoint-1.pth", stopped / "checkpoint-1.pth")
    # the log holds each record once, with the uninterrupted run's losses (a log window and
    # the epoch's mean span the stop: their sums were saved with the step)
    for kind, key in (("step", "step"), ("epoch", "epoch")):
        assert [(r[key], r["loss"]) for r in records(stopped, kind)] == \
            [(r[key], r["loss"]) for r in records(straight, kind)], kind


@pytest.mark.slow
def test_sigusr1_requeues_the_slurm_job_and_sigterm_does_not(tmp_path, monkeypatch, capsys):
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol-calls"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("MAE_TEST_SIGNAL_AT_STEP", "1")
    printed_before, real_requeue = [], preemption.requeue  # printed when it asked for it

    def requeue_after_the_stop_line(args, stopped):
        printed_before.append(capsys.readouterr().out.splitlines())
        return real_requeue(args, stopped)

    monkeypatch.setattr(preemption, "requeue", requeue_after_the_stop_line)
    for signal_name, run in (("TERM", "term"), ("USR1", "usr1")):
        monkeypatch.setenv("MAE_TEST_SIGNAL", signal_name)
        capsys.readouterr()
        printed_before.clear()
        assert main(tiny(tmp_path, tmp_path / run, "--requeue")) == 0
        # the stop line is out (flushed) before scontrol runs: SLURM then signals the task
        line = printed_before[0][-1]
        assert line.startswith(f"stopped by SIG{signal_name} at epoch 0 step 2; "), line
        after = capsys.readouterr().out.splitlines()
        assert after == (["requeued SLURM job 4242"] if signal_name == "USR1" else []), after
    assert calls.read_text().splitlines() == ["requeue 4242"]  # once: for SIGUSR1


def test_checkpoints_are_ordered_by_the_epoch_and_step_they_hold(tmp_path):
    def save(name, epoch, epoch_step=None):
        state = {"epoch": epoch} | ({} if epoch_step is None else {"epoch_step": epoch_step,
                                                                 "steps_per_epoch": 4})
        torch.save(state, tmp_path / name)

    save("checkpoint-2.pth", 2, 4)
    save("checkpoint-3.pth", 3)  # an older file: no step, a complete epoch
    save("checkpoint-last.pth", 4, 1)  # stopped mid-epoch 4, after epoch 3's checkpoint
    names = [p.name for p in ckpt.checkpoints_newest_first(tmp_path)]
    assert names == ["checkpoint-last.pth", "checkpoint-3.pth", "checkpoint-2.pth"]
    save("checkpoint-last.pth", 3, 2)  # mid-epoch 3: older than epoch 3's end
    names = [p.name for p in ckpt.checkpoints_newest_first(tmp_path)]
    assert names == ["checkpoint-3.pth", "checkpoint-last.pth", "checkpoint-2.pth"]
    save("checkpoint-last.pth", 2, 4)  # the same as checkpoint-2: the rolling one first
    (tmp_path / "checkpoint-3.pth").write_bytes(b"")  # unreadable: by its name
    names = [p.name for p in ckpt.checkpoints_newest_first(tmp_path)]
    assert names == ["checkpoint-3.pth", "checkpoint-last.pth", "checkpoint-2.pth"]


def test_the_log_forgets_what_follows_the_step_a_run_resumes_at(tmp_path):
    log = JsonLog(tmp_path / "log.jsonl")
    for epoch, steps in ((0, range(0, 4)), (1, range(4, 8))):
        for step in steps:
            log.write(kind="step", epoch=epoch, step=step)
        log.write(kind="epoch", epoch=epoch)
    log.drop_from(1, 6)  # resumed in epoch 1 after 2 of its steps
    kept = [(r["kind"], r.get("step")) for r in map(json.loads, log.path.read_text().splitlines())]
    assert kept == [("step", 0), ("step", 1), ("step", 2), ("step", 3), ("epoch", None),
                    ("step", 4), ("step", 5)]


def process_group(pgid: int) -> list[int]:
    """The live processes of process group `pgid` (a session the test started, and the
    DataLoader workers its leader forked)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append(int(entry))
    return found


@pytest.mark.slow
def test_sigterm_exits_0_and_leaves_no_dataloader_worker(tmp_path):
    out = tmp_path / "run"
    argv = tiny(tmp_path, out, "--num-workers", "2", "--epochs", "3")
    env = env_for_subprocess(MAE_TEST_SIGNAL_AT_STEP="6")
    proc = subprocess.Popen([sys.executable, "-m", "mae.cli", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its workers share its process group
    most = 0
    while proc.poll() is None:
        most = max(most, len(process_group(proc.pid)))
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    left = process_group(proc.pid)
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.splitlines()[-1] == STOP_LINE.format(
        "SIGTERM", 1, 3, out / "checkpoint-last.pth"), stdout
    assert most >= 3, most  # the main process and its 2 workers ran
    assert left == [], left


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_slurm_tasks(tmp_path_factory):
    """An uninterrupted 2-process run whose group comes from SLURM's variables alone, as
    `srun --ntasks=2` sets them (no torchrun, no RANK/WORLD_SIZE/MASTER_ADDR)."""
    tmp_path = tmp_path_factory.mktemp("slurm")
    out = tmp_path / "run"
    argv = tiny(tmp_path, out, "--dataset-size", "64")
    base = {k: v for k, v in env_for_subprocess().items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    base.update(SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_JOB_NUM_NODES="1",
                SLURM_STEP_NUM_NODES="1", SLURM_JOB_ID="777",
                SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(free_port()))
    procs = [subprocess.Popen([sys.executable, "-m", "mae.cli", *argv],
                              env={**base, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    return tmp_path, out, results


@pytest.mark.slow
def test_slurm_variables_form_the_group_and_train(two_slurm_tasks):
    _, out, results = two_slurm_tasks
    for code, _, stderr in results:
        assert code == 0, stderr[-3000:]
    assert "2 process(es) on cpu" in results[0][1]
    # 64 images, 2 processes x batch 8: 4 steps an epoch each, rank 0 alone writes
    assert ckpt.load_checkpoint(out / "checkpoint-1.pth")["step"] == 8
    assert [r["epoch"] for r in records(out, "epoch")] == [0, 1]


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("gpu-a[1-2],gpu-b3", ["gpu-a1", "gpu-a2", "gpu-b3"]),
    ("r[1-2]n[8-9]", ["r1n8", "r1n9", "r2n8", "r2n9"]),
    ("c[098-101]-ib", ["c098-ib", "c099-ib", "c100-ib", "c101-ib"]),
    ("login", ["login"]),
])
def test_nodelists_expand_as_slurm_writes_them(nodelist, hosts):
    assert distributed.expand_hostnames(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["node[01-04", "node]1[", "node[a-b]", ""])
def test_a_bad_nodelist_is_a_clear_error(nodelist):
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        distributed.expand_hostnames(nodelist)


def test_slurm_environment_fills_what_torchrun_would_set(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol: our own expansion
    slurm = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16",
             "SLURM_LOCALID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_STEP_NUM_NODES": "2",
             "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}
    env = distributed.slurm_environment(slurm)
    port = int(env.pop("MASTER_PORT"))
    assert env == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
                   "MASTER_ADDR": "gpu07"}
    # every task of a job derives the same port, below the ephemeral ports; other jobs others
    assert 20000 <= port <= 32767
    assert port == int(distributed.slurm_environment(dict(slurm, SLURM_PROCID="0"))
                       ["MASTER_PORT"])
    others = {distributed.slurm_environment(dict(slurm, SLURM_JOB_ID=str(j)))["MASTER_PORT"]
              for j in range(10)}
    assert len(others) > 5
    # torchrun's variables (or a MASTER_PORT the user set) take precedence; one task is no group
    assert distributed.slurm_environment({**slurm, "WORLD_SIZE": "2"}) == {}
    assert distributed.slurm_environment({**slurm, "MASTER_PORT": "1234"}).get("MASTER_PORT") \
        is None
    assert distributed.slurm_environment({**slurm, "SLURM_STEP_NUM_TASKS": "1"}) == {}


def test_mae_started_in_the_batch_script_without_srun_is_one_process():
    # the batch step has the allocation's SLURM_NTASKS, but no srun step: no group to wait for
    batch_step = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2",
                  "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}
    assert distributed.slurm_environment(batch_step) == {}


@pytest.mark.parametrize("missing", ["SLURM_JOB_NODELIST", "SLURM_JOB_ID"])
def test_a_missing_slurm_variable_is_a_clear_error(tmp_path, monkeypatch, missing):
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol
    step = {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NODELIST": "gpu07",
            "SLURM_JOB_ID": "123456"}
    del step[missing]
    with pytest.raises(ValueError, match=missing):
        distributed.slurm_environment(step)


def test_first_host_asks_scontrol_when_there_is_one(tmp_path, monkeypatch):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\n[ \"$1 $2\" = \"show hostnames\" ] && echo from-scontrol "
                        "&& echo other\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert distributed.first_host("weird[1-2]") == "from-scontrol"


def test_sigterm_stops_finetune_mid_epoch_and_it_resumes_bit_for_bit(tmp_path, monkeypatch,
                                                                     capsys):
    """Mixup, cutmix, RandAugment, random erasing and drop path draw from the streams the stop
    saved (one process, no workers: the transforms run in it)."""
    pytest.importorskip("timm", reason="the [finetune] extra (timm, torchvision) is not installed")
    argv = ["finetune", "--model", "vit_tiny_patch16", "--input-size", "16", "--patch-size",
            "4", "--batch-size", "8", "--dataset-size", "32", "--val-size", "8",
            "--num-workers", "0", "--epochs", "2", "--warmup-epochs", "1", "--mixup", "0.8",
            "--cutmix", "1.0", "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--quiet",
            "--device", "cpu"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main([*argv, "--output-dir", str(straight)]) == 0
    monkeypatch.setenv("MAE_TEST_SIGNAL_AT_STEP", "4")
    capsys.readouterr()
    assert main([*argv, "--output-dir", str(stopped)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == STOP_LINE.format(
        "SIGTERM", 1, 1, stopped / "checkpoint-last.pth")
    monkeypatch.delenv("MAE_TEST_SIGNAL_AT_STEP")
    assert main([*argv, "--output-dir", str(stopped), "--resume", "auto"]) == 0
    assert_same_weights(straight / "checkpoint-1.pth", stopped / "checkpoint-1.pth")


def test_a_second_sigint_stops_at_once_without_saving(tmp_path, monkeypatch, capsys):
    from mae.train import pretrain as pretrain_module

    def interrupted_twice(args):
        os.kill(os.getpid(), signal.SIGINT)  # recorded: the step would finish and save
        os.kill(os.getpid(), signal.SIGINT)  # the user does not wait
        raise AssertionError("the second SIGINT did not stop the run")

    monkeypatch.setattr(pretrain_module, "pretrain", interrupted_twice)
    assert main(tiny(tmp_path, tmp_path / "run")) == 130
    err = capsys.readouterr().err
    assert err.startswith("error: interrupted by a second SIGINT") and err.count("\n") == 1, err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_with_accumulation_the_ranks_stop_at_the_first_boundary_after_agreeing(monkeypatch):
    """The agreement runs at every micro-batch, not only at accumulation boundaries: a signal
    seen during micro-batch 5 with --accum-iter 4 stops the run after micro-batch 7 (agreed
    after 6), where agreeing at boundaries only stopped it after 11. The all-reduce is stood in
    for by one rank's own flag (the max over one rank)."""
    from mae.train import preemption

    class Done:
        def wait(self):
            pass

    started = []
    monkeypatch.setattr(preemption, "_several_processes", lambda: True)
    monkeypatch.setattr(preemption.dist, "all_reduce",
                        lambda flag, op, async_op: started.append(int(flag)) or Done())
    stop = preemption.StopSignals()
    accum = 4
    for step in range(16):
        if step == 5:
            stop.signum = signal.SIGUSR1  # as the handler records it
        if stop.after_step(step, may_stop=(step + 1) % accum == 0):
            break
    assert step == 7 and stop.signum == signal.SIGUSR1
    assert started == [0] * 5 + [int(signal.SIGUSR1)]  # one agreement per micro-batch
    assert stop.agree()  # between epochs too, without another collective
