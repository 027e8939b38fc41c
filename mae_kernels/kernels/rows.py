"""Row gather/scatter in Triton: out[b, k] = x[b, index[b, k]] and its adjoint."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

NUM_WARPS = 4


@triton.jit
def _copy_rows_kernel(src_ptr, index_ptr, dst_ptr, K, L_src, L_dst, D,
                      GATHER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # a (b, k) pair; 64-bit so offsets cannot overflow
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    b = row // K
    i = tl.load(index_ptr + row)
    if GATHER:
        src_row = b * L_src + i
        dst_row = row
    else:
        src_row = row
        dst_row = b * L_dst + i
    valid = cols < D
    values = tl.load(src_ptr + src_row * D + cols, mask=valid)
    tl.store(dst_ptr + dst_row * D + cols, values, mask=valid)


def _launch(src, index, dst, K, L_src, L_dst, gather: bool):
    rows, D = index.numel(), src.shape[-1]
    if rows == 0 or D == 0:
        return dst
    # 16 bytes per thread per access: 128 threads x 8 bf16 (or 4 float32) values
    block = min(16 // src.element_size() * 32 * NUM_WARPS, triton.next_power_of_2(D))
    grid = (rows, triton.cdiv(D, block))
    _copy_rows_kernel[grid](src, index, dst, K, L_src, L_dst, D, GATHER=gather, BLOCK=block,
                            num_warps=NUM_WARPS)
    return dst


def gather_rows_triton(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    x, index = x.contiguous(), index.contiguous()
    B, L, D = x.shape
    K = index.shape[1]
    out = x.new_empty(B, K, D)
    return _launch(x, index, out, K, L, K, gather=True)


def scatter_rows_triton(src: torch.Tensor, index: torch.Tensor, length: int) -> torch.Tensor:
    src, index = src.contiguous(), index.contiguous()
    B, K, D = src.shape
    out = src.new_zeros(B, length, D)
    return _launch(src, index, out, K, K, length, gather=False)
