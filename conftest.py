"""Splits the cores between pytest-xdist workers (`pytest -n N`): N processes each running
torch's default thread count oversubscribe the machine. NOTE: on 2 cores, two training
processes at 2 threads each ran about 10x slower than one alone, not 2x."""
import os

workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if workers > 1:
    import torch

    share = max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(share)
    os.environ.setdefault("OMP_NUM_THREADS", str(share))  # the subprocesses that tests start
