// Token gather/scatter: the primitives behind masking and its backward.
//   gather_tokens(x, index)[b, k]          = x[b, index[b, k]]
//   scatter_tokens(src, index, length)[b, index[b, k]] = src[b, k], zeros elsewhere
// Rows are copied whole, so the kernels depend on the element size only, not on the dtype.
#pragma once

#include <ATen/core/Tensor.h>

namespace mae_kernels {

at::Tensor gather_tokens_cpu(const at::Tensor& x, const at::Tensor& index);
at::Tensor scatter_tokens_cpu(const at::Tensor& src, const at::Tensor& index, int64_t length);

// Shared argument checks for every backend; raise c10::ValueError / c10::TypeError.
void check_gather_args(const at::Tensor& x, const at::Tensor& index);
void check_scatter_args(const at::Tensor& src, const at::Tensor& index, int64_t length);

}  // namespace mae_kernels
