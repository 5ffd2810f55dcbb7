// Autograd kernels (DispatchKey::AutogradCUDA) of torch.ops.deep_ep.{_dispatch_static,
// cached_dispatch, combine}: the formulas of deep_ep_ops/autograd.py in C++, so an eager call
// on CUDA tensors never enters Python. CPU tensors keep the Python autograd kernel (it is
// registered on the Autograd alias key; a kernel on AutogradCUDA takes precedence for CUDA).
//
// Every backward calls the ops through the dispatcher (with autograd), like the Python
// formulas, so double backward, torch.compile and CUDA-graph capture see the same graph.
// When no input requires a gradient the kernel goes straight below autograd (no graph node).
#include <torch/extension.h>

#include <torch/autograd.h>
#include <c10/core/DispatchKey.h>
#include <torch/library.h>

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>

#include "generated/handle_layout.hpp"  // rendered from deep_ep_ops/handle.py (codegen)
#include "op_handles.hpp"

namespace deep_ep_ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool wants_grad(std::initializer_list<const at::Tensor*> inputs) {
  if (!c10::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : inputs)
    if (t != nullptr && t->defined() && t->requires_grad()) return true;
  return false;
}

// combine(g, handle) with autograd: the gradient that sums the copies of every token.
at::Tensor combine_rows(const at::Tensor& rows, const at::Tensor& handle, const std::string& group,
                        int64_t num_sms) {
  return combine_op().call(rows.contiguous(), handle, std::nullopt, group, num_sms);
}

// ---- _dispatch_static: d x = combine(d recv_x); d topk_weights[t, k] = the gradient of the
// recv_topk_weights entry that carried slot k (one rank holds each (t, k), so a combine of the
// slot-placed gradients returns it) -------------------------------------------------------

