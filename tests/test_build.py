"""The C++/CUDA sources and their builds: where the build on import finds the sources (checkout,
wheel), what a broken CUDA toolkit makes the builds say, nvcc compiles the CUDA kernels, CMake
builds libtorch + ctest passes; and the docs' account of the layout and the demo."""
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch.utils
from torch.utils import cpp_extension
from torch.utils.cpp_extension import CUDA_HOME

import mae_kernels
from mae_kernels import _extension

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["ops.cpp", "tokens.h", "cuda/tokens_cuda.cpp", "cuda/tokens_kernels.cu",
           "cuda/tokens_kernels.h"]
# the toolkit's own nvcc (the first on PATH may be a wrapper elsewhere)
NVCC = str(Path(CUDA_HOME) / "bin" / "nvcc") if CUDA_HOME else shutil.which("nvcc")
LICENCE_FILES = ("LICENSE", "THIRD_PARTY_NOTICES.md")


@pytest.mark.skipif(NVCC is None or not Path(NVCC).exists(), reason="nvcc not found")
def test_cuda_kernels_compile_for_hopper(tmp_path):
    """The .cu kernels need no torch headers, so a syntax error cannot land unseen on CPU CI."""
    result = subprocess.run(
        [NVCC, "-arch=sm_90", "-O3", "-c", str(ROOT / "csrc/cuda/tokens_kernels.cu"),
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


def test_checkout_builds_from_top_level_csrc():
    """An editable checkout keeps the sources at the top level, with no copy in the package."""
    assert Path(mae_kernels.__file__).resolve().parent == ROOT / "mae_kernels"
    assert _extension.CSRC == ROOT / "csrc"
    assert all((ROOT / "csrc" / s).is_file() for s in SOURCES)
    assert not (ROOT / "mae_kernels" / "csrc").exists()


def test_docs_describe_the_demo_as_its_defaults():
    """Each `SxS images, PxP patches` and `N patches of PxP pixels` in the README and the docs is
    the image demo's input and patch size."""
    from mae.train.pretrain import DEMO_DEFAULTS

    text = "".join(p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
    size, patch = DEMO_DEFAULTS["input_size"], DEMO_DEFAULTS["patch_size"]
    sizes = re.findall(r"(\d+)x\1(?: images,| with) (\d+)x\2 patches", text)
    counts = re.findall(r"(\d+) patches(?: \([^)]*\))? of (\d+)x\2 pixels", text)
    assert set(sizes) == {(str(size), str(patch))}, sizes
    assert set(counts) == {(str((size // patch) ** 2), str(patch))}, counts
    # the layout: the C++/CUDA sources at the top level
    assert "`csrc/`" in (ROOT / "docs" / "development.md").read_text()


@pytest.mark.slow
def test_sdist_and_wheel_carry_the_sources_and_build_on_import(tmp_path):
    """sdist -> wheel -> install without the repository: the package carries csrc/ and its build
    on import compiles from there; both carry the licence and the metadata of pyproject.toml.
    MAE_KERNELS_NO_EXTENSION=1 ships the sources only, as a build-isolated `pip install .` does
    (torch is invisible there)."""
    src = tmp_path / "src"
    src.mkdir()
    junk = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "CMakeLists.txt",
                 *LICENCE_FILES):
        shutil.copy(ROOT / name, src)
    for name in ("csrc", "mae_kernels", "mae"):
        shutil.copytree(ROOT / name, src / name, ignore=junk)
    env = {**os.environ, "MAE_KERNELS_NO_EXTENSION": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    dist = tmp_path / "dist"
    release = f"mae_kernels-{mae_kernels.__version__}"
    steps = [
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(dist)],
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(dist), str(dist / f"{release}.tar.gz")],
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
         str(tmp_path / "site"), str(dist / f"{release}-py3-none-any.whl")],
    ]
    for step in steps:
        result = subprocess.run(step, cwd=src, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, f"{' '.join(step)}\n{result.stdout}\n{result.stderr}"
    with tarfile.open(dist / f"{release}.tar.gz") as sdist:
        names = sdist.getnames()
        sdist_metadata = sdist.extractfile(f"{release}/PKG-INFO").read().decode()
    assert all(f"{release}/csrc/{s}" in names for s in SOURCES), names
    assert all(f"{release}/{name}" in names for name in LICENCE_FILES), names
    with zipfile.ZipFile(dist / f"{release}-py3-none-any.whl") as wheel:
        names = wheel.namelist()
        wheel_metadata = wheel.read(f"{release}.dist-info/METADATA").decode()
    assert all(f"mae_kernels/csrc/{s}" in names for s in SOURCES), names
    assert all(f"{release}.dist-info/licenses/{name}" in names for name in LICENCE_FILES), names
    for metadata in (sdist_metadata, wheel_metadata):
        assert "License-Expression: BSD-3-Clause" in metadata, metadata
        assert f"Version: {mae_kernels.__version__}" in metadata
        assert "Summary: Fused Triton and C++/CUDA kernels" in metadata
        assert "Project-URL: " in metadata and "Provides-Extra: lightly" in metadata

    site, cache = tmp_path / "site", tmp_path / "cache"
    check = """
import torch
import mae_kernels
from mae_kernels import _extension, tokens
print(mae_kernels.__file__, _extension.CSRC, tokens.LIBRARY, sep="\\n")
x, index = torch.randn(2, 5, 3), torch.tensor([[4, 0], [1, 2]])
assert torch.equal(torch.ops.mae_kernels.gather_tokens(x, index), x[[[0], [1]], index])
"""
    env = {**os.environ, "PYTHONPATH": str(site), "MAE_KERNELS_CACHE": str(cache)}
    env.pop("MAE_KERNELS_NO_EXTENSION", None)
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    package, csrc, library = result.stdout.split()
    assert Path(package).parent == site / "mae_kernels"
    assert Path(csrc) == site / "mae_kernels" / "csrc"
    assert Path(library).is_relative_to(cache), result.stderr


def _fake_toolkit(root: Path, release: str, headers: bool) -> Path:
    """A CUDA_HOME whose nvcc reports `release`, with or without the toolkit's headers."""
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    if headers:
        (root / "include").mkdir()
        (root / "include" / "cuda_runtime.h").write_text("")
    return root


@pytest.fixture
def cuda_torch(monkeypatch):
    """This torch as if built with CUDA 13.0, whatever it is (the diagnosis reads no GPU)."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.delenv("MAE_KERNELS_NO_CUDA", raising=False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")  # want_cuda() would set it


def _use_toolkit(monkeypatch, home: Path):
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(home))


FIX = ("export CUDA_HOME=", "MAE_KERNELS_NO_CUDA=1")


def test_cuda_problem_names_the_cause_and_the_fix(tmp_path, monkeypatch, cuda_torch):
    # CUDA_HOME unset, torch guessed it from a wrapper nvcc on PATH: no headers there
    wrapper = _fake_toolkit(tmp_path / "wrapper", "13.0", headers=False)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper / 'bin'}{os.pathsep}{os.environ['PATH']}")
    _use_toolkit(monkeypatch, wrapper)
    problem = _extension.cuda_problem()
    assert f"{wrapper}/include/cuda_runtime.h does not exist" in problem
    assert f"guessed it from the nvcc on PATH, {wrapper / 'bin' / 'nvcc'}" in problem
    assert all(fix in problem for fix in FIX), problem

    other = _fake_toolkit(tmp_path / "cuda-12.4", "12.4", headers=True)
    monkeypatch.setenv("CUDA_HOME", str(other))
    _use_toolkit(monkeypatch, other)
    problem = _extension.cuda_problem()
    assert "is CUDA 12.4, torch was built with CUDA 13.0" in problem
    assert all(fix in problem for fix in FIX), problem

    good = _fake_toolkit(tmp_path / "cuda-13.0", "13.0", headers=True)
    _use_toolkit(monkeypatch, good)
    assert _extension.cuda_problem() is None


def _record_builds(monkeypatch, fail_cuda: Exception | None = None) -> list[bool]:
    """Replaces the compiler and the loader: which builds the build on import asks for."""
    builds = []

    def compile_on_import(cuda):
        builds.append(cuda)
        if cuda and fail_cuda is not None:
            raise fail_cuda
        return Path("library.so")

    monkeypatch.setattr(_extension, "_prebuilt", lambda: None)
    monkeypatch.setattr(_extension, "_compile_on_import", compile_on_import)
    monkeypatch.setattr(torch.ops, "load_library", lambda path: None)
    monkeypatch.delenv("MAE_KERNELS_NO_EXTENSION", raising=False)
    return builds


def test_build_on_import_skips_a_cuda_build_known_to_fail(tmp_path, monkeypatch, capsys,
                                                          cuda_torch):
    _use_toolkit(monkeypatch, _fake_toolkit(tmp_path / "wrapper", "13.0", headers=False))
    builds = _record_builds(monkeypatch)
    assert _extension.load_extension() == Path("library.so")
    assert builds == [False]
    err = capsys.readouterr().err
    assert "not building the CUDA kernels" in err and "cuda_runtime.h does not exist" in err
    assert all(fix in err for fix in FIX) and "building the CPU kernels only" in err


def test_failed_cuda_build_says_the_compilers_error_and_the_fix(tmp_path, monkeypatch, capsys,
                                                                cuda_torch):
    _use_toolkit(monkeypatch, _fake_toolkit(tmp_path / "cuda", "13.0", headers=True))
    error = RuntimeError("Error building extension 'mae_kernels_cuda': [1/3] nvcc ...\n"
                         "tokens_cuda.cpp:3:10: fatal error: cuda_fp16.h: No such file\n"
                         "ninja: build stopped: subcommand failed.")
    builds = _record_builds(monkeypatch, fail_cuda=error)
    assert _extension.load_extension() == Path("library.so")
    assert builds == [True, False]
    err = capsys.readouterr().err
    assert "the CUDA build failed (RuntimeError: tokens_cuda.cpp:3:10: fatal error: " \
           "cuda_fp16.h: No such file)" in err
    assert all(fix in err for fix in FIX) and "Building the CPU kernels only" in err


@pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch")
def test_setup_stops_early_on_a_broken_cuda_toolkit(tmp_path):
    """`pip install --no-build-isolation` runs setup.py: it says the cause and the fix up front,
    in one line, instead of a compiler error a minute later."""
    home = _fake_toolkit(tmp_path / "wrapper", torch.version.cuda, headers=False)
    env = {**os.environ, "CUDA_HOME": str(home)}
    env.pop("MAE_KERNELS_NO_CUDA", None)
    env.pop("MAE_KERNELS_NO_EXTENSION", None)
    result = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert (f"mae-kernels: cannot build the CUDA kernels: {home}/include/cuda_runtime.h does "
            "not exist") in result.stderr
    assert all(fix in result.stderr for fix in FIX), result.stderr
