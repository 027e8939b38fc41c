"""Loads the C++/CUDA extension (`torch.ops.mae_kernels.gather_tokens` / `scatter_tokens`).

A library compiled against one torch must never be loaded into another: the C++ ABI differs
between releases, and a mismatch crashes or, worse, corrupts silently. So every build embeds the
torch it was compiled against (`mae_kernels_build_tag` in csrc/ops.cpp), read here from the file
before loading it:

1. the library `pip install --no-build-isolation -e .` built (mae_kernels/_C*.so), if its tag
   matches the running torch;
2. otherwise the same sources compiled on first import with torch.utils.cpp_extension (ninja),
   cached per torch version, as DeepSpeed does for its ops (a plain `pip install -e .` builds in
   an isolated environment that cannot see the installed torch, so it ships the sources only);
3. if neither works (no compiler), plain PyTorch, with one warning.

MAE_KERNELS_NO_CUDA=1 leaves the CUDA kernels out of a build; MAE_KERNELS_NO_EXTENSION=1 skips
the extension altogether (plain PyTorch).
"""
from __future__ import annotations

import os
import re
import sys
import time
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).with_name("csrc")
CPU_SOURCES = ["ops.cpp"]
CUDA_SOURCES = ["cuda/tokens_cuda.cpp", "cuda/tokens_kernels.cu"]
_TAG = re.compile(rb"mae_kernels build: ([^;\0]*);")


def torch_build_id() -> str:
    """What an extension must have been compiled against to be loaded into this process."""
    return f"{torch.__version__}-{torch.version.git_version[:12]}"


def build_flags() -> dict[str, list[str]]:
    """Compiler flags shared by setup.py and the build on import. The language standard is left
    to torch's helpers: torch 2.14's headers need C++20, earlier ones C++17."""
    define = f"-DMAE_KERNELS_TORCH={torch_build_id()}"
    return {"cxx": ["-O3", define], "nvcc": ["-O3", define]}


def want_cuda() -> bool:
    """Whether a build includes the CUDA kernels: torch has CUDA and nvcc is found. Where no
    GPU is visible to pick the architectures from, they default to A100 and Hopper (sm_80,
    sm_90), plus PTX for newer GPUs; TORCH_CUDA_ARCH_LIST overrides."""
    from torch.utils.cpp_extension import CUDA_HOME

    if os.environ.get("MAE_KERNELS_NO_CUDA") == "1":
        return False
    if torch.version.cuda is None or CUDA_HOME is None:
        return False
    if not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    return True


def built_for(path: Path) -> str | None:
    """The torch build id embedded in a compiled library, or None if it has none."""
    match = _TAG.search(path.read_bytes())
    return match.group(1).decode() if match else None


def _prebuilt() -> Path | None:
    """The library setup.py built into this package's folder, if any."""
    return next(iter(sorted(Path(__file__).parent.glob("_C*.so"))), None)


def _compile_on_import(cuda: bool) -> Path:
    from torch.utils.cpp_extension import get_default_build_root, load

    python = f"py{sys.version_info[0]}{sys.version_info[1]}"
    name = "_".join(["mae_kernels", python, re.sub(r"\W", "_", torch_build_id())]
                    + (["cuda"] if cuda else []))
    build_dir = Path(os.environ.get("MAE_KERNELS_CACHE", get_default_build_root())) / name
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = [str(CSRC / s) for s in CPU_SOURCES + (CUDA_SOURCES if cuda else [])]
    fresh = not any(build_dir.glob(f"{name}*.so"))
    if fresh:
        print(f"mae_kernels: compiling the C++{'/CUDA' if cuda else ''} extension for torch "
              f"{torch.__version__} into {build_dir} (once per torch version; about "
              f"{'2 minutes' if cuda else '30 s'} on 2 cores)", file=sys.stderr, flush=True)
    start = time.perf_counter()
    flags = build_flags()
    load(name, sources, extra_cflags=flags["cxx"], extra_cuda_cflags=flags["nvcc"],
         extra_include_paths=[str(CSRC)], with_cuda=cuda, is_python_module=False,
         build_directory=str(build_dir), verbose=False)
    if fresh:
        print(f"mae_kernels: extension built in {time.perf_counter() - start:.0f} s",
              file=sys.stderr, flush=True)
    return next(build_dir.glob(f"{name}*.so"))


def load_extension() -> Path | None:
    """Registers the compiled ops; returns the library loaded, or None (plain PyTorch)."""
    if os.environ.get("MAE_KERNELS_NO_EXTENSION") == "1":
        return None
    prebuilt = _prebuilt()
    if prebuilt is not None:
        tag = built_for(prebuilt)
        if tag == torch_build_id():
            torch.ops.load_library(str(prebuilt))
            return prebuilt
        print(f"mae_kernels: {prebuilt.name} was built for torch {tag}, this is torch "
              f"{torch_build_id()}: not loading it", file=sys.stderr, flush=True)
    cuda = want_cuda()
    try:
        try:
            path = _compile_on_import(cuda)
        except Exception as exc:
            if not cuda:
                raise
            # e.g. an nvcc that does not match torch's CUDA: the CPU kernels still help
            print(f"mae_kernels: the CUDA build failed ({type(exc).__name__}); building the CPU "
                  "kernels only", file=sys.stderr, flush=True)
            path = _compile_on_import(cuda=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: say so, keep working
        warnings.warn(
            f"mae_kernels: the C++ extension could not be built ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}); "
            "gather_tokens/scatter_tokens run plain PyTorch. Build it with: "
            "pip install --no-build-isolation -e .",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    torch.ops.load_library(str(path))
    return path
