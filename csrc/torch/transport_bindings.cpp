// Python bindings of the transports: the Buffer's set-up (deep_ep_ops/cuda/transport.py) picks one
// and hands it to the per-Buffer states. module.cpp calls deep_ep_ops_bind_transport(m).
#include <torch/extension.h>

#include <memory>
#include <string>
#include <vector>

#include "../transport/peer_memory.hpp"

namespace deep_ep_ops {
namespace {

// Keeps the Python all-gather alive inside the C++ transport; dropping it needs the GIL.
struct PythonAllGather {
  explicit PythonAllGather(pybind11::function f) : fn(std::move(f)) {}
  ~PythonAllGather() {
    pybind11::gil_scoped_acquire gil;
    fn = pybind11::function();
  }
  pybind11::function fn;
};

BytesAllGather wrap_all_gather(pybind11::function fn) {
  auto holder = std::make_shared<PythonAllGather>(std::move(fn));
  return [holder](const std::string& mine) {
    pybind11::gil_scoped_acquire gil;
    // bytes both ways: IPC handles are binary, a std::string would be decoded as UTF-8
    pybind11::object out = holder->fn(pybind11::bytes(mine));
    std::vector<std::string> all;
    for (auto item : out) all.push_back(item.cast<std::string>());
    return all;
  };
}

}  // namespace
}  // namespace deep_ep_ops

void deep_ep_ops_bind_transport(pybind11::module_& m) {
  namespace deo = deep_ep_ops;
  namespace py = pybind11;
  py::class_<deo::PeerMemoryTransport, std::shared_ptr<deo::PeerMemoryTransport>>(m, "PeerMemoryTransport")
      .def_property_readonly("name", &deo::PeerMemoryTransport::name)
      .def_property_readonly("rank", &deo::PeerMemoryTransport::rank)
      .def_property_readonly("num_ranks", &deo::PeerMemoryTransport::num_ranks);
  m.def("nccl_window_transport", &deo::make_nccl_window_transport);
  m.def("cuda_ipc_transport", [](int rank, int num_ranks, int device, py::function all_gather) {
    return deo::make_cuda_ipc_transport(rank, num_ranks, device, deo::wrap_all_gather(std::move(all_gather)));
  });
  m.def("nccl_window_supported", &deo::nccl_window_supported);
  m.def("nccl_lsa_size", &deo::nccl_lsa_size);
}
