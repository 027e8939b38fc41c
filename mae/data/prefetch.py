"""Batches prepared ahead of the step that takes them: the data is ready before the step asks.

A loader thread takes each batch the DataLoader yields (its workers read and decode), prepares
it (`prepare(batch, labels, epoch, step)`: the gpu loader's decode and crop; without one, the
copy to the device) and queues it, up to `depth` batches ahead of the training thread. On CUDA
the loader thread works on a stream of its own: each batch is handed over with an event the
training stream waits for, and its tensors are recorded on the training stream
(`record_stream`), so the caching allocator does not reuse them while the step reads them. The
training thread performs no host synchronisation for data: it takes a ready batch from a queue.

`wait_s` sums the seconds the training thread waited for its batches: the loader's share of a
step, zero when the data is hidden behind the step.

With `group` (training under several processes: a gloo group that only this thread uses,
`mae.train.distributed.data_group`) the loader thread also settles with the other ranks, ahead
of the step, whether every rank has a batch: a rank whose batch had no readable image makes
every rank skip that step (the others' images are counted as skipped), so the ranks'
collectives stay paired.

A DataLoader with `num_workers=0` runs its data set in the training thread, as PyTorch defines
it, and so does this: such a data set may draw from the process's global random streams (timm's
augmentation), which a resumed run restores in the order the training thread draws them.
`depth=0` also prepares each batch in the training thread, when the step asks for it.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import queue
import threading
import time
import warnings
from typing import NamedTuple

import torch

DEFAULT_DEPTH = 2


class Batch(NamedTuple):
    images: torch.Tensor | None
    labels: torch.Tensor | None
    skipped: int  # files of this batch that could not be read (or left out by agreement)


class _Ready(NamedTuple):
    batch: Batch
    event: torch.cuda.Event | None


_END = object()
_CLOSED = object()  # a rank's loader thread is closing: every rank's stops
CLOSE_WAIT_S = 60
PEER_STOPPED = ("another process's data loader stopped (its error, or its stop, ends this run "
                "too)")


class _Failed(NamedTuple):
    error: BaseException


class Prefetcher:
    """An iterator of `Batch`es on `device` over `loader` (which yields (batch, labels,
    skipped)), steps numbered from `first` in `epoch`; see the module doc. Close it (or use it
    as a context manager) to stop its thread and the loader's workers early.

    With a `group`, the loader threads of all the ranks agree once per batch, in batch order:
    whether any rank's batch is empty (every rank then skips that step) and whether any rank is
    closing. The first round in which one votes closing ends every rank's thread, after the
    same round: a thread closed mid-epoch votes once more (never past the epoch's `len(loader)`
    rounds), so no rank's thread is left waiting in a round the others never join."""

    def __init__(self, loader, device, prepare=None, *, epoch: int = 0, first: int = 0,
                 depth: int = DEFAULT_DEPTH, group=None):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.prepare, self.epoch = prepare, epoch
        if getattr(loader, "num_workers", 1) == 0:
            depth = 0  # the data set runs in this thread (see the module doc)
        self.depth = depth
        self.wait_s = 0.0
        if hasattr(prepare, "before_iteration"):
            prepare.before_iteration(loader)  # (the gpu loader's: who decodes from now on)
        self._batches = iter(loader)  # here: the workers' seeds come from this thread's streams
        self._steps = itertools.count(first)
        self._group = group
        self._rounds = len(loader) - first if group is not None else 0  # agreements left
        self._closed = False
        self._stream = None
        if depth:
            if self.device.type == "cuda":
                self._stream = loader_stream(self.device)
            self._ready = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._produce, name="mae-loader",
                                            daemon=True)
            self._thread.start()

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self._closed:
            raise StopIteration
        start = time.perf_counter()
        item = self._ready.get() if self.depth else self._agreed(self._prepared(
            self._next_raw()))
        self.wait_s += time.perf_counter() - start
        if item is _CLOSED:
            item = _Failed(RuntimeError(PEER_STOPPED))
        if item is _END or isinstance(item, _Failed):
            self.close()
            if item is _END:
                raise StopIteration
            raise item.error
        batch, event = item
        if event is not None:  # on the training stream, after the loader stream's work
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for tensor in batch[:2]:
                if tensor is not None and tensor.is_cuda:
                    tensor.record_stream(current)
        return batch

    def _next_raw(self):
        """(step, what the loader yields), or _END."""
        try:
            return next(self._steps), next(self._batches)
        except StopIteration:
            return _END

    def _produce(self) -> None:
        try:
            if self._stream is not None:
                torch.cuda.set_device(self.device)  # the current device is per thread
            while True:
                raw = _END if self._closed else self._next_raw()
                item = self._agreed(self._prepared(raw))
                if item is _CLOSED:
                    if not self._closed:  # another rank's loader closed: nothing more comes
                        self._put(_Failed(RuntimeError(PEER_STOPPED)))
                    return
                self._put(item)
                if item is _END:
                    return
        except BaseException as exc:  # noqa: BLE001 - raised again in the training thread
            if isinstance(exc, StopIteration):  # would end the consumer's loop silently
                exc = RuntimeError(f"the data loader stopped: {exc!r}")
            if self._rounds:  # the other ranks' threads stop with this one
                with contextlib.suppress(Exception):
                    self._vote(False, closing=True)
            self._put(_Failed(exc))

    def _put(self, item) -> None:
        while not self._closed:
            try:
                self._ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _prepared(self, raw):
        if raw is _END:
            return _END
        step, (images, labels, skipped) = raw
        event = None
        with torch.cuda.stream(self._stream) if self._stream else contextlib.nullcontext():
            if self.prepare is not None:
                images, labels, unreadable = self.prepare(images, labels, self.epoch, step)
                skipped += unreadable
            elif images is not None:
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
            if self._stream is not None:
                event = torch.cuda.Event()
                event.record()
        return _Ready(Batch(images, labels, skipped), event), step

    def _agreed(self, prepared):
        """The batch after this round's agreement (see the class doc): as it is, left out
        (every rank skips the step), or _CLOSED (a rank is closing: stop); _END as it is."""
        if prepared is _END:
            if not self._closed or not self._rounds:
                return _END
        if not self._rounds:
            return _CLOSED if self._closed else prepared[0]
        ready, step = (None, None) if prepared is _END else prepared
        empty, closing = self._vote(ready is not None and ready.batch.images is None,
                                    closing=self._closed or ready is None)
        if closing:
            return _CLOSED
        images, labels, skipped = ready.batch
        if empty and images is not None:
            warnings.warn(f"epoch {self.epoch} step {step}: another process had no readable "
                          f"image in its batch, so every process skips this step (this one "
                          f"leaves {images.shape[0]} images out)", RuntimeWarning, stacklevel=2)
            return _Ready(Batch(None, None, skipped + images.shape[0]), ready.event)
        return ready

    def _vote(self, empty: bool, closing: bool) -> tuple[bool, bool]:
        """One round of the loader threads' agreement: (any rank empty, any rank closing). A
        CPU collective of their own gloo group: no GPU synchronisation."""
        import torch.distributed as dist

        flags = torch.tensor([int(empty), int(closing)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        self._rounds -= 1
        return bool(flags[0]), bool(flags[1])

    def close(self) -> None:
        """Stops the loader thread and lets the DataLoader's workers go."""
        if self._closed:
            return
        self._closed = True
        if self.depth:
            # it may be putting a batch, fetching one, or in a round the other ranks' threads
            # join as they close (a rank that fails alone never joins: not waited for)
            deadline = time.monotonic() + CLOSE_WAIT_S
            while self._thread.is_alive() and time.monotonic() < deadline:
                try:
                    self._ready.get(timeout=0.1)
                except queue.Empty:
                    continue
        # the workers exit now, not with the process: an error raised in the loader thread
        # holds the DataLoader's iterator in its traceback, which would keep them waiting
        shutdown = getattr(self._batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        del self._batches

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@functools.cache
def loader_stream(device: torch.device) -> torch.cuda.Stream:
    """The loader threads' CUDA stream on `device`, one for the process: the caching allocator
    keeps blocks per stream, so a stream per epoch would cache the decode buffers again each
    time."""
    return torch.cuda.Stream(device)


class DeviceLoader:
    """A loader of `Batch`es on `device` for the loops that iterate one themselves (evaluation,
    feature extraction): each pass through a `Prefetcher` over `loader` with `prepare` (a
    `GpuBatches` of evaluation: centre boxes, the same every epoch)."""

    def __init__(self, loader, device, prepare=None, depth: int = DEFAULT_DEPTH):
        self.loader, self.device, self.prepare, self.depth = loader, device, prepare, depth

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        with Prefetcher(self.loader, self.device, self.prepare, depth=self.depth) as batches:
            yield from batches
