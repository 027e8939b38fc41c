"""The loader thread (mae/data/prefetch.py): batches prepared while the step runs, errors raised
where the step asks, workers released on close, one decision per step on every rank."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from mae.data.prefetch import Batch, DeviceLoader, Prefetcher

from .test_preemption import REPO, env_for_subprocess


class Batches:
    """A loader yielding (images, labels, skipped) triples, its `num_workers` as a DataLoader's."""

    def __init__(self, count: int, num_workers: int = 1, fail_at: int | None = None):
        self.count, self.num_workers, self.fail_at = count, num_workers, fail_at

    def __len__(self):
        return self.count

    def __iter__(self):
        for i in range(self.count):
            if i == self.fail_at:
                raise ValueError(f"shard {i}: unexpected end of data")
            yield torch.full((2, 3), float(i)), torch.tensor([i, i]), 0


def loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mae-loader"]


def test_the_next_batch_is_prepared_while_the_step_runs():
    """A step that blocks until the preparation of the next batch has begun: it returns only
    because that preparation runs beside it (in the training thread it would wait forever;
    here, for 30 s, and fail)."""
    began = {i: threading.Event() for i in range(6)}

    def prepare(images, labels, epoch, step):
        began[step].set()
        return images * 2, labels, 1

    batches = Prefetcher(Batches(5), "cpu", prepare, epoch=3, first=1, depth=2)
    steps = []
    for step, (images, labels, skipped) in enumerate(batches, 1):
        if step < 5:  # the step: waits (GIL released) for the loader to start on the next one
            assert began[step + 1].wait(timeout=30), f"step {step + 1} not prepared beside {step}"
        steps.append((step, images[0, 0].item(), labels.tolist(), skipped))
    # steps numbered from `first` (a resumed epoch), each batch prepared once, in order
    assert steps == [(i + 1, 2.0 * i, [i, i], 1) for i in range(5)]
    assert not loader_threads()


def test_without_depth_or_workers_each_batch_is_prepared_when_the_step_asks():
    for loader, depth in ((Batches(3), 0), (Batches(3, num_workers=0), 2)):
        began = []

        def prepare(x, y, epoch, step, began=began):
            began.append(step)
            return x, y, 0

        batches = Prefetcher(loader, "cpu", prepare, depth=depth)
        assert batches.depth == 0 and not loader_threads()
        for step, _ in enumerate(batches):
            assert began == list(range(step + 1))  # nothing prepared ahead


def test_an_error_in_the_loader_is_raised_at_the_step_that_needed_the_batch():
    batches = Prefetcher(Batches(6, fail_at=3), "cpu", depth=2)
    taken = []
    with pytest.raises(ValueError, match="shard 3: unexpected end of data"):
        for images, _, _ in batches:
            taken.append(int(images[0, 0]))
    assert taken == [0, 1, 2] and not loader_threads()


def test_closing_early_stops_the_thread_and_the_dataloader_workers():
    dataset = torch.utils.data.TensorDataset(torch.arange(64.0))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2,
                                         collate_fn=lambda rows: (torch.stack(
                                             [r[0] for r in rows]), torch.zeros(2), 0))
    with Prefetcher(loader, "cpu", depth=2) as batches:
        iterator = batches._batches
        next(batches)
        workers = list(iterator._workers)
        assert all(w.is_alive() for w in workers)
    assert not loader_threads()
    for worker in workers:
        worker.join(timeout=30)
        assert not worker.is_alive()


def test_evaluation_loops_get_ready_batches_on_each_pass():
    loader = DeviceLoader(Batches(4), "cpu", lambda x, y, epoch, step: (x + step, y, 0))
    for _ in range(2):  # a new pass each time, its thread gone when it ends
        assert [int(b.images[0, 0]) for b in loader] == [0, 2, 4, 6]
        assert not loader_threads()
    assert len(loader) == 4 and isinstance(next(iter(loader)), Batch)


AGREE = r"""
import json, os, sys, warnings
import torch, torch.distributed as dist
from mae.data.prefetch import Prefetcher
from mae.train import distributed

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

class Batches:  # rank 1's batch at step 2 had no readable image
    num_workers = 1
    def __len__(self):
        return 5
    def __iter__(self):
        for step in range(5):
            empty = rank == 1 and step == 2
            x = torch.full((4, 3), float(step + rank))
            yield (None, None, 4) if empty else (x, x.sum(1), 0)

trained, skipped = [], 0
with warnings.catch_warnings(record=True):
    for step, (x, y, n) in enumerate(Prefetcher(Batches(), "cpu", depth=2,
                                                group=distributed.data_group())):
        skipped += n
        if x is None:
            continue
        loss = ((model(x)[:, 0] - y) ** 2).mean()  # DDP: an all-reduce per backward
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        trained.append(step)
weights = [p.detach().flatten().tolist() for p in model.parameters()]
json.dump({"trained": trained, "skipped": skipped, "weights": weights},
          open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w"))
distributed.shutdown(synchronize=True)
"""


