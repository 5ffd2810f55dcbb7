// Python module of the CUDA backend (private: the public ops are defined in Python as
// torch.ops.deep_ep.*; deep_ep_ops/cuda/backend.py calls these functions).
#include <torch/extension.h>
#include <pybind11/stl.h>

#include <ATen/cuda/CUDAContext.h>
#include <nccl.h>  // NCCL_VERSION_CODE

#include <cstring>
#include <memory>
#include <vector>

#include "ops.hpp"
#include "state.hpp"
#include "host_checks.hpp"

namespace deep_ep_ops {
namespace {

std::shared_ptr<State> create_state(std::shared_ptr<PeerMemoryTransport> transport, int rank,
                                    int num_ranks, int max_tokens, int hidden, int topk,
                                    int num_experts, bool fp8, double timeout_s, int device) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(device).stream(), &status);
  if (status != cudaStreamCaptureStatusNone)
    throw std::runtime_error(
        "deep_ep_ops: a Buffer cannot be created during CUDA graph capture (it allocates "
        "peer memory collectively); create it before capturing");
  StateConfig cfg{rank, num_ranks, max_tokens, hidden, topk, num_experts, fp8, timeout_s, device};
  return std::make_shared<State>(cfg, std::move(transport));
}

// (code, rank, peer, slot, expected, seen, op) of the first GPU timeout; code 0 = none.
std::vector<int64_t> error_record(const State& st) { return error_record_fields(st.error_host); }

// Phase timestamps (ns from its start) of the last dispatch's layout kernel, or with one rank
// and compact rows of its one kernel's last tile to add its histogram (local_dispatch.cu),
// for profiling.
std::vector<int64_t> layout_times(const State& st) {
  int v[8] = {};
  cudaMemcpy(v, st.scratch.recv_info, sizeof(v), cudaMemcpyDeviceToHost);
  return {v[3], v[4], v[5], v[6], v[7]};
}

}  // namespace
}  // namespace deep_ep_ops

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace deo = deep_ep_ops;
  py::class_<deo::State, std::shared_ptr<deo::State>>(m, "State")
      .def_property_readonly("window_bytes", [](const deo::State& s) { return s.window_bytes; })
      .def_property_readonly("data_bytes", [](const deo::State& s) { return s.data_bytes; })
      .def_property_readonly("sm_count", [](const deo::State& s) { return s.sm_count; })
      .def_property_readonly("alive", &deo::State::alive)
      .def_property_readonly("transport", &deo::State::transport_name);
  m.def("create_state", &deo::create_state);
  m.def("destroy_state", [](deo::State& s) { s.destroy(); });
  m.def("error_record", &deo::error_record);
  m.def("layout_times", &deo::layout_times);
  m.def("nccl_version_code", []() { return NCCL_VERSION_CODE; });
  m.def("default_ctas", [](const deo::State& s, int64_t num_sms) { return deo::barrier_ctas(s, num_sms); });
  m.def("dispatch", &deo::dispatch, py::call_guard<py::gil_scoped_release>());
  m.def("cached_dispatch", &deo::cached_dispatch, py::call_guard<py::gil_scoped_release>());
  m.def("combine", &deo::combine, py::call_guard<py::gil_scoped_release>());
  void deep_ep_ops_bind_transport(pybind11::module_&); deep_ep_ops_bind_transport(m);  // transport/
  void deep_ep_ops_bind_aux(pybind11::module_&); deep_ep_ops_bind_aux(m);  // aux_bindings.cpp
  void deep_ep_ops_bind_torch_ops(pybind11::module_&); deep_ep_ops_bind_torch_ops(m);  // torch_ops.cpp
  void deep_ep_ops_bind_torch_autograd(pybind11::module_&); deep_ep_ops_bind_torch_autograd(m);  // torch_autograd.cpp
}
