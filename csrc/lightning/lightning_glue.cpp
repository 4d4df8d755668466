// Torch glue of the lightning-attention ops on the CPU: validate, allocate,
// call the torch-free kernel, register the CPU implementation.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "lightning/lightning_checks.h"

namespace m1::lightning {
namespace {

at::Tensor lightning_attn_decode_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& slope, at::Tensor& state, double scale) {
  DecodeParams p = make_decode_params(q, k, v, slope, state, scale);
  TORCH_CHECK(q.is_cpu(), "m1.lightning_attn_decode: CPU kernel called with tensors on ", q.device());
  at::Tensor o = at::empty({p.batch, p.heads, p.dv}, v.options());
  p.o = o.data_ptr();
  decode_cpu(p);
  return o;
}

std::tuple<at::Tensor, at::Tensor> lightning_attn_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const at::Tensor& slope,
                                                          const std::optional<at::Tensor>& initial_state,
                                                          const std::optional<at::Tensor>& cu_seqlens, double scale,
                                                          std::optional<int64_t> block_size) {
  constexpr const char* op = "m1._lightning_attn_fwd";
  PrefillArgs args = make_prefill_args(op, q, k, v, slope, initial_state, cu_seqlens, scale, block_size);
  PrefillParams& p = args.params;
  at::Tensor o = at::empty({p.batch, p.seqlen, p.heads, p.dv}, v.options());
  at::Tensor final_state = at::empty({p.num_seqs, p.heads, p.dk, p.dv}, q.options().dtype(args.state_dtype));
  p.o = o.data_ptr();
  p.final_state = final_state.data_ptr();
  p.cpu_threads = at::get_num_threads();
  prefill_fwd_cpu(p);
  return {o, final_state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lightning_attn_bwd_cpu(
    const at::Tensor& grad_o, const std::optional<at::Tensor>& grad_final_state, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& slope, const std::optional<at::Tensor>& initial_state,
    const std::optional<at::Tensor>& cu_seqlens, double scale, std::optional<int64_t> block_size) {
  constexpr const char* op = "m1._lightning_attn_bwd";
  PrefillArgs args = make_prefill_args(op, q, k, v, slope, initial_state, cu_seqlens, scale, block_size, grad_o,
                                       grad_final_state);
  PrefillParams& p = args.params;
  at::Tensor dq = at::empty({p.batch, p.seqlen, p.heads, p.dk}, q.options());
  at::Tensor dk = at::empty({p.batch, p.seqlen, p.heads, p.dk}, k.options());
  at::Tensor dv = at::empty({p.batch, p.seqlen, p.heads, p.dv}, v.options());
  at::Tensor d_initial = at::empty({p.num_seqs, p.heads, p.dk, p.dv}, q.options().dtype(args.state_dtype));
  p.grad_q = dq.data_ptr();
  p.grad_k = dk.data_ptr();
  p.grad_v = dv.data_ptr();
  p.grad_initial_state = d_initial.data_ptr();
  p.cpu_threads = at::get_num_threads();
  prefill_bwd_cpu(p);
  return {dq, dk, dv, d_initial};
}

}  // namespace

TORCH_LIBRARY_IMPL(m1, CPU, m) {
  m.impl("lightning_attn_decode", &lightning_attn_decode_cpu);
  m.impl("_lightning_attn_fwd", &lightning_attn_fwd_cpu);
  m.impl("_lightning_attn_bwd", &lightning_attn_bwd_cpu);
}

}  // namespace m1::lightning
