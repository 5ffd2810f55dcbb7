// CUDA kernels of torch.ops.deep_ep.{_dispatch_static, cached_dispatch, combine} and the
// composite dispatch, registered in C++ so the dispatcher calls them unboxed: no Python on the
// eager path (autograd aside, see ep_autograd.cpp).
//
// * The group table: group_name -> (process-group backend, EP state), a copy of Python's
//   registry (deep_ep_ops/registry.py writes it; this file never calls back into Python). A
//   name that is missing, or a gloo Buffer given CUDA tensors, raises the ValueError Python
//   would raise.
// * The checks of deep_ep_ops/validation.py, with the same messages, raised as c10::ValueError
//   (Python ValueError) before any launch: the shape / dtype / range / device / contiguity
//   rules rendered from deep_ep_ops/check_rules.py (generated/ep_checks.hpp); with
//   DEEP_EP_OPS_VALIDATE=1 also its value rules (expert ids), which copy to the host (skipped
//   during graph capture, like Python's).
// * The handle's header checks (its Buffer, the rows of x): always for a handle the C++
//   dispatch made, from its host-side record (handle_records.hpp, no sync); for any other
//   handle only with DEEP_EP_OPS_VALIDATE=1, which reads the header (a sync).
// * register_kernels() (called by deep_ep_ops.ops._use_cpp_kernels after it removed the Python
//   CUDA impls) makes the registrations; nothing is registered when the .so is merely loaded.
#include <torch/extension.h>
#include <pybind11/stl.h>

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include <ATen/cuda/CUDAContext.h>

#include "../ep/ep_ops.hpp"
#include "../ep/ep_state.hpp"
#include "../host/cuda_check.hpp"  // stream_capturing
#include "check_text.hpp"
#include "generated/ep_checks.hpp"  // rendered from deep_ep_ops/check_rules.py (codegen)
#include "handle_checks.hpp"
#include "handle_records.hpp"
#include "op_handles.hpp"
#include "py_text.hpp"

