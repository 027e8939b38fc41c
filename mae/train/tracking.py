"""Where a run's log records go besides log.jsonl: TensorBoard event files (`--log-dir`, as
facebookresearch/mae's main_pretrain.py writes them) and Weights & Biases (`--wandb PROJECT`).

Both take the records `JsonLog.write` takes. A step record becomes `train_loss`, `lr`,
`images_per_sec` and `data_wait_ms` at the official x-axis, epoch_1000x = int((step in epoch /
steps per epoch + epoch) * 1000); an epoch record becomes its numbers (`epoch_loss`,
`epoch_data_wait_ms`, `probe_top1`, `val_top1`, ...) at (epoch + 1) * 1000, the end of that
epoch on the same axis. Both packages are optional
(the `logging` extra); a flag whose package is missing is an error before the run starts.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import netrc
import os
import socket
import urllib.parse
from pathlib import Path

PACKAGES = {"log_dir": ("--log-dir", "tensorboard"), "wandb": ("--wandb", "wandb")}
STEP_TAGS = {"loss": "train_loss", "lr": "lr", "images_per_sec": "images_per_sec",
             "data_wait_ms": "data_wait_ms"}
_OPEN: list = []  # sinks of runs in this process, closed by close_all


def missing_package(args) -> str | None:
    """The error for a logging flag whose package is not installed, or None."""
    for dest, (flag, package) in PACKAGES.items():
        if getattr(args, dest, None) and importlib.util.find_spec(package) is None:
            return (f"{flag} needs the {package} package, which is not installed: pip install "
                    f"{package} (or the extra: pip install -e \".[logging]\")")
    return None


def scalars(record: dict):
    """(tag, value, x) of each number a log record holds, on the epoch_1000x axis."""
    kind = record.get("kind")
    if kind == "step":
        x = record["epoch_1000x"]
        for key, tag in STEP_TAGS.items():
            if isinstance(record.get(key), (int, float)):
                yield tag, record[key], x
    elif kind == "epoch":
        x = (record["epoch"] + 1) * 1000
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                # the step records' names get a prefix: a tag holds one series on one axis
                yield (f"epoch_{key}" if key in STEP_TAGS else key), value, x


class TensorBoardSink:
    """Event files in `log_dir`, opened at the first record (a run that fails before it has
    anything to log makes no folder). A resumed run's writer purges the points a killed run
    left from its `continue_from` on (TensorBoard's purge_step), as log.jsonl drops them."""

    def __init__(self, log_dir):
        self.log_dir, self.writer, self.purge_step = log_dir, None, None

    def continue_from(self, x: int, saved_args: dict) -> None:
        self.purge_step = x

    def write(self, record: dict) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=self.purge_step)
        for tag, value, x in scalars(record):
            self.writer.add_scalar(tag, value, x)
        if record.get("kind") == "epoch":
            self.writer.flush()  # an epoch's numbers are on disk when it ends

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _wandb_key_known() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _wandb_reachable(timeout: float = 1.5) -> bool:
    """Whether a TCP connection to the W&B server (WANDB_BASE_URL's host) opens in `timeout`."""
    url = urllib.parse.urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


def wandb_mode() -> tuple[str | None, str | None]:
    """(wandb.init's mode, why offline): WANDB_MODE's choice where set (None: wandb reads it);
    else offline without an API key or when the server does not answer within 1.5 s (a
    compute node without internet), so a run never waits on a login prompt or a timeout."""
    if os.environ.get("WANDB_MODE"):
        return None, None
    if not _wandb_key_known():
        return "offline", "no W&B API key"
    if not _wandb_reachable():
        return "offline", "the W&B server is not reachable"
    return None, None


class WandbSink:
    """A W&B run, started at the first record; offline (synced later with `wandb sync`) as
    `wandb_mode` decides. Its id is kept in the run's arguments, so in its checkpoints: a run
    resumed from them (a requeued job) continues the same W&B run."""

    def __init__(self, project: str, args):
        self.project, self.args, self.run = project, args, None

    def continue_from(self, x: int, saved_args: dict) -> None:
        if saved_args.get("wandb") == self.project and saved_args.get("wandb_run_id"):
            self.args.wandb_run_id = saved_args["wandb_run_id"]

    def _start(self) -> None:
        import wandb

        args = self.args
        mode, why = wandb_mode()
        if why:
            print(f"--wandb: {why}, logging offline (upload later with `wandb sync`)")
        directory = os.environ.get("WANDB_DIR") or str(args.output_dir)
        Path(directory).mkdir(parents=True, exist_ok=True)
        config = json.loads(json.dumps(vars(args), default=str))
        run_id = getattr(args, "wandb_run_id", None)
        self.run = wandb.init(project=self.project, dir=directory, config=config, mode=mode,
                              reinit="finish_previous", id=run_id,
                              resume="allow" if run_id else None)
        args.wandb_run_id = self.run.id
        self.run.define_metric("epoch_1000x")
        self.run.define_metric("*", step_metric="epoch_1000x")

    def write(self, record: dict) -> None:
        values = list(scalars(record))
        if values:
            if self.run is None:
                self._start()
            self.run.log({"epoch_1000x": values[0][2], **{t: v for t, v, _ in values}})

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def open_sinks(args) -> list:
    """The sinks `args` asks for (`--log-dir`, `--wandb`), registered for close_all."""
    sinks = []
    if getattr(args, "log_dir", None):
        sinks.append(TensorBoardSink(args.log_dir))
    if getattr(args, "wandb", None):
        sinks.append(WandbSink(args.wandb, args))
    _OPEN.extend(sinks)
    return sinks


def close_all(keep: int = 0) -> None:
    """Closes the open sinks, all but the first `keep` (those of an enclosing run)."""
    while len(_OPEN) > keep:
        _OPEN.pop().close()


def closes_sinks(run):
    """`run` (pretrain, finetune) closing the sinks it opens when it returns or raises, so a
    caller that runs it from Python (twice, or in a notebook) leaks no writer or W&B run."""
    @functools.wraps(run)
    def wrapper(*args, **kwargs):
        keep = len(_OPEN)
        try:
            return run(*args, **kwargs)
        finally:
            close_all(keep)
    return wrapper
