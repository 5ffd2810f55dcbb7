// Python module of the CUDA backend (private: the public ops are defined in Python as
// torch.ops.deep_ep.*; deep_ep_ops/cuda/backend.py calls these functions).
#include <torch/extension.h>

#include <ATen/cuda/CUDAContext.h>
#include <nccl.h>

#include <cstring>
#include <memory>

#include "ops.hpp"
#include "state.hpp"

namespace deep_ep_ops {
namespace {

std::shared_ptr<State> create_state(uintptr_t comm_ptr, int rank, int num_ranks, int max_tokens,
                                    int hidden, int topk, int num_experts, bool fp8,
                                    double timeout_s, int device) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(device).stream(), &status);
  if (status != cudaStreamCaptureStatusNone)
    throw std::runtime_error(
        "deep_ep_ops: a Buffer cannot be created during CUDA graph capture (it allocates and "
        "registers symmetric memory collectively); create it before capturing");
  if (comm_ptr == 0) throw std::runtime_error("deep_ep_ops: the NCCL communicator pointer is null");
  StateConfig cfg{comm_ptr, rank, num_ranks, max_tokens, hidden, topk, num_experts, fp8,
                  timeout_s, device};
  return std::make_shared<State>(cfg);
}

py::object last_error(const State& st) {
  if (st.error_host == nullptr || st.error_host->code == 0) return py::none();
  ErrorRecord e;
  std::memcpy(&e, static_cast<const void*>(st.error_host), sizeof(e));
  py::dict d;
  d["rank"] = e.rank;
  d["peer"] = e.peer;
  d["slot"] = e.slot;
  d["expected"] = e.expected;
  d["seen"] = e.seen;
  d["op"] = e.op;
  d["message"] = describe_error(e);
  return d;
}

}  // namespace
}  // namespace deep_ep_ops

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace deo = deep_ep_ops;
  py::class_<deo::State, std::shared_ptr<deo::State>>(m, "State")
      .def_property_readonly("window_bytes", [](const deo::State& s) { return s.window_bytes; })
      .def_property_readonly("data_bytes", [](const deo::State& s) { return s.data_bytes; })
      .def_property_readonly("sm_count", [](const deo::State& s) { return s.sm_count; })
      .def_property_readonly("alive", &deo::State::alive);
  m.def("create_state", &deo::create_state);
  m.def("destroy_state", [](deo::State& s) { s.destroy(); });
  m.def("last_error", &deo::last_error);
  m.def("nccl_version_code", []() { return NCCL_VERSION_CODE; });
  m.def("default_ctas", [](const deo::State& s, int64_t num_sms) { return deo::barrier_ctas(s, num_sms); });
  m.def("dispatch", &deo::dispatch, py::call_guard<py::gil_scoped_release>());
  m.def("cached_dispatch", &deo::cached_dispatch, py::call_guard<py::gil_scoped_release>());
  m.def("combine", &deo::combine, py::call_guard<py::gil_scoped_release>());
}
