// Fused MoE forward on the CPU.
//
// Shapes: T tokens, D model dim, F expert FFN dim, E experts, k choices;
// P = T * k slots, in expert-sorted order after the permutation (moe_permute.h).
//
//   1. permute: histogram / scan / stable scatter of the slot indices;
//   2. gather:  xs[p] = x[token of slot p]                                [P, D]
//   3. gate_up: tasks (expert e, FFN columns c .. c + kFfnChunk):
//                 G = xs_e Wg[e, c:]^T, U = xs_e Wu[e, c:]^T   on row blocks of kRowBlock,
//                 then, on the tile still in cache: act[p, c:] = w_p silu(G) U  [P, F]
//                 (and, when kept for the backward, gate_up[p] = (G, U));
//   4. down:    tasks (expert e, model columns d .. d + kDimChunk):
//                 ys[p, d:] = act_e Wd[e, d:, :]^T                           [P, D] fp32
//   5. combine: y[t] = sum_j ys[slot_pos[t k + j]], j = 0 .. k-1 in order.
//
// The routing weight is folded into act (w W_down a = W_down (w a)), so the
// combine is a plain sum over k in fp32. Parallelism is over (expert, column
// chunk) tasks handed out dynamically, which also splits a single busy expert.
// Two GEMM paths (CpuGemm in moe.h):
//   fp32 tiles  (every CPU, every dtype): xs and act in Acc (fp32, or fp64);
//               m1::cpu::sgemm on contiguous slabs, 16-bit weight blocks
//               converted to fp32 inside their task (each weight once per
//               call); experts with <= kDirectRows rows multiply straight from
//               the weights instead (gemm_nt_few_rows: no packing, read once);
//   bf16 dot    (bfloat16 inputs on CPUs with AVX512-BF16): xs and act stay
//               bf16 and gemm_nt_bf16 multiplies them with the weights as
//               they are (act is rounded to bf16, as in any bf16 MLP);
//   f32 avx512  (float32 inputs on CPUs with AVX-512): gemm_nt_f32, the same
//               without conversions.
// On the AVX-512 paths xs and act rows are padded (row stride + 16) so that
// a power-of-two D or F does not put the kernel's four A rows in one cache set.
#include <algorithm>
#include <tuple>
#include <type_traits>

#include "common/dispatch.h"
#include "moe/moe_cpu_common.h"
#include "moe/moe_gemm_avx512_cpu.h"

