"""Every kernel under compute-sanitizer memcheck: the GPU plan's sanitizer stage.

    python3 scripts/gpu_sanitize.py --memcheck   # itself under compute-sanitizer, its log read
    python3 scripts/gpu_sanitize.py              # the calls alone

The calls: every op case of tests/test_gpu.py (OP_CASES: forward and backward at small odd sizes,
D=40 and a 7x9 grid, so partial blocks and row tails run), on CUDA, or on a machine without one
through the Triton interpreter. The launches of every Triton kernel are counted: a kernel that
no call reached fails the run, by name, as do the extension's CUDA kernels when they were not
built. With --memcheck the calls run with PYTORCH_NO_CUDA_MEMORY_CACHING=1, so that an access
past a tensor leaves its allocation instead of landing in the caching allocator's pool, and the
sanitizer's log is read: any error inside a kernel (an invalid or misaligned access, a device-side
assert) fails the stage, ours named as ours; a CUDA API call that returned an error is listed
apart, as benign (torch and Triton probe the driver and handle what it refuses).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":  # set before any kernel import
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(ROOT))
from mae_kernels import tokens  # noqa: E402
from tests.test_gpu import OP_CASES  # noqa: E402
from tests.utils import KERNELS, count_launches, triton_on_cpu  # noqa: E402

EXTENSION_KERNELS = ["copy_rows_kernel"]  # csrc/cuda/tokens_kernels.cu: gather and scatter
PREFIX = "========= "
# API errors that report a kernel's fault to the host (sticky errors), not a refused request
FAULTS = ("IllegalAddress", "LaunchFailure", "Assert", "MisalignedAddress", "IllegalInstruction",
          "ILLEGAL_ADDRESS", "LAUNCH_FAILED", "ASSERT", "MISALIGNED_ADDRESS")


def exercise(device: str = DEVICE) -> dict[str, int]:
    """Runs every op case on `device` (CPU tensors through the Triton interpreter); returns the
    launches of each Triton kernel."""
    with count_launches() as launches:
        for case in OP_CASES.values():
            if not case.triton and device == "cpu":
                continue  # the extension's kernels are CUDA's
            inputs = [a.to(device) if isinstance(a, torch.Tensor) else a for a in case.draw()]
            with triton_on_cpu() if device == "cpu" else contextlib.nullcontext():
                case(*inputs)
        if device == "cuda":
            torch.cuda.synchronize()
    return dict(launches)


def calls(device: str = DEVICE) -> int:
    """The calls, a table of launches; 1 if a kernel was never called."""
    launches = exercise(device)
    for name in sorted(KERNELS):
        print(f"{launches.get(name, 0):4d}  {name}")
    missed = sorted(set(KERNELS) - set(launches))
    if device == "cuda" and "cuda" not in tokens.KERNEL_DEVICES:
        missed += [f"{k} (the extension was built without CUDA kernels)"
                   for k in EXTENSION_KERNELS]
    print("kernels no call reached:", ", ".join(missed) if missed else "none")
    return 1 if missed else 0


def read_log(text: str) -> tuple[list[str], list[str]]:
    """(errors inside kernels, benign CUDA API errors) of a compute-sanitizer log, one line
    each. An API error that reports a kernel's fault counts with the kernel errors."""
    blocks = []
    for line in text.splitlines():
        if not line.startswith(PREFIX):
            continue
        body = line[len(PREFIX):]
        if body and not body[0].isspace():
            blocks.append([body])
        elif blocks:
            blocks[-1].append(body.strip())
    kernel_errors, api_errors = [], []
    for first, *rest in blocks:
        if first.startswith(("COMPUTE-SANITIZER", "ERROR SUMMARY", "LEAK SUMMARY",
                             "Target application returned")):
            continue
        if first.startswith("Program hit"):
            fault = any(name in first for name in FAULTS)
            (kernel_errors if fault else api_errors).append(first)
            continue
        where = next((line for line in rest if line.startswith("at ")), "at an unknown place")
        ours = [k for k in [*KERNELS, *EXTENSION_KERNELS] if k in where]
        whose = f"ours ({ours[0]})" if ours else "another kernel"
        kernel_errors.append(f"{first} {where}: {whose}")
    return kernel_errors, api_errors


def memcheck() -> int:
    """This script's calls under compute-sanitizer memcheck; 1 on any error inside a kernel,
    a kernel never called, or calls that failed."""
    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not Path(sanitizer).exists():
        print("compute-sanitizer not found")
        return 1
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "memcheck.log"
        env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
        done = subprocess.run([sanitizer, "--tool", "memcheck", "--log-file", str(log),
                               sys.executable, __file__], env=env, cwd=ROOT)
        text = log.read_text(errors="replace") if log.exists() else ""
    kernel_errors, api_errors = read_log(text)
    print(f"benign: {len(api_errors)} CUDA API calls returned an error, each handled by the "
          "program (torch and Triton probing the driver):")
    for line in sorted(set(api_errors)):
        print(f"  {api_errors.count(line)} x {line}")
    print(f"errors inside kernels: {len(kernel_errors)}")
    for line in kernel_errors:
        print(f"  {line}")
    summary = next((line for line in text.splitlines() if "ERROR SUMMARY" in line), None)
    print(summary or "no ERROR SUMMARY in the sanitizer's log")
    return 1 if kernel_errors or done.returncode != 0 or summary is None else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memcheck", action="store_true",
                        help="run the calls under compute-sanitizer and read its log")
    args = parser.parse_args(argv)
    return memcheck() if args.memcheck else calls()


if __name__ == "__main__":
    sys.exit(main())
