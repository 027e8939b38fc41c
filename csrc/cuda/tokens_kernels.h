// Plain CUDA launchers for the token primitives. No ATen types cross this boundary, so the
// kernels compile with nvcc alone (CI checks them without a CUDA build of torch).
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace mae_kernels {

// How a copy of `rows` rows of `row_bytes` bytes between `from` and `to` is launched: the widest
// vector that divides the row and both addresses, a warp per row, several rows per block, long
// rows split over grid.y. grid.x is 0 when the rows are too many for one launch.
struct CopyGeometry {
  dim3 grid;
  dim3 block;
  int vector_bytes;
};
CopyGeometry copy_geometry(const void* from, const void* to, int64_t rows, int64_t row_bytes);

// out[b, k, :] = x[b, index[b, k], :]; rows whose index is out of [0, L) are written as zeros.
cudaError_t launch_gather_rows(const void* x, const int64_t* index, void* out, int64_t B,
                               int64_t L, int64_t K, int64_t row_bytes, cudaStream_t stream);

// out[b, index[b, k], :] = src[b, k, :]; out must be zero-filled; out-of-range rows are skipped.
cudaError_t launch_scatter_rows(const void* src, const int64_t* index, void* out, int64_t B,
                                int64_t K, int64_t length, int64_t row_bytes, cudaStream_t stream);

}  // namespace mae_kernels
