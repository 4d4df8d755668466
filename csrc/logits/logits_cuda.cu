// FP32 logits head on the GPU (sm_80 and later; see logits.h for the math).
//
// Precision: every product is an IEEE fp32 FFMA (fmaf) of operands widened
// exactly from their storage type; no tensor cores (no TF32), no fast-math exp.
// This is a SIMT kernel: 64 x 64 output tiles, 256 threads each owning a 4 x 4
// micro-tile, K staged through shared memory 16 at a time. It is written for
// exactness and bounds safety (any N, D, V, row strides, dtypes), not tuned.
//
// logprobs forward: grid (token tiles, vocabulary splits). A CTA walks the
//   vocabulary tiles of its split; each thread folds its 4 columns of each of
//   its 4 rows into per-row online log-sum-exp accumulators (logits_common.h),
//   the 16 threads sharing a row merge theirs with warp shuffles, and the CTA
//   writes one partial accumulator per (split, row). The thread that meets a
//   row's target column writes the target logit (exactly one in the grid).
//   A second kernel merges the splits in order (deterministic) per row.
// logprobs backward: grid (vocabulary tiles, token tiles), one 64 x 64 cell per
//   CTA: recompute the logits tile, form dX in shared memory, then
//   dH[tile rows, :] += dX W[tile cols, :] and dW[tile cols, :] += dX^T H[tile rows, :]
//   in 64-column chunks of D with fp32 atomicAdd (as Cut Cross-Entropy does):
//   gradients are not bitwise deterministic on the GPU. Accumulators are the
//   outputs when those are fp32, else fp32 workspace narrowed at the end.
// logits forward / backward: a generic tiled GEMM, C = A B^T over operands
//   given by (pointer, dtype, row stride, k stride); every output element is
//   summed by one CTA, so no atomics.
//
// Targets are compared with column indices, never used as addresses; the glue
// has also checked their range before launching.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "common/dtype.h"
#include "logits/logits.h"
#include "logits/logits_common.h"

namespace m1::logits {
namespace {

constexpr int kTile = 64;               // BM = BN: rows and columns of an output tile
constexpr int kBK = 16;                 // K staged per step
constexpr int kThreads = 256;           // 16 x 16 threads, 4 x 4 outputs each
constexpr int kPitch = kTile + 4;       // shared-memory row pitch (floats): 16-byte rows, fewer bank conflicts
constexpr int64_t kMaxGridY = 65535;

// Element (i, k) of a matrix operand is ptr[i * s_mn + k * s_k] (zero outside
// [0, mn) x [0, k)), in `dtype`.
struct Operand {
  const void* ptr;
  DType dtype;
  int64_t s_mn, s_k, mn, k;
};

__device__ __forceinline__ float load_elem(const void* ptr, DType dt, int64_t off) {
  switch (dt) {
    case DType::kBFloat16: return load_as<float>(static_cast<const bf16*>(ptr)[off]);
    case DType::kFloat16: return load_as<float>(static_cast<const fp16*>(ptr)[off]);
    default: return static_cast<const float*>(ptr)[off];
  }
}

__device__ __forceinline__ void store_elem(void* ptr, DType dt, int64_t off, float v) {
  switch (dt) {
    case DType::kBFloat16: static_cast<bf16*>(ptr)[off] = store_from<bf16>(v); break;
    case DType::kFloat16: static_cast<fp16*>(ptr)[off] = store_from<fp16>(v); break;
    default: static_cast<float*>(ptr)[off] = v;
  }
}

// S[kk][r] = op(m0 + r, k0 + kk) for r < 64, kk < 16: 1024 elements, 4 per thread,
// with consecutive threads along whichever index is contiguous in memory.
__device__ __forceinline__ void load_k_tile(float (*S)[kPitch], const Operand& op, int64_t m0, int64_t k0) {
  const int t = threadIdx.x;
  if (op.s_k == 1) {  // 4 threads per row, 4 consecutive k each
    const int r = t / 4, kk = (t % 4) * 4;
    const int64_t m = m0 + r;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t k = k0 + kk + q;
      S[kk + q][r] = (m < op.mn && k < op.k) ? load_elem(op.ptr, op.dtype, m * op.s_mn + k) : 0.f;
    }
  } else {  // 16 threads per k, 4 consecutive rows each
    const int kk = t / 16, r = (t % 16) * 4;
    const int64_t k = k0 + kk;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t m = m0 + r + q;
      S[kk][r + q] = (m < op.mn && k < op.k) ? load_elem(op.ptr, op.dtype, m * op.s_mn + k * op.s_k) : 0.f;
    }
  }
}

