// Test-only module: the rendered input checks (generated/ep_checks.hpp, from
// deep_ep_ops/check_rules.py) built without CUDA, so tests/test_check_rules.py can run every
// rule's failing example through them and compare their messages with Python's byte for byte
// (the argument rules, then dispatch's value rules).
#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

#include "generated/ep_checks.hpp"

namespace {

namespace checks = deep_ep_ops::checks;

// The facts in check_rules.FACTS order (the order of BufferFacts' fields): five ints, whether
// the Buffer is on CUDA, its device type and its backend (the two strings live in `words`).
checks::BufferFacts facts(const pybind11::sequence& f, std::vector<std::string>& words) {
  TORCH_CHECK(f.size() == 8, "expected 8 Buffer facts, got ", f.size());
  words = {f[6].cast<std::string>(), f[7].cast<std::string>()};
  return checks::BufferFacts{f[0].cast<int64_t>(), f[1].cast<int64_t>(), f[2].cast<int64_t>(),
                             f[3].cast<int64_t>(), f[4].cast<int64_t>(), f[5].cast<bool>(),
                             words[0].c_str(), words[1].c_str()};
}

const at::Tensor* opt(const std::optional<at::Tensor>& t) { return t ? &*t : nullptr; }

// The ValueError's text alone (as torch's translation gives Python), without a backtrace.
template <class F>
void run(F&& f) {
  try {
    f();
  } catch (const c10::ValueError& e) {
    throw pybind11::value_error(e.what_without_backtrace());
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dispatch", [](const pybind11::sequence& f, const std::string& group,
                       const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
                       const at::Tensor& topk_idx, const at::Tensor& topk_weights,
                       int64_t num_experts, int64_t expert_alignment, int64_t num_sms) {
    std::vector<std::string> words;
    const checks::BufferFacts buf = facts(f, words);
    run([&] {
      checks::dispatch_shapes(buf, group, x, opt(x_scales), topk_idx, topk_weights,
                              num_experts, expert_alignment, num_sms);
      // then the value rules, as the kernels with DEEP_EP_OPS_VALIDATE=1 and Python on CPU
      // tensors (meta ones have no data)
      if (!topk_idx.is_meta() && topk_idx.numel() > 0)
        checks::dispatch_values(topk_idx, num_experts);
    });
  });
  m.def("cached_dispatch", [](const pybind11::sequence& f, const std::string& group,
                              const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
                              const at::Tensor& handle, int64_t num_sms) {
    std::vector<std::string> words;
    const checks::BufferFacts buf = facts(f, words);
    run([&] { checks::cached_dispatch_shapes(buf, group, x, opt(x_scales), handle, num_sms); });
  });
  m.def("combine", [](const pybind11::sequence& f, const std::string& group,
                      const at::Tensor& x, const at::Tensor& handle,
                      const std::optional<at::Tensor>& weights, int64_t num_sms) {
    std::vector<std::string> words;
    const checks::BufferFacts buf = facts(f, words);
    run([&] { checks::combine_shapes(buf, group, x, handle, opt(weights), num_sms); });
  });
}
