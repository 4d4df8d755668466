// Helpers for the torch glue files (never included by kernel code): dtype
// mapping and the argument checks every op family builds its validation from.
// Errors name the op and the argument and say what was expected; they surface
// in Python as ValueError (shapes, layouts), TypeError (dtypes) and
// RuntimeError (devices).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "common/dtype.h"

namespace m1 {

inline std::string shape_str(c10::IntArrayRef sizes) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? ", " : "") << sizes[i];
  os << "]";
  return os.str();
}

inline DType to_m1_dtype(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return DType::kFloat32;
    case c10::ScalarType::Double: return DType::kFloat64;
    case c10::ScalarType::BFloat16: return DType::kBFloat16;
    case c10::ScalarType::Half: return DType::kFloat16;
    default: TORCH_CHECK_TYPE(false, "m1: unsupported dtype ", t);
  }
}

using NamedTensor = std::pair<const char*, const at::Tensor*>;

// Every tensor on the device of the first one.
inline void check_same_device(const char* op, std::initializer_list<NamedTensor> tensors) {
  const NamedTensor& first = *tensors.begin();
  for (const NamedTensor& t : tensors) {
    TORCH_CHECK(t.second->device() == first.second->device(), op, ": all tensors must be on one device; '",
                first.first, "' is on ", first.second->device(), " but '", t.first, "' is on ",
                t.second->device());
  }
}

// `t` has exactly the given sizes; `what` describes them symbolically ("[B, H, K]").
inline void check_shape(const char* op, const char* name, const at::Tensor& t, c10::IntArrayRef expected,
                        const char* what) {
  TORCH_CHECK_VALUE(t.sizes() == expected, op, ": '", name, "' must have shape ", what, " = ",
                    shape_str(expected), ", got ", shape_str(t.sizes()));
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* what) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": '", name, "' must be ", dim, "-D ", what, ", got shape ",
                    shape_str(t.sizes()));
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, c10::ScalarType expected) {
  TORCH_CHECK_TYPE(t.scalar_type() == expected, op, ": '", name, "' must be ", expected, ", got ",
                   t.scalar_type());
}

// Floating inputs the kernels take: float32, bfloat16, float16, and float64 on the CPU.
inline void check_float_input(const char* op, const char* name, const at::Tensor& t) {
  const auto st = t.scalar_type();
  const bool ok = st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || (st == at::kDouble && t.is_cpu());
  TORCH_CHECK_TYPE(ok, op, ": '", name, "' must be float32, bfloat16 or float16 (or float64 on the CPU), got ", st,
                   " on ", t.device());
}

// Innermost dimension contiguous: kernels take the outer strides, not this one.
inline void check_last_dim_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, op, ": '", name,
                    "' must be contiguous in its last dimension (stride 1), got strides ", shape_str(t.strides()),
                    "; call .contiguous() first");
}

inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": '", name, "' must be contiguous, got strides ",
                    shape_str(t.strides()));
}

}  // namespace m1
