#include "moe/moe_checks.h"

#include <limits>

#include "common/torch_utils.h"
#include "moe/moe_permute.h"

namespace m1::moe {

MoeInputs make_moe_inputs(const char* op, const at::Tensor& x, const at::Tensor& w_gate_up,
                          const at::Tensor& w_down, const at::Tensor& topk_weights, const at::Tensor& topk_ids) {
  check_dim(op, "x", x, 2, "[T, D]");
  const int64_t T = x.size(0), D = x.size(1);
  check_dim(op, "w_gate_up", w_gate_up, 3, "[E, 2F, D]");
  const int64_t E = w_gate_up.size(0);
  TORCH_CHECK_VALUE(E >= 1, op, ": 'w_gate_up' must hold at least one expert, got shape ",
                    shape_str(w_gate_up.sizes()));
  TORCH_CHECK_VALUE(w_gate_up.size(1) % 2 == 0, op,
                    ": 'w_gate_up' must have shape [E, 2F, D] (gate rows then up rows), got an odd second dimension: ",
                    shape_str(w_gate_up.sizes()));
  const int64_t F = w_gate_up.size(1) / 2;
  check_shape(op, "w_gate_up", w_gate_up, {E, 2 * F, D}, "[E, 2F, D] (D from x)");
  check_dim(op, "w_down", w_down, 3, "[E, D, F]");
  check_shape(op, "w_down", w_down, {E, D, F}, "[E, D, F] (E, F from w_gate_up, D from x)");
  check_dim(op, "topk_weights", topk_weights, 2, "[T, k]");
  const int64_t k = topk_weights.size(1);
  check_shape(op, "topk_weights", topk_weights, {T, k}, "[T, k] (T from x)");
  check_shape(op, "topk_ids", topk_ids, {T, k}, "[T, k] (the shape of topk_weights)");

  check_same_device(op, {{"x", &x}, {"w_gate_up", &w_gate_up}, {"w_down", &w_down},
                         {"topk_weights", &topk_weights}, {"topk_ids", &topk_ids}});
  check_float_input(op, "x", x);
  check_dtype(op, "w_gate_up", w_gate_up, x.scalar_type());
  check_dtype(op, "w_down", w_down, x.scalar_type());
  TORCH_CHECK_TYPE(topk_weights.scalar_type() == at::kFloat ||
                       (topk_weights.scalar_type() == at::kDouble && x.scalar_type() == at::kDouble),
                   op, ": 'topk_weights' must be float32 (float64 is accepted with float64 x), got ",
                   topk_weights.scalar_type(), " with x ", x.scalar_type());
  TORCH_CHECK_TYPE(topk_ids.scalar_type() == at::kLong || topk_ids.scalar_type() == at::kInt, op,
                   ": 'topk_ids' must be int64 or int32, got ", topk_ids.scalar_type());

  check_last_dim_contiguous(op, "x", x);
  check_contiguous(op, "w_gate_up", w_gate_up);
  check_contiguous(op, "w_down", w_down);
  check_contiguous(op, "topk_weights", topk_weights);
  check_contiguous(op, "topk_ids", topk_ids);
  // Positions in the expert-sorted order are int32 (moe_permute.h).
  TORCH_CHECK_VALUE(T * k < std::numeric_limits<int32_t>::max(), op, ": T * k = ", T * k,
                    " slots is too many (at most 2^31 - 2)");
  TORCH_CHECK_VALUE(E * permute_chunks(T * k) < std::numeric_limits<int32_t>::max(), op, ": E = ", E,
                    " experts with T * k = ", T * k, " slots is too many");

  MoeInputs in;
  in.shape = {T, D, F, E, k};
  in.dtype = to_m1_dtype(x.scalar_type());
  in.x = x.data_ptr();
  in.x_row_stride = x.stride(0);
  in.w_gate_up = w_gate_up.data_ptr();
  in.w_down = w_down.data_ptr();
  in.topk_weights = topk_weights.data_ptr();
  in.weight_dtype = to_m1_dtype(topk_weights.scalar_type());
  in.topk_ids = topk_ids.data_ptr();
  in.ids_int64 = topk_ids.scalar_type() == at::kLong;
  return in;
}

namespace {

template <typename Id>
void check_ids_typed(const char* op, const Id* ids, int64_t n, int64_t k, int64_t experts) {
  const int64_t bad = first_invalid_id(ids, n, experts);
  TORCH_CHECK_VALUE(bad < 0, op, ": 'topk_ids' must hold expert indices in [0, E) = [0, ", experts, "), got ",
                    int64_t(ids[bad < 0 ? 0 : bad]), " at [", bad / k, ", ", bad % k, "]");
}

}  // namespace

void check_ids_in_range_cpu(const char* op, const at::Tensor& topk_ids, int64_t experts) {
  TORCH_CHECK(topk_ids.is_cpu() && topk_ids.is_contiguous(), op, ": internal: host id check on ",
              topk_ids.device());
  const int64_t n = topk_ids.numel(), k = topk_ids.size(1);
  if (topk_ids.scalar_type() == at::kLong) {
    check_ids_typed(op, topk_ids.data_ptr<int64_t>(), n, k, experts);
  } else {
    check_ids_typed(op, topk_ids.data_ptr<int32_t>(), n, k, experts);
  }
}

void throw_invalid_ids(const char* op, int64_t count, int64_t experts) {
  TORCH_CHECK_VALUE(false, op, ": 'topk_ids' must hold expert indices in [0, E) = [0, ", experts, "), got ", count,
                    " id(s) outside that range");
}

at::Tensor prepare_grad_y(const char* op, const at::Tensor& grad_y, const at::Tensor& x, BackwardParams& p) {
  check_shape(op, "grad_y", grad_y, x.sizes(), "[T, D] (the shape of x)");
  check_same_device(op, {{"x", &x}, {"grad_y", &grad_y}});
  check_dtype(op, "grad_y", grad_y, x.scalar_type());
  at::Tensor g = grad_y.size(1) <= 1 || grad_y.stride(1) == 1 ? grad_y : grad_y.contiguous();
  p.grad_y = g.data_ptr();
  p.grad_y_row_stride = g.stride(0);
  return g;
}

void check_gate_up(const char* op, const std::optional<at::Tensor>& gate_up, const at::Tensor& x,
                   const MoeShape& shape) {
  if (!gate_up.has_value()) return;
  const at::Tensor& h = *gate_up;
  check_shape(op, "gate_up", h, {shape.slots(), 2 * shape.ffn}, "[T * k, 2F]");
  check_same_device(op, {{"x", &x}, {"gate_up", &h}});
  check_dtype(op, "gate_up", h, x.scalar_type());
  check_contiguous(op, "gate_up", h);
}

}  // namespace m1::moe
