// C++ signatures of the deep_ep ops that C++ kernels call back through the dispatcher (schemas
// in deep_ep_ops/schemas.py), their typed handles (looked up once), and the optional-tensor
// argument helper of the kernels that implement them. Torch-only: also built without CUDA
// (tests/test_cpp_autograd_cpu.py).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace deep_ep_ops {

using Tensors6 =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Tensors2 = std::tuple<at::Tensor, at::Tensor>;

using DispatchStaticSig = Tensors6(const at::Tensor&, const std::optional<at::Tensor>&,
                                   const at::Tensor&, const at::Tensor&, c10::string_view,
                                   int64_t, int64_t, bool, int64_t);
using TrimDispatchSig = Tensors6(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&);
using CachedDispatchSig = Tensors2(const at::Tensor&, const std::optional<at::Tensor>&,
                                   const at::Tensor&, c10::string_view, int64_t);
using CombineSig = at::Tensor(const at::Tensor&, const at::Tensor&,
                              const std::optional<at::Tensor>&, c10::string_view, int64_t);
// _dispatch_static's arguments and the inter-host wire (exact: counts first)
using MultihostDispatchSig = Tensors6(const at::Tensor&, const std::optional<at::Tensor>&,
                                      const at::Tensor&, const at::Tensor&, c10::string_view,
                                      int64_t, int64_t, bool, int64_t, bool);

namespace detail {
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* qualified_name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(qualified_name, "").typed<Sig>();
}
}  // namespace detail

inline const c10::TypedOperatorHandle<DispatchStaticSig>& dispatch_static_op() {
  static const auto op = detail::find_op<DispatchStaticSig>("deep_ep::_dispatch_static");
  return op;
}
inline const c10::TypedOperatorHandle<TrimDispatchSig>& trim_dispatch_op() {
  static const auto op = detail::find_op<TrimDispatchSig>("deep_ep::_trim_dispatch");
  return op;
}
inline const c10::TypedOperatorHandle<CachedDispatchSig>& cached_dispatch_op() {
  static const auto op = detail::find_op<CachedDispatchSig>("deep_ep::cached_dispatch");
  return op;
}
inline const c10::TypedOperatorHandle<CombineSig>& combine_op() {
  static const auto op = detail::find_op<CombineSig>("deep_ep::combine");
  return op;
}

// The multi-host composition (deep_ep_ops/cuda/multihost.py) of a Buffer spanning hosts.
inline const c10::TypedOperatorHandle<MultihostDispatchSig>& multihost_dispatch_op() {
  static const auto op =
      detail::find_op<MultihostDispatchSig>("deep_ep::_multihost_dispatch_static");
  return op;
}
inline const c10::TypedOperatorHandle<CachedDispatchSig>& multihost_cached_dispatch_op() {
  static const auto op =
      detail::find_op<CachedDispatchSig>("deep_ep::_multihost_cached_dispatch");
  return op;
}
inline const c10::TypedOperatorHandle<CombineSig>& multihost_combine_op() {
  static const auto op = detail::find_op<CombineSig>("deep_ep::_multihost_combine");
  return op;
}

// An optional tensor argument as a pointer: nullptr for None (or an undefined tensor).
inline const at::Tensor* opt(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

}  // namespace deep_ep_ops
