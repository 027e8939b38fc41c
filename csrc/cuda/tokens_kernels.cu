#include "tokens_kernels.h"

#include <algorithm>

namespace mae_kernels {
namespace {

// NOTE: a warp per row, kRowsPerBlock rows per block. A bf16 ViT-B row (D=768) is 96 16-byte
// vectors: the former 256-thread block per row left 160 of its threads idle, about half the
// copy bandwidth; a warp moves it in 3 vectors per lane, every lane busy.
constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;
// vectors each lane loads before it stores any: independent loads in flight
constexpr int kVecsPerLane = 8;
constexpr int64_t kChunk = int64_t{kWarp} * kVecsPerLane;  // vectors of a row per warp pass

// Row blockIdx.x * kRowsPerBlock + threadIdx.y, its vectors of Vec split into chunks of kChunk
// over blockIdx.y. Offsets are 64-bit: B*L*D passes 2^31 at MAE-Huge sizes.
template <typename Vec, bool kGather>
__global__ void __launch_bounds__(kWarp * kRowsPerBlock)
copy_rows_kernel(const Vec* __restrict__ from, const int64_t* __restrict__ index,
                 Vec* __restrict__ to, int64_t rows, int64_t K, int64_t L, int64_t vecs_per_row) {
  const int64_t row = int64_t{blockIdx.x} * kRowsPerBlock + threadIdx.y;
  if (row >= rows) return;
  const int64_t b = row / K;
  const int64_t i = __ldg(index + row);
  const bool in_range = i >= 0 && i < L;
  if (!kGather && !in_range) return;
  Vec* dst = to + (kGather ? row : b * L + i) * vecs_per_row;
  const Vec* src = from + (kGather ? b * L + i : row) * vecs_per_row;
  for (int64_t start = blockIdx.y * kChunk; start < vecs_per_row; start += gridDim.y * kChunk) {
    Vec values[kVecsPerLane];
#pragma unroll
    for (int k = 0; k < kVecsPerLane; ++k) {
      const int64_t v = start + k * kWarp + threadIdx.x;
      values[k] = v < vecs_per_row && in_range ? src[v] : Vec{};
    }
#pragma unroll
    for (int k = 0; k < kVecsPerLane; ++k) {
      const int64_t v = start + k * kWarp + threadIdx.x;
      if (v < vecs_per_row) dst[v] = values[k];
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
  const CopyGeometry shape = copy_geometry(from, to, rows, row_bytes);
  if (shape.grid.x == 0) return cudaErrorInvalidConfiguration;
  const int64_t vecs = row_bytes / shape.vector_bytes;
  switch (shape.vector_bytes) {
#define MAE_KERNELS_LAUNCH(BYTES, VEC)                                                    \
  case BYTES:                                                                             \
    copy_rows_kernel<VEC, kGather><<<shape.grid, shape.block, 0, stream>>>(               \
        static_cast<const VEC*>(from), index, static_cast<VEC*>(to), rows, K, L, vecs);   \
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

CopyGeometry copy_geometry(const void* from, const void* to, int64_t rows, int64_t row_bytes) {
  const int width = vector_bytes(from, to, row_bytes);
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const int64_t chunks = std::min<int64_t>((row_bytes / width + kChunk - 1) / kChunk, 65535);
  if (blocks > 0x7fffffffLL) return {dim3(0), dim3(0), width};
  return {dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(chunks)),
          dim3(kWarp, kRowsPerBlock), width};
}

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
