// Torch glue of the fused-MoE ops on the CPU: validate (ids included, before
// anything is written), allocate, call the torch-free kernels, register.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "moe/moe_checks.h"

namespace m1::moe {
namespace {

constexpr const char* kForward = "m1.fused_moe";
constexpr const char* kBackward = "m1.fused_moe_backward";

std::tuple<at::Tensor, at::Tensor> fused_moe_cpu(const at::Tensor& x, const at::Tensor& w_gate_up,
                                                 const at::Tensor& w_down, const at::Tensor& topk_weights,
                                                 const at::Tensor& topk_ids, bool save_gate_up) {
  ForwardParams p;
  p.in = make_moe_inputs(kForward, x, w_gate_up, w_down, topk_weights, topk_ids);
  TORCH_CHECK(x.is_cpu(), kForward, ": CPU kernel called with tensors on ", x.device());
  check_ids_in_range_cpu(kForward, topk_ids, p.in.shape.experts);
  const MoeShape& s = p.in.shape;
  at::Tensor y = at::empty({s.tokens, s.dim}, x.options());
  at::Tensor gate_up = at::empty({save_gate_up ? s.slots() : 0, 2 * s.ffn}, x.options());
  p.y = y.data_ptr();
  p.gate_up = save_gate_up ? gate_up.data_ptr() : nullptr;
  forward_cpu(p);
  return {y, gate_up};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_moe_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w_gate_up, const at::Tensor& w_down,
    const at::Tensor& topk_weights, const at::Tensor& topk_ids, const std::optional<at::Tensor>& gate_up) {
  BackwardParams p;
  p.in = make_moe_inputs(kBackward, x, w_gate_up, w_down, topk_weights, topk_ids);
  TORCH_CHECK(x.is_cpu(), kBackward, ": CPU kernel called with tensors on ", x.device());
  const at::Tensor grad_y_c = prepare_grad_y(kBackward, grad_y, x, p);
  check_gate_up(kBackward, gate_up, x, p.in.shape);
  check_ids_in_range_cpu(kBackward, topk_ids, p.in.shape.experts);
  const MoeShape& s = p.in.shape;
  at::Tensor grad_x = at::empty({s.tokens, s.dim}, x.options());
  at::Tensor grad_w_gate_up = at::empty(w_gate_up.sizes(), w_gate_up.options());
  at::Tensor grad_w_down = at::empty(w_down.sizes(), w_down.options());
  at::Tensor grad_topk_weights = at::empty(topk_weights.sizes(), topk_weights.options());
  p.gate_up = gate_up.has_value() ? gate_up->data_ptr() : nullptr;
  p.grad_x = grad_x.data_ptr();
  p.grad_w_gate_up = grad_w_gate_up.data_ptr();
  p.grad_w_down = grad_w_down.data_ptr();
  p.grad_topk_weights = grad_topk_weights.data_ptr();
  backward_cpu(p);
  return {grad_x, grad_w_gate_up, grad_w_down, grad_topk_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(m1, CPU, m) {
  m.impl("fused_moe", &fused_moe_cpu);
  m.impl("fused_moe_backward", &fused_moe_backward_cpu);
}

}  // namespace m1::moe
