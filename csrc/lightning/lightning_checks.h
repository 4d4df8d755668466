// Input validation for the lightning-attention op family, shared by the CPU
// and CUDA glue: one place that turns tensors into checked kernel params.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "lightning/decode.h"
#include "lightning/prefill.h"

namespace m1::lightning {

// Validates the arguments of m1::lightning_attn_decode and returns the kernel
// params with every field but `o` filled in.
DecodeParams make_decode_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& slope, const at::Tensor& state, double scale);

// Validated arguments of the prefill ops: the kernel params (outputs not yet
// allocated) and the tensors its pointers refer to, which must outlive the call.
struct PrefillArgs {
  PrefillParams params;
  at::Tensor cu_seqlens;        // int64 [N + 1] on the inputs' device, or undefined
  at::Tensor initial_state;     // state_dtype, contiguous, or undefined
  at::Tensor grad_final_state;  // state_dtype, contiguous, or undefined (backward only)
  at::ScalarType state_dtype;   // float32, or float64 for float64 inputs
};

// Validates the arguments of m1::_lightning_attn_fwd (grad_o undefined) or
// m1::_lightning_attn_bwd (grad_o defined) on any device: shapes, dtypes,
// devices, layouts, and the values of cu_seqlens (read on the host). Resolves
// block_size (None = the device's default) and checks its range.
PrefillArgs make_prefill_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& slope, const std::optional<at::Tensor>& initial_state,
                              const std::optional<at::Tensor>& cu_seqlens, double scale,
                              std::optional<int64_t> block_size, const at::Tensor& grad_o = at::Tensor(),
                              const std::optional<at::Tensor>& grad_final_state = std::nullopt);

}  // namespace m1::lightning
