// Python bindings of the pp / cp / engram backend (AuxState and its ops). bindings.cpp calls
// deep_ep_ops_bind_aux(m) from its module init, so this file owns everything aux-related.
#include <torch/extension.h>
#include <pybind11/stl.h>

#include <ATen/cuda/CUDAContext.h>

#include <memory>
#include <stdexcept>
#include <vector>

#include "aux_ops.hpp"
#include "aux_state.hpp"

namespace deep_ep_ops {
namespace {

std::shared_ptr<AuxState> create_aux_state(std::shared_ptr<PeerMemoryTransport> transport,
                                           int rank, int num_ranks,
                                           int device, double timeout_s, int64_t pp_max_bytes,
                                           int64_t pp_inline_bytes, int64_t pp_slots,
                                           int64_t cp_max_bytes, int64_t cp_inline_bytes) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(device).stream(), &status);
  if (status != cudaStreamCaptureStatusNone)
    throw std::runtime_error("deep_ep_ops: a Buffer cannot be created during CUDA graph capture");
  AuxConfig cfg{rank,         num_ranks,       device,
                timeout_s,    pp_max_bytes,    pp_inline_bytes,
                static_cast<int>(pp_slots), cp_max_bytes, cp_inline_bytes};
  return std::make_shared<AuxState>(cfg, std::move(transport));
}

}  // namespace
}  // namespace deep_ep_ops

void deep_ep_ops_bind_aux(pybind11::module_& m) {
  namespace deo = deep_ep_ops;
  namespace py = pybind11;
  py::class_<deo::AuxState, std::shared_ptr<deo::AuxState>>(m, "AuxState")
      .def_property_readonly("window_bytes", [](const deo::AuxState& s) { return s.lay.window_bytes; })
      .def_property_readonly("pp_max_bytes", [](const deo::AuxState& s) { return s.lay.pp_max_bytes; })
      .def_property_readonly("pp_inline_bytes", [](const deo::AuxState& s) { return s.lay.pp_inline_bytes; })
      .def_property_readonly("cp_max_bytes", [](const deo::AuxState& s) { return s.lay.cp_max_bytes; })
      .def_property_readonly("cp_inline_bytes", [](const deo::AuxState& s) { return s.lay.cp_inline_bytes; })
      .def_property_readonly("alive", &deo::AuxState::alive);
  m.def("create_aux_state", &deo::create_aux_state);
  m.def("destroy_aux_state", [](deo::AuxState& s) { s.destroy(); });
  m.def("aux_error_record", &deo::aux_error_record);
  m.def("pp_send_recv", &deo::pp_send_recv, py::call_guard<py::gil_scoped_release>());
  m.def("cp_all_gather", &deo::cp_all_gather, py::call_guard<py::gil_scoped_release>());
  m.def("cp_reduce_scatter", &deo::cp_reduce_scatter, py::call_guard<py::gil_scoped_release>());
  m.def("cp_input", &deo::cp_input);
  m.def("engram_table", &deo::engram_table, py::call_guard<py::gil_scoped_release>());
  m.def("engram_fetch", &deo::engram_fetch, py::call_guard<py::gil_scoped_release>());
  m.def("engram_scatter_add", &deo::engram_scatter_add, py::call_guard<py::gil_scoped_release>());
}
