import os
from pathlib import Path

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


@pytest.fixture(autouse=True)
def _no_run_in_the_working_directory():
    """A training command left at its default --output-dir (./output_dir) writes into the
    checkout; a test that did gives its run a folder of its own."""
    default = Path("output_dir")
    existed = default.exists()
    yield
    assert existed or not default.exists(), "this test wrote a run into ./output_dir"


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request):
    """Each op's CPU kernel, then its Triton launcher (interpreted); asserts which one ran."""
    with running(request.param) as ran:
        yield ran
