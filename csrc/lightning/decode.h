// Lightning attention decode: one token per sequence, state updated in place.
//
//   S <- lambda_h * S + k^T v          S: [K, V] fp32 per (b, h)
//   o  = scale * q S                   (uses the updated state)
//
// Params struct + launchers (one per device). Torch-free: the glue in
// lightning_glue*.cpp validates tensors and fills this struct.
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "lightning/lightning_common.h"

#if defined(M1_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>
#endif

namespace m1::lightning {

struct DecodeParams {
  int64_t batch = 0, heads = 0, dk = 0, dv = 0;  // B, H, K, V

  const void* q = nullptr;  // [B, H, K], in_dtype, last dim contiguous
  const void* k = nullptr;  // [B, H, K], in_dtype, last dim contiguous
  const void* v = nullptr;  // [B, H, V], in_dtype, last dim contiguous
  RowStrides q_strides{}, k_strides{}, v_strides{};
  DType in_dtype = DType::kFloat32;  // q, k, v and o

  const float* slope = nullptr;  // [H] float32, decay rate per head
  void* state = nullptr;         // [B, H, K, V] contiguous, state_dtype, read and written
  DType state_dtype = DType::kFloat32;
  void* o = nullptr;             // [B, H, V] contiguous, in_dtype, written
  double scale = 1.0;
};

void decode_cpu(const DecodeParams& p);

#if defined(M1_WITH_CUDA) || defined(__CUDACC__)
// Throws std::runtime_error on a launch failure.
void decode_cuda(const DecodeParams& p, cudaStream_t stream);
#endif

}  // namespace m1::lightning
