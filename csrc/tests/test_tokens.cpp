// C++ test of the CPU token kernels, through the dispatcher as a libtorch user would call them.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdlib>
#include <iostream>

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::cerr << "FAILED: " << what << "\n";
    ++failures;
  }
}

at::Tensor call_gather(const at::Tensor& x, const at::Tensor& index) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mae_kernels::gather_tokens", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(x, index);
}

at::Tensor call_scatter(const at::Tensor& src, const at::Tensor& index, int64_t length) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mae_kernels::scatter_tokens", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt)>();
  return op.call(src, index, c10::SymInt(length));
}

}  // namespace

int main() {
  torch::manual_seed(0);
  for (auto dtype : {torch::kFloat32, torch::kFloat16, torch::kBFloat16, torch::kFloat64}) {
    const int64_t B = 3, L = 11, D = 7, K = 5;
    auto x = torch::randn({B, L, D}).to(dtype);
    auto index = torch::stack({torch::randperm(L).slice(0, 0, K), torch::randperm(L).slice(0, 0, K),
                               torch::randperm(L).slice(0, 0, K)});
    auto expanded = index.unsqueeze(-1).expand({B, K, D});
    auto gathered = call_gather(x, index);
    expect(torch::equal(gathered, torch::gather(x, 1, expanded)), "gather matches torch::gather");
    auto scattered = call_scatter(gathered, index, L);
    auto want = torch::zeros_like(x).scatter(1, expanded, gathered);
    expect(torch::equal(scattered, want), "scatter matches torch::scatter");
    expect(torch::equal(call_gather(scattered, index), gathered), "gather undoes scatter");
  }
  bool threw = false;
  try {
    call_gather(torch::randn({2, 4, 3}), torch::full({2, 1}, 4, torch::kLong));
  } catch (const c10::Error&) {
    threw = true;
  }
  expect(threw, "an out-of-range index throws");
  std::cout << (failures == 0 ? "all token tests passed" : "token tests failed") << "\n";
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
