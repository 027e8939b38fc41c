"""Every Triton kernel compiles for Hopper (sm_90) with the real compiler, not the interpreter,
as its launcher would launch it at MAE sizes; the bandwidth-bound copies use 16-byte accesses;
the masking kernels neither spill nor crowd the register file up to the longest fused row."""
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
    # each in bf16 and fp32; masking per strategy (random: images and video tubes), and each
    # strategy at S = 1024 and 4096 in bf16; patchify, unpatchify and the loss for images and
    # for videos
    expected = {"masking_random": 6, "masking_block": 4, "masking_grid": 4, "masking_gather": 14,
                "unshuffle": 2, "unshuffle_backward": 2, "loss_forward": 4, "loss_backward": 4,
                "patchify": 8, "hog": 2, "resized_crop": 4}
    assert {name: entry["compiled"] for name, entry in report.items()} == expected


@pytest.mark.parametrize("kernel", ["masking_gather", "unshuffle", "unshuffle_backward",
                                    "patchify"])
def test_copies_use_16_byte_accesses(report, kernel):
    load, store = VECTOR
    assert load in report[kernel]["loads"] and store in report[kernel]["stores"]


def test_loss_reads_pred_and_writes_grad_in_16_byte_vectors(report):
    assert VECTOR[0] in report["loss_forward"]["loads"]
    assert VECTOR[1] in report["loss_backward"]["stores"]


def test_resized_crop_writes_16_byte_vectors(report):
    """Both output layouts (a channel's row; a patch row's p*3 interleaved values), each in
    bf16 and fp32: the uint8 reads are gathers, the writes whole vectors."""
    assert report["resized_crop"]["stores"] == [VECTOR[1]]


MASKING = ["masking_random", "masking_block", "masking_grid", "masking_gather"]


def test_masking_kernels_do_not_spill(report):
    """At S = 196 (ViT-B/16; VideoMAE-B's tubes: 8 frames of 196), 1024 and 4096 (the longest
    row fused), no masking kernel spills or needs more than 128 registers a thread (the former
    single kernel: 255 and 280-488 bytes of stack at S = 4096)."""
    launches = [(name, r) for name in MASKING for r in report[name]["resources"]]
    table = "\n".join(f"{name} {r['args']}: {r['regs']} registers, {r['stack']} B stack"
                      for name, r in launches)
    sizes = {r["args"]["S"] for name, r in launches if name != "masking_gather"}
    assert sizes == {196, 1024, 4096}, table
    assert all(r["stack"] == 0 and r["regs"] <= 128 for _, r in launches), table


def test_masking_gather_tile_is_sized_by_the_kept_rows(report):
    """The gather's tile holds kept rows only: at most next_power_of_2 of them (49 kept of 196:
    64 rows, not 256)."""
    for r in report["masking_gather"]["resources"]:
        rows = r["args"]["R"]
        assert r["args"]["BLOCK_R"] <= 1 << (rows - 1).bit_length(), r["args"]
