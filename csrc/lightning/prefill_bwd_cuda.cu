// Lightning attention prefill backward on the GPU: three passes of the kernel
// in prefill_cuda_pass.cuh, nothing saved by the forward (prefill.h has the
// recurrences):
//   dq              forward direction, (X, Y, Z, S) = (do, v, k, S^T), S^T from initial_state
//   dv, d initial   reverse direction, (X, Y, Z, R) = (q, k, do, R), R from grad_final_state
//   dk              reverse direction, (X, Y, Z, R) = (do, v, q, R^T)
// Each pass runs one CTA per (sequence, head, 64 output columns).
#include "lightning/prefill_cuda_pass.cuh"

namespace m1::lightning {

void launch_reverse_pass(const PassParams& p, DType dtype, cudaStream_t stream) {
  cuda_detail::launch_pass<true>(p, dtype, stream);
}

void prefill_bwd_cuda(const PrefillParams& p, cudaStream_t stream) {
  if (p.state_dtype != DType::kFloat32) throw std::invalid_argument("m1: CUDA lightning states must be float32");
  const int64_t T = p.seqlen, H = p.heads, K = p.dk, V = p.dv;
  const TokenStrides dk_st{T * H * K, H * K, K}, dv_st{T * H * V, H * V, V};
  const auto* s0 = static_cast<const float*>(p.initial_state);
  const auto* dfinal = static_cast<const float*>(p.grad_final_state);

  PassParams base;
  base.seqlen = T, base.heads = H, base.num_seqs = p.num_seqs, base.cu_seqlens = p.cu_seqlens;
  base.state_elems = K * V, base.slope = p.slope, base.scale = float(p.scale);

  PassParams dq = base;  // state element (d in V, c in K) = S_0[c, d]
  dq.dim = V, dq.cols = K;
  dq.x = p.grad_o, dq.xs = p.grad_o_strides, dq.y = p.v, dq.ys = p.v_strides, dq.z = p.k, dq.zs = p.k_strides;
  dq.out = p.grad_q, dq.os = dk_st;
  dq.state_in = s0, dq.in_rs = 1, dq.in_cs = V;
  launch_causal_pass(dq, p.in_dtype, stream);

  PassParams dv = base;  // R element (d in K, c in V) = dfinal[d, c]; its last value is d initial_state
  dv.dim = K, dv.cols = V;
  dv.x = p.q, dv.xs = p.q_strides, dv.y = p.k, dv.ys = p.k_strides, dv.z = p.grad_o, dv.zs = p.grad_o_strides;
  dv.out = p.grad_v, dv.os = dv_st;
  dv.state_in = dfinal, dv.in_rs = V, dv.in_cs = 1;
  dv.state_out = static_cast<float*>(p.grad_initial_state), dv.out_rs = V, dv.out_cs = 1;
  launch_reverse_pass(dv, p.in_dtype, stream);

  PassParams dk = base;  // R^T element (d in V, c in K) = dfinal[c, d]
  dk.dim = V, dk.cols = K;
  dk.x = p.grad_o, dk.xs = p.grad_o_strides, dk.y = p.v, dk.ys = p.v_strides, dk.z = p.q, dk.zs = p.q_strides;
  dk.out = p.grad_k, dk.os = dk_st;
  dk.state_in = dfinal, dk.in_rs = 1, dk.in_cs = V;
  launch_reverse_pass(dk, p.in_dtype, stream);
}

}  // namespace m1::lightning
