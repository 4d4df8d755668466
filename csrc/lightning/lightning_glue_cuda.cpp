// Torch glue of the lightning-attention ops on CUDA: validate, allocate on the
// inputs' device, launch on the current stream, register the CUDA implementation.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

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

}  // namespace

TORCH_LIBRARY_IMPL(m1, CUDA, m) { m.impl("lightning_attn_decode", &lightning_attn_decode_cuda); }

}  // namespace m1::lightning