// acc[i][j] = sum_k A(m0 + ty*4 + i, k) B(n0 + tx*4 + j, k) over all of k, in fp32 FFMA.
__device__ __forceinline__ void mma_tile(const Operand& A, const Operand& B, int64_t m0, int64_t n0,
                                         float (*As)[kPitch], float (*Bs)[kPitch], float acc[4][4]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  for (int64_t k0 = 0; k0 < A.k; k0 += kBK) {
    __syncthreads();  // the previous step's tiles are consumed
    load_k_tile(As, A, m0, k0);
    load_k_tile(Bs, B, n0, k0);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      const float4 a = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
      const float4 b = *reinterpret_cast<const float4*>(&Bs[kk][tx * 4]);
      const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }
}

__device__ __forceinline__ LseAcc<float> shfl_xor(LseAcc<float> a, int lane_mask) {
  return {__shfl_xor_sync(0xffffffffu, a.m, lane_mask), __shfl_xor_sync(0xffffffffu, a.s, lane_mask),
          __shfl_xor_sync(0xffffffffu, a.t, lane_mask)};
}

Operand hidden_op(const Matrix& h, int64_t n, int64_t d) { return {h.ptr, h.dtype, h.ld, 1, n, d}; }
Operand weight_op(const Matrix& w, int64_t v, int64_t d) { return {w.ptr, w.dtype, w.ld, 1, v, d}; }

// ---------------------------------------------------------------------------
// logprobs forward

struct FwdArgs {
  Operand hidden, weight;
  int64_t n, v, splits;
  const int64_t* targets;
  int64_t targets_stride;
  float inv_t;
  LseAcc<float>* part;  // [splits, N]
  float* z_target;      // [N]
};

__global__ void __launch_bounds__(kThreads) logprobs_fwd_kernel(const FwdArgs a) {
  __shared__ __align__(16) float As[kBK][kPitch];  // 16 x 68 x 4 B = 4.25 KB
  __shared__ __align__(16) float Bs[kBK][kPitch];  // 4.25 KB
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t m0 = int64_t(blockIdx.x) * kTile, split = blockIdx.y;
  const int64_t tiles = ceil_div(a.v, kTile);

  int64_t target[4];
  LseAcc<float> row_acc[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = m0 + ty * 4 + i;
    target[i] = row < a.n ? a.targets[row * a.targets_stride] : -1;
    row_acc[i] = lse_empty<float>();
  }
  for (int64_t b = part_begin(tiles, a.splits, split); b < part_begin(tiles, a.splits, split + 1); ++b) {
    float acc[4][4];
    mma_tile(a.hidden, a.weight, m0, b * kTile, As, Bs, acc);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t col = b * kTile + tx * 4 + j;
        if (col < a.v) {
          const float z = acc[i][j] * a.inv_t;
          row_acc[i] = lse_push(row_acc[i], z);
          if (col == target[i]) a.z_target[m0 + ty * 4 + i] = z;  // col == target implies row < N
        }
      }
  }
  // The 16 threads of a row are lanes 0-15 or 16-31 of one warp.
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int mask = 8; mask >= 1; mask /= 2) row_acc[i] = lse_merge(row_acc[i], shfl_xor(row_acc[i], mask));
    const int64_t row = m0 + ty * 4 + i;
    if (tx == 0 && row < a.n) a.part[split * a.n + row] = row_acc[i];
  }
}

struct FinishArgs {
  int64_t n, splits;
  const LseAcc<float>* part;
  const float* z_target;
  const int64_t* targets;
  int64_t targets_stride, ignore_index;
  float *logprobs, *entropy, *lse;
};

