// Python bindings of the inter-host stage (deep_ep_ops/cuda/interhost.py): tensors in, device
// pointers and byte counts out to the C++ interface, on the current stream of the stage's
// device. module.cpp calls deep_ep_ops_bind_interhost(m).
#include <torch/extension.h>
#include <pybind11/stl.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../interhost/nccl_rail_stage.hpp"
#include "../interhost/rail_stage.hpp"

namespace deep_ep_ops {
namespace {

// A stage and the device its transfers run on (the tensors must live there).
struct RailStageHandle {
  std::shared_ptr<InterHostStage> stage;
  int device;
};

void check_tensor(const std::string& op, const RailStageHandle& h, const torch::Tensor& t,
                  const char* what, int host) {
  const std::string at = "deep_ep." + op + ": " + h.stage->place.where() + ", " + what +
                         " for " + h.stage->place.peer(host) + ": ";
  if (!t.is_cuda() || t.get_device() != h.device)
    throw std::invalid_argument(at + "must be on cuda:" + std::to_string(h.device) + ", is on " +
                                t.device().str());
  if (!t.is_contiguous())
    throw std::invalid_argument(at + "must be contiguous (it is sent as one byte range)");
}

// What Python passes: (peer host, tensor sent, tensor received into) per piece.
using Parts = std::vector<std::tuple<int, torch::Tensor, torch::Tensor>>;

// Parts -> pieces of the tensors' whole byte ranges.
std::vector<RailPiece> to_pieces(const std::string& op, const RailStageHandle& h,
                                 const Parts& parts) {
  std::vector<RailPiece> pieces;
  for (const auto& [host, send, recv] : parts) {
    check_tensor(op, h, send, "the tensor sent", host);
    check_tensor(op, h, recv, "the tensor received into", host);
    pieces.push_back({host, send.data_ptr(), static_cast<int64_t>(send.nbytes()),
                      recv.data_ptr(), static_cast<int64_t>(recv.nbytes())});
  }
  return pieces;
}

cudaStream_t current_stream(const RailStageHandle& h) {
  return at::cuda::getCurrentCUDAStream(h.device).stream();
}

void check_counts(const std::string& op, const RailStageHandle& h, const torch::Tensor& t,
                  const char* what) {
  const int n = h.stage->place.num_hosts;
  if (!t.is_cuda() || t.get_device() != h.device || t.scalar_type() != torch::kInt64 ||
      t.dim() != 1 || t.size(0) != n || !t.is_contiguous())
    throw std::invalid_argument("deep_ep." + op + ": " + h.stage->place.where() + ": " + what +
                                " must be a contiguous int64 tensor of " + std::to_string(n) +
                                " counts (one per host) on cuda:" + std::to_string(h.device) +
                                ", got " + t.toString() + " " + std::to_string(t.numel()) +
                                " elements on " + t.device().str());
}

}  // namespace
}  // namespace deep_ep_ops

void deep_ep_ops_bind_interhost(pybind11::module_& m) {
  namespace deo = deep_ep_ops;
  namespace py = pybind11;
  using deo::Parts;
  using Handle = deo::RailStageHandle;
  py::class_<Handle>(m, "InterHostStage")
      .def_property_readonly("name", [](const Handle& h) { return h.stage->name(); })
      .def_property_readonly("alive", [](const Handle& h) { return h.stage->alive(); })
      .def_property_readonly("host", [](const Handle& h) { return h.stage->place.host; })
      .def_property_readonly("num_hosts",
                             [](const Handle& h) { return h.stage->place.num_hosts; })
      .def("exchange_rows",
           [](Handle& h, const std::string& op, const Parts& parts) {
             h.stage->exchange_rows(op.c_str(), deo::to_pieces(op, h, parts),
                                    deo::current_stream(h));
           },
           // a first transfer waits on the host for NCCL to connect the pair: let the stall
           // watch's thread run meanwhile
           py::call_guard<py::gil_scoped_release>())
      .def("return_partials",
           [](Handle& h, const std::string& op, const Parts& parts) {
             h.stage->return_partials(op.c_str(), deo::to_pieces(op, h, parts),
                                      deo::current_stream(h));
           },
           py::call_guard<py::gil_scoped_release>())
      .def("exchange_counts",
           [](Handle& h, const std::string& op, const torch::Tensor& send,
              const torch::Tensor& recv) {
             deo::check_counts(op, h, send, "the counts sent");
             deo::check_counts(op, h, recv, "the counts received");
             h.stage->exchange_counts(op.c_str(), send.data_ptr<int64_t>(),
                                      recv.data_ptr<int64_t>(), deo::current_stream(h));
           })
      .def("counts_to_host",
           [](Handle& h, const std::string& op, const torch::Tensor& send,
              const torch::Tensor& recv) {
             deo::check_counts(op, h, send, "the counts sent");
             deo::check_counts(op, h, recv, "the counts received");
             // the stream sync must not hold the GIL: other Python threads keep running
             py::gil_scoped_release nogil;
             auto counts = h.stage->counts_to_host(op.c_str(), send.data_ptr<int64_t>(),
                                                   recv.data_ptr<int64_t>(), deo::current_stream(h));
             return std::make_pair(std::move(counts.sent), std::move(counts.received));
           })
      .def("destroy", [](Handle& h) { h.stage->destroy(); })
      .def("abort", [](Handle& h, const std::string& reason) { return h.stage->abort(reason); },
           py::call_guard<py::gil_scoped_release>());
  // The stall watch's thread queries CUDA events while the op's thread may be capturing a graph
  // in the default (global) mode, which forbids such queries in every thread that has not opted
  // out, and invalidates the capture.
  m.def("relax_capture_mode_for_this_thread", []() {
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  });
  m.def("nccl_rail_unique_id", []() { return py::bytes(deo::nccl_rail_unique_id()); });
  m.def("nccl_rail_stage", [](const py::bytes& unique_id, int rank, int num_hosts,
                              int ranks_per_host, int device) {
    const deo::RailPlace place = deo::make_rail_place(rank, num_hosts, ranks_per_host);
    const std::string id = unique_id;  // bytes, not str: the id is binary
    // ncclCommInitRank waits for every rail rank; release the GIL meanwhile
    py::gil_scoped_release nogil;
    return Handle{deo::make_nccl_rail_stage(id, place, device), device};
  });
}