@pytest.mark.slow
def test_a_rank_with_no_readable_image_makes_every_rank_skip_that_step(tmp_path):
    """2 gloo processes under torchrun, rank 1's third batch all unreadable: without the
    agreement rank 1 would pair its next all-reduce with rank 0's third (gloo aborts with a
    collective mismatch, NCCL mixes steps or hangs); with it both skip step 2 and end with the
    same weights."""
    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", str(script), str(tmp_path)], cwd=REPO,
                            env=env_for_subprocess(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["trained"] for r in ranks] == [[0, 1, 3, 4]] * 2
    assert [r["skipped"] for r in ranks] == [4, 4]  # rank 0 left its 4 images out too
    assert ranks[0]["weights"] == ranks[1]["weights"]


CLOSE = r"""
import os, sys, threading, time
import torch, torch.distributed as dist
from mae.data.prefetch import Prefetcher
from mae.train import distributed

dist.init_process_group("gloo")
rank, scenario = dist.get_rank(), sys.argv[1]

class Batches:
    num_workers = 1
    def __len__(self):
        return 10
    def __iter__(self):
        for step in range(10):
            if scenario == "stop" and rank == 0 and step == 1:
                time.sleep(1.0)  # rank 0's workers lag behind
            if scenario == "error" and rank == 1 and step == 3:
                raise ValueError("shard 3: unexpected end of data")
            yield torch.full((2, 3), float(step)), torch.zeros(2), 0

batches = Prefetcher(Batches(), "cpu", depth=2, group=distributed.data_group())
try:
    for step, _ in enumerate(batches):
        if scenario == "stop" and step == 0:  # every rank stops after step 0...
            if rank == 1:
                time.sleep(2.0)  # ...rank 1 a little later
            break
except Exception as exc:  # noqa: BLE001
    print(f"rank {rank} raised: {exc}", flush=True)
closing = threading.Thread(target=batches.close, daemon=True)
closing.start()
closing.join(30)
print(f"rank {rank} closed: {not closing.is_alive()}", flush=True)
os._exit(0)
"""


@pytest.mark.parametrize("scenario", ["stop", "error"])
def test_ranks_whose_loader_threads_are_rounds_apart_all_close(tmp_path, scenario):
    """Two gloo processes: `stop`, both stop after step 0 while rank 0's loader lags (its
    thread had agreed on fewer batches than rank 1's); `error`, rank 1's loader fails at step
    3. Every rank's thread ends after the same round, no rank waits in a round the other never
    joins, and a rank whose peer failed raises instead of waiting for a batch."""
    script = tmp_path / "close.py"
    script.write_text(CLOSE)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", str(script), scenario], cwd=REPO,
                            env=env_for_subprocess(), capture_output=True, text=True, timeout=300)
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank "))
    if scenario == "stop":
        assert lines == ["rank 0 closed: True", "rank 1 closed: True"], result.stdout
    else:
        assert lines == ["rank 0 closed: True", "rank 0 raised: another process's data loader "
                         "stopped (its error, or its stop, ends this run too)",
                         "rank 1 closed: True", "rank 1 raised: shard 3: unexpected end of "
                         "data"], result.stdout + result.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_training_stream_waits_for_the_loader_stream_without_a_host_sync():
    """The loader thread's stream is slowed (a spin kernel) before it writes the batch: the
    training stream must see the written values (it waited on the event), and taking the
    batch synchronises nothing (sync debug mode 'error' around it)."""
    def prepare(images, labels, epoch, step):
        out = torch.empty(1024, device="cuda")
        torch.cuda._sleep(50_000_000)  # ~25 ms on the loader stream
        out.fill_(float(step))
        return out, labels, 0  # labels stay on the host: no copy to flag

    batches = Prefetcher(Batches(4), "cuda", prepare, depth=2)
    seen = []
    for _ in range(4):
        torch.cuda.set_sync_debug_mode("error")
        try:
            images, _, _ = next(batches)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        seen.append(images.sum().item() / 1024)
    assert seen == [0.0, 1.0, 2.0, 3.0]
    assert os.environ.get("CUDA_LAUNCH_BLOCKING") != "1"  # else the test proves nothing
