#include "lightning/lightning_checks.h"

#include <limits>

#include "common/torch_utils.h"

namespace m1::lightning {

DecodeParams make_decode_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& slope, const at::Tensor& state, double scale) {
  constexpr const char* op = "m1.lightning_attn_decode";
  check_dim(op, "q", q, 3, "[B, H, K]");
  const int64_t B = q.size(0), H = q.size(1), K = q.size(2);
  check_shape(op, "k", k, q.sizes(), "[B, H, K] (the shape of q)");
  check_dim(op, "v", v, 3, "[B, H, V]");
  check_shape(op, "v", v, {B, H, v.size(2)}, "[B, H, V]");
  const int64_t V = v.size(2);
  check_shape(op, "slope", slope, {H}, "[H]");
  check_shape(op, "state", state, {B, H, K, V}, "[B, H, K, V]");

  check_same_device(op, {{"q", &q}, {"k", &k}, {"v", &v}, {"slope", &slope}, {"state", &state}});
  check_float_input(op, "q", q);
  check_dtype(op, "k", k, q.scalar_type());
  check_dtype(op, "v", v, q.scalar_type());
  check_dtype(op, "slope", slope, at::kFloat);
  TORCH_CHECK_TYPE(state.scalar_type() == at::kFloat || (state.scalar_type() == at::kDouble && q.scalar_type() == at::kDouble),
                   op, ": 'state' must be float32 (float64 is accepted with float64 q, k, v), got ",
                   state.scalar_type(), " with q ", q.scalar_type());

  check_last_dim_contiguous(op, "q", q);
  check_last_dim_contiguous(op, "k", k);
  check_last_dim_contiguous(op, "v", v);
  check_contiguous(op, "slope", slope);
  check_contiguous(op, "state", state);
  TORCH_CHECK_VALUE(B * H <= std::numeric_limits<int32_t>::max(), op, ": B * H = ", B * H, " is too large");

  DecodeParams p;
  p.batch = B;
  p.heads = H;
  p.dk = K;
  p.dv = V;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_strides = {q.stride(0), q.stride(1)};
  p.k_strides = {k.stride(0), k.stride(1)};
  p.v_strides = {v.stride(0), v.stride(1)};
  p.in_dtype = to_m1_dtype(q.scalar_type());
  p.slope = slope.data_ptr<float>();
  p.state = state.data_ptr();
  p.state_dtype = to_m1_dtype(state.scalar_type());
  p.scale = scale;
  return p;
}

}  // namespace m1::lightning
