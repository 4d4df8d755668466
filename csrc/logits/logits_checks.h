// Input validation for the logits-head op family, shared by the CPU and CUDA
// glue: one place that turns tensors into checked kernel params. Everything
// but the target range is checked here; the range needs the values, which the
// CPU glue reads (check_targets_cpu) and the CUDA glue reduces on the device.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "logits/logits.h"

namespace m1::logits {

// m1.fp32_logprobs: every field but the outputs, `workers` and `workspace`.
LogprobsFwdParams make_logprobs_fwd_params(const at::Tensor& hidden, const at::Tensor& weight,
                                           const at::Tensor& targets, double temperature, int64_t ignore_index);

// m1._fp32_logprobs_backward: every field but the outputs, `workers` and `workspace`.
LogprobsBwdParams make_logprobs_bwd_params(const std::optional<at::Tensor>& grad_logprobs,
                                           const std::optional<at::Tensor>& grad_entropy,
                                           const std::optional<at::Tensor>& grad_lse, const at::Tensor& hidden,
                                           const at::Tensor& weight, const at::Tensor& targets,
                                           const at::Tensor& entropy, const at::Tensor& lse, double temperature,
                                           int64_t ignore_index);

LogitsFwdParams make_logits_fwd_params(const at::Tensor& hidden, const at::Tensor& weight);

// grad_logits may have any layout; when the kernels cannot read it in place it
// is copied into *grad_copy, which must outlive the kernel call.
LogitsBwdParams make_logits_bwd_params(const at::Tensor& grad_logits, const at::Tensor& hidden,
                                       const at::Tensor& weight, at::Tensor* grad_copy);

// dtype of the results: float64 when hidden and weight are float64, else float32.
at::ScalarType result_dtype(const at::Tensor& hidden);

// Every target is ignore_index or in [0, V); raises IndexError naming the
// first offending row otherwise. Reads the (CPU) targets.
void check_targets_cpu(const char* op, const at::Tensor& targets, int64_t vocab, int64_t ignore_index);

}  // namespace m1::logits
