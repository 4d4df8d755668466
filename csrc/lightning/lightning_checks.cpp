#include "lightning/lightning_checks.h"

#include <ATen/ops/_to_copy.h>

#include <limits>
#include <string>
#include <vector>

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

namespace {

// A [N, H, K, V] state argument (initial_state, grad_final_state): checked,
// converted to the kernels' state dtype and made contiguous (it is only read).
at::Tensor checked_state(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q,
                         c10::IntArrayRef shape, at::ScalarType state_dtype) {
  check_dim(op, name, t, 4, "[N, H, K, V]");
  check_shape(op, name, t, shape, "[N, H, K, V]");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || (t.scalar_type() == at::kDouble && q.scalar_type() == at::kDouble),
                   op, ": '", name, "' must be float32 (float64 is accepted with float64 q, k, v), got ",
                   t.scalar_type(), " with q ", q.scalar_type());
  return t.to(state_dtype).contiguous();
}

// cu_seqlens: 1-D int32/int64 offsets [N + 1] with cu[0] = 0, non-decreasing,
// cu[N] = T. The values are read on the host (a device sync for CUDA tensors)
// so that no kernel ever sees an offset outside the packed sequence.
at::Tensor checked_cu_seqlens(const char* op, const at::Tensor& cu, int64_t B, int64_t T) {
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong, op,
                   ": 'cu_seqlens' must be int32 or int64, got ", cu.scalar_type());
  check_dim(op, "cu_seqlens", cu, 1, "[N + 1]");
  TORCH_CHECK_VALUE(cu.size(0) >= 1, op, ": 'cu_seqlens' must hold N + 1 >= 1 offsets, got an empty tensor");
  TORCH_CHECK_VALUE(B == 1, op, ": with 'cu_seqlens' the sequences are packed along T and q must have batch size 1, ",
                    "got B = ", B);
  const at::Tensor host = cu.to(at::kCPU, at::kLong).contiguous();
  const int64_t* c = host.data_ptr<int64_t>();
  const int64_t N = host.size(0) - 1;
  TORCH_CHECK_VALUE(c[0] == 0, op, ": 'cu_seqlens' must start at 0, got cu_seqlens[0] = ", c[0]);
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK_VALUE(c[i + 1] >= c[i], op, ": 'cu_seqlens' must be non-decreasing, got cu_seqlens[", i, "] = ", c[i],
                      " > cu_seqlens[", i + 1, "] = ", c[i + 1]);
  }
  TORCH_CHECK_VALUE(c[N] == T, op, ": 'cu_seqlens' must end at T = ", T, " (the packed length), got cu_seqlens[", N,
                    "] = ", c[N]);
  return cu.is_cpu() ? host : cu.to(at::kLong).contiguous();
}

}  // namespace