namespace deep_ep_ops {
namespace {


struct GroupEntry {
  std::string backend;              // "nccl", "gloo", ...
  std::shared_ptr<EpState> state;   // null: the Buffer has no CUDA state of its own
  bool multi_host = false;          // the group spans hosts: deep_ep_ops/cuda/multihost.py
};

std::mutex g_mutex;
std::unordered_map<std::string, GroupEntry>& groups() {
  static auto* r = new std::unordered_map<std::string, GroupEntry>();  // never destroyed (exit order)
  return *r;
}

// the words of a failed check (check_text.hpp)
using checks::desc;
using checks::fail;
using checks::py_repr;

struct Named {
  const char* name;
  const at::Tensor* t;  // nullptr: None
};

// ---- the group of a call ------------------------------------------------------------------

[[noreturn]] void fail_missing_group(c10::string_view name) {
  std::vector<std::string> known;
  for (const auto& kv : groups()) known.push_back(kv.first);
  std::sort(known.begin(), known.end());
  // built by appending only: assigning a literal over "none" makes GCC 12 warn (-Wrestrict,
  // a false positive of its std::string)
  std::string list = known.empty() ? "none" : "[";
  for (size_t i = 0; i < known.size(); ++i) list += (i ? ", " : "") + py_repr(known[i]);
  if (!known.empty()) list += "]";
  // deep_ep_ops/registry.py missing_message()
  value_error("group_name=" + py_repr(name) + ": no deep_ep_ops.Buffer is registered for this "
              "group (registered: " + list + "); create one with deep_ep_ops.Buffer(group, ...) "
              "on every rank");
}

// The EP state of the call's group. A Buffer without CUDA state (gloo) given CUDA tensors gets
// the message of check_rules.py's device rule about its first CUDA tensor: written here, as it
// comes before the rendered rules, which read facts of an EP state such a Buffer lacks.
// nullptr: the group spans hosts, so the call goes to the multi-host composition (the
// _multihost_* ops, deep_ep_ops/cuda/multihost.py: the inter-host stage, then these kernels on
// the host's sub-Buffer), which checks its inputs itself.
std::shared_ptr<EpState> state_of(const char* op, c10::string_view name,
                                  std::initializer_list<Named> tensors) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = groups().find(std::string(name.data(), name.size()));
  if (it == groups().end()) fail_missing_group(name);
  if (it->second.multi_host) return nullptr;
  if (it->second.state) return it->second.state;
  for (const auto& n : tensors)
    if (n.t != nullptr && n.t->is_cuda())
      fail(op, n.name, "on cpu (group " + py_repr(name) + " is " + it->second.backend + ")",
           desc(*n.t));
  value_error(std::string("deep_ep.") + op + ": group " + py_repr(name) + " has no CUDA state");
}

// The composite dispatch's exact flag for the multi-host wire (exact: counts first, then only
// real rows between hosts). _dispatch_static has no such argument (its outputs do not depend
// on it), so the composite hands it down the call it makes on this thread.
thread_local bool t_exact_wire = false;

struct ExactWireScope {
  bool before;
  explicit ExactWireScope(bool exact) : before(t_exact_wire) { t_exact_wire = exact; }
  ~ExactWireScope() { t_exact_wire = before; }
};

// When the value checks run: validation.wants_value_checks for CUDA tensors, asked of the
// runtime here (the environment, graph capture) as Python asks its own.
bool value_checks_requested(const at::Tensor& t) {
  const char* v = std::getenv("DEEP_EP_OPS_VALIDATE");
  if (v == nullptr || v[0] != '1' || v[1] != '\0') return false;
  // the checks copy to the host
  return !stream_capturing(at::cuda::getCurrentCUDAStream(t.get_device()).stream());
}

// validation.check_handle_header: the handle was made on this Buffer, x has the rows its
// dispatch implies (cached_dispatch: its T tokens; combine: its C rows). The facts come from the
// handle's record when this extension's dispatch made it (no sync, so always checked); a handle
// without one (a clone, a slice, one written in place) is read back only when
// DEEP_EP_OPS_VALIDATE=1, as before records.
void check_handle_header(HandleUse use, const EpState& st, c10::string_view group,
                         const at::Tensor& handle, int64_t x_rows) {
  const BufferIdentity buf{st.cfg.buffer_id, st.cfg.num_ranks, st.cfg.topk, group};
  if (const std::optional<HandleFacts> made = recorded_handle(handle)) {
    check_handle_facts(use, *made, buf, x_rows);
    return;
  }
  if (value_checks_requested(handle))
    check_handle_facts(use, read_handle_header(use, handle), buf, x_rows);
}

// ---- checks (validation.py check_dispatch / check_cached_dispatch / check_combine): the
// rendered rules of check_rules.py (shape, dtype, range, device, contiguity) -----------------

void check_dispatch(const EpState& st, c10::string_view group, const at::Tensor& x,
                    const std::optional<at::Tensor>& x_scales, const at::Tensor& topk_idx,
                    const at::Tensor& topk_weights, int64_t num_experts,
                    int64_t expert_alignment, int64_t num_sms) {
  const at::Tensor* s = opt(x_scales);
  checks::dispatch_shapes(checks::buffer_facts(st), group, x, s, topk_idx, topk_weights,
                          num_experts, expert_alignment, num_sms);
}

void check_cached_dispatch(const EpState& st, c10::string_view group, const at::Tensor& x,
                           const std::optional<at::Tensor>& x_scales, const at::Tensor& handle,
                           int64_t num_sms) {
  const at::Tensor* s = opt(x_scales);
  checks::cached_dispatch_shapes(checks::buffer_facts(st), group, x, s, handle, num_sms);
}

void check_combine(const EpState& st, c10::string_view group, const at::Tensor& x,
                   const at::Tensor& handle, const std::optional<at::Tensor>& weights,
                   int64_t num_sms) {
  const at::Tensor* w = opt(weights);
  checks::combine_shapes(checks::buffer_facts(st), group, x, handle, w, num_sms);
}

// ---- kernels ----------------------------------------------------------------------------

using Out6 = DispatchOut;

Out6 dispatch_static_cuda(const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
                          const at::Tensor& topk_idx, const at::Tensor& topk_weights,
                          c10::string_view group_name, int64_t num_experts,
                          int64_t expert_alignment, bool expand, int64_t num_sms) {
  std::shared_ptr<EpState> st = state_of("dispatch", group_name,
                                        {{"x", &x}, {"x_scales", opt(x_scales)},
                                         {"topk_idx", &topk_idx}, {"topk_weights", &topk_weights}});
  if (!st)
    return multihost_dispatch_op().call(x, x_scales, topk_idx, topk_weights, group_name,
                                        num_experts, expert_alignment, expand, num_sms,
                                        t_exact_wire);
  check_dispatch(*st, group_name, x, x_scales, topk_idx, topk_weights, num_experts,
                 expert_alignment, num_sms);
  if (topk_idx.numel() > 0 && value_checks_requested(topk_idx))
    checks::dispatch_values(topk_idx, num_experts);  // check_rules.DISPATCH_VALUES
  Out6 out = dispatch(*st, x, x_scales, topk_idx, topk_weights, num_experts, expert_alignment,
                      expand, num_sms);
  // what the kernels stamp into the header, for combine / cached_dispatch to check without a sync
  record_handle(std::get<5>(out), HandleFacts{st->cfg.buffer_id, st->cfg.num_ranks, st->cfg.topk,
                                              x.size(0), std::get<0>(out).size(0)});
  return out;
}

std::tuple<at::Tensor, at::Tensor> cached_dispatch_cuda(const at::Tensor& x,
                                                        const std::optional<at::Tensor>& x_scales,
                                                        const at::Tensor& handle,
                                                        c10::string_view group_name,
                                                        int64_t num_sms) {
  std::shared_ptr<EpState> st = state_of("cached_dispatch", group_name,
                                        {{"x", &x}, {"x_scales", opt(x_scales)}, {"handle", &handle}});
  if (!st) return multihost_cached_dispatch_op().call(x, x_scales, handle, group_name, num_sms);
  check_cached_dispatch(*st, group_name, x, x_scales, handle, num_sms);
  check_handle_header(HandleUse::cached_dispatch, *st, group_name, handle, x.size(0));
  return cached_dispatch(*st, x, x_scales, handle, num_sms);
}

at::Tensor combine_cuda(const at::Tensor& x, const at::Tensor& handle,
                        const std::optional<at::Tensor>& weights, c10::string_view group_name,
                        int64_t num_sms) {
  std::shared_ptr<EpState> st = state_of("combine", group_name,
                                        {{"x", &x}, {"handle", &handle}, {"weights", opt(weights)}});
  if (!st) return multihost_combine_op().call(x, handle, weights, group_name, num_sms);
  check_combine(*st, group_name, x, handle, weights, num_sms);
  check_handle_header(HandleUse::combine, *st, group_name, handle, x.size(0));
  return combine(*st, x, handle, weights, num_sms);
}

// dispatch = _dispatch_static, then _trim_dispatch when exact (ops.py _dispatch): only the
// collective is effectful, so compile never sees an effectful op with unbacked sizes.
Out6 dispatch_composite(const at::Tensor& x, const std::optional<at::Tensor>& x_scales,
                        const at::Tensor& topk_idx, const at::Tensor& topk_weights,
                        c10::string_view group_name, int64_t num_experts,
                        int64_t expert_alignment, bool expand, bool exact, int64_t num_sms) {
  Out6 out;
  {
    ExactWireScope wire(exact);
    out = dispatch_static_op().call(x, x_scales, topk_idx, topk_weights, group_name,
                                    num_experts, expert_alignment, expand, num_sms);
  }
  if (!exact) return out;
  return trim_dispatch_op().call(std::get<0>(out), std::get<1>(out), std::get<2>(out),
                                 std::get<3>(out), std::get<4>(out), std::get<5>(out));
}

std::unique_ptr<torch::Library> g_cuda_lib, g_composite_lib;

}  // namespace

