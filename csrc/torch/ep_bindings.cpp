// Python bindings of the EP family's CUDA state and entry points (deep_ep_ops/cuda/ep.py calls
// them; the eager path of the ops goes through the C++ kernels of ep_kernels.cpp instead).
#include <torch/extension.h>
#include <pybind11/stl.h>

#include <ATen/cuda/CUDAContext.h>

#include <memory>
#include <stdexcept>
#include <vector>

#include "../ep/ep_launch.hpp"
#include "../ep/ep_ops.hpp"
#include "../ep/ep_state.hpp"
#include "../host/cuda_check.hpp"
#include "error_dict.hpp"

namespace deep_ep_ops {
namespace {

std::shared_ptr<EpState> create_state(std::shared_ptr<PeerMemoryTransport> transport,
                                      int buffer_id, int rank, int num_ranks, int max_tokens,
                                      int hidden, int topk, int num_experts, bool fp8,
                                      double timeout_s, int device, int direct_slots,
                                      bool zero_copy_combine) {
  if (stream_capturing(at::cuda::getCurrentCUDAStream(device).stream()))
    throw std::runtime_error(
        "deep_ep_ops: a Buffer cannot be created during CUDA graph capture (it allocates "
        "peer memory collectively); create it before capturing");
  EpConfig cfg{buffer_id, rank,        num_ranks, max_tokens, hidden,
               topk,      num_experts, fp8,       timeout_s,  device, direct_slots,
               zero_copy_combine};
  return std::make_shared<EpState>(cfg, std::move(transport));
}

// Phase timestamps (ns from its start) of the last dispatch's layout kernel, or with one rank
// and compact rows of its one kernel's last tile to add its histogram (local_dispatch.cu),
// for profiling.
std::vector<int64_t> layout_times(const EpState& st) {
  int v[8] = {};
  cudaMemcpy(v, st.scratch.recv_info, sizeof(v), cudaMemcpyDeviceToHost);
  return {v[3], v[4], v[5], v[6], v[7]};
}

// The last dispatch with more than one rank in global nanoseconds of the GPU's clock (the same
// for every rank on one GPU, so their timelines line up): the kernel stamps (KernelStamp
// order), then each push CTA's kPushStamps.
std::vector<int64_t> dispatch_timeline(const EpState& st) {
  std::vector<unsigned long long> raw(kKernelStamps +
                                      static_cast<size_t>(st.last_push_ctas) * kPushStamps);
  cudaMemcpy(raw.data(), st.scratch.kernel_times, kKernelStamps * sizeof(raw[0]),
             cudaMemcpyDeviceToHost);
  cudaMemcpy(raw.data() + kKernelStamps, st.scratch.push_times,
             (raw.size() - kKernelStamps) * sizeof(raw[0]), cudaMemcpyDeviceToHost);
  return std::vector<int64_t>(raw.begin(), raw.end());
}

}  // namespace
}  // namespace deep_ep_ops

void deep_ep_ops_bind_ep(pybind11::module_& m) {
  namespace deo = deep_ep_ops;
  namespace py = pybind11;
  py::class_<deo::EpState, std::shared_ptr<deo::EpState>>(m, "EpState")
      .def_property_readonly("window_bytes", [](const deo::EpState& s) { return s.win.window_bytes; })
      // this rank's window as mapped here (tests check which outputs live in it)
      .def_property_readonly("window_base", [](const deo::EpState& s) {
        return reinterpret_cast<uintptr_t>(s.comm.peer_base[s.cfg.rank]);
      })
      .def_property_readonly("data_bytes", [](const deo::EpState& s) { return s.win.data_bytes; })
      .def_property_readonly("sm_count", [](const deo::EpState& s) { return s.sm_count; })
      .def_property_readonly("alive", &deo::EpState::alive)
      .def_property_readonly("transport", &deo::EpState::transport_name)
      // direct-output slots: how many, how many hold live outputs, and how the dispatches with
      // more than one rank placed their rows so far (tests and benchmarks read it)
      .def_property_readonly("direct_output_stats", [](const deo::EpState& s) {
        return py::dict(py::arg("slots") = s.slots->size(), py::arg("busy") = s.slots->busy(),
                        py::arg("slot_bytes") = s.win.slot_bytes,
                        py::arg("direct") = s.slots->direct.load(),
                        py::arg("staged") = s.slots->staged.load());
      })
      // zero-copy combine: combines with more than one rank whose input the peers read in
      // place, and those that pushed partials
      .def_property_readonly("combine_input_stats", [](const deo::EpState& s) {
        return py::dict(py::arg("slots") = s.win.num_cin_slots,
                        py::arg("slot_bytes") = s.win.cin_slot_bytes,
                        py::arg("in_place") = s.combine_in_place.load(),
                        py::arg("pushed") = s.combine_pushed.load());
      })
      // dispatches with more than one rank: rows fanned out by bulk copies or by registers (of
      // those, how many by the pipelined compact loop, and of these how many counted in the
      // push itself), those whose routing outputs the pushes wrote into a direct-output slot
      // (no epilogue), those whose last tokens went out in halves, those whose count blocks
      // wrote the routing rows, and the largest row the bulk fan-out takes on this device
      .def_property_readonly("dispatch_push_stats", [](const deo::EpState& s) {
        return py::dict(py::arg("bulk") = s.dispatch_bulk.load(),
                        py::arg("register") = s.dispatch_register.load(),
                        py::arg("pipelined") = s.dispatch_pipelined.load(),
                        py::arg("fused") = s.dispatch_fused.load(),
                        py::arg("direct_routing") = s.dispatch_direct_routing.load(),
                        py::arg("split_tail") = s.dispatch_split_tail.load(),
                        py::arg("routing_by_count") = s.dispatch_routing_by_count.load(),
                        py::arg("bulk_row_limit") = deo::bulk_row_limit(s));
      });
  m.def("create_state", &deo::create_state);
  m.def("destroy_state", [](deo::EpState& s) { s.destroy(); });
  m.def("ep_last_error", [](const deo::EpState& s) { return deo::error_dict(s.error_host); });
  m.def("layout_times", &deo::layout_times);
  m.def("dispatch_timeline", &deo::dispatch_timeline);
  m.def("default_ctas", [](const deo::EpState& s, int64_t num_sms) { return deo::barrier_ctas(s, num_sms); });
  m.def("dispatch", &deo::dispatch, py::call_guard<py::gil_scoped_release>());
  m.def("cached_dispatch", &deo::cached_dispatch, py::call_guard<py::gil_scoped_release>());
  m.def("combine", &deo::combine, py::call_guard<py::gil_scoped_release>());
  m.def("combine_input", &deo::combine_input);
}
