// Torch glue of the lightning-attention ops on the CPU: validate, allocate,
// call the torch-free kernel, register the CPU implementation.
#include <ATen/ops/empty.h>
#include <torch/library.h>

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

}  // namespace

TORCH_LIBRARY_IMPL(m1, CPU, m) { m.impl("lightning_attn_decode", &lightning_attn_decode_cpu); }

}  // namespace m1::lightning
