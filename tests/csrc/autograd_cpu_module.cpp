// Test-only module: csrc/torch/ep_autograd.cpp built without CUDA, so
// tests/test_cpp_autograd_cpu.py can register its kernels on AutogradCPU and check the C++
// backward formulas against the CPU reference ops (gloo) on a machine without a GPU.
#include <torch/extension.h>

void deep_ep_ops_bind_torch_autograd(pybind11::module_& m);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { deep_ep_ops_bind_torch_autograd(m); }
