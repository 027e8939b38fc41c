// ATen side of the CUDA token primitives: checks, device guard, current stream.
#include "../tokens.h"
#include "tokens_kernels.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace mae_kernels {
namespace {

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, " kernel launch failed: ", cudaGetErrorString(status));
}

at::Tensor gather_tokens_cuda(const at::Tensor& x_in, const at::Tensor& index_in) {
  check_gather_args(x_in, index_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2), K = index.size(1);
  at::Tensor out = at::empty({B, K, D}, x.options());
  check_launch(launch_gather_rows(x.const_data_ptr(), index.const_data_ptr<int64_t>(),
                                  out.mutable_data_ptr(), B, L, K, D * x.element_size(),
                                  c10::cuda::getCurrentCUDAStream()),
               "gather_tokens");
  return out;
}

at::Tensor scatter_tokens_cuda(const at::Tensor& src_in, const at::Tensor& index_in,
                               int64_t length) {
  check_scatter_args(src_in, index_in, length);
  const c10::cuda::CUDAGuard guard(src_in.device());
  const at::Tensor src = src_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  const int64_t B = src.size(0), K = src.size(1), D = src.size(2);
  at::Tensor out = at::zeros({B, length, D}, src.options());
  check_launch(launch_scatter_rows(src.const_data_ptr(), index.const_data_ptr<int64_t>(),
                                   out.mutable_data_ptr(), B, K, length, D * src.element_size(),
                                   c10::cuda::getCurrentCUDAStream()),
               "scatter_tokens");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mae_kernels, CUDA, m) {
  m.impl("gather_tokens", &gather_tokens_cuda);
  m.impl("scatter_tokens", &scatter_tokens_cuda);
}

}  // namespace mae_kernels
