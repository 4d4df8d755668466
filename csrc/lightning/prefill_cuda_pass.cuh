// The CUDA kernel of lightning-attention prefill and its backward (sm_80 and
// later): one causal pass over the blocks of a sequence with tensor-core MMA
// (CuTe SM80 atoms: bf16 / fp16 m16n8k16, TF32 m16n8k8 for fp32 inputs) and
// an fp32 state in registers. Included by prefill_fwd_cuda.cu (forward
// direction) and prefill_bwd_cuda.cu (reverse direction); torch-free.
//
// Shapes: Bt = 64 tokens per block (i queries, j keys), D = 64 or 128 the
// inner dim of the scores, C = 64 the column tile of Z, out and the state.
//
// Forward direction, per block of n <= Bt tokens, state S [D, C] before it:
//   P   = (X Y^T) * scale * lambda^(i-j) [j <= i]                  [Bt, Bt]
//   out = (X S) * scale * lambda^(i+1) + P Z                         [Bt, C]
//   S   = lambda^n S + (lambda^(n-1-j) Y)^T Z
// used with (X, Y, Z, S) = (q, k, v, S) for o and (do, v, k, S^T) for dq.
// Reverse direction, blocks last to first, R [D, C] the gradient into the
// state at the end of the block (d final_state, or its transpose, at first):
//   P   = (X Y^T) * scale * lambda^(i-j) [j <= i]
//   out = P^T Z + (lambda^(n-1-j) Y) R
//   R   = lambda^n R + (scale * lambda^(i+1) X)^T Z
// used with (X, Y, Z, R) = (q, k, do, R) for dv and d initial_state and with
// (do, v, q, R^T) for dk. See prefill.h for the recurrences.
//
// Tiling: one CTA of 4 warps per (sequence, head, column tile) loops over its
// blocks. The 4 warps split every MMA along M (TiledMMA 64 x 8 x k); operands
// are staged in shared memory in the MMA dtype and read into registers one
// k-slice at a time. The state lives in the MMA accumulators (fp32) and is
// copied, rounded to the MMA dtype, to shared memory once per block as the B
// operand of the next block's X S (or Y R) product. Index math (which
// sequence, which block, decay exponents) comes from lightning_common.h, the
// helpers the CPU kernels run.
//
// Shared memory (Elem = MMA dtype: 2 B for bf16/fp16, 4 B for TF32):
//   X, Y [Bt, D], S^T or R^T [C, D]: 3 x 64 x 128 x 2 B = 48 KB (D = 128, bf16)
//   Z [Bt, C], P [Bt, Bt]:          2 x 64 x 64 x 2 B  = 16 KB
//   decay table lambda^m, m = 0..Bt: 65 x 4 B
// i.e. 64 KB (bf16/fp16) or 128 KB (TF32) at D = 128: above the 48 KB default,
// so the launcher raises the kernel's dynamic shared-memory limit.
#pragma once

#include <cute/tensor.hpp>

#include <stdexcept>
#include <string>

#include "common/dispatch.h"
#include "common/dtype.h"
#include "common/sm80_mma.cuh"
#include "lightning/lightning_common.h"
#include "lightning/prefill.h"

namespace m1::lightning {

// One pass over every (sequence, head, column tile). Strides in elements.
struct PassParams {
  int64_t seqlen = 0, heads = 0, num_seqs = 0;
  int64_t dim = 0;   // D: the inner dim of X and Y (64 or 128)
  int64_t cols = 0;  // columns of Z, out and the state (multiple of 64)
  const int64_t* cu_seqlens = nullptr;

  const void* x = nullptr;  // [B, T, H, D], in_dtype
  const void* y = nullptr;  // [B, T, H, D]
  const void* z = nullptr;  // [B, T, H, cols]
  TokenStrides xs{}, ys{}, zs{};
  void* out = nullptr;  // [B, T, H, cols] contiguous, in_dtype
  TokenStrides os{};

  // The state of (sequence n, head h) starts at (n * heads + h) * state_elems; element (d, c) of
  // its [D, cols] view is at d * rs + c * cs (so that a transposed [cols, D] state reads as [D, cols]).
  int64_t state_elems = 0;
  const float* state_in = nullptr;  // or nullptr: zeros
  int64_t in_rs = 0, in_cs = 0;
  float* state_out = nullptr;  // or nullptr: not written
  int64_t out_rs = 0, out_cs = 0;

