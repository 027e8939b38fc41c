// Schema registration and the CPU kernels of the token primitives.
#include "tokens.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstring>

// The torch this library was compiled against, read from the file (not by loading it) by
// mae_kernels/_extension.py, so that a library built for another torch is rebuilt, never loaded.
#define MAE_KERNELS_STR_(x) #x
#define MAE_KERNELS_STR(x) MAE_KERNELS_STR_(x)
#ifndef MAE_KERNELS_TORCH
#define MAE_KERNELS_TORCH unknown
#endif
extern "C" __attribute__((used, visibility("default"))) const char mae_kernels_build_tag[] =
    "mae_kernels build: " MAE_KERNELS_STR(MAE_KERNELS_TORCH) ";";

namespace mae_kernels {

namespace {

void check_common(const at::Tensor& data, const char* data_name, const at::Tensor& index) {
  TORCH_CHECK_VALUE(data.dim() == 3, data_name, " must have shape (B, L, D), got ", data.dim(),
                    " dimensions");
  TORCH_CHECK_VALUE(index.dim() == 2, "index must have shape (B, K), got ", index.dim(),
                    " dimensions");
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "index must be int64, got ",
                   index.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(data.scalar_type()), data_name,
                   " must be a floating-point tensor, got ", data.scalar_type());
  TORCH_CHECK_VALUE(index.size(0) == data.size(0), "index has batch size ", index.size(0),
                    " but ", data_name, " has ", data.size(0));
  TORCH_CHECK_VALUE(index.device() == data.device(), "index is on ", index.device(), " but ",
                    data_name, " is on ", data.device());
}

// Rows are independent; one task per chunk of (b, k) rows.
template <typename CopyRow>
void for_each_row(int64_t rows, int64_t row_bytes, const CopyRow& copy_row) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) copy_row(r);
  });
}

}  // namespace

void check_gather_args(const at::Tensor& x, const at::Tensor& index) {
  check_common(x, "x", index);
}

void check_scatter_args(const at::Tensor& src, const at::Tensor& index, int64_t length) {
  check_common(src, "src", index);
  TORCH_CHECK_VALUE(index.size(1) == src.size(1), "index has ", index.size(1),
                    " tokens per row but src has ", src.size(1));
  TORCH_CHECK_VALUE(length >= index.size(1), "length (", length,
                    ") must be at least the number of scattered tokens (", index.size(1), ")");
}

at::Tensor gather_tokens_cpu(const at::Tensor& x_in, const at::Tensor& index_in) {
  check_gather_args(x_in, index_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), K = index.size(1);
  at::Tensor out = at::empty({B, K, D}, x.options());
  const int64_t row_bytes = D * x.element_size();
  const auto* src = static_cast<const char*>(x.const_data_ptr());
  auto* dst = static_cast<char*>(out.mutable_data_ptr());
  const int64_t* idx = index.const_data_ptr<int64_t>();
  for_each_row(B * K, row_bytes, [&](int64_t r) {
    const int64_t b = r / K;
    const int64_t i = idx[r];
    TORCH_CHECK_INDEX(i >= 0 && i < L, "index[", b, ", ", r % K, "] = ", i,
                      " is out of range for x with L = ", L);
    std::memcpy(dst + r * row_bytes, src + (b * L + i) * row_bytes, row_bytes);
  });
  return out;
}

at::Tensor scatter_tokens_cpu(const at::Tensor& src_in, const at::Tensor& index_in,
                              int64_t length) {
  check_scatter_args(src_in, index_in, length);
  const at::Tensor src = src_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  const int64_t B = src.size(0), K = src.size(1), D = src.size(2);
  at::Tensor out = at::zeros({B, length, D}, src.options());
  const int64_t row_bytes = D * src.element_size();
  const auto* from = static_cast<const char*>(src.const_data_ptr());
  auto* to = static_cast<char*>(out.mutable_data_ptr());
  const int64_t* idx = index.const_data_ptr<int64_t>();
  for_each_row(B * K, row_bytes, [&](int64_t r) {
    const int64_t b = r / K;
    const int64_t i = idx[r];
    TORCH_CHECK_INDEX(i >= 0 && i < length, "index[", b, ", ", r % K, "] = ", i,
                      " is out of range for length ", length);
    std::memcpy(to + (b * length + i) * row_bytes, from + r * row_bytes, row_bytes);
  });
  return out;
}

TORCH_LIBRARY(mae_kernels, m) {
  m.def("gather_tokens(Tensor x, Tensor index) -> Tensor");
  m.def("scatter_tokens(Tensor src, Tensor index, SymInt length) -> Tensor");
}

TORCH_LIBRARY_IMPL(mae_kernels, CPU, m) {
  m.impl("gather_tokens", &gather_tokens_cpu);
  m.impl("scatter_tokens", &scatter_tokens_cpu);
}

}  // namespace mae_kernels
