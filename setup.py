"""Builds mae_kernels._C against the installed torch when the build can see it.

`pip install --no-build-isolation -e .` (torch already installed): compiles the extension now,
CPU kernels always, CUDA kernels too when torch has CUDA and nvcc is found (CUDA_HOME).
`pip install -e .` (build isolation hides the installed torch): ships the C++ sources only;
`import mae_kernels` compiles them on first use against the torch that runs, and caches the
result (mae_kernels/_extension.py). Either way a library built for another torch is never loaded.
"""
import importlib.util
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def extensions():
    if importlib.util.find_spec("torch") is None:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # The same sources and flags as the build on import: load mae_kernels/_extension.py by path,
    # since importing the package would try to load the extension being built.
    spec = importlib.util.spec_from_file_location("_extension", ROOT / "mae_kernels/_extension.py")
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    csrc = Path("mae_kernels/csrc")
    sources = [str(csrc / s) for s in ext.CPU_SOURCES]
    flags = ext.build_flags()
    kind = CppExtension
    if ext.want_cuda():
        sources += [str(csrc / s) for s in ext.CUDA_SOURCES]
        kind = CUDAExtension
    module = kind("mae_kernels._C", sources, include_dirs=[str(ROOT / csrc)],
                  extra_compile_args=flags if kind is CUDAExtension else {"cxx": flags["cxx"]},
                  py_limited_api=True)
    return [module], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()
if not ext_modules:
    print("mae-kernels: torch is not visible to this build (build isolation): the C++ "
          "extension will be compiled on first import. To build it now: "
          "pip install --no-build-isolation -e .", file=sys.stderr)

setup(
    name="mae-kernels",
    version="0.1.0",
    description="Fused Triton and C++/CUDA kernels for Masked Autoencoder pre-training",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mae_kernels", "mae_kernels.*", "mae", "mae.*"]),
    package_data={"mae_kernels": ["csrc/*.cpp", "csrc/*.h", "csrc/cuda/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11",
        # torch pins its own triton on Linux (2.11: 3.6, 2.14: 3.8); any of 3.6-3.9 works.
        "triton>=3.6; platform_system == 'Linux'",
        "ninja",  # the build on import
        "numpy",
        "tqdm",
        "pillow",
        "matplotlib",
        "pyyaml",  # --config files (safe_load)
        "safetensors",  # mae export
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "pytest-benchmark", "hypothesis", "transformers",
                 "scikit-learn", "scikit-image"],
        # timm needs torchvision; install the torchvision of your torch first (torch 2.14.1:
        # torchvision 0.29.1) so pip does not replace torch.
        # Pillow 13 rejects posterize(bits=0), which timm's RandAugment ("rand-m9-mstd0.5-inc1")
        # asks for at its highest magnitude.
        "finetune": ["timm>=1.0.20", "torchvision", "pillow<13"],
        # video files for `mae pretrain --video --data-path` (frame folders need nothing)
        "video": ["av>=14"],
        # `mae anomaly --synthetic`: AUROC
        "anomaly": ["scikit-learn"],
    },
    entry_points={"console_scripts": ["mae=mae.cli:main"]},
)
