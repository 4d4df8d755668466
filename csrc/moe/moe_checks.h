// Input validation for the fused-MoE ops, shared by the CPU and CUDA glue:
// one place that turns tensors into checked kernel params.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "moe/moe.h"

namespace m1::moe {

// Validates the inputs m1::fused_moe and m1::fused_moe_backward share
// (shapes, dtypes, layouts, devices, sizes; not the id range) and returns them
// as kernel params. `op` names the op in error messages.
MoeInputs make_moe_inputs(const char* op, const at::Tensor& x, const at::Tensor& w_gate_up,
                          const at::Tensor& w_down, const at::Tensor& topk_weights, const at::Tensor& topk_ids);

// Raises a ValueError naming the first id outside [0, E), its position and
// value. CPU tensors only (reads the ids on the host).
void check_ids_in_range_cpu(const char* op, const at::Tensor& topk_ids, int64_t experts);

// The error for ids outside [0, E) found on a device (count only).
[[noreturn]] void throw_invalid_ids(const char* op, int64_t count, int64_t experts);

// grad_y of m1::fused_moe_backward: [T, D], x's dtype and device. Returns it
// with a contiguous last dimension (a copy when autograd hands in an expanded
// gradient) and fills the grad_y fields of `p`.
at::Tensor prepare_grad_y(const char* op, const at::Tensor& grad_y, const at::Tensor& x, BackwardParams& p);

// The saved pre-activations of m1::fused_moe_backward: [T * k, 2F] in x's
// dtype, contiguous, on x's device (or absent).
void check_gate_up(const char* op, const std::optional<at::Tensor>& gate_up, const at::Tensor& x,
                   const MoeShape& shape);

}  // namespace m1::moe