// Register the kernels (once). The Python CUDA impls of these ops must be gone already
// (deep_ep_ops.ops._use_cpp_kernels destroys their Library first).
void register_kernels(bool composite) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!g_cuda_lib) {
    auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, "deep_ep",
                                                c10::DispatchKey::CUDA, __FILE__, __LINE__);
    lib->impl("_dispatch_static", TORCH_FN(dispatch_static_cuda));
    lib->impl("cached_dispatch", TORCH_FN(cached_dispatch_cuda));
    lib->impl("combine", TORCH_FN(combine_cuda));
    g_cuda_lib = std::move(lib);
  }
  if (composite && !g_composite_lib) {
    auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, "deep_ep",
                                                c10::DispatchKey::CompositeImplicitAutograd,
                                                __FILE__, __LINE__);
    lib->impl("dispatch", TORCH_FN(dispatch_composite));
    g_composite_lib = std::move(lib);
  }
}

// Ops whose CUDA kernel register_kernels() provides (ops.py moves exactly these).
std::vector<std::string> cpp_cuda_ops() { return {"_dispatch_static", "cached_dispatch", "combine"}; }

// deep_ep_ops/registry.py keeps this table equal to its own (it alone writes it).
void register_group(const std::string& name, const std::string& backend,
                    std::shared_ptr<EpState> state, bool multi_host) {
  std::lock_guard<std::mutex> lock(g_mutex);
  groups()[name] = GroupEntry{backend, std::move(state), multi_host};
}

void unregister_group(const std::string& name) {
  std::lock_guard<std::mutex> lock(g_mutex);
  groups().erase(name);
}

// Whether the composite dispatch running on this thread asked for the exact wire (the CPU
// reference's collective reads it: once loaded, the C++ composite serves CPU tensors too).
bool exact_wire_requested() { return t_exact_wire; }

std::vector<std::string> registered_groups() {
  std::lock_guard<std::mutex> lock(g_mutex);
  std::vector<std::string> out;
  for (const auto& kv : groups()) out.push_back(kv.first);
  return out;
}

}  // namespace deep_ep_ops

void deep_ep_ops_bind_kernel_registry(pybind11::module_& m) {
  namespace deo = deep_ep_ops;
  m.def("register_kernels", &deo::register_kernels, pybind11::arg("composite") = true);
  m.def("cpp_cuda_ops", &deo::cpp_cuda_ops);
  m.def("register_group", &deo::register_group, pybind11::arg("name"), pybind11::arg("backend"),
        pybind11::arg("state"), pybind11::arg("multi_host") = false);
  m.def("unregister_group", &deo::unregister_group);
  m.def("registered_groups", &deo::registered_groups);
  m.def("exact_wire_requested", &deo::exact_wire_requested);
}
