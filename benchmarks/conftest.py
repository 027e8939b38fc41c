import pytest
import torch

CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_benchmark_update_machine_info(config, machine_info):
    import datetime
    import importlib.metadata
    import os
    import platform

    machine_info["torch"] = torch.__version__
    machine_info["cuda"] = torch.version.cuda
    try:
        machine_info["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        machine_info["triton"] = None
    if CUDA:
        machine_info["device"] = torch.cuda.get_device_name()
    else:
        cpu = machine_info.get("cpu", {}).get("brand_raw") or platform.processor() or "unknown"
        machine_info["device"] = f"CPU only: {cpu}, {os.cpu_count()} cores"
    machine_info["date"] = datetime.date.today().isoformat()
