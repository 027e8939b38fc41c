"""Shared test helpers: which implementation runs, and proof that it ran."""
from __future__ import annotations

import contextlib
from collections import Counter

import torch

from mae_kernels import augment, hog, loss, masking, patches, queries, tokens, unshuffling
from mae_kernels._library import HAS_TRITON

# The ops with a Triton launcher (their default kernel) and a CPU kernel.
DEVICE_OPS = {
    "masking": masking.masking_op,
    "unshuffle": unshuffling.unshuffle_op,
    "unshuffle_backward": unshuffling.unshuffle_backward_op,
    "mae_loss": loss.mae_loss_op,
    "mae_loss_backward": loss.mae_loss_backward_op,
    "patchify": patches.patchify_op,
    "unpatchify": patches.unpatchify_op,
    "hog_targets": hog.hog_op,
    "resized_crop": augment.resized_crop_op,
    "decoder_queries": queries.queries_op,
    "decoder_queries_backward": queries.queries_backward_op,
}
KERNELS = {name: kernel for module in (masking, unshuffling, loss, patches, hog, augment, queries)
           for name, kernel in vars(module).items() if name.endswith("_kernel")}
# "cpu": the dispatcher's CPU kernels (PyTorch + the C++ extension); "triton": the Triton
# launchers on CPU tensors, through the interpreter.
IMPLEMENTATIONS = ["cpu"] + (["triton"] if HAS_TRITON else [])

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rtol, atol) against the reference computed in float32 from the same inputs.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def assert_close(actual, expected, dtype):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def assert_same_grads(got: torch.nn.Module, want: torch.nn.Module, rtol=1e-4, atol=1e-6):
    """The same parameters received gradients in both models, and the gradients agree."""
    got_grads = {n: p.grad for n, p in got.named_parameters() if p.grad is not None}
    want_grads = {n: p.grad for n, p in want.named_parameters() if p.grad is not None}
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=rtol, atol=atol, msg=name)


@contextlib.contextmanager
def count_launches():
    """Counts the launches of every mae_kernels Triton kernel inside the block, by name."""
    counts = Counter()

    def counting(name, run):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return run(*args, **kwargs)
        return wrapper

    for name, kernel in KERNELS.items():
        kernel.run = counting(name, kernel.run)
    try:
        yield counts
    finally:
        for kernel in KERNELS.values():
            del kernel.run  # back to the class's method


@contextlib.contextmanager
def triton_on_cpu():
    """CPU tensors run the Triton launchers (under TRITON_INTERPRET=1), not the CPU kernels."""
    with contextlib.ExitStack() as stack:
        for op in DEVICE_OPS.values():
            stack.enter_context(op.set_kernel_enabled("cpu", enabled=False))
        yield


class Ran:
    """What the `implementation` fixture yields: its name and the Triton launches so far."""

    def __init__(self, name: str, launches: Counter):
        self.name = name
        self.launches = launches

    def __str__(self):
        return self.name

    def check(self) -> None:
        if self.name == "triton":
            assert sum(self.launches.values()) > 0, "no Triton kernel ran"
        else:
            assert not self.launches, f"Triton kernels ran on the CPU path: {dict(self.launches)}"
            assert "cpu" in tokens.KERNEL_DEVICES, "the C++ extension's CPU kernels are missing"


@contextlib.contextmanager
def running(name: str):
    """Runs the block on one implementation and checks afterwards that it, and only it, ran."""
    with count_launches() as launches:
        ran = Ran(name, launches)
        with triton_on_cpu() if name == "triton" else contextlib.nullcontext():
            yield ran
    ran.check()
