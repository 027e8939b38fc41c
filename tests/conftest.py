import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through the interpreter; set before any kernel import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .utils import IMPLEMENTATIONS, running  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request):
    """Each op's CPU kernel, then its Triton launcher (interpreted); asserts which one ran."""
    with running(request.param) as ran:
        yield ran
