// Input validation for the lightning-attention op family, shared by the CPU
// and CUDA glue: one place that turns tensors into checked kernel params.
#pragma once

#include <ATen/core/Tensor.h>

#include "lightning/decode.h"

namespace m1::lightning {

// Validates the arguments of m1::lightning_attn_decode and returns the kernel
// params with every field but `o` filled in.
DecodeParams make_decode_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& slope, const at::Tensor& state, double scale);

}  // namespace m1::lightning
