"""Builds mae_kernels._C against the torch already installed (use --no-build-isolation).

CPU sources always; the CUDA sources too when torch has CUDA and nvcc is found.
MAE_KERNELS_FORCE_CUDA=1 / MAE_KERNELS_NO_CUDA=1 override the detection.
"""
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "mae-kernels builds against the installed torch: install torch first "
        "(pip install torch==2.13.0), then: pip install --no-build-isolation -e ."
    )

ROOT = Path(__file__).parent


def want_cuda() -> bool:
    if os.environ.get("MAE_KERNELS_NO_CUDA") == "1":
        return False
    if os.environ.get("MAE_KERNELS_FORCE_CUDA") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    cpu_sources = ["csrc/ops.cpp", "csrc/python_module.cpp"]
    cxx_flags = ["-O3", "-std=c++17"]
    if not want_cuda():
        return CppExtension("mae_kernels._C", cpu_sources, extra_compile_args={"cxx": cxx_flags})
    return CUDAExtension(
        "mae_kernels._C",
        cpu_sources + ["csrc/cuda/tokens_cuda.cpp", "csrc/cuda/tokens_kernels.cu"],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
    )


setup(
    name="mae-kernels",
    version="0.1.0",
    description="Fused Triton and C++/CUDA kernels for Masked Autoencoder pre-training",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mae_kernels", "mae_kernels.*", "mae", "mae.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "numpy",
        "tqdm",
        "pillow",
        "matplotlib",
    ],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "triton>=3.2", "transformers"],
    },
    entry_points={"console_scripts": ["mae=mae.cli:main"]},
)
