// Autograd kernels (DispatchKey::AutogradCUDA) of torch.ops.deep_ep.{_dispatch_static,
// cached_dispatch, combine}: the formulas of deep_ep_ops/autograd_formulas.py, rendered into
// generated/ep_autograd_formulas.hpp (deep_ep_ops/codegen/ep_autograd.py), so an eager call on
// CUDA tensors never enters Python. CPU tensors keep the Python autograd kernel, which evaluates
// the same table (it is registered on the Autograd alias key; a kernel on AutogradCUDA takes
// precedence for CUDA).
#include <torch/extension.h>

#include <c10/core/DispatchKey.h>
#include <torch/library.h>

#include <memory>
#include <mutex>
#include <string>

#include "generated/ep_autograd_formulas.hpp"  // rendered from deep_ep_ops/autograd_formulas.py

namespace deep_ep_ops {
namespace {

std::mutex g_mutex;
std::unique_ptr<torch::Library> g_lib;

}  // namespace

// Register the kernels on `dispatch_key` (once per process): AutogradCUDA from
// deep_ep_ops.ops._use_cpp_kernels (unless DEEP_EP_OPS_CPP_AUTOGRAD=0); AutogradCPU only in
// tests/test_cpp_autograd_cpu.py, which checks these formulas on CPU over gloo.
void register_autograd_kernels(const std::string& dispatch_key) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_lib) return;
  auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, "deep_ep",
                                              c10::parseDispatchKey(dispatch_key), __FILE__,
                                              __LINE__);
  autograd_formulas::register_all(*lib);
  g_lib = std::move(lib);
}

}  // namespace deep_ep_ops

void deep_ep_ops_bind_torch_autograd(pybind11::module_& m) {
  m.def("register_autograd_kernels", &deep_ep_ops::register_autograd_kernels,
        pybind11::arg("dispatch_key") = "AutogradCUDA");
}
