// Torch glue of m1.rms_norm on the CPU: validate, allocate, call the torch-free
// kernel (norm/rms_norm_cpu.cpp), register the CPU implementation.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>

#include "common/torch_utils.h"
#include "norm/rms_norm.h"

namespace m1::norm {
namespace {

at::Tensor rms_norm_cpu_op(const at::Tensor& x, const at::Tensor& weight, double eps) {
  constexpr const char* op = "m1.rms_norm";
  check_float_input(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": 'x' must have at least one dimension [..., D], got a 0-D tensor");
  const int64_t d = x.size(-1);
  check_shape(op, "weight", weight, {d}, "[D]");
  check_same_device(op, {{"x", &x}, {"weight", &weight}});
  TORCH_CHECK(x.is_cpu(), op, ": CPU kernel called with tensors on ", x.device());
  const bool same = weight.scalar_type() == x.scalar_type();
  const bool fp32_weight = weight.scalar_type() == at::kFloat && (x.scalar_type() == at::kBFloat16 ||
                                                                    x.scalar_type() == at::kHalf);
  TORCH_CHECK_TYPE(same || fp32_weight, op, ": 'weight' must have x's dtype (", x.scalar_type(),
                   "), or be float32 for 16-bit x; got ", weight.scalar_type());
  check_contiguous(op, "weight", weight);
  check_last_dim_contiguous(op, "x", x);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": 'eps' must be finite and >= 0, got ", eps);

  const at::Tensor rows = x.reshape({-1, d});  // a view when the leading dims collapse, else a copy
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(same ? x.scalar_type() : at::kFloat));
  RmsNormParams p;
  p.x = rows.data_ptr();
  p.ldx = rows.size(0) > 1 ? rows.stride(0) : d;
  p.weight = weight.data_ptr();
  p.out = out.data_ptr();
  p.rows = rows.size(0);
  p.d = d;
  p.eps = eps;
  p.x_dtype = to_m1_dtype(x.scalar_type());
  p.weight_dtype = to_m1_dtype(weight.scalar_type());
  rms_norm_cpu(p);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(m1, CPU, m) { m.impl("rms_norm", &rms_norm_cpu_op); }

}  // namespace m1::norm
