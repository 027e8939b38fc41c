#include "tokens_kernels.h"

#include <algorithm>

namespace mae_kernels {
namespace {

constexpr int kThreads = 256;

// One (b, k) row per blockIdx.x, vectors of Vec along the row. Offsets are 64-bit: B*L*D
// passes 2^31 at MAE-Huge sizes.
template <typename Vec, bool kGather>
__global__ void copy_rows_kernel(const Vec* __restrict__ from, const int64_t* __restrict__ index,
                                 Vec* __restrict__ to, int64_t K, int64_t L, int64_t vecs_per_row) {
  const int64_t row = blockIdx.x;
  const int64_t b = row / K;
  const int64_t i = __ldg(index + row);
  const bool in_range = i >= 0 && i < L;
  if (!kGather && !in_range) return;
  Vec* dst = to + (kGather ? row : b * L + i) * vecs_per_row;
  const Vec* src = from + (kGather ? b * L + i : row) * vecs_per_row;
  for (int64_t v = blockIdx.y * int64_t{blockDim.x} + threadIdx.x; v < vecs_per_row;
       v += int64_t{gridDim.y} * blockDim.x) {
    if (kGather && !in_range) {
      dst[v] = Vec{};
    } else {
      dst[v] = src[v];
    }
  }
}

// The widest vector (16, 8, 4, 2 or 1 bytes) that divides the row and both base addresses.
int vector_bytes(const void* a, const void* b, int64_t row_bytes) {
  const auto addr = reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b);
  for (int width : {16, 8, 4, 2}) {
    if (row_bytes % width == 0 && addr % width == 0) return width;
  }
  return 1;
}

template <bool kGather>
cudaError_t launch(const void* from, const int64_t* index, void* to, int64_t rows, int64_t K,
                   int64_t L, int64_t row_bytes, cudaStream_t stream) {
  if (rows == 0 || row_bytes == 0) return cudaSuccess;
  const int width = vector_bytes(from, to, row_bytes);
  const int64_t vecs = row_bytes / width;
  if (rows > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const int64_t chunks = std::min<int64_t>((vecs + kThreads - 1) / kThreads, 65535);
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(chunks));
  switch (width) {
#define MAE_KERNELS_LAUNCH(BYTES, VEC)                                                    \
  case BYTES:                                                                             \
    copy_rows_kernel<VEC, kGather><<<grid, kThreads, 0, stream>>>(                        \
        static_cast<const VEC*>(from), index, static_cast<VEC*>(to), K, L, vecs);         \
    break;
    MAE_KERNELS_LAUNCH(16, uint4)
    MAE_KERNELS_LAUNCH(8, uint2)
    MAE_KERNELS_LAUNCH(4, uint32_t)
    MAE_KERNELS_LAUNCH(2, uint16_t)
    MAE_KERNELS_LAUNCH(1, uint8_t)
#undef MAE_KERNELS_LAUNCH
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gather_rows(const void* x, const int64_t* index, void* out, int64_t B,
                               int64_t L, int64_t K, int64_t row_bytes, cudaStream_t stream) {
  return launch<true>(x, index, out, B * K, K, L, row_bytes, stream);
}

cudaError_t launch_scatter_rows(const void* src, const int64_t* index, void* out, int64_t B,
                                int64_t K, int64_t length, int64_t row_bytes,
                                cudaStream_t stream) {
  return launch<false>(src, index, out, B * K, K, length, row_bytes, stream);
}

}  // namespace mae_kernels
