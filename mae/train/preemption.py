"""Stopping a training run cleanly: on SIGTERM, SIGUSR1 (what SLURM sends before a time limit
with `--signal=USR1@<seconds>`, or before a preemption) and SIGINT, every rank finishes its
current step, the ranks agree, checkpoint-last is saved at that step (`engine.save_stopped`:
rank 0's .pth, or every rank's share of a large or sharded model) and the run exits
with one line: 0 after SIGTERM/SIGUSR1 (a requeue wrapper can tell a clean stop), 130 after
SIGINT (the shell's convention), no traceback. A second SIGINT stops at once, without saving.

The handler only records the signal. The ranks agree without a blocking collective per step:
after each step (micro-batch) every rank starts an asynchronous all-reduce (max) of its signal
number on a CPU tensor (gloo; under NCCL the process group has a gloo side for CPU tensors, see
`distributed.init`) and reads the result of the previous one, so they all stop after the same
step: the first optimizer step at least one step after the first rank saw a signal. A single
process needs no collective.

`--requeue`: after a stop by SIGUSR1 (the time-limit warning the sbatch script asks for) in a
SLURM job (SLURM_JOB_ID set), global rank 0 prints the stop line, then runs `scontrol requeue
$SLURM_JOB_ID` (so the job starts again and continues with `--resume auto`) and prints a line
saying how it went. SIGTERM is not requeued: it is what `scancel`
sends, and a preemption SLURM sends it for is requeued by SLURM itself where the partition
says so.

For tests only: MAE_TEST_SIGNAL_AT_STEP=N makes rank 0 send itself MAE_TEST_SIGNAL (TERM by
default, or USR1 or INT) after global step N, through the real signal path.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
TEST_STEP_VARIABLE = "MAE_TEST_SIGNAL_AT_STEP"
TEST_SIGNAL_VARIABLE = "MAE_TEST_SIGNAL"


class Preempted(Exception):
    """A run stopped by a signal after `step` steps of `epoch` (every rank raises it); `path`
    is the checkpoint rank 0 wrote. `mae` prints `line()` and exits with `exit_code`."""

    def __init__(self, signum: int, epoch: int, step: int, steps_per_epoch: int,
                 rng_states=None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.epoch, self.step = signum, epoch, step
        self.steps_per_epoch = steps_per_epoch
        self.rng_states = rng_states  # every rank's random streams, for a mid-epoch save
        self.path: Path | None = None

    @property
    def exit_code(self) -> int:
        return 128 + signal.SIGINT if self.signum == signal.SIGINT else 0

    def line(self) -> str:
        return (f"stopped by {signal.Signals(self.signum).name} at epoch {self.epoch} step "
                f"{self.step}; saved {self.path}; resume with --resume auto")


class Interrupted(KeyboardInterrupt):
    """A second SIGINT: the run stops at once, without saving."""


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """A DataLoader worker's `worker_init_fn`: the main process owns the stop and shuts its
    workers down; a worker killed by a terminal's SIGINT (sent to the whole process group)
    would break the step the main process is finishing."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


_active = None


def active():
    """The installed StopSignals (`mae pretrain` and `mae finetune` install them), or None."""
    return _active


class StopSignals:
    """Records SIGTERM/SIGUSR1/SIGINT while installed (a context manager) and tells every rank
    the same step to stop at."""

    def __init__(self):
        self.signum = 0
        self._pending = None  # (work, tensor) of the agreement in flight
        self._agreed = False  # the ranks agreed to stop at the next step that may
        self._previous = {}
        at = os.environ.get(TEST_STEP_VARIABLE)
        self._test_step = int(at) if at else None
        self._test_signal = signal.Signals["SIG" + os.environ.get(TEST_SIGNAL_VARIABLE, "TERM")]

    def __enter__(self):
        global _active
        if threading.current_thread() is threading.main_thread():  # where Python runs handlers
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
            _active = self
        return self

    def __exit__(self, kind, *exc):
        global _active
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self._pending is not None and kind is None:
            # the last step's agreement: in flight still when a run ends, and every rank
            # started it; the group must not be torn down under it
            self._pending[0].wait()
        self._pending = None
        if _active is self:
            _active = None

    def _record(self, signum, _frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise Interrupted  # a second Ctrl-C: the user will not wait for the step
        self.signum = self.signum or signum

    def after_step(self, iteration: int, may_stop: bool) -> bool:
        """Called by every rank after each step (micro-batch; global step `iteration`):
        whether the ranks agreed to stop now. The agreement advances at every step (the
        all-reduce started after one step is read after the next), and the run stops at the
        first step that `may_stop` (after an optimizer step, not the epoch's last) once they
        agreed: with --accum-iter N, at most N + 1 micro-batches after the signal, where
        agreeing at boundaries only took up to 2N."""
        if self._test_step == iteration and not (dist.is_initialized() and dist.get_rank()):
            os.kill(os.getpid(), self._test_signal)
        if not _several_processes():
            return may_stop and self.signum != 0
        if not self._agreed:
            self._agreed = self._collect()
            if not self._agreed:
                flag = torch.tensor([self.signum], dtype=torch.int64)
                self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True),
                                 flag)
        return may_stop and self._agreed

    def agree(self) -> bool:
        """Blocking agreement (between epochs): whether any rank saw a signal by now."""
        if not _several_processes():
            return self.signum != 0
        if self._agreed or self._collect():
            return True
        flag = torch.tensor([self.signum], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return self._adopt(int(flag))

    def _collect(self) -> bool:
        if self._pending is None:
            return False
        work, flag = self._pending
        self._pending = None
        work.wait()
        return self._adopt(int(flag))

    def _adopt(self, signum: int) -> bool:
        # every rank reports the same signal: the one the reduction chose
        if signum:
            self.signum = signum
        return signum != 0


def _several_processes() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def requeue(args, stopped: Preempted) -> str | None:
    """`scontrol requeue` of this SLURM job, when asked (`--requeue`) and the stop was the
    time-limit warning (SIGUSR1); only global rank 0 asks. Returns the line saying how it went
    (None when not asked). Call it after printing the stop line: the requeue has SLURM signal
    the job's tasks, and with the handlers restored that signal may end this one at once."""
    job = os.environ.get("SLURM_JOB_ID")
    if not getattr(args, "requeue", False) or stopped.signum != signal.SIGUSR1:
        return None
    if not job:
        return "--requeue: not a SLURM job (no SLURM_JOB_ID), not requeued"
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return "--requeue: scontrol is not on PATH, not requeued"
    result = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True)
    if result.returncode:
        problem = (result.stderr or result.stdout).strip().splitlines()
        return (f"scontrol requeue {job} failed ({result.returncode}: "
                f"{problem[-1] if problem else 'no message'})")
    return f"requeued SLURM job {job}"
