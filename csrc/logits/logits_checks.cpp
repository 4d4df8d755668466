#include "logits/logits_checks.h"

#include <cmath>

#include "common/torch_utils.h"
#include "logits/logits_common.h"

namespace m1::logits {
namespace {

constexpr const char* kLogprobs = "m1.fp32_logprobs";
constexpr const char* kLogprobsBwd = "m1._fp32_logprobs_backward";
constexpr const char* kLogits = "m1.fp32_logits";
constexpr const char* kLogitsBwd = "m1._fp32_logits_backward";

// hidden [N, D] and weight [V, D]: shapes, dtypes, layouts. Returns {N, D, V}.
struct Dims {
  int64_t n, d, v;
};

// Rows of a matrix for the kernels. A single row's stride is irrelevant (and
// may be anything, e.g. for an expanded tensor), so it is reported as `cols`;
// so are the strides of an empty matrix.
Matrix as_matrix(const char* op, const char* name, const at::Tensor& t) {
  const int64_t rows = t.size(0), cols = t.size(1);
  if (t.numel() == 0) return {t.data_ptr(), cols, to_m1_dtype(t.scalar_type())};  // never read; any strides
  check_last_dim_contiguous(op, name, t);
  const int64_t ld = rows <= 1 ? cols : t.stride(0);
  TORCH_CHECK_VALUE(rows <= 1 || ld >= cols, op, ": '", name, "' rows overlap (strides ", shape_str(t.strides()),
                    " for shape ", shape_str(t.sizes()), "); call .contiguous() first");
  return {t.data_ptr(), ld, to_m1_dtype(t.scalar_type())};
}

// Rows with unit stride that do not overlap: what as_matrix accepts.
bool as_rows_ok(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  const bool last = t.size(1) <= 1 || t.stride(1) == 1;
  return last && (t.size(0) <= 1 || t.stride(0) >= t.size(1));
}

Dims check_head(const char* op, const at::Tensor& hidden, const at::Tensor& weight) {
  check_dim(op, "hidden", hidden, 2, "[N, D]");
  check_dim(op, "weight", weight, 2, "[V, D]");
  const int64_t N = hidden.size(0), D = hidden.size(1), V = weight.size(0);
  check_shape(op, "weight", weight, {V, D}, "[V, D] (D from hidden)");
  TORCH_CHECK_VALUE(V >= 1, op, ": 'weight' must have at least one row (a vocabulary of V >= 1), got shape ",
                    shape_str(weight.sizes()));
  check_same_device(op, {{"hidden", &hidden}, {"weight", &weight}});
  check_float_input(op, "hidden", hidden);
  check_float_input(op, "weight", weight);
  const bool h64 = hidden.scalar_type() == at::kDouble, w64 = weight.scalar_type() == at::kDouble;
  TORCH_CHECK_TYPE(h64 == w64, op, ": float64 is supported only when both 'hidden' and 'weight' are float64, got ",
                   hidden.scalar_type(), " and ", weight.scalar_type());
  return {N, D, V};
}

void check_temperature(const char* op, double temperature) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, op,
                    ": 'temperature' must be a finite number > 0, got ", temperature);
}

void check_targets(const char* op, const at::Tensor& targets, const at::Tensor& hidden, int64_t N) {
  check_dim(op, "targets", targets, 1, "[N]");
  check_shape(op, "targets", targets, {N}, "[N] (N from hidden)");
  check_same_device(op, {{"hidden", &hidden}, {"targets", &targets}});
  check_dtype(op, "targets", targets, at::kLong);
}

// An [N] vector of the result dtype, any stride (0 for an expanded gradient).
Vector as_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& hidden, int64_t N) {
  check_dim(op, name, t, 1, "[N]");
  check_shape(op, name, t, {N}, "[N] (N from hidden)");
  check_same_device(op, {{"hidden", &hidden}, {name, &t}});
  check_dtype(op, name, t, result_dtype(hidden));
  return {t.data_ptr(), t.stride(0)};
}

}  // namespace

