// Torch glue of the lightning-attention ops on CUDA: validate, allocate on the
// inputs' device, launch on the current stream, register the CUDA implementation.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "lightning/lightning_checks.h"

namespace m1::lightning {
namespace {

at::Tensor lightning_attn_decode_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& slope, at::Tensor& state, double scale) {
  DecodeParams p = make_decode_params(q, k, v, slope, state, scale);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor o = at::empty({p.batch, p.heads, p.dv}, v.options());
  p.o = o.data_ptr();
  decode_cuda(p, c10::cuda::getCurrentCUDAStream());
  return o;
}

// cu_seqlens values are validated on the host (make_prefill_args copies them:
// one device sync per call with cu_seqlens).
std::tuple<at::Tensor, at::Tensor> lightning_attn_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, const at::Tensor& slope,
                                                           const std::optional<at::Tensor>& initial_state,
                                                           const std::optional<at::Tensor>& cu_seqlens, double scale,
                                                           std::optional<int64_t> block_size) {
  constexpr const char* op = "m1._lightning_attn_fwd";
  PrefillArgs args = make_prefill_args(op, q, k, v, slope, initial_state, cu_seqlens, scale, block_size);
  const c10::cuda::CUDAGuard guard(q.device());
  PrefillParams& p = args.params;
  at::Tensor o = at::empty({p.batch, p.seqlen, p.heads, p.dv}, v.options());
  at::Tensor final_state = at::empty({p.num_seqs, p.heads, p.dk, p.dv}, q.options().dtype(args.state_dtype));
  p.o = o.data_ptr();
  p.final_state = final_state.data_ptr();
  prefill_fwd_cuda(p, c10::cuda::getCurrentCUDAStream());
  return {o, final_state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lightning_attn_bwd_cuda(
    const at::Tensor& grad_o, const std::optional<at::Tensor>& grad_final_state, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& slope, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& cu_seqlens, double scale, std::optional<int64_t> block_size) {
  constexpr const char* op = "m1._lightning_attn_bwd";
  PrefillArgs args = make_prefill_args(op, q, k, v, slope, initial_state, cu_seqlens, scale, block_size, grad_o,
                                       grad_final_state);
  const c10::cuda::CUDAGuard guard(q.device());
  PrefillParams& p = args.params;
  at::Tensor dq = at::empty({p.batch, p.seqlen, p.heads, p.dk}, q.options());
  at::Tensor dk = at::empty({p.batch, p.seqlen, p.heads, p.dk}, k.options());
  at::Tensor dv = at::empty({p.batch, p.seqlen, p.heads, p.dv}, v.options());
  at::Tensor d_initial = at::empty({p.num_seqs, p.heads, p.dk, p.dv}, q.options().dtype(args.state_dtype));
  p.grad_q = dq.data_ptr();
  p.grad_k = dk.data_ptr();
  p.grad_v = dv.data_ptr();
  p.grad_initial_state = d_initial.data_ptr();
  prefill_bwd_cuda(p, c10::cuda::getCurrentCUDAStream());
  return {dq, dk, dv, d_initial};
}

}  // namespace

TORCH_LIBRARY_IMPL(m1, CUDA, m) {
  m.impl("lightning_attn_decode", &lightning_attn_decode_cuda);
  m.impl("_lightning_attn_fwd", &lightning_attn_fwd_cuda);
  m.impl("_lightning_attn_bwd", &lightning_attn_bwd_cuda);
}

}  // namespace m1::lightning
