// Torch glue of the logits-head ops on CUDA: validate, check the target range
// on the device, allocate outputs and workspace on the inputs' device, launch
// on the current stream, register the CUDA implementations.
//
// Target range: the values live on the GPU, so the check is one reduction
// (any target that is neither ignore_index nor in [0, V)) whose boolean result
// is copied to the host: one device synchronisation per call, before any
// kernel runs. The kernels would be memory-safe even without it (they only
// compare targets with column indices), but a bad target must be an error,
// not a silently wrong log-prob.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "logits/logits_checks.h"

namespace m1::logits {
namespace {

void check_targets_cuda(const char* op, const at::Tensor& targets, int64_t vocab, int64_t ignore_index) {
  if (targets.numel() == 0) return;
  const at::Tensor bad = targets.ne(ignore_index).logical_and(targets.lt(0).logical_or(targets.ge(vocab)));
  if (!bad.any().item<bool>()) return;
  const int64_t i = bad.nonzero()[0][0].item<int64_t>();
  TORCH_CHECK_INDEX(false, op, ": 'targets' must be in [0, V) = [0, ", vocab, ") or equal ignore_index = ",
                    ignore_index, "; targets[", i, "] = ", targets[i].item<int64_t>());
}

at::Tensor workspace(int64_t bytes, const at::Tensor& like) {
  return at::empty({std::max<int64_t>(bytes, 1)}, like.options().dtype(at::kByte));
}

at::Tensor grad_output(bool wanted, int64_t rows, int64_t cols, const at::Tensor& like) {
  return wanted ? at::empty({rows, cols}, like.options()) : at::empty({0}, like.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fp32_logprobs_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                                                  const at::Tensor& targets, double temperature,
                                                                  int64_t ignore_index) {
  LogprobsFwdParams p = make_logprobs_fwd_params(hidden, weight, targets, temperature, ignore_index);
  const c10::cuda::CUDAGuard guard(hidden.device());
  check_targets_cuda("m1.fp32_logprobs", targets, p.v, ignore_index);
  const auto opts = hidden.options().dtype(at::kFloat);
  at::Tensor logprobs = at::empty({p.n}, opts), entropy = at::empty({p.n}, opts), lse = at::empty({p.n}, opts);
  at::Tensor ws = workspace(logprobs_fwd_workspace_bytes(p), hidden);
  p.logprobs = logprobs.data_ptr();
  p.entropy = entropy.data_ptr();
  p.lse = lse.data_ptr();
  p.workspace = ws.data_ptr();
  logprobs_fwd_cuda(p, c10::cuda::getCurrentCUDAStream());
  return {logprobs, entropy, lse};
}

std::tuple<at::Tensor, at::Tensor> fp32_logprobs_backward_cuda(
    const std::optional<at::Tensor>& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
    const std::optional<at::Tensor>& grad_lse, const at::Tensor& hidden, const at::Tensor& weight,
    const at::Tensor& targets, const at::Tensor& entropy, const at::Tensor& lse, double temperature,
    int64_t ignore_index, bool want_grad_hidden, bool want_grad_weight) {
  constexpr const char* op = "m1._fp32_logprobs_backward";
  LogprobsBwdParams p = make_logprobs_bwd_params(grad_logprobs, grad_entropy, grad_lse, hidden, weight, targets,
                                                 entropy, lse, temperature, ignore_index);
  const c10::cuda::CUDAGuard guard(hidden.device());
  check_targets_cuda(op, targets, p.v, ignore_index);
  at::Tensor grad_hidden = grad_output(want_grad_hidden, p.n, p.d, hidden);
  at::Tensor grad_weight = grad_output(want_grad_weight, p.v, p.d, weight);
  p.grad_hidden = want_grad_hidden ? grad_hidden.data_ptr() : nullptr;
  p.grad_weight = want_grad_weight ? grad_weight.data_ptr() : nullptr;
  at::Tensor ws = workspace(logprobs_bwd_workspace_bytes(p), hidden);
  p.workspace = ws.data_ptr();
  logprobs_bwd_cuda(p, c10::cuda::getCurrentCUDAStream());
  return {grad_hidden, grad_weight};
}

at::Tensor fp32_logits_cuda(const at::Tensor& hidden, const at::Tensor& weight) {
  LogitsFwdParams p = make_logits_fwd_params(hidden, weight);
  const c10::cuda::CUDAGuard guard(hidden.device());
  at::Tensor out = at::empty({p.n, p.v}, hidden.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  logits_fwd_cuda(p, c10::cuda::getCurrentCUDAStream());
  return out;
}

std::tuple<at::Tensor, at::Tensor> fp32_logits_backward_cuda(const at::Tensor& grad_logits, const at::Tensor& hidden,
                                                             const at::Tensor& weight, bool want_grad_hidden,
                                                             bool want_grad_weight) {
  at::Tensor grad_copy;
  LogitsBwdParams p = make_logits_bwd_params(grad_logits, hidden, weight, &grad_copy);
  const c10::cuda::CUDAGuard guard(hidden.device());
  at::Tensor grad_hidden = grad_output(want_grad_hidden, p.n, p.d, hidden);
  at::Tensor grad_weight = grad_output(want_grad_weight, p.v, p.d, weight);
  p.grad_hidden = want_grad_hidden ? grad_hidden.data_ptr() : nullptr;
  p.grad_weight = want_grad_weight ? grad_weight.data_ptr() : nullptr;
  logits_bwd_cuda(p, c10::cuda::getCurrentCUDAStream());
  return {grad_hidden, grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(m1, CUDA, m) {
  m.impl("fp32_logprobs", &fp32_logprobs_cuda);
  m.impl("_fp32_logprobs_backward", &fp32_logprobs_backward_cuda);
  m.impl("fp32_logits", &fp32_logits_cuda);
  m.impl("_fp32_logits_backward", &fp32_logits_backward_cuda);
}

}  // namespace m1::logits