  const float* slope = nullptr;  // [H]
  float scale = 1.f;
};

// The two directions, each compiled in its own translation unit.
void launch_causal_pass(const PassParams& p, DType dtype, cudaStream_t stream);   // prefill_fwd_cuda.cu
void launch_reverse_pass(const PassParams& p, DType dtype, cudaStream_t stream);  // prefill_bwd_cuda.cu

namespace cuda_detail {

constexpr int kBt = 64;  // tokens per block (kCudaBlock)
constexpr int kC = 64;   // column tile
constexpr int kThreads = 128;
static_assert(kBt == kCudaBlock, "the CUDA block size is the kernel's MMA tile along T");

// The tensor-core atom and operand type of each input dtype (fp32 inputs: TF32).
template <typename T>
using Mma = Sm80Mma<T>;

// 4 warps stacked along M: a 64 x 8 x k tile, repeated over N (and over M for 128-row products).
template <typename T>
using TiledMma =
    decltype(cute::make_tiled_mma(typename Mma<T>::Atom{}, cute::Layout<cute::Shape<cute::_4, cute::_1, cute::_1>>{}));

template <typename T, int D>
constexpr int smem_bytes() {
  return int(sizeof(typename Mma<T>::Elem)) * (3 * kBt * D + kBt * kC + kBt * kBt) + (kBt + 4) * 4;
}

// acc (+)= A B^T for A (M, K) and B (N, K) views of shared memory, one k-slice of
// register operands at a time. acc is this thread's fragment of the (M, N) product.
template <typename TiledMmaT, typename SA, typename SB, typename Acc>
__device__ __forceinline__ void gemm_smem(const TiledMmaT& mma, const SA& sA, const SB& sB, Acc& acc) {
  auto thr = mma.get_thread_slice(threadIdx.x);
  auto tA = thr.partition_A(sA);  // (MMA, MMA_M, MMA_K)
  auto tB = thr.partition_B(sB);  // (MMA, MMA_N, MMA_K)
  auto rA = cute::make_fragment_like(tA(cute::_, cute::_, 0));
  auto rB = cute::make_fragment_like(tB(cute::_, cute::_, 0));
  CUTE_UNROLL
  for (int k = 0; k < cute::size<2>(tA); ++k) {
    cute::copy(tA(cute::_, cute::_, k), rA);
    cute::copy(tB(cute::_, cute::_, k), rB);
    cute::gemm(mma, rA, rB, acc);
  }
}

// Rows [t0, t0 + n) of one head of a token-major tensor into a [kBt, W] Elem
// tile (row stride W), columns [c0, c0 + W); rows n..kBt-1 are zero.
template <typename T, typename Elem, int W>
__device__ __forceinline__ void load_rows(const T* src, TokenStrides st, int64_t b, int64_t t0, int64_t h, int64_t c0,
                                          int n, Elem* dst) {
  for (int e = threadIdx.x; e < kBt * W; e += kThreads) {
    const int r = e / W, c = e % W;
    const float x = r < n ? load_as<float>(src[token_offset(st, b, t0 + r, h) + c0 + c]) : 0.f;
    dst[e] = Elem(x);
  }
}

// tile[r, :] *= factor(r) for r < n (rows n.. stay zero), rounding back to Elem.
template <typename Elem, int W, typename F>
__device__ __forceinline__ void scale_rows(Elem* tile, int n, const F& factor) {
  for (int e = threadIdx.x; e < kBt * W; e += kThreads) {
    const int r = e / W;
    if (r < n) tile[e] = Elem(float(tile[e]) * factor(r));
  }
}

template <typename T, int D, bool REVERSE>
__global__ void __launch_bounds__(kThreads) lightning_pass_kernel(const PassParams p) {
  using namespace cute;
  using Elem = typename Mma<T>::Elem;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Elem* x_buf = reinterpret_cast<Elem*>(smem_raw);  // [Bt, D]   X (then X scaled, reverse)
  Elem* y_buf = x_buf + kBt * D;                    // [Bt, D]   Y (then Y decayed)
  Elem* st_buf = y_buf + kBt * D;                   // [C, D]    S^T / R^T in Elem
  Elem* z_buf = st_buf + kC * D;                    // [Bt, C]   Z
  Elem* p_buf = z_buf + kBt * kC;                   // [Bt, Bt]  masked, decayed scores
  float* decay = reinterpret_cast<float*>(p_buf + kBt * kBt);  // [Bt + 1] lambda^m

  const int64_t tiles = p.cols / kC;
  const SeqHeadTile w = seq_head_tile(blockIdx.x, p.heads, tiles);
  const SeqSpan seq = sequence_span(p.cu_seqlens, w.seq, p.seqlen);
  const int64_t h = w.head, c0 = w.tile * kC;
  const int64_t state_base = (w.seq * p.heads + h) * p.state_elems;
  const float scale = p.scale;
  for (int m = threadIdx.x; m <= kBt; m += kThreads) decay[m] = decay_pow<float>(p.slope[h], m);

  // Row-major (tokens x cols) tiles and the transposed views the products need.
  auto row_major = [](auto* ptr, auto rows, auto cols) {
    return make_tensor(make_smem_ptr(ptr), make_layout(make_shape(rows, cols), make_stride(cols, Int<1>{})));
  };
  auto col_major = [](auto* ptr, auto rows, auto cols) {
    return make_tensor(make_smem_ptr(ptr), make_layout(make_shape(rows, cols), make_stride(Int<1>{}, rows)));
  };
  const auto sX = row_major(x_buf, Int<kBt>{}, Int<D>{});      // (i, d)
  const auto sXt = col_major(x_buf, Int<D>{}, Int<kBt>{});     // (d, i)
  const auto sY = row_major(y_buf, Int<kBt>{}, Int<D>{});      // (j, d)
  const auto sYt = col_major(y_buf, Int<D>{}, Int<kBt>{});     // (d, j)
  const auto sSt = row_major(st_buf, Int<kC>{}, Int<D>{});     // (c, d): B operand of X S / Y R
  const auto sS = col_major(st_buf, Int<D>{}, Int<kC>{});      // (d, c): the state, to store it
  const auto sZt = col_major(z_buf, Int<kC>{}, Int<kBt>{});    // (c, token)
  const auto sP = row_major(p_buf, Int<kBt>{}, Int<kBt>{});    // (i, j)
  const auto sPt = col_major(p_buf, Int<kBt>{}, Int<kBt>{});   // (j, i)

  TiledMma<T> mma;
  auto thr = mma.get_thread_slice(threadIdx.x);
  // Accumulators and the (row, col) coordinate of each of their elements.
  auto acc_s = partition_fragment_C(mma, Shape<Int<D>, Int<kC>>{});  // state (d, c), fp32
  auto acc_p = partition_fragment_C(mma, Shape<Int<kBt>, Int<kBt>>{});
  auto acc_o = partition_fragment_C(mma, Shape<Int<kBt>, Int<kC>>{});
  const auto coord_s = thr.partition_C(make_identity_tensor(Shape<Int<D>, Int<kC>>{}));
  const auto coord_p = thr.partition_C(make_identity_tensor(Shape<Int<kBt>, Int<kBt>>{}));
  const auto coord_o = thr.partition_C(make_identity_tensor(Shape<Int<kBt>, Int<kC>>{}));
  auto st_of_s = thr.partition_C(sS);
  auto p_of_p = thr.partition_C(sP);

  CUTE_UNROLL
  for (int e = 0; e < size(acc_s); ++e) {
    const int64_t d = get<0>(coord_s(e)), c = get<1>(coord_s(e));
    acc_s(e) = p.state_in != nullptr ? p.state_in[state_base + d * p.in_rs + (c0 + c) * p.in_cs] : 0.f;
    st_of_s(e) = Elem(acc_s(e));
  }

  const int64_t blocks = num_blocks(seq.len, kBt);
  for (int64_t step = 0; step < blocks; ++step) {
    const int64_t blk = REVERSE ? blocks - 1 - step : step;
    const BlockSpan bk = block_span(seq.len, kBt, blk);
    const int n = int(bk.len);
    const int64_t t0 = seq.start + bk.start;
    __syncthreads();  // the previous block is done with every buffer; the state copy is visible
    load_rows<T, Elem, D>(static_cast<const T*>(p.x), p.xs, seq.batch, t0, h, 0, n, x_buf);
    load_rows<T, Elem, D>(static_cast<const T*>(p.y), p.ys, seq.batch, t0, h, 0, n, y_buf);
    load_rows<T, Elem, kC>(static_cast<const T*>(p.z), p.zs, seq.batch, t0, h, c0, n, z_buf);
    __syncthreads();

    // Scores, masked and decayed in registers, staged as the next product's operand.
    clear(acc_p);
    gemm_smem(mma, sX, sY, acc_p);
    CUTE_UNROLL
    for (int e = 0; e < size(acc_p); ++e) {
      const int i = get<0>(coord_p(e)), j = get<1>(coord_p(e));
      const bool keep = j <= i && i < n;
      p_of_p(e) = Elem(keep ? acc_p(e) * scale * decay[intra_decay_exponent(i, j)] : 0.f);
    }
    if constexpr (!REVERSE) {
      clear(acc_o);
      gemm_smem(mma, sX, sSt, acc_o);  // X S (X is read before any rescaling)
    }
    __syncthreads();  // scores visible; everyone is done reading the raw X and Y
    scale_rows<Elem, D>(y_buf, n, [&](int j) { return decay[key_decay_exponent(n, j)]; });
    if constexpr (REVERSE) scale_rows<Elem, D>(x_buf, n, [&](int i) { return scale * decay[query_decay_exponent(i)]; });
    __syncthreads();

    if constexpr (!REVERSE) {
      CUTE_UNROLL
      for (int e = 0; e < size(acc_o); ++e) acc_o(e) *= scale * decay[query_decay_exponent(get<0>(coord_o(e)))];
      gemm_smem(mma, sP, sZt, acc_o);  // + P Z
    } else {
      clear(acc_o);
      gemm_smem(mma, sPt, sZt, acc_o);  // P^T Z
      gemm_smem(mma, sY, sSt, acc_o);   // + (decayed Y) R
    }
    T* out = static_cast<T*>(p.out);
    CUTE_UNROLL
    for (int e = 0; e < size(acc_o); ++e) {
      const int r = get<0>(coord_o(e)), c = get<1>(coord_o(e));
      if (r < n) out[token_offset(p.os, seq.batch, t0 + r, h) + c0 + c] = store_from<T>(acc_o(e));
    }

    // State: S <- lambda^n S + (decayed Y)^T Z, or R <- lambda^n R + (scaled X)^T Z.
    const float block_decay = decay[block_decay_exponent(n)];
    CUTE_UNROLL
    for (int e = 0; e < size(acc_s); ++e) acc_s(e) *= block_decay;
    if constexpr (!REVERSE) {
      gemm_smem(mma, sYt, sZt, acc_s);
    } else {
      gemm_smem(mma, sXt, sZt, acc_s);
    }
    __syncthreads();  // everyone is done reading the old S^T / R^T
    CUTE_UNROLL
    for (int e = 0; e < size(acc_s); ++e) st_of_s(e) = Elem(acc_s(e));
  }

  if (p.state_out != nullptr) {
    CUTE_UNROLL
    for (int e = 0; e < size(acc_s); ++e) {
      const int64_t d = get<0>(coord_s(e)), c = get<1>(coord_s(e));
      p.state_out[state_base + d * p.out_rs + (c0 + c) * p.out_cs] = acc_s(e);
    }
  }
}

template <typename T, int D, bool REVERSE>
void launch_pass_typed(const PassParams& p, cudaStream_t stream) {
  const int64_t ctas = p.num_seqs * p.heads * (p.cols / kC);
  if (ctas == 0) return;
  constexpr int smem = smem_bytes<T, D>();
  auto kernel = lightning_pass_kernel<T, D, REVERSE>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err == cudaSuccess) {
    kernel<<<dim3(unsigned(ctas)), dim3(kThreads), smem, stream>>>(p);
    err = cudaGetLastError();
  }
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("m1: lightning prefill kernel launch failed: ") + cudaGetErrorString(err));
  }
}

// Dispatch on the input dtype and D (64 or 128; checked by the glue).
template <bool REVERSE>
void launch_pass(const PassParams& p, DType dtype, cudaStream_t stream) {
  if (p.dim != 64 && p.dim != 128) throw std::invalid_argument("m1: CUDA lightning prefill takes D = 64 or 128");
  if (p.cols % kC != 0) throw std::invalid_argument("m1: CUDA lightning prefill needs a multiple of 64 columns");
  M1_DISPATCH_DTYPE_NO_DOUBLE(dtype, T, {
    if (p.dim == 64) {
      launch_pass_typed<T, 64, REVERSE>(p, stream);
    } else {
      launch_pass_typed<T, 128, REVERSE>(p, stream);
    }
  });
}

}  // namespace cuda_detail
}  // namespace m1::lightning
