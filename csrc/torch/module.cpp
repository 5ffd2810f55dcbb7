// The CUDA extension's Python module (private: the public ops are torch.ops.deep_ep.*, defined
// in Python; deep_ep_ops/cuda/ calls these functions). Each part binds its own functions.
#include <torch/extension.h>

#include <nccl.h>  // NCCL_VERSION_CODE

void deep_ep_ops_bind_transport(pybind11::module_&);       // transport/transport_bindings.cpp
void deep_ep_ops_bind_ep(pybind11::module_&);              // ep_bindings.cpp
void deep_ep_ops_bind_channels(pybind11::module_&);        // channel_bindings.cpp
void deep_ep_ops_bind_kernel_registry(pybind11::module_&);  // ep_kernels.cpp
void deep_ep_ops_bind_torch_autograd(pybind11::module_&);  // ep_autograd.cpp
void deep_ep_ops_bind_handle_records(pybind11::module_&);  // handle_records.cpp
void deep_ep_ops_bind_interhost(pybind11::module_&);        // interhost_bindings.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("nccl_version_code", []() { return NCCL_VERSION_CODE; });
  deep_ep_ops_bind_transport(m);
  deep_ep_ops_bind_ep(m);
  deep_ep_ops_bind_channels(m);
  deep_ep_ops_bind_kernel_registry(m);
  deep_ep_ops_bind_torch_autograd(m);
  deep_ep_ops_bind_handle_records(m);
  deep_ep_ops_bind_interhost(m);
}