namespace m1::moe {
namespace {

using namespace cpu_detail;

constexpr int64_t kFfnChunk = 256;  // gate/up columns per task: 2 x 256 x D weights
constexpr int64_t kDimChunk = 256;  // down-projection output columns per task: 256 x F weights
constexpr int64_t kDirectRows = 8;  // experts with at most this many rows skip sgemm (memory-bound: see gemm_nt_few_rows)
constexpr int64_t kRowBlock = 256;  // rows per sgemm inside a task: the G/U tile stays in L2

// act[i, j] = w_i * silu(g[i, j]) * u[i, j] for a [rows, n] tile whose gate and
// up halves sit side by side in `gu` (row stride ld_gu); act (storage Out) has
// row stride ld_act.
template <typename Acc, typename Out>
M1_CPU_MULTIVERSION void silu_mul_rows(const Acc* __restrict gu, int64_t ld_gu, int64_t rows, int64_t n,
                                       const Acc* __restrict w, Out* __restrict act, int64_t ld_act) {
  for (int64_t i = 0; i < rows; ++i) {
    const Acc* __restrict g = gu + i * ld_gu;
    const Acc* __restrict u = g + n;
    Out* __restrict out = act + i * ld_act;
    const Acc wi = w[i];
    for (int64_t j = 0; j < n; ++j) out[j] = store_from<Out>(wi * (g[j] * sigmoid(g[j])) * u[j]);
  }
}

enum class Path { kFp32Tiles, kBf16Dot, kF32Avx512 };

template <typename T, Path kPath>
void forward_path(const ForwardParams& p) {
  using Acc = acc_t<T>;
  // Storage of the gathered rows and activations the GEMMs read.
  using Op = std::conditional_t<kPath == Path::kBf16Dot, bf16, Acc>;
  constexpr bool kFloat = std::is_same_v<Acc, float>;  // not the float64 path
  constexpr bool kAvx512 = kPath != Path::kFp32Tiles;
  const MoeInputs& in = p.in;
  const int64_t D = in.shape.dim, F = in.shape.ffn, E = in.shape.experts, k = in.shape.topk;
  const int64_t P = in.shape.slots();
  const T* w_gate_up = static_cast<const T*>(in.w_gate_up);
  const T* w_down = static_cast<const T*>(in.w_down);
  T* gate_up_out = static_cast<T*>(p.gate_up);

  const Permutation perm = permute(in);
  const bool parallel = 2.0 * double(P) * double(D) * double(F) > kParallelFlops;
  const std::vector<Acc> w = gather_weights<Acc>(in, perm);
  const int64_t ldx = kAvx512 ? D + 16 : D, lda = kAvx512 ? F + 16 : F;  // row strides of xs, act
  const Scratch bufs({bytes_of<Op>(P * ldx), bytes_of<Op>(P * lda), bytes_of<Acc>(P * D)});
  Op* const xs = bufs.get<Op>(0);    // [P, D] gathered rows of x (row stride ldx)
  Op* const act = bufs.get<Op>(1);   // [P, F] w silu(g) u (row stride lda)
  Acc* const ys = bufs.get<Acc>(2);  // [P, D] expert outputs
  gather_rows(static_cast<const T*>(in.x), in.x_row_stride, D, perm, k, xs, ldx);

  // 3. gate_up GEMM with SiLU * up and the routing weight on the tile.
  constexpr bool kConvertWeights = kPath == Path::kFp32Tiles && !std::is_same_v<T, Acc>;
  const int64_t wbuf_size = kConvertWeights ? 2 * kFfnChunk * D : 0;  // converted [2 kFfnChunk, D] block
  const std::vector<Task> gu_tasks = make_tasks(perm, E, F, kFfnChunk, false);
  run_tasks(
      int64_t(gu_tasks.size()), parallel,
      [&] { return Buffer<Acc>(wbuf_size + kRowBlock * 2 * kFfnChunk); },  // + the G|U tile
      [&](int64_t i, Buffer<Acc>& scratch) {
        const int64_t e = gu_tasks[i].expert, c = gu_tasks[i].chunk * kFfnChunk;
        const int64_t n = std::min(kFfnChunk, F - c);
        const T* wg_e = w_gate_up + e * 2 * F * D + c * D;  // gate rows c .. c + n: [n, D]
        const T* wu_e = wg_e + F * D;                       // up rows F + c ..
        const int64_t begin = perm.expert_offsets[e], end = perm.expert_offsets[e + 1];
        Acc* tile = scratch.get() + wbuf_size;
        // Few rows (fp32 tiles, f32 avx512): multiply straight from the weights with the
        // memory-bound kernel; else convert and sgemm (or the AVX-512 kernel).
        const bool direct = kFloat && kPath != Path::kBf16Dot && end - begin <= kDirectRows;
        const Acc* wg = nullptr;
        const Acc* wu = nullptr;
        int64_t ldw = D;
        if constexpr (kPath == Path::kFp32Tiles) {
          if (!direct) {
            std::tie(wg, ldw) = block_as<T, Acc>(wg_e, D, n, D, scratch.get());
            std::tie(wu, ldw) = block_as<T, Acc>(wu_e, D, n, D, scratch.get() + n * D);
          }
        }
        for (int64_t r = begin; r < end; r += kRowBlock) {
          const int64_t m = std::min(kRowBlock, end - r);
          const Op* xr = xs + r * ldx;
          if constexpr (kPath == Path::kBf16Dot) {
            gemm_nt_bf16(m, n, D, xr, ldx, wg_e, D, tile, 2 * n);
            gemm_nt_bf16(m, n, D, xr, ldx, wu_e, D, tile + n, 2 * n);
          } else if constexpr (kPath == Path::kF32Avx512) {
            if (direct) {
              gemm_nt_few_rows(m, n, D, xr, ldx, wg_e, D, tile, 2 * n);
              gemm_nt_few_rows(m, n, D, xr, ldx, wu_e, D, tile + n, 2 * n);
            } else {
              gemm_nt_f32(m, n, D, xr, ldx, wg_e, D, tile, 2 * n);
              gemm_nt_f32(m, n, D, xr, ldx, wu_e, D, tile + n, 2 * n);
            }
          } else {
            if constexpr (kFloat) {
              if (direct) {
                gemm_nt_few_rows(m, n, D, xr, ldx, wg_e, D, tile, 2 * n);
                gemm_nt_few_rows(m, n, D, xr, ldx, wu_e, D, tile + n, 2 * n);
              }
            }
            if (!direct) {
              gemm<Acc>(false, true, m, n, D, xr, ldx, wg, ldw, Acc(0), tile, 2 * n);
              gemm<Acc>(false, true, m, n, D, xr, ldx, wu, ldw, Acc(0), tile + n, 2 * n);
            }
          }
          if (gate_up_out) {
            store_block<T, Acc>(tile, 2 * n, m, n, gate_up_out + r * 2 * F + c, 2 * F);
            store_block<T, Acc>(tile + n, 2 * n, m, n, gate_up_out + r * 2 * F + F + c, 2 * F);
          }
          silu_mul_rows(tile, 2 * n, m, n, w.data() + r, act + r * lda + c, lda);
        }
      });

  // 4. down GEMM into the expert-sorted output rows.
  const std::vector<Task> down_tasks = make_tasks(perm, E, D, kDimChunk, false);
  run_tasks(
      int64_t(down_tasks.size()), parallel, [&] { return Buffer<Acc>(kConvertWeights ? kDimChunk * F : 0); },
      [&](int64_t i, Buffer<Acc>& scratch) {
        const int64_t e = down_tasks[i].expert, d = down_tasks[i].chunk * kDimChunk;
        const int64_t n = std::min(kDimChunk, D - d);
        const T* wd_e = w_down + e * D * F + d * F;  // rows d .. d + n of W_down[e]: [n, F]
        const int64_t begin = perm.expert_offsets[e], rows = perm.rows(e);
        Acc* out = ys + begin * D + d;
        if constexpr (kPath == Path::kBf16Dot) {
          gemm_nt_bf16(rows, n, F, act + begin * lda, lda, wd_e, F, out, D);
        } else if constexpr (kPath == Path::kF32Avx512) {
          if (rows <= kDirectRows) {
            gemm_nt_few_rows(rows, n, F, act + begin * lda, lda, wd_e, F, out, D);
          } else {
            gemm_nt_f32(rows, n, F, act + begin * lda, lda, wd_e, F, out, D);
          }
        } else {
          if constexpr (kFloat) {
            if (rows <= kDirectRows) {
              gemm_nt_few_rows(rows, n, F, act + begin * lda, lda, wd_e, F, out, D);
              return;
            }
          }
          const auto [wd, ldd] = block_as<T, Acc>(wd_e, F, n, F, scratch.get());
          gemm<Acc>(false, true, rows, n, F, act + begin * lda, lda, wd, ldd, Acc(0), out, D);
        }
      });

  // 5. combine: y[t] = sum over the token's k slots, in slot order.
  T* y = static_cast<T*>(p.y);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, k * D));
  cpu::parallel_for(0, in.shape.tokens, grain, [&](int64_t begin, int64_t end) {
    std::vector<Acc> row(static_cast<size_t>(D));
    for (int64_t t = begin; t < end; ++t) {
      std::fill(row.begin(), row.end(), Acc(0));
      for (int64_t j = 0; j < k; ++j) {
        const Acc* src = ys + int64_t(perm.slot_pos[t * k + j]) * D;
        for (int64_t d = 0; d < D; ++d) row[d] += src[d];
      }
      for (int64_t d = 0; d < D; ++d) y[t * D + d] = store_from<T>(row[d]);
    }
  });
}

template <typename T>
void forward_typed(const ForwardParams& p) {
  const bool auto_path = p.in.cpu_gemm == CpuGemm::kAuto;
  if constexpr (std::is_same_v<T, bf16>) {
    if (auto_path && avx512::cpu_has_bf16()) return forward_path<T, Path::kBf16Dot>(p);
  }
  if constexpr (std::is_same_v<T, float>) {
    if (auto_path && avx512::cpu_has()) return forward_path<T, Path::kF32Avx512>(p);
  }
  forward_path<T, Path::kFp32Tiles>(p);
}

}  // namespace

void forward_cpu(const ForwardParams& p) {
  M1_DISPATCH_DTYPE(p.in.dtype, T, forward_typed<T>(p));
}

}  // namespace m1::moe