PrefillArgs make_prefill_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& slope, const std::optional<at::Tensor>& initial_state,
                              const std::optional<at::Tensor>& cu_seqlens, double scale,
                              std::optional<int64_t> block_size, const at::Tensor& grad_o,
                              const std::optional<at::Tensor>& grad_final_state) {
  const bool backward = grad_o.defined();
  check_dim(op, "q", q, 4, "[B, T, H, K]");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), K = q.size(3);
  check_dim(op, "k", k, 4, "[B, T, H, K]");
  check_shape(op, "k", k, q.sizes(), "[B, T, H, K] (the shape of q)");
  check_dim(op, "v", v, 4, "[B, T, H, V]");
  const int64_t V = v.size(3);
  check_shape(op, "v", v, {B, T, H, V}, "[B, T, H, V]");
  check_dim(op, "slope", slope, 1, "[H]");
  check_shape(op, "slope", slope, {H}, "[H]");
  if (backward) {
    check_dim(op, "grad_o", grad_o, 4, "[B, T, H, V]");
    check_shape(op, "grad_o", grad_o, v.sizes(), "[B, T, H, V] (the shape of v)");
  }

  std::vector<NamedTensor> on_device{{"q", &q}, {"k", &k}, {"v", &v}, {"slope", &slope}};
  if (initial_state) on_device.push_back({"initial_state", &*initial_state});
  if (cu_seqlens) on_device.push_back({"cu_seqlens", &*cu_seqlens});
  if (backward) on_device.push_back({"grad_o", &grad_o});
  if (grad_final_state) on_device.push_back({"grad_final_state", &*grad_final_state});
  for (const NamedTensor& t : on_device) {
    TORCH_CHECK(t.second->device() == q.device(), op, ": all tensors must be on one device; 'q' is on ", q.device(),
                " but '", t.first, "' is on ", t.second->device());
  }

  check_float_input(op, "q", q);
  check_dtype(op, "k", k, q.scalar_type());
  check_dtype(op, "v", v, q.scalar_type());
  check_dtype(op, "slope", slope, at::kFloat);
  if (backward) check_dtype(op, "grad_o", grad_o, q.scalar_type());
  check_last_dim_contiguous(op, "q", q);
  check_last_dim_contiguous(op, "k", k);
  check_last_dim_contiguous(op, "v", v);
  if (backward) check_last_dim_contiguous(op, "grad_o", grad_o);
  check_contiguous(op, "slope", slope);

  PrefillArgs args;
  args.state_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (cu_seqlens) args.cu_seqlens = checked_cu_seqlens(op, *cu_seqlens, B, T);
  const int64_t N = cu_seqlens ? args.cu_seqlens.size(0) - 1 : B;
  if (initial_state) {
    args.initial_state = checked_state(op, "initial_state", *initial_state, q, {N, H, K, V}, args.state_dtype);
  }
  if (grad_final_state) {
    args.grad_final_state = checked_state(op, "grad_final_state", *grad_final_state, q, {N, H, K, V}, args.state_dtype);
  }

  TORCH_CHECK_VALUE(K <= kMaxHeadDim && V <= kMaxHeadDim, op, ": head dims K, V must be <= ", kMaxHeadDim,
                    ", got K = ", K, ", V = ", V);
  // block_size is a speed knob (the result does not depend on it), validated alike on every device.
  TORCH_CHECK_VALUE(!block_size || (*block_size >= 1 && *block_size <= kCpuMaxBlock), op,
                    ": 'block_size' must be in [1, ", kCpuMaxBlock, "], got ", block_size.value_or(0));
  if (q.is_cpu()) {
    args.params.block_size = block_size.value_or(kCpuDefaultBlock);
  } else {
#if defined(M1_WITH_CUDA)
    TORCH_CHECK_VALUE(cuda_prefill_supports(K, V), op, ": the CUDA kernels take K = V in {64, 128}, got K = ", K,
                      ", V = ", V, " (the CPU kernel takes any K, V <= ", kMaxHeadDim, ")");
    // The CUDA kernels always run blocks of their MMA tile, whatever size was asked for, so code
    // tuned for the CPU runs unchanged on a GPU.
    args.params.block_size = kCudaBlock;
#else
    TORCH_CHECK(false, op, ": no kernel for device ", q.device());
#endif
  }

  PrefillParams& p = args.params;
  p.batch = B, p.seqlen = T, p.heads = H, p.dk = K, p.dv = V, p.num_seqs = N;
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  p.q_strides = {q.stride(0), q.stride(1), q.stride(2)};
  p.k_strides = {k.stride(0), k.stride(1), k.stride(2)};
  p.v_strides = {v.stride(0), v.stride(1), v.stride(2)};
  p.in_dtype = to_m1_dtype(q.scalar_type());
  p.slope = slope.data_ptr<float>();
  p.cu_seqlens = args.cu_seqlens.defined() ? args.cu_seqlens.data_ptr<int64_t>() : nullptr;
  p.initial_state = args.initial_state.defined() ? args.initial_state.data_ptr() : nullptr;
  p.state_dtype = to_m1_dtype(args.state_dtype);
  p.scale = scale;
  if (backward) {
    p.grad_o = grad_o.data_ptr();
    p.grad_o_strides = {grad_o.stride(0), grad_o.stride(1), grad_o.stride(2)};
    p.grad_final_state = args.grad_final_state.defined() ? args.grad_final_state.data_ptr() : nullptr;
  }
  return args;
}

}  // namespace m1::lightning
