"""Builds mae_kernels._C against the installed torch when the build can see it.

`pip install --no-build-isolation -e .` (torch already installed): compiles the extension now,
CPU kernels always, CUDA kernels too when torch has CUDA and nvcc is found (CUDA_HOME).
`pip install -e .` (build isolation hides the installed torch): ships the C++ sources only;
`import mae_kernels` compiles them on first use against the torch that runs, and caches the
result (mae_kernels/_extension.py). Either way a library built for another torch is never loaded.
MAE_KERNELS_NO_EXTENSION=1 ships the sources only, as an isolated build does.

A CUDA toolkit that cannot work (CUDA_HOME without the toolkit's headers or nvcc, or an nvcc of
another CUDA major than torch's) stops the build at once, with the cause and the fix: pip shows
a successful build's output only with -v, so a CPU-only fallback would pass unnoticed.

The C++ sources live in csrc/ at the top level; wheels and sdists carry a copy inside the package
(mae_kernels/csrc), for the build on import of an install that has no repository beside it.
"""
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = Path("csrc")
CSRC_FILES = ["*.cpp", "*.h", "cuda/*.cpp", "cuda/*.cu", "cuda/*.h"]  # what a build compiles


class build_py_with_sources(build_py):
    """Copies csrc/ into the built package (not in editable mode, which reads it in place)."""

    def run(self):
        super().run()
        if self.editable_mode:
            return
        for source in self._sources():
            target = Path(self.build_lib) / "mae_kernels" / source
            self.mkpath(str(target.parent))
            self.copy_file(str(ROOT / source), str(target))

    def get_outputs(self, include_bytecode=True):
        package = Path(self.build_lib) / "mae_kernels"
        return super().get_outputs(include_bytecode) + [str(package / s) for s in self._sources()]

    @staticmethod
    def _sources():
        return sorted({p.relative_to(ROOT) for pattern in CSRC_FILES
                       for p in (ROOT / CSRC).glob(pattern)})


def extensions():
    if importlib.util.find_spec("torch") is None \
            or os.environ.get("MAE_KERNELS_NO_EXTENSION") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # The same sources and flags as the build on import: load mae_kernels/_extension.py by path,
    # since importing the package would try to load the extension being built.
    spec = importlib.util.spec_from_file_location("_extension", ROOT / "mae_kernels/_extension.py")
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    sources = [str(CSRC / s) for s in ext.CPU_SOURCES]
    flags = ext.build_flags()
    kind = CppExtension
    if ext.want_cuda():
        problem = ext.cuda_problem()
        if problem:
            sys.exit(f"mae-kernels: cannot build the CUDA kernels: {problem}")
        sources += [str(CSRC / s) for s in ext.CUDA_SOURCES]
        kind = CUDAExtension
    module = kind("mae_kernels._C", sources, include_dirs=[str(ROOT / CSRC)],
                  extra_compile_args=flags if kind is CUDAExtension else {"cxx": flags["cxx"]},
                  py_limited_api=True)
    return [module], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()
cmdclass["build_py"] = build_py_with_sources
if not ext_modules:
    why = ("MAE_KERNELS_NO_EXTENSION=1" if os.environ.get("MAE_KERNELS_NO_EXTENSION") == "1"
           else "torch is not visible to this build (build isolation)")
    print(f"mae-kernels: {why}: the C++ extension will be compiled on first import. To build "
          "it now: pip install --no-build-isolation -e .", file=sys.stderr)

# Name, version, dependencies, extras and the `mae` command are in pyproject.toml.
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
