// The SM80 tensor-core MMA atom and CuTe operand type for each input dtype,
// shared by the CUDA kernels that build CuTe tiled MMAs (lightning prefill,
// fused MoE gate/up). Accumulators are fp32 in every case.
#pragma once

#include <cute/tensor.hpp>

#include "common/dtype.h"

namespace m1 {

template <typename T> struct Sm80Mma;
template <> struct Sm80Mma<bf16> {
  using Elem = cute::bfloat16_t;
  using Atom = cute::SM80_16x8x16_F32BF16BF16F32_TN;
};
template <> struct Sm80Mma<fp16> {
  using Elem = cute::half_t;
  using Atom = cute::SM80_16x8x16_F32F16F16F32_TN;
};
template <> struct Sm80Mma<float> {  // TF32: 10-bit mantissa, rounded to nearest on conversion
  using Elem = cute::tfloat32_t;
  using Atom = cute::SM80_16x8x8_F32TF32TF32F32_TN;
};

}  // namespace m1