struct DispatchStaticFn : torch::autograd::Function<DispatchStaticFn> {
  static constexpr bool is_traceable = true;  // backward: dispatcher ops on saved data only
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const std::optional<at::Tensor>& x_scales,
                               const at::Tensor& topk_idx, const at::Tensor& topk_weights,
                               c10::string_view group_name, int64_t num_experts,
                               int64_t expert_alignment, bool expand, int64_t num_sms) {
    Tensors6 out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = dispatch_static_op().call(x, x_scales, topk_idx, topk_weights, group_name,
                                      num_experts, expert_alignment, expand, num_sms);
    }
    auto& [recv_x, recv_s, recv_idx, recv_w, tpe, handle] = out;
    ctx->save_for_backward({handle, recv_idx});
    ctx->saved_data["group"] = std::string(group_name.data(), group_name.size());
    ctx->saved_data["expand"] = expand;
    ctx->saved_data["num_sms"] = num_sms;
    // a SymInt: under torch.compile with dynamic shapes a plain int would pin it to a constant
    ctx->saved_data["K"] = topk_weights.sym_size(1);
    // autograd edges exist for tensor inputs only: topk_weights is edge 2, or 3 with scales
    ctx->saved_data["w_edge"] = static_cast<int64_t>(opt(x_scales) != nullptr ? 3 : 2);
    // No mark_non_differentiable: the integer outputs are non-differentiable by dtype, the
    // float recv_x_scales stays differentiable as with the Python kernel, and compiled
    // autograd asserts on a non-empty non-differentiable set.
    return {recv_x, recv_s, recv_idx, recv_w, tpe, handle};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& handle = saved[0];
    const at::Tensor& recv_idx = saved[1];
    const std::string group = ctx->saved_data["group"].toStringRef();
    const int64_t num_sms = ctx->saved_data["num_sms"].toInt();
    const at::Tensor& g_x = grads[0];
    const at::Tensor& g_w = grads[3];
    at::Tensor grad_x, grad_w;
    if (ctx->needs_input_grad(0) && g_x.defined())
      grad_x = combine_rows(g_x, handle, group, num_sms);
    if (ctx->needs_input_grad(ctx->saved_data["w_edge"].toInt()) && g_w.defined()) {
      at::Tensor rows;
      if (ctx->saved_data["expand"].toBool()) {
        const c10::SymInt K = ctx->saved_data["K"].toSymInt();
        // the receive part is the handle's last C rows (C = rows of recv_topk_weights): after
        // the T send rows on one host, after the V virtual rows too on several
        const at::Tensor slot = handle.slice_symint(0, handle.sym_size(0) - g_w.sym_size(0))
                                    .select(1, handle::kRecvTopkSlot)
                                    .to(at::kLong);
        const at::Tensor valid = slot.ge(0);
        rows = at::zeros_symint({g_w.sym_size(0), K}, g_w.options())
                   .scatter(1, slot.clamp_min(0).unsqueeze(1),
                            at::where(valid, g_w, at::zeros_like(g_w)).unsqueeze(1));
      } else {
        rows = at::where(recv_idx.ge(0), g_w, at::zeros_like(g_w));
      }
      grad_w = combine_rows(rows, handle, group, num_sms);
    }
    // one entry per forward argument (x, x_scales, topk_idx, topk_weights, then the non-tensors)
    return {grad_x, at::Tensor(), at::Tensor(), grad_w, at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

Tensors6 dispatch_static_autograd(const at::Tensor& x,
                                  const std::optional<at::Tensor>& x_scales,
                                  const at::Tensor& topk_idx, const at::Tensor& topk_weights,
                                  c10::string_view group_name, int64_t num_experts,
                                  int64_t expert_alignment, bool expand, int64_t num_sms) {
  if (!wants_grad({&x, opt(x_scales), &topk_weights})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return dispatch_static_op().call(x, x_scales, topk_idx, topk_weights, group_name,
                                     num_experts, expert_alignment, expand, num_sms);
  }
  variable_list o = DispatchStaticFn::apply(x, x_scales, topk_idx, topk_weights, group_name,
                                            num_experts, expert_alignment, expand, num_sms);
  return {o[0], o[1], o[2], o[3], o[4], o[5]};
}

// ---- cached_dispatch: d x = combine(d recv_x) -----------------------------------------

struct CachedDispatchFn : torch::autograd::Function<CachedDispatchFn> {
  static constexpr bool is_traceable = true;
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const std::optional<at::Tensor>& x_scales,
                               const at::Tensor& handle, c10::string_view group_name,
                               int64_t num_sms) {
    Tensors2 out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = cached_dispatch_op().call(x, x_scales, handle, group_name, num_sms);
    }
    ctx->save_for_backward({handle});
    ctx->saved_data["group"] = std::string(group_name.data(), group_name.size());
    ctx->saved_data["num_sms"] = num_sms;
    return {std::get<0>(out), std::get<1>(out)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor handle = ctx->get_saved_variables()[0];
    at::Tensor grad_x;
    if (ctx->needs_input_grad(0) && grads[0].defined())
      grad_x = combine_rows(grads[0], handle, ctx->saved_data["group"].toStringRef(),
                            ctx->saved_data["num_sms"].toInt());
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

Tensors2 cached_dispatch_autograd(const at::Tensor& x,
                                  const std::optional<at::Tensor>& x_scales,
                                  const at::Tensor& handle, c10::string_view group_name,
                                  int64_t num_sms) {
  if (!wants_grad({&x, opt(x_scales)})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return cached_dispatch_op().call(x, x_scales, handle, group_name, num_sms);
  }
  variable_list o = CachedDispatchFn::apply(x, x_scales, handle, group_name, num_sms);
  return {o[0], o[1]};
}

// ---- combine: d x[row] = w[row] * d out[t(row)] (a cached dispatch of d out);
// d w[row] = <d out[t(row)], x[row]>, both accumulated in fp32 (fp64 for fp64) ------------

struct CombineFn : torch::autograd::Function<CombineFn> {
  static constexpr bool is_traceable = true;
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& handle,
                            const std::optional<at::Tensor>& weights, c10::string_view group_name,
                            int64_t num_sms) {
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      out = combine_op().call(x, handle, weights, group_name, num_sms);
    }
    const at::Tensor* w = opt(weights);
    ctx->save_for_backward({x, handle, w != nullptr ? *w : at::Tensor()});
    ctx->saved_data["group"] = std::string(group_name.data(), group_name.size());
    ctx->saved_data["num_sms"] = num_sms;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &handle = saved[1], &weights = saved[2];
    at::Tensor grad_x, grad_w;
    if (grads[0].defined()) {
      const at::Tensor rows = std::get<0>(cached_dispatch_op().call(
          grads[0].contiguous(), std::nullopt, handle, ctx->saved_data["group"].toStringRef(),
          ctx->saved_data["num_sms"].toInt()));
      const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
      if (ctx->needs_input_grad(0))
        grad_x = weights.defined()
                     ? (rows.to(acc) * weights.to(acc).unsqueeze(1)).to(x.scalar_type())
                     : rows;
      // weights is edge 2 (x, handle, weights) when given
      if (weights.defined() && ctx->needs_input_grad(2))
        grad_w = (rows.to(acc) * x.to(acc)).sum(-1).to(weights.scalar_type());
    }
    return {grad_x, at::Tensor(), grad_w, at::Tensor(), at::Tensor()};
  }
};

at::Tensor combine_autograd(const at::Tensor& x, const at::Tensor& handle,
                            const std::optional<at::Tensor>& weights,
                            c10::string_view group_name, int64_t num_sms) {
  if (!wants_grad({&x, opt(weights)})) {
    at::AutoDispatchBelowADInplaceOrView below;
    return combine_op().call(x, handle, weights, group_name, num_sms);
  }
  return CombineFn::apply(x, handle, weights, group_name, num_sms);
}

std::mutex g_mutex;
std::unique_ptr<torch::Library> g_lib;

}  // namespace

// Register the kernels on `dispatch_key` (once per process): AutogradCUDA from
// deep_ep_ops.ops._use_cpp_kernels (unless DEEP_EP_OPS_CPP_AUTOGRAD=0); AutogradCPU only in
// tests/test_cpp_autograd_cpu.py, which checks these formulas on CPU over gloo.
void register_autograd_kernels(const std::string& dispatch_key) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_lib) return;
  auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, "deep_ep",
                                              c10::parseDispatchKey(dispatch_key), __FILE__,
                                              __LINE__);
  lib->impl("_dispatch_static", TORCH_FN(dispatch_static_autograd));
  lib->impl("cached_dispatch", TORCH_FN(cached_dispatch_autograd));
  lib->impl("combine", TORCH_FN(combine_autograd));
  g_lib = std::move(lib);
}

}  // namespace deep_ep_ops

void deep_ep_ops_bind_torch_autograd(pybind11::module_& m) {
  m.def("register_autograd_kernels", &deep_ep_ops::register_autograd_kernels,
        pybind11::arg("dispatch_key") = "AutogradCUDA");
}
