// The words of a failed input check, as Python writes them (deep_ep_ops/validation.py _fail and
// _desc, Python's reprs), raised as c10::ValueError (Python ValueError). Used by the rendered
// shape checks (generated/ep_checks.hpp) and by ep_kernels.cpp's own checks. Torch-only: also
// built without CUDA (tests/test_check_rules.py).
//
// Strings are built with std::to_string and only on failure, and raised whole through
// py_text.hpp's value_error: no iostreams (py_text.hpp says why).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cctype>
#include <cstdint>
#include <string>

#include "py_text.hpp"  // py_repr, value_error

namespace deep_ep_ops {
namespace checks {

// str(dtype)
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kFloat8_e4m3fn: return "torch.float8_e4m3fn";
    case at::kFloat8_e5m2: return "torch.float8_e5m2";
    case at::kFloat8_e4m3fnuz: return "torch.float8_e4m3fnuz";
    case at::kFloat8_e5m2fnuz: return "torch.float8_e5m2fnuz";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: {
      std::string s = c10::toString(t);
      for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      return "torch." + s;
    }
  }
}

// Python's repr of a tuple of ints: (3,) and (1, 3, 8).
inline std::string py_tuple(at::IntArrayRef v) {
  std::string s = "(";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  if (v.size() == 1) s += ",";
  return s + ")";
}

// Python's repr of a list of ints: [3, 3].
inline std::string py_list(const int64_t* v, int64_t n) {
  std::string s = "[";
  for (int64_t i = 0; i < n; ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  return s + "]";
}

// str(tensor.device) for the devices these ops see.
inline std::string device_str(const at::Tensor& t) {
  if (t.is_cuda()) return "cuda:" + std::to_string(t.get_device());
  if (t.is_cpu()) return "cpu";
  if (t.is_meta()) return "meta";
  return "a non-CUDA device";
}

// validation._desc
inline std::string desc(const at::Tensor& t) {
  return "shape " + py_tuple(t.sizes()) + " " + dtype_name(t.scalar_type()) + " on " +
         device_str(t);
}

// Python's repr of a str (py_text.hpp; here so the rendered checks find it as checks::py_repr).
using deep_ep_ops::py_repr;

// validation._fail
[[noreturn]] inline void fail(const char* op, const char* arg, const std::string& expected,
                              const std::string& got) {
  value_error(std::string("deep_ep.") + op + ": " + arg + " must be " + expected + "; got " + got);
}

}  // namespace checks
}  // namespace deep_ep_ops
