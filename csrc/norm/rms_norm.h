// RMSNorm, the model's normalisation (DESIGN 5), as one pass per row: torch-free
// kernel params and the CPU entry point (norm/rms_norm_cpu.cpp).
//
//   r   = 1 / sqrt(sum_j x_j^2 / D + eps)     fp32 (fp64 for float64 x)
//   y_j = round_x(x_j * r)                    rounded to x's dtype first, then
//   out = round_out(y_j * w_j)                times the weight (transformers' order)
//
// out's dtype is x's, or float32 when the weight is float32 and x 16-bit.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace m1::norm {

struct RmsNormParams {
  const void* x = nullptr;  // [rows, d], unit-stride rows `ldx` apart
  int64_t ldx = 0;
  const void* weight = nullptr;  // [d]
  void* out = nullptr;           // [rows, d] contiguous
  int64_t rows = 0, d = 0;
  double eps = 0.0;
  DType x_dtype = DType::kFloat32, weight_dtype = DType::kFloat32;
};

void rms_norm_cpu(const RmsNormParams& p);

}  // namespace m1::norm
