// Python bindings of the channel family (pp / cp / engram): its CUDA state and entry points
// (deep_ep_ops/cuda/channels.py calls them).
#include <torch/extension.h>
#include <pybind11/stl.h>

#include <ATen/cuda/CUDAContext.h>

#include <memory>
#include <stdexcept>
#include <vector>

#include "../channels/channel_ops.hpp"
#include "../channels/channel_state.hpp"
#include "../host/cuda_check.hpp"
#include "error_dict.hpp"

namespace deep_ep_ops {
namespace {

std::shared_ptr<ChannelState> create_channel_state(std::shared_ptr<PeerMemoryTransport> transport,
                                           int rank, int num_ranks,
                                           int device, double timeout_s, int64_t pp_max_bytes,
                                           int64_t pp_inline_bytes, int64_t pp_slots,
                                           int64_t cp_max_bytes, int64_t cp_inline_bytes) {
  if (stream_capturing(at::cuda::getCurrentCUDAStream(device).stream()))
    throw std::runtime_error("deep_ep_ops: a Buffer cannot be created during CUDA graph capture");
  ChannelConfig cfg{rank,         num_ranks,       device,
                timeout_s,    pp_max_bytes,    pp_inline_bytes,
                static_cast<int>(pp_slots), cp_max_bytes, cp_inline_bytes};
  return std::make_shared<ChannelState>(cfg, std::move(transport));
}

}  // namespace
}  // namespace deep_ep_ops

void deep_ep_ops_bind_channels(pybind11::module_& m) {
  namespace deo = deep_ep_ops;
  namespace py = pybind11;
  py::class_<deo::ChannelState, std::shared_ptr<deo::ChannelState>>(m, "ChannelState")
      .def_property_readonly("window_bytes", [](const deo::ChannelState& s) { return s.lay.window_bytes; })
      .def_property_readonly("pp_max_bytes", [](const deo::ChannelState& s) { return s.lay.pp_max_bytes; })
      .def_property_readonly("pp_inline_bytes", [](const deo::ChannelState& s) { return s.lay.pp_inline_bytes; })
      .def_property_readonly("cp_max_bytes", [](const deo::ChannelState& s) { return s.lay.cp_max_bytes; })
      .def_property_readonly("cp_inline_bytes", [](const deo::ChannelState& s) { return s.lay.cp_inline_bytes; })
      .def_property_readonly("alive", &deo::ChannelState::alive);
  m.def("create_channel_state", &deo::create_channel_state);
  m.def("destroy_channel_state", [](deo::ChannelState& s) { s.destroy(); });
  m.def("channel_last_error", [](const deo::ChannelState& s) { return deo::error_dict(s.error_host); });
  m.def("pp_send_recv", &deo::pp_send_recv, py::call_guard<py::gil_scoped_release>());
  m.def("cp_all_gather", &deo::cp_all_gather, py::call_guard<py::gil_scoped_release>());
  m.def("cp_reduce_scatter", &deo::cp_reduce_scatter, py::call_guard<py::gil_scoped_release>());
  m.def("cp_input", &deo::cp_input);
  m.def("engram_table", &deo::engram_table, py::call_guard<py::gil_scoped_release>());
  m.def("engram_fetch", &deo::engram_fetch, py::call_guard<py::gil_scoped_release>());
  m.def("engram_scatter_add", &deo::engram_scatter_add, py::call_guard<py::gil_scoped_release>());
}