__global__ void logprobs_finish_kernel(const FinishArgs a) {
  const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= a.n) return;
  LseAcc<float> acc = a.part[n];
  for (int64_t s = 1; s < a.splits; ++s) acc = lse_merge(acc, a.part[s * a.n + n]);
  const bool ignored = a.targets[n * a.targets_stride] == a.ignore_index;
  const RowOutputs<float> out = row_outputs(acc, ignored ? 0.f : a.z_target[n], ignored);
  a.logprobs[n] = out.logprob;
  a.entropy[n] = out.entropy;
  a.lse[n] = out.lse;
}

// Enough CTAs to fill the GPU a few times over: split the vocabulary when the
// token tiles alone are too few.
int64_t forward_splits(const LogprobsFwdParams& p) {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t token_tiles = std::max<int64_t>(1, ceil_div(p.n, kTile));
  const int64_t vocab_tiles = ceil_div(p.v, kTile);
  return std::max<int64_t>(1, std::min(vocab_tiles, ceil_div(4 * int64_t(sms), token_tiles)));
}

// ---------------------------------------------------------------------------
// logprobs backward

struct RowCoef {
  float lse, at_target, c, e;  // logits_common.h RowGrad with the row's lse
};

struct PrepArgs {
  int64_t n;
  const int64_t* targets;
  int64_t targets_stride, ignore_index;
  float inv_t;
  Vector grad_logprobs, grad_entropy, grad_lse, entropy, lse;
  RowCoef* coef;
};

__device__ __forceinline__ float read_vec(const Vector& v, int64_t i) {
  return v.ptr == nullptr ? 0.f : static_cast<const float*>(v.ptr)[i * v.stride];
}

__global__ void logprobs_prep_kernel(const PrepArgs a) {
  const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= a.n) return;
  const bool ignored = a.targets[n * a.targets_stride] == a.ignore_index;
  const RowGrad<float> g = row_grad(read_vec(a.grad_logprobs, n), read_vec(a.grad_entropy, n),
                                    read_vec(a.grad_lse, n), read_vec(a.entropy, n), a.inv_t, ignored);
  a.coef[n] = {read_vec(a.lse, n), g.at_target, g.c, g.e};
}

struct BwdArgs {
  Operand hidden, weight;
  int64_t n, d, v;
  const int64_t* targets;
  int64_t targets_stride;
  float inv_t;
  const RowCoef* coef;
  float* dh;  // [N, D] fp32 accumulator or nullptr
  float* dw;  // [V, D] fp32 accumulator or nullptr
};

// C[r][c] = chunk of `op` rows [r0, r0 + 64) x columns [c0, c0 + 64), zero outside.
__device__ __forceinline__ void load_chunk(float (*C)[kPitch], const Operand& op, int64_t r0, int64_t c0) {
  const int t = threadIdx.x;
  const int r = t / 4, c = (t % 4) * 16;  // 4 threads per row, 16 consecutive columns each
  const int64_t row = r0 + r;
#pragma unroll
  for (int q = 0; q < 16; ++q) {
    const int64_t col = c0 + c + q;
    C[r][c + q] = (row < op.mn && col < op.k) ? load_elem(op.ptr, op.dtype, row * op.s_mn + col) : 0.f;
  }
}

