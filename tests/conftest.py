import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton kernels run on CPU tensors through the interpreter; set before any kernel import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mae_kernels import backend  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rtol, atol) against the reference computed in float32 from the same inputs.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}
CPU_BACKENDS = ["cpp"] + (["triton"] if backend.HAS_TRITON else [])


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


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=CPU_BACKENDS)
def cpu_backend(request):
    with backend.use_backend(request.param):
        yield request.param
