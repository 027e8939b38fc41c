"""The C++/CUDA sources: nvcc compiles the CUDA kernels, CMake builds libtorch + ctest passes."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch.utils
from torch.utils.cpp_extension import CUDA_HOME

ROOT = Path(__file__).resolve().parents[1]
# the toolkit's own nvcc (the first on PATH may be a wrapper elsewhere)
NVCC = str(Path(CUDA_HOME) / "bin" / "nvcc") if CUDA_HOME else shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None or not Path(NVCC).exists(), reason="nvcc not found")
def test_cuda_kernels_compile_for_hopper(tmp_path):
    """The .cu kernels need no torch headers, so a syntax error cannot land unseen on CPU CI."""
    result = subprocess.run(
        [NVCC, "-arch=sm_90", "-O3", "-c", str(ROOT / "mae_kernels/csrc/cuda/tokens_kernels.cu"),
         "-o", str(tmp_path / "tokens_kernels.o")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found")
def test_cmake_build_and_ctest(tmp_path):
    build = tmp_path / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    steps = [
        ["cmake", "-S", str(ROOT), "-B", str(build), *generator,
         f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
        ["cmake", "--build", str(build), "--parallel", "2"],
        ["ctest", "--test-dir", str(build), "--output-on-failure"],
    ]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{' '.join(step)}\n{result.stdout}\n{result.stderr}"
