// Torch glue of the logits-head ops on the CPU: validate (target range
// included) before touching memory, allocate, call the torch-free kernels,
// register the CPU implementations.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "logits/logits_checks.h"

namespace m1::logits {
namespace {

void check_cpu(const char* op, const at::Tensor& hidden) {
  TORCH_CHECK(hidden.is_cpu(), op, ": CPU kernel called with tensors on ", hidden.device());
}

// A gradient output like `t` ([rows, cols] contiguous), or an empty [0] tensor when not wanted.
at::Tensor grad_output(bool wanted, int64_t rows, int64_t cols, const at::Tensor& like) {
  return wanted ? at::empty({rows, cols}, like.options()) : at::empty({0}, like.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fp32_logprobs_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                                                 const at::Tensor& targets, double temperature,
                                                                 int64_t ignore_index) {
  LogprobsFwdParams p = make_logprobs_fwd_params(hidden, weight, targets, temperature, ignore_index);
  check_cpu("m1.fp32_logprobs", hidden);
  check_targets_cpu("m1.fp32_logprobs", targets, p.v, ignore_index);
  const auto opts = hidden.options().dtype(result_dtype(hidden));
  at::Tensor logprobs = at::empty({p.n}, opts), entropy = at::empty({p.n}, opts), lse = at::empty({p.n}, opts);
  p.logprobs = logprobs.data_ptr();
  p.entropy = entropy.data_ptr();
  p.lse = lse.data_ptr();
  p.workers = at::get_num_threads();
  logprobs_fwd_cpu(p);
  return {logprobs, entropy, lse};
}

std::tuple<at::Tensor, at::Tensor> fp32_logprobs_backward_cpu(
    const std::optional<at::Tensor>& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
    const std::optional<at::Tensor>& grad_lse, const at::Tensor& hidden, const at::Tensor& weight,
    const at::Tensor& targets, const at::Tensor& entropy, const at::Tensor& lse, double temperature,
    int64_t ignore_index, bool want_grad_hidden, bool want_grad_weight) {
  constexpr const char* op = "m1._fp32_logprobs_backward";
  LogprobsBwdParams p = make_logprobs_bwd_params(grad_logprobs, grad_entropy, grad_lse, hidden, weight, targets,
                                                 entropy, lse, temperature, ignore_index);
  check_cpu(op, hidden);
  check_targets_cpu(op, targets, p.v, ignore_index);
  at::Tensor grad_hidden = grad_output(want_grad_hidden, p.n, p.d, hidden);
  at::Tensor grad_weight = grad_output(want_grad_weight, p.v, p.d, weight);
  p.grad_hidden = want_grad_hidden ? grad_hidden.data_ptr() : nullptr;
  p.grad_weight = want_grad_weight ? grad_weight.data_ptr() : nullptr;
  p.workers = at::get_num_threads();
  logprobs_bwd_cpu(p);
  return {grad_hidden, grad_weight};
}

at::Tensor fp32_logits_cpu(const at::Tensor& hidden, const at::Tensor& weight) {
  LogitsFwdParams p = make_logits_fwd_params(hidden, weight);
  check_cpu("m1.fp32_logits", hidden);
  at::Tensor out = at::empty({p.n, p.v}, hidden.options().dtype(result_dtype(hidden)));
  p.out = out.data_ptr();
  p.workers = at::get_num_threads();
  logits_fwd_cpu(p);
  return out;
}

std::tuple<at::Tensor, at::Tensor> fp32_logits_backward_cpu(const at::Tensor& grad_logits, const at::Tensor& hidden,
                                                            const at::Tensor& weight, bool want_grad_hidden,
                                                            bool want_grad_weight) {
  at::Tensor grad_copy;
  LogitsBwdParams p = make_logits_bwd_params(grad_logits, hidden, weight, &grad_copy);
  check_cpu("m1._fp32_logits_backward", hidden);
  at::Tensor grad_hidden = grad_output(want_grad_hidden, p.n, p.d, hidden);
  at::Tensor grad_weight = grad_output(want_grad_weight, p.v, p.d, weight);
  p.grad_hidden = want_grad_hidden ? grad_hidden.data_ptr() : nullptr;
  p.grad_weight = want_grad_weight ? grad_weight.data_ptr() : nullptr;
  p.workers = at::get_num_threads();
  logits_bwd_cpu(p);
  return {grad_hidden, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(m1, CPU, m) {
  m.impl("fp32_logprobs", &fp32_logprobs_cpu);
  m.impl("_fp32_logprobs_backward", &fp32_logprobs_backward_cpu);
  m.impl("fp32_logits", &fp32_logits_cpu);
  m.impl("_fp32_logits_backward", &fp32_logits_backward_cpu);
}

}  // namespace m1::logits