__global__ void __launch_bounds__(kThreads) logprobs_bwd_kernel(const BwdArgs a) {
  __shared__ __align__(16) float As[kBK][kPitch];   // 4.25 KB
  __shared__ __align__(16) float Bs[kBK][kPitch];   // 4.25 KB
  __shared__ __align__(16) float Xs[kTile][kPitch];  // dX tile: 64 x 68 x 4 B = 17 KB
  __shared__ __align__(16) float Cs[kTile][kPitch];  // 64-column chunk of weight or hidden: 17 KB
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t n0 = int64_t(blockIdx.x) * kTile;  // vocabulary columns
  const int64_t token_tiles = ceil_div(a.n, kTile);
  for (int64_t mt = blockIdx.y; mt < token_tiles; mt += gridDim.y) {
    const int64_t m0 = mt * kTile;
    float acc[4][4];
    mma_tile(a.hidden, a.weight, m0, n0, As, Bs, acc);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = m0 + ty * 4 + i;
      const RowCoef rc = row < a.n ? a.coef[row] : RowCoef{0.f, 0.f, 0.f, 0.f};
      const int64_t target = row < a.n ? a.targets[row * a.targets_stride] : -1;
      float dx[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t col = n0 + tx * 4 + j;
        dx[j] = 0.f;
        if (row < a.n && col < a.v) {
          const float logp = acc[i][j] * a.inv_t - rc.lse;
          const RowGrad<float> g{rc.at_target, rc.c, rc.e};
          dx[j] = dlogit(g, expf(logp), fmaxf(logp, -88.f), col == target);  // -inf logits: 0, not 0 * inf
        }
      }
      *reinterpret_cast<float4*>(&Xs[ty * 4 + i][tx * 4]) = make_float4(dx[0], dx[1], dx[2], dx[3]);
    }
    // dH[m0 + 4ty + i, d0 + 4tx + j] += sum_c dX[4ty + i, c] W[n0 + c, d0 + 4tx + j]
    if (a.dh != nullptr) {
      for (int64_t d0 = 0; d0 < a.d; d0 += kTile) {
        __syncthreads();  // Xs written / previous chunk consumed
        load_chunk(Cs, a.weight, n0, d0);
        __syncthreads();
        float out[4][4] = {};
        for (int c = 0; c < kTile; ++c) {
          const float4 w = *reinterpret_cast<const float4*>(&Cs[c][tx * 4]);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float x = Xs[ty * 4 + i][c];
            out[i][0] = fmaf(x, w.x, out[i][0]);
            out[i][1] = fmaf(x, w.y, out[i][1]);
            out[i][2] = fmaf(x, w.z, out[i][2]);
            out[i][3] = fmaf(x, w.w, out[i][3]);
          }
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int64_t row = m0 + ty * 4 + i, col = d0 + tx * 4 + j;
            if (row < a.n && col < a.d) atomicAdd(a.dh + row * a.d + col, out[i][j]);
          }
      }
    }
    // dW[n0 + 4ty + i, d0 + 4tx + j] += sum_r dX[r, 4ty + i] H[m0 + r, d0 + 4tx + j]
    if (a.dw != nullptr) {
      for (int64_t d0 = 0; d0 < a.d; d0 += kTile) {
        __syncthreads();
        load_chunk(Cs, a.hidden, m0, d0);
        __syncthreads();
        float out[4][4] = {};
        for (int r = 0; r < kTile; ++r) {
          const float4 x = *reinterpret_cast<const float4*>(&Xs[r][ty * 4]);
          const float4 h = *reinterpret_cast<const float4*>(&Cs[r][tx * 4]);
          const float xv[4] = {x.x, x.y, x.z, x.w}, hv[4] = {h.x, h.y, h.z, h.w};
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) out[i][j] = fmaf(xv[i], hv[j], out[i][j]);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int64_t row = n0 + ty * 4 + i, col = d0 + tx * 4 + j;
            if (row < a.v && col < a.d) atomicAdd(a.dw + row * a.d + col, out[i][j]);
          }
      }
    }
    __syncthreads();  // Xs and Cs are reused by the next token tile
  }
}

__global__ void narrow_kernel(const float* src, int64_t count, DType dtype, void* dst) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x)
    store_elem(dst, dtype, i, src[i]);
}

// ---------------------------------------------------------------------------
// Generic GEMM: C[m, n] = alpha * sum_k A(m, k) B(n, k), C row-major (ldc) in c_dtype.

struct GemmArgs {
  Operand a, b;
  float alpha;
  void* c;
  DType c_dtype;
  int64_t ldc;
};

__global__ void __launch_bounds__(kThreads) gemm_kernel(const GemmArgs g) {
  __shared__ __align__(16) float As[kBK][kPitch];  // 4.25 KB
  __shared__ __align__(16) float Bs[kBK][kPitch];  // 4.25 KB
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t n0 = int64_t(blockIdx.x) * kTile;
  const int64_t m_tiles = ceil_div(g.a.mn, kTile);
  for (int64_t mt = blockIdx.y; mt < m_tiles; mt += gridDim.y) {
    const int64_t m0 = mt * kTile;
    float acc[4][4];
    mma_tile(g.a, g.b, m0, n0, As, Bs, acc);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t row = m0 + ty * 4 + i, col = n0 + tx * 4 + j;
        if (row < g.a.mn && col < g.b.mn) store_elem(g.c, g.c_dtype, row * g.ldc + col, g.alpha * acc[i][j]);
      }
  }
}

