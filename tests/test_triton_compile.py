"""Every Triton kernel compiles for Hopper (sm_90) with the real compiler, not the interpreter,
as its launcher would launch it at MAE sizes; the bandwidth-bound copies use 16-byte accesses;
the masking kernels neither spill nor crowd the register file up to the longest fused row. And
the extension's CUDA gather/scatter: how its launches are sized, compiled with nvcc."""
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
    # each in bf16 and fp32; masking per strategy (random: images, video tubes and CrossMAE's
    # predicted subset; units: Pixio's), and each strategy at S = 1024 and 4096 in bf16;
    # patchify, unpatchify and the loss for images, for videos and over a predicted subset;
    # patchify of an unaligned view
    expected = {"masking_random": 8, "masking_block": 4, "masking_grid": 4, "masking_units": 4,
                "masking_gather": 20, "unshuffle": 2, "unshuffle_backward": 2,
                "loss_forward": 6, "loss_backward": 6, "patchify": 10, "hog": 2,
                "resized_crop": 4, "decoder_queries": 2, "decoder_queries_backward": 2}
    assert {name: entry["compiled"] for name, entry in report.items()} == expected


def test_launches_compile_with_the_jit_s_specialisations(report):
    """As the JIT specialises them on the GPU: integers equal to 1 become constants, and only
    16-byte aligned pointers get the divisibility hint (a hand-made signature typed those
    integers i32 and assumed every pointer aligned)."""
    (unshuffle, *_) = report["unshuffle"]["resources"]
    assert unshuffle["args"]["P"] == 1 and "P" in unshuffle["constants"], unshuffle
    images = [r for r in report["masking_random"]["resources"] if r["args"]["frames"] == 1]
    assert images and all("frames" in r["constants"] for r in images)
    unaligned = [r for r in report["patchify"]["resources"] if "img_ptr" not in r["divisible"]]
    assert len(unaligned) == 2 and all("patches_ptr" in r["divisible"] for r in unaligned)


@pytest.mark.parametrize("kernel", ["masking_gather", "unshuffle", "unshuffle_backward",
                                    "patchify", "decoder_queries"])
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


MASKING = ["masking_random", "masking_block", "masking_grid", "masking_units", "masking_gather"]


def test_masking_kernels_do_not_spill(report):
    """At S = 196 (ViT-B/16; VideoMAE-B's tubes: 8 frames of 196), 256 (Pixio at 256 px),
    1024 and 4096 (the longest row fused), no masking kernel spills or needs more than 128
    registers a thread (the former single kernel: 255 and 280-488 bytes of stack at S = 4096)."""
    launches = [(name, r) for name in MASKING for r in report[name]["resources"]]
    table = "\n".join(f"{name} {r['args']}: {r['regs']} registers, {r['stack']} B stack"
                      for name, r in launches)
    sizes = {r["args"]["S"] for name, r in launches if name != "masking_gather"}
    assert sizes == {196, 256, 1024, 4096}, table
    assert all(r["stack"] == 0 and r["regs"] <= 128 for name, r in launches), table


def test_masking_gather_tile_is_sized_by_the_kept_rows(report):
    """The gather's tile holds kept rows only: at most next_power_of_2 of them (49 kept of 196:
    64 rows, not 256)."""
    for r in report["masking_gather"]["resources"]:
        rows = r["args"]["R"]
        assert r["args"]["BLOCK_R"] <= 1 << (rows - 1).bit_length(), r["args"]


NVCC = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
GEOMETRY = r"""
#include "tokens_kernels.h"
#include <cstdio>
int main() {
  alignas(16) static char from[16], to[16];
  // rows, bytes per row: ViT-B/16's kept tokens, bf16 D=768 and float32 D=1024; an odd row
  // (float32 D=33); one long row
  const long long cases[][2] = {{256 * 49, 768 * 2}, {256 * 49, 1024 * 4}, {256 * 49, 33 * 4},
                                {1, 1 << 24}};
  for (const auto& c : cases) {
    const auto g = mae_kernels::copy_geometry(from, to, c[0], c[1]);
    std::printf("%lld %lld %u %u %u %u %d\n", c[0], c[1], g.grid.x, g.grid.y, g.block.x,
                g.block.y, g.vector_bytes);
  }
}
"""


@pytest.mark.skipif(not NVCC.exists(), reason="nvcc not found (CUDA_HOME)")
def test_gather_scatter_launches_keep_every_lane_busy(tmp_path):
    """The extension's copies: a warp per row, several rows per block, 16-byte vectors. A bf16
    ViT-B row is 96 vectors: every lane of its warp moves 3 (a 256-thread block per row left
    160 threads idle). Built with nvcc for sm_90 and run on the host (no GPU call)."""
    csrc = Path(__file__).parents[1] / "csrc" / "cuda"
    (tmp_path / "geometry.cu").write_text(GEOMETRY)
    build = subprocess.run([str(NVCC), "-arch=sm_90", "-O2", f"-I{csrc}",
                            str(csrc / "tokens_kernels.cu"), str(tmp_path / "geometry.cu"),
                            "-o", str(tmp_path / "geometry")],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    out = subprocess.run([str(tmp_path / "geometry")], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    shapes = {}
    for line in out.splitlines():
        rows, row_bytes, *launch = map(int, line.split())
        shapes[rows, row_bytes] = dict(zip(["grid_x", "grid_y", "lanes", "rows_per_block",
                                            "width"], launch))
    for (rows, _), g in shapes.items():
        assert g["lanes"] == 32 and g["rows_per_block"] > 1, g  # a warp per row
        assert g["grid_x"] * g["rows_per_block"] >= rows, g
    for row_bytes in (768 * 2, 1024 * 4):  # ViT-B/16's rows: 16-byte vectors, no lane idle
        g = shapes[256 * 49, row_bytes]
        vectors = row_bytes // g["width"]
        assert g["width"] == 16 and vectors % g["lanes"] == 0, g
    assert shapes[256 * 49, 33 * 4]["width"] == 4  # the widest vector that divides the row
    assert shapes[1, 1 << 24]["grid_y"] > 1  # a long row is shared by several warps
