import json
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
MARKS = {
    "vit_b": "MAE ViT-B/16 sizes: B=256, L=196, encoder D=768, decoder D=512, 224x224",
    "bf16": "bfloat16 cases",
    "video": "the VideoMAE ops",
    "compiled": "torch.compile cases",
    "step": "the whole pre-training step",
    "long_compile": "ops whose compiled reference takes minutes to build",
    "loader": "the input pipeline: resized_crop and the loaders' per-image stages",
    "pipeline": "the training step fed by the real loader against the step fed from memory",
    "decoder_side": "Pixio's and CrossMAE's ops and steps (masking units, three-way split, "
                    "decoder queries, predicted-subset loss; MAE vs CrossMAE vs Pixio steps)",
}


def pytest_configure(config):
    for name, meaning in MARKS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _record_case(request):
    """With MAE_BENCH_CASES=FILE, appends each case's result to FILE as one JSON line when it
    ends, in pytest-benchmark's format: pytest-benchmark writes its JSON only when the session
    ends, so a run stopped at its time limit would return nothing."""
    yield
    path = os.environ.get("MAE_BENCH_CASES")
    bench = request.node.funcargs.get("benchmark")
    if path and bench is not None and bench.stats is not None:
        with open(path, "a") as f:
            f.write(json.dumps(bench.stats.as_dict(include_data=False), default=str) + "\n")


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