at::ScalarType result_dtype(const at::Tensor& hidden) {
  return hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

LogprobsFwdParams make_logprobs_fwd_params(const at::Tensor& hidden, const at::Tensor& weight,
                                           const at::Tensor& targets, double temperature, int64_t ignore_index) {
  const Dims dims = check_head(kLogprobs, hidden, weight);
  check_targets(kLogprobs, targets, hidden, dims.n);
  check_temperature(kLogprobs, temperature);
  LogprobsFwdParams p;
  p.n = dims.n;
  p.d = dims.d;
  p.v = dims.v;
  p.hidden = as_matrix(kLogprobs, "hidden", hidden);
  p.weight = as_matrix(kLogprobs, "weight", weight);
  p.targets = targets.data_ptr<int64_t>();
  p.targets_stride = targets.stride(0);
  p.ignore_index = ignore_index;
  p.inv_temperature = 1.0 / temperature;
  p.out_dtype = to_m1_dtype(result_dtype(hidden));
  return p;
}

LogprobsBwdParams make_logprobs_bwd_params(const std::optional<at::Tensor>& grad_logprobs,
                                           const std::optional<at::Tensor>& grad_entropy,
                                           const std::optional<at::Tensor>& grad_lse, const at::Tensor& hidden,
                                           const at::Tensor& weight, const at::Tensor& targets,
                                           const at::Tensor& entropy, const at::Tensor& lse, double temperature,
                                           int64_t ignore_index) {
  const char* op = kLogprobsBwd;
  const Dims dims = check_head(op, hidden, weight);
  check_targets(op, targets, hidden, dims.n);
  check_temperature(op, temperature);
  LogprobsBwdParams p;
  p.n = dims.n;
  p.d = dims.d;
  p.v = dims.v;
  p.hidden = as_matrix(op, "hidden", hidden);
  p.weight = as_matrix(op, "weight", weight);
  p.targets = targets.data_ptr<int64_t>();
  p.targets_stride = targets.stride(0);
  p.ignore_index = ignore_index;
  p.inv_temperature = 1.0 / temperature;
  p.vec_dtype = to_m1_dtype(result_dtype(hidden));
  if (grad_logprobs) p.grad_logprobs = as_vector(op, "grad_logprobs", *grad_logprobs, hidden, dims.n);
  if (grad_entropy) p.grad_entropy = as_vector(op, "grad_entropy", *grad_entropy, hidden, dims.n);
  if (grad_lse) p.grad_lse = as_vector(op, "grad_lse", *grad_lse, hidden, dims.n);
  p.entropy = as_vector(op, "entropy", entropy, hidden, dims.n);
  p.lse = as_vector(op, "lse", lse, hidden, dims.n);
  return p;
}

LogitsFwdParams make_logits_fwd_params(const at::Tensor& hidden, const at::Tensor& weight) {
  const Dims dims = check_head(kLogits, hidden, weight);
  LogitsFwdParams p;
  p.n = dims.n;
  p.d = dims.d;
  p.v = dims.v;
  p.hidden = as_matrix(kLogits, "hidden", hidden);
  p.weight = as_matrix(kLogits, "weight", weight);
  p.out_dtype = to_m1_dtype(result_dtype(hidden));
  return p;
}

LogitsBwdParams make_logits_bwd_params(const at::Tensor& grad_logits, const at::Tensor& hidden,
                                       const at::Tensor& weight, at::Tensor* grad_copy) {
  const char* op = kLogitsBwd;
  const Dims dims = check_head(op, hidden, weight);
  check_dim(op, "grad_logits", grad_logits, 2, "[N, V]");
  check_shape(op, "grad_logits", grad_logits, {dims.n, dims.v}, "[N, V]");
  check_same_device(op, {{"hidden", &hidden}, {"grad_logits", &grad_logits}});
  check_dtype(op, "grad_logits", grad_logits, result_dtype(hidden));
  // Autograd hands over gradients in any layout (logits.sum() gives strides
  // [0, 0]): the kernels need unit-stride rows that do not overlap, so anything
  // else is read from a contiguous copy, which the caller keeps alive.
  if (!as_rows_ok(grad_logits)) *grad_copy = grad_logits.contiguous();
  const at::Tensor& g = as_rows_ok(grad_logits) ? grad_logits : *grad_copy;
  LogitsBwdParams p;
  p.n = dims.n;
  p.d = dims.d;
  p.v = dims.v;
  p.grad_out = as_matrix(op, "grad_logits", g);
  p.hidden = as_matrix(op, "hidden", hidden);
  p.weight = as_matrix(op, "weight", weight);
  return p;
}

void check_targets_cpu(const char* op, const at::Tensor& targets, int64_t vocab, int64_t ignore_index) {
  const int64_t* t = targets.data_ptr<int64_t>();
  const int64_t n = targets.size(0), stride = targets.stride(0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t ti = t[i * stride];
    TORCH_CHECK_INDEX(target_valid(ti, vocab, ignore_index), op, ": 'targets' must be in [0, V) = [0, ", vocab,
                      ") or equal ignore_index = ", ignore_index, "; targets[", i, "] = ", ti);
  }
}

}  // namespace m1::logits
