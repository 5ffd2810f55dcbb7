// What the rendered autograd kernels (generated/ep_autograd_formulas.hpp, from
// deep_ep_ops/autograd_formulas.py) share: whether a call needs a graph node, and an op call
// below autograd. Torch-only: also built without CUDA (tests/test_cpp_autograd_cpu.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <initializer_list>
#include <utility>

namespace deep_ep_ops {

// Grad mode is on and a tensor input (nullptr: an optional one given as None) requires a
// gradient: else the kernel makes no graph node, as Python's Function.apply.
inline bool wants_grad(std::initializer_list<const at::Tensor*> inputs) {
  if (!c10::GradMode::is_enabled()) return false;
  for (const at::Tensor* t : inputs)
    if (t != nullptr && t->defined() && t->requires_grad()) return true;
  return false;
}

// `op(args...)` on the kernels below autograd (the forward of a Function, or a call that needs
// no graph node).
template <class Sig, class... Args>
auto call_below_autograd(const c10::TypedOperatorHandle<Sig>& op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(std::forward<Args>(args)...);
}

}  // namespace deep_ep_ops
