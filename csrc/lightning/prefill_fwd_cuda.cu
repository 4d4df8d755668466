// Lightning attention prefill forward on the GPU: the causal pass of
// prefill_cuda_pass.cuh with (X, Y, Z, S) = (q, k, v, S), one CTA per
// (sequence, head, 64 value columns). Also provides the forward-direction
// launcher that the backward uses for dq.
#include "lightning/prefill_cuda_pass.cuh"

namespace m1::lightning {

void launch_causal_pass(const PassParams& p, DType dtype, cudaStream_t stream) {
  cuda_detail::launch_pass<false>(p, dtype, stream);
}

void prefill_fwd_cuda(const PrefillParams& p, cudaStream_t stream) {
  if (p.state_dtype != DType::kFloat32) throw std::invalid_argument("m1: CUDA lightning states must be float32");
  const int64_t T = p.seqlen, H = p.heads, K = p.dk, V = p.dv;
  PassParams pp;
  pp.seqlen = T, pp.heads = H, pp.num_seqs = p.num_seqs, pp.dim = K, pp.cols = V, pp.cu_seqlens = p.cu_seqlens;
  pp.x = p.q, pp.xs = p.q_strides;
  pp.y = p.k, pp.ys = p.k_strides;
  pp.z = p.v, pp.zs = p.v_strides;
  pp.out = p.o, pp.os = TokenStrides{T * H * V, H * V, V};
  pp.state_elems = K * V;
  pp.state_in = static_cast<const float*>(p.initial_state), pp.in_rs = V, pp.in_cs = 1;
  pp.state_out = static_cast<float*>(p.final_state), pp.out_rs = V, pp.out_cs = 1;
  pp.slope = p.slope, pp.scale = float(p.scale);
  launch_causal_pass(pp, p.in_dtype, stream);
}

}  // namespace m1::lightning
