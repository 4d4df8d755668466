// Index and decay helpers of lightning attention shared by the CPU and CUDA
// kernels (and unit-tested on the host by csrc/tests/test_lightning_common.cpp).
//
// Decay: head h decays its state by lambda_h = exp(-slope_h) per token, so a
// contribution n tokens old is weighted lambda_h^n = exp(-slope_h * n). Always
// computed as one exp of the product, never as repeated multiplication, so
// every kernel (and every block size) gets the same factor to the last bit.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace m1::lightning {

M1_HOST_DEVICE M1_INLINE float exp_(float x) { return ::expf(x); }
M1_HOST_DEVICE M1_INLINE double exp_(double x) { return ::exp(x); }

// lambda^n for decay rate `slope` (>= 0) and integer distance n >= 0.
template <typename Acc>
M1_HOST_DEVICE M1_INLINE Acc decay_pow(Acc slope, int64_t n) {
  return exp_(-slope * Acc(n));
}

M1_HOST_DEVICE M1_INLINE constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Element offsets of the token-major layouts, [B, H, D] rows with strides in
// elements and a contiguous last dimension.
struct RowStrides {
  int64_t batch;
  int64_t head;
};

M1_HOST_DEVICE M1_INLINE int64_t row_offset(RowStrides s, int64_t b, int64_t h) {
  return b * s.batch + h * s.head;
}

// Offset of the [K, V] state of (b, h) in a contiguous [B, H, K, V] tensor.
M1_HOST_DEVICE M1_INLINE int64_t state_offset(int64_t b, int64_t h, int64_t heads, int64_t dk, int64_t dv) {
  return ((b * heads + h) * dk) * dv;
}

}  // namespace m1::lightning
