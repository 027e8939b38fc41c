"""Every Triton kernel compiles for Hopper (sm_90) with the real compiler, not the interpreter,
as its launcher would launch it at MAE sizes; the bandwidth-bound copies use 16-byte accesses."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mae_kernels._library import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
SCRIPT = Path(__file__).with_name("triton_sm90.py")
VECTOR = "ld.global.v4.b32", "st.global.v4.b32"


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                            env=env, timeout=600, cwd=SCRIPT.parents[1])
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_for_sm90(report):
    # each in bf16 and fp32; masking per strategy (random: images and video tubes); patchify,
    # unpatchify and the loss for images and for videos
    expected = {"masking_random": 4, "masking_block": 2, "masking_grid": 2, "unshuffle": 2,
                "unshuffle_backward": 2, "loss_forward": 4, "loss_backward": 4, "patchify": 8,
                "hog": 2}
    assert {name: entry["compiled"] for name, entry in report.items()} == expected


@pytest.mark.parametrize("kernel", ["masking_random", "masking_block", "masking_grid",
                                    "unshuffle", "unshuffle_backward", "patchify"])
def test_copies_use_16_byte_accesses(report, kernel):
    load, store = VECTOR
    assert load in report[kernel]["loads"] and store in report[kernel]["stores"]


def test_loss_reads_pred_and_writes_grad_in_16_byte_vectors(report):
    assert VECTOR[0] in report["loss_forward"]["loads"]
    assert VECTOR[1] in report["loss_backward"]["stores"]
