// Test-only module: csrc/torch/handle_records.cpp and handle_checks.cpp built without CUDA, so
// tests/test_handle_records_cpu.py can check the record table (lookups, views, liveness,
// pruning, threads) and the header-check messages on CPU tensors, and time a lookup.
#include <torch/extension.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "torch/handle_checks.hpp"
#include "torch/handle_records.hpp"

void deep_ep_ops_bind_handle_records(pybind11::module_& m);

namespace {

namespace deo = deep_ep_ops;

deo::HandleUse use_of(const std::string& op) {
  if (op == "combine") return deo::HandleUse::combine;
  if (op == "cached_dispatch") return deo::HandleUse::cached_dispatch;
  throw std::invalid_argument("op must be 'combine' or 'cached_dispatch'");
}

// The facts check of the C++ kernels: from the record if there is one, else from the header
// when read_header (DEEP_EP_OPS_VALIDATE=1), else none. Returns which source was used.
std::string check(const std::string& op, const at::Tensor& handle, int64_t buffer_id,
                  int64_t num_ranks, int64_t topk, const std::string& group, int64_t x_rows,
                  bool read_header) {
  const deo::BufferIdentity buf{buffer_id, num_ranks, topk, group};
  if (const std::optional<deo::HandleFacts> made = deo::recorded_handle(handle)) {
    deo::check_handle_facts(use_of(op), *made, buf, x_rows);
    return "record";
  }
  if (!read_header) return "none";
  deo::check_handle_facts(use_of(op), deo::read_handle_header(use_of(op), handle), buf, x_rows);
  return "header";
}

// Mean ns of one recorded_handle() over `iters` calls (the per-call cost the kernels add).
double lookup_ns(const at::Tensor& handle, int64_t iters) {
  int64_t found = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iters; ++i) found += deo::recorded_handle(handle).has_value();
  const auto t1 = std::chrono::steady_clock::now();
  if (found != iters) throw std::runtime_error("lookup_ns: the handle has no record");
  return std::chrono::duration<double, std::nano>(t1 - t0).count() / static_cast<double>(iters);
}

// Mean ns of one record_handle() of a fresh handle (what each dispatch adds), over `iters`
// handles made beforehand and kept alive (their allocation is not timed).
double record_ns(int64_t iters) {
  std::vector<at::Tensor> handles;
  for (int64_t i = 0; i < iters; ++i) handles.push_back(at::zeros({4, 11}, at::kInt));
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iters; ++i)
    deo::record_handle(handles[i], deo::HandleFacts{1, 1, 2, 1, 2});
  const auto t1 = std::chrono::steady_clock::now();
  return std::chrono::duration<double, std::nano>(t1 - t0).count() / static_cast<double>(iters);
}

// `threads` threads each record and look up fresh handles `iters` times (the table's mutex
// under contention, pruning included); returns how many lookups found their handle.
int64_t stress(int64_t threads, int64_t iters) {
  std::vector<std::thread> pool;
  std::vector<int64_t> found(threads, 0);
  for (int64_t k = 0; k < threads; ++k)
    pool.emplace_back([k, iters, &found] {
      for (int64_t i = 0; i < iters; ++i) {
        at::Tensor h = at::zeros({4, 11}, at::kInt);
        deo::record_handle(h, deo::HandleFacts{k, 1, 2, 1, i});
        const auto f = deo::recorded_handle(h);
        found[k] += f.has_value() && f->buffer_id == k && f->num_rows == i;
      }
    });
  for (auto& t : pool) t.join();
  int64_t total = 0;
  for (int64_t f : found) total += f;
  return total;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  deep_ep_ops_bind_handle_records(m);
  m.def("record_handle", [](const at::Tensor& handle, int64_t buffer_id, int64_t num_ranks,
                            int64_t topk, int64_t num_tokens, int64_t num_rows) {
    deo::record_handle(handle, deo::HandleFacts{buffer_id, num_ranks, topk, num_tokens, num_rows});
  });
  m.def("check", &check);
  m.def("read_handle_header", [](const std::string& op, const at::Tensor& handle) {
    const deo::HandleFacts f = deo::read_handle_header(use_of(op), handle);
    return std::vector<int64_t>{f.buffer_id, f.num_ranks, f.topk, f.num_tokens, f.num_rows};
  });
  m.def("lookup_ns", &lookup_ns);
  m.def("record_ns", &record_ns);
  m.def("stress", &stress, pybind11::call_guard<pybind11::gil_scoped_release>());
}
