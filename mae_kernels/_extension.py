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

The sources live in csrc/ at the repository root (an editable install reads them there); a wheel
or sdist install carries a copy inside the package (setup.py's build_py), which is read first.

MAE_KERNELS_NO_CUDA=1 leaves the CUDA kernels out of a build; MAE_KERNELS_NO_EXTENSION=1 skips
the extension altogether (plain PyTorch).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch


def _find_sources() -> Path:
    """The package's copy of the C++ sources (wheels, sdists), else the repository's csrc/."""
    package = Path(__file__).with_name("csrc")
    return package if (package / "ops.cpp").is_file() else Path(__file__).parents[1] / "csrc"


CSRC = _find_sources()
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


def cuda_problem() -> str | None:
    """Why a CUDA build would fail here, with the fix; None when nothing is known to be wrong.
    The usual cause: CUDA_HOME unset and the nvcc on PATH a wrapper outside the toolkit, from
    which torch guesses a CUDA_HOME that has no headers (`cuda_runtime.h` not found)."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home is None:
        return None
    on_path = shutil.which("nvcc")
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        origin = "set in the environment"
    elif on_path:
        origin = f"CUDA_HOME is unset, so torch guessed it from the nvcc on PATH, {on_path}"
    else:
        origin = "CUDA_HOME is unset and no nvcc is on PATH: torch's default"
    nvcc = Path(home) / "bin" / "nvcc"
    not_root = f"CUDA_HOME={home} ({origin}) is not a CUDA toolkit's root"
    if not (Path(home) / "include" / "cuda_runtime.h").is_file():
        cause = f"{home}/include/cuda_runtime.h does not exist: {not_root}"
    elif not nvcc.is_file():
        cause = f"{nvcc} does not exist: {not_root}"
    else:
        try:
            out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True,
                                 timeout=60).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            out = f"{type(exc).__name__}: {exc}"
        release = re.search(r"release (\d+)\.(\d+)", out)
        if release is None:
            cause = f"{nvcc} --version does not say its CUDA release ({out.strip()[-200:]!r})"
        elif torch.version.cuda and release.group(1) != torch.version.cuda.split(".")[0]:
            cause = (f"{nvcc} is CUDA {release.group(1)}.{release.group(2)}, torch was built "
                     f"with CUDA {torch.version.cuda}")
        else:
            return None
    return f"{cause}. Fix: {cuda_fix()}"


def cuda_fix() -> str:
    """What to do about a CUDA build that fails."""
    toolkit = "/usr/local/cuda" if Path("/usr/local/cuda/include/cuda_runtime.h").is_file() \
        else "/path/to/cuda"
    return (f"export CUDA_HOME={toolkit} (the root of a CUDA toolkit matching torch's CUDA "
            f"{torch.version.cuda}), or MAE_KERNELS_NO_CUDA=1 to build the CPU kernels only")


def first_error(exc: BaseException) -> str:
    """The line of a failed build's output that says what went wrong (a compiler's output ends
    with ninja's "build stopped", which does not)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"\berror\b", line, re.IGNORECASE)
              and not line.startswith("Error building extension")]
    return next(iter(errors), lines[-1] if lines else repr(exc))


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
    problem = cuda_problem() if cuda else None
    if problem:  # a build known to fail would cost a minute to say less
        print(f"mae_kernels: not building the CUDA kernels: {problem}; building the CPU kernels "
              "only", file=sys.stderr, flush=True)
        cuda = False
    try:
        try:
            path = _compile_on_import(cuda)
        except Exception as exc:
            if not cuda:
                raise
            # the CPU kernels still help
            print(f"mae_kernels: the CUDA build failed ({type(exc).__name__}: "
                  f"{first_error(exc)}). Fix: {cuda_fix()}. Building the CPU kernels only",
                  file=sys.stderr, flush=True)
            path = _compile_on_import(cuda=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: say so, keep working
        warnings.warn(
            f"mae_kernels: the C++ extension could not be built ({type(exc).__name__}: "
            f"{first_error(exc)}); "
            "gather_tokens/scatter_tokens run plain PyTorch. Build it with: "
            "pip install --no-build-isolation -e .",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    torch.ops.load_library(str(path))
    return path