void launch_gemm(const GemmArgs& g, cudaStream_t stream) {
  if (g.a.mn == 0 || g.b.mn == 0) return;
  const dim3 grid(unsigned(ceil_div(g.b.mn, kTile)), unsigned(std::min(kMaxGridY, ceil_div(g.a.mn, kTile))));
  gemm_kernel<<<grid, kThreads, 0, stream>>>(g);
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("m1: ") + what + " launch failed: " + cudaGetErrorString(err));
}

int64_t storage_bytes(DType d) { return d == DType::kFloat32 ? 4 : d == DType::kFloat64 ? 8 : 2; }

void require_fp32_results(DType d) {
  if (d != DType::kFloat32) throw std::invalid_argument("m1: the CUDA logits head computes in float32 (no float64)");
}

void narrow(const float* src, int64_t count, DType dtype, void* dst, cudaStream_t stream) {
  if (count == 0) return;
  const int64_t blocks = std::min<int64_t>(ceil_div(count, 256), 4096);
  narrow_kernel<<<unsigned(blocks), 256, 0, stream>>>(src, count, dtype, dst);
}

// Workspace layout of the backward: row coefficients, then the fp32
// accumulators of the gradients whose dtype is not fp32.
struct BwdLayout {
  int64_t coef_bytes, dh_floats, dw_floats;
  int64_t total() const { return coef_bytes + 4 * (dh_floats + dw_floats); }
};

BwdLayout bwd_layout(const LogprobsBwdParams& p) {
  const int64_t coef = ceil_div(p.n * int64_t(sizeof(RowCoef)), 256) * 256;
  const bool dh_acc = p.grad_hidden != nullptr && p.hidden.dtype != DType::kFloat32;
  const bool dw_acc = p.grad_weight != nullptr && p.weight.dtype != DType::kFloat32;
  return {coef, dh_acc ? p.n * p.d : 0, dw_acc ? p.v * p.d : 0};
}

int64_t fwd_part_bytes(int64_t n, int64_t splits) {
  return ceil_div(splits * n * int64_t(sizeof(LseAcc<float>)), 256) * 256;
}

}  // namespace

int64_t logprobs_fwd_workspace_bytes(const LogprobsFwdParams& p) {
  return fwd_part_bytes(p.n, forward_splits(p)) + p.n * int64_t(sizeof(float));
}

int64_t logprobs_bwd_workspace_bytes(const LogprobsBwdParams& p) { return bwd_layout(p).total(); }

void logprobs_fwd_cuda(const LogprobsFwdParams& p, cudaStream_t stream) {
  require_fp32_results(p.out_dtype);
  if (p.n == 0) return;
  const int64_t splits = forward_splits(p);
  auto* part = static_cast<LseAcc<float>*>(p.workspace);
  auto* z_target = reinterpret_cast<float*>(static_cast<char*>(p.workspace) + fwd_part_bytes(p.n, splits));
  FwdArgs a{hidden_op(p.hidden, p.n, p.d), weight_op(p.weight, p.v, p.d), p.n, p.v, splits, p.targets,
            p.targets_stride, float(p.inv_temperature), part, z_target};
  const dim3 grid(unsigned(ceil_div(p.n, kTile)), unsigned(splits));
  logprobs_fwd_kernel<<<grid, kThreads, 0, stream>>>(a);
  check_launch("logprobs forward");
  FinishArgs f{p.n, splits, part, z_target, p.targets, p.targets_stride, p.ignore_index,
               static_cast<float*>(p.logprobs), static_cast<float*>(p.entropy), static_cast<float*>(p.lse)};
  logprobs_finish_kernel<<<unsigned(ceil_div(p.n, 256)), 256, 0, stream>>>(f);
  check_launch("logprobs finish");
}

