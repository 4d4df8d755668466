// FP32 logits head (DESIGN 3.3): params structs and launchers, torch-free.
//
//   N tokens, D model dim, V vocabulary, T temperature
//   hidden [N, D], weight [V, D] (float32, bfloat16, float16; float64 on the CPU)
//   z = hidden @ weight^T / T       computed in IEEE fp32 (fp64 for fp64 inputs),
//                                   in tiles, never stored whole
//
// logprobs forward:  logprob[n] = z[n, t_n] - lse[n],  entropy[n] = -sum p log p,
//                    lse[n] = logsumexp(z[n]); rows with t_n == ignore_index give
//                    logprob = entropy = 0 (lse is still computed).
// logprobs backward: recomputes z tile by tile and forms
//                    grad_hidden = dX @ weight, grad_weight = dX^T @ hidden
//                    with dX = dL/dx from logits_common.h (row_grad, dlogit).
// logits forward:    out = hidden @ weight^T  [N, V] (for sampling).
// logits backward:   grad_hidden = G @ weight, grad_weight = G^T @ hidden.
//
// The glue (logits_checks.cpp) validates every tensor (including the target
// range) before filling these structs.
#pragma once

#include <cstdint>

#include "common/dtype.h"

#if defined(M1_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>
#endif

namespace m1::logits {

// A row-major matrix whose rows are `ld` elements apart (last dim contiguous).
struct Matrix {
  const void* ptr = nullptr;
  int64_t ld = 0;
  DType dtype = DType::kFloat32;
};

// A vector with an element stride (0 for an expanded scalar), in `dtype`.
struct Vector {
  const void* ptr = nullptr;  // nullptr: absent (treated as zeros)
  int64_t stride = 1;
};

struct LogprobsFwdParams {
  int64_t n = 0, d = 0, v = 0;
  Matrix hidden, weight;                   // [N, D], [V, D]
  const int64_t* targets = nullptr;        // [N] int64
  int64_t targets_stride = 1;
  int64_t ignore_index = -100;
  double inv_temperature = 1.0;
  DType out_dtype = DType::kFloat32;       // float32, or float64 when both inputs are float64
  void* logprobs = nullptr;                // [N] out_dtype, contiguous, written
  void* entropy = nullptr;                 // [N]
  void* lse = nullptr;                     // [N]
  int workers = 1;                         // CPU: tasks that run at once (the glue passes torch's thread count)
  void* workspace = nullptr;               // CUDA: logprobs_fwd_workspace_bytes() bytes
};

struct LogprobsBwdParams {
  int64_t n = 0, d = 0, v = 0;
  Matrix hidden, weight;
  const int64_t* targets = nullptr;
  int64_t targets_stride = 1;
  int64_t ignore_index = -100;
  double inv_temperature = 1.0;
  DType vec_dtype = DType::kFloat32;       // dtype of the [N] vectors below (the forward's out_dtype)
  Vector grad_logprobs, grad_entropy, grad_lse;  // upstream gradients; absent ones are zero
  Vector entropy, lse;                     // saved by the forward
  void* grad_hidden = nullptr;             // [N, D] contiguous, hidden's dtype; nullptr: not wanted
  void* grad_weight = nullptr;             // [V, D] contiguous, weight's dtype; nullptr: not wanted
  int workers = 1;
  void* workspace = nullptr;               // CUDA: logprobs_bwd_workspace_bytes() bytes
};

struct LogitsFwdParams {
  int64_t n = 0, d = 0, v = 0;
  Matrix hidden, weight;
  DType out_dtype = DType::kFloat32;
  void* out = nullptr;                     // [N, V] contiguous, written
  int workers = 1;
};

struct LogitsBwdParams {
  int64_t n = 0, d = 0, v = 0;
  Matrix grad_out;                         // [N, V] in the forward's out_dtype
  Matrix hidden, weight;
  void* grad_hidden = nullptr;             // as in LogprobsBwdParams
  void* grad_weight = nullptr;
  int workers = 1;
};

void logprobs_fwd_cpu(const LogprobsFwdParams& p);
void logprobs_bwd_cpu(const LogprobsBwdParams& p);
void logits_fwd_cpu(const LogitsFwdParams& p);
void logits_bwd_cpu(const LogitsBwdParams& p);

#if defined(M1_WITH_CUDA) || defined(__CUDACC__)
// Scratch the CUDA launchers need, allocated by the caller (the torch glue uses
// the caching allocator) on the current device, the one the launch will use.
int64_t logprobs_fwd_workspace_bytes(const LogprobsFwdParams& p);
int64_t logprobs_bwd_workspace_bytes(const LogprobsBwdParams& p);

// Throw std::runtime_error on a launch failure.
void logprobs_fwd_cuda(const LogprobsFwdParams& p, cudaStream_t stream);
void logprobs_bwd_cuda(const LogprobsBwdParams& p, cudaStream_t stream);
void logits_fwd_cuda(const LogitsFwdParams& p, cudaStream_t stream);
void logits_bwd_cuda(const LogitsBwdParams& p, cudaStream_t stream);
#endif

}  // namespace m1::logits
