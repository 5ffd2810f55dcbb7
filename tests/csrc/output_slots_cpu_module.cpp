// Test-only module: csrc/ep/output_slots.hpp (the direct-output slot table) built without CUDA,
// so tests/test_output_slots_cpu.py can check acquire / release, and that tensors whose deleters
// release a slot (as the CUDA dispatch makes them, csrc/ep/ep_ops.cpp slot_tensors) free it
// only when the last of them is gone, also when many threads race for the slots.
#include <torch/extension.h>

#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "ep/output_slots.hpp"

namespace {

namespace deo = deep_ep_ops;

// Two CPU tensors over `storage` that each hold slot `slot` of `pool`, like recv_x and
// recv_scales of a direct dispatch.
std::vector<at::Tensor> pair_in_slot(const std::shared_ptr<deo::OutputSlots>& pool, int slot,
                                     at::Tensor storage) {
  auto release = [pool, slot, storage](void*) { pool->release(slot); };
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  float* base = storage.data_ptr<float>();
  return {at::from_blob(base, {2, 2}, release, opts), at::from_blob(base + 4, {2}, release, opts)};
}

// `threads` threads each take a slot `rounds` times (retrying while all are taken), check no
// other thread holds it, and give it back. Returns how often two threads held one slot.
int64_t race(int slots, int threads, int rounds) {
  deo::OutputSlots pool(slots);
  std::vector<std::atomic<int>> holders(slots);
  for (auto& h : holders) h.store(0);
  std::atomic<int64_t> clashes{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t)
    ts.emplace_back([&] {
      for (int r = 0; r < rounds; ++r) {
        int s;
        while ((s = pool.acquire(1)) < 0) std::this_thread::yield();
        if (holders[s].fetch_add(1) != 0) ++clashes;
        holders[s].fetch_sub(1);
        pool.release(s);
      }
    });
  for (auto& t : ts) t.join();
  return clashes.load() + pool.busy();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<deo::OutputSlots, std::shared_ptr<deo::OutputSlots>>(m, "OutputSlots")
      .def(pybind11::init<int>())
      .def("acquire", &deo::OutputSlots::acquire)
      .def("release", &deo::OutputSlots::release)
      .def("size", &deo::OutputSlots::size)
      .def("busy", &deo::OutputSlots::busy);
  m.def("pair_in_slot", &pair_in_slot);
  m.def("race", &race, pybind11::call_guard<pybind11::gil_scoped_release>());
}