void logprobs_bwd_cuda(const LogprobsBwdParams& p, cudaStream_t stream) {
  require_fp32_results(p.vec_dtype);
  const BwdLayout layout = bwd_layout(p);
  char* ws = static_cast<char*>(p.workspace);
  auto* coef = reinterpret_cast<RowCoef*>(ws);
  float* ws_dh = reinterpret_cast<float*>(ws + layout.coef_bytes);
  float* ws_dw = ws_dh + layout.dh_floats;
  float* dh = p.grad_hidden == nullptr ? nullptr : layout.dh_floats ? ws_dh : static_cast<float*>(p.grad_hidden);
  float* dw = p.grad_weight == nullptr ? nullptr : layout.dw_floats ? ws_dw : static_cast<float*>(p.grad_weight);
  if (dh != nullptr) cudaMemsetAsync(dh, 0, size_t(p.n * p.d) * sizeof(float), stream);
  if (dw != nullptr) cudaMemsetAsync(dw, 0, size_t(p.v * p.d) * sizeof(float), stream);
  if (p.n > 0 && p.d > 0 && (dh != nullptr || dw != nullptr)) {
    PrepArgs prep{p.n, p.targets, p.targets_stride, p.ignore_index, float(p.inv_temperature), p.grad_logprobs,
                  p.grad_entropy, p.grad_lse, p.entropy, p.lse, coef};
    logprobs_prep_kernel<<<unsigned(ceil_div(p.n, 256)), 256, 0, stream>>>(prep);
    check_launch("logprobs backward prep");
    BwdArgs a{hidden_op(p.hidden, p.n, p.d), weight_op(p.weight, p.v, p.d), p.n, p.d, p.v, p.targets,
              p.targets_stride, float(p.inv_temperature), coef, dh, dw};
    const dim3 grid(unsigned(ceil_div(p.v, kTile)), unsigned(std::min(kMaxGridY, ceil_div(p.n, kTile))));
    logprobs_bwd_kernel<<<grid, kThreads, 0, stream>>>(a);
    check_launch("logprobs backward");
  }
  if (layout.dh_floats) narrow(ws_dh, layout.dh_floats, p.hidden.dtype, p.grad_hidden, stream);
  if (layout.dw_floats) narrow(ws_dw, layout.dw_floats, p.weight.dtype, p.grad_weight, stream);
  check_launch("logprobs backward narrow");
}

void logits_fwd_cuda(const LogitsFwdParams& p, cudaStream_t stream) {
  require_fp32_results(p.out_dtype);
  launch_gemm({hidden_op(p.hidden, p.n, p.d), weight_op(p.weight, p.v, p.d), 1.f, p.out, DType::kFloat32, p.v},
              stream);
  check_launch("logits forward");
}

void logits_bwd_cuda(const LogitsBwdParams& p, cudaStream_t stream) {
  require_fp32_results(p.grad_out.dtype);
  const Matrix& g = p.grad_out;
  if (p.grad_hidden != nullptr) {  // dH[n, d] = sum_v G[n, v] W[v, d]
    const Operand a{g.ptr, g.dtype, g.ld, 1, p.n, p.v}, b{p.weight.ptr, p.weight.dtype, 1, p.weight.ld, p.d, p.v};
    if (p.v == 0) {
      cudaMemsetAsync(p.grad_hidden, 0, size_t(p.n * p.d) * storage_bytes(p.hidden.dtype), stream);
    } else {
      launch_gemm({a, b, 1.f, p.grad_hidden, p.hidden.dtype, p.d}, stream);
    }
  }
  if (p.grad_weight != nullptr) {  // dW[v, d] = sum_n G[n, v] H[n, d]
    const Operand a{g.ptr, g.dtype, 1, g.ld, p.v, p.n}, b{p.hidden.ptr, p.hidden.dtype, 1, p.hidden.ld, p.d, p.n};
    if (p.n == 0) {
      cudaMemsetAsync(p.grad_weight, 0, size_t(p.v * p.d) * storage_bytes(p.weight.dtype), stream);
    } else {
      launch_gemm({a, b, 1.f, p.grad_weight, p.weight.dtype, p.d}, stream);
    }
  }
  check_launch("logits backward");
}

}  // namespace m1::logits
