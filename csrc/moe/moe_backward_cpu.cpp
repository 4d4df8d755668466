// Fused MoE backward on the CPU: dx, dW_gate_up, dW_down, d topk_weights.
//
// Shapes: T tokens, D model dim, F expert FFN dim, E experts, k choices;
// P = T * k slots in expert-sorted order (moe_permute.h), the same order the
// forward used (the permutation is recomputed from topk_ids: O(P)).
//
//   1. permute; gather xs[p] = x[token], dys[p] = dy[token]          [P, D] Acc
//   2. h = (G, U): the forward's saved pre-activations, or recomputed
//      with the gate_up GEMM when they were not kept                 [P, 2F]
//   3. activation tasks (expert e, FFN columns c .. c + kFfnChunk):
//        dA = dys_e Wd[e][:, c:]                    (sgemm on row blocks)
//        on the tile: a = silu(G) U;  dw_part[p, chunk] = dA . a
//                     aw[p, c:] = w a                                  [P, F]
//                     dh[p, c:] = w dA U silu'(G),  dh[p, F + c:] = w dA silu(G)   [P, 2F]
//   4. gradient tasks, one list of three kinds, all independent:
//        dW_down[e][d:, :]   = dys_e[:, d:]^T aw_e        (rows of dW_down)
//        dW_gate_up[e][r:,:] = dh_e[:, r:]^T xs_e         (rows of dW_gate_up)
//        dxs_e[:, d:]        = dh_e Wgu[e][:, d:]          (columns of dx rows)
//      experts without tokens get zero weight gradients;
//   5. combine: dx[t] = sum_j dxs[slot_pos[t k + j]]; d w[t, j] = sum over
//      chunks of dw_part (fixed order: deterministic).
//
// FLOPs with U = 2 P D F: 1 (dA) + 1 (dW_down) + 2 (dW_gate_up) + 2 (dx) = 6U,
// plus 2U when h is recomputed; the forward is 3U.
#include <algorithm>
#include <tuple>
#include <type_traits>

#include "common/dispatch.h"
#include "moe/moe_cpu_common.h"
#include "moe/moe_gemm_avx512_cpu.h"

namespace m1::moe {
namespace {

using namespace cpu_detail;

constexpr int64_t kFfnChunk = 128;  // FFN columns per activation task
constexpr int64_t kRowChunk = 128;  // rows of dW_down / dW_gate_up per task
constexpr int64_t kDimChunk = 128;  // dx columns per task
constexpr int64_t kRowBlock = 256;  // rows per sgemm inside an activation task

// The activation-gradient epilogue on a [rows, n] tile (see the file header).
// g, u: pre-activations (row stride ld_h, storage H); da: dA tile (row stride
// n); dg, du: the gate and up halves of dh (row stride ld_dh).
template <typename H, typename Acc, typename Op>
M1_INLINE Acc act_grad_one(H g_, H u_, Acc dA, Acc wi, Op& aw, Op& dg, Op& du) {
  const Acc g = load_as<Acc>(g_), u = load_as<Acc>(u_);
  const Acc s = sigmoid(g), silu = g * s, a = silu * u;
  aw = store_from<Op>(wi * a);
  dg = store_from<Op>(wi * dA * u * s * (Acc(1) + g * (Acc(1) - s)));
  du = store_from<Op>(wi * dA * silu);
  return dA * a;
}

template <typename H, typename Acc, typename Op>
M1_CPU_MULTIVERSION void act_grad_rows(const H* __restrict g, const H* __restrict u, int64_t ld_h,
                                       const Acc* __restrict da, int64_t rows, int64_t n, const Acc* __restrict w,
                                       Op* __restrict aw, int64_t ld_aw, Op* __restrict dg, Op* __restrict du,
                                       int64_t ld_dh, Acc* __restrict dw_part, int64_t ld_part) {
  constexpr int V = 8;  // the dot product in 8 lanes: a float sum only vectorises when split by hand
  for (int64_t i = 0; i < rows; ++i) {
    const Acc wi = w[i];
    const H* gi = g + i * ld_h;
    const H* ui = u + i * ld_h;
    const Acc* dai = da + i * n;
    Op* awi = aw + i * ld_aw;
    Op* dgi = dg + i * ld_dh;
    Op* dui = du + i * ld_dh;
    Acc lanes[V] = {};
    int64_t j = 0;
    for (; j + V <= n; j += V)
      for (int l = 0; l < V; ++l)
        lanes[l] += act_grad_one(gi[j + l], ui[j + l], dai[j + l], wi, awi[j + l], dgi[j + l], dui[j + l]);
    Acc dot = Acc(0);
    for (int l = 0; l < V; ++l) dot += lanes[l];
    for (; j < n; ++j) dot += act_grad_one(gi[j], ui[j], dai[j], wi, awi[j], dgi[j], dui[j]);
    dw_part[i * ld_part] = dot;
  }
}

enum class Path { kFp32Tiles, kBf16Dot, kF32Avx512 };

// The AVX-512 NT kernel of an operand type.
inline void gemm_nt(int64_t m, int64_t n, int64_t k, const bf16* a, int64_t lda, const bf16* b, int64_t ldb, float* c,
                    int64_t ldc) {
  gemm_nt_bf16(m, n, k, a, lda, b, ldb, c, ldc);
}
inline void gemm_nt(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                    float* c, int64_t ldc) {
  gemm_nt_f32(m, n, k, a, lda, b, ldb, c, ldc);
}

template <typename T, Path kPath>
void backward_path(const BackwardParams& p) {
  using Acc = acc_t<T>;
  // Storage of the operands the GEMMs read (gathered rows, aw, dh).
  using Op = std::conditional_t<kPath == Path::kBf16Dot, bf16, Acc>;
  constexpr bool kDot = kPath != Path::kFp32Tiles;  // the AVX-512 NT kernels (bf16 dot or fp32)
  constexpr bool kConvert = !kDot && !std::is_same_v<T, Acc>;  // fp32 tiles of 16-bit weights
  const MoeInputs& in = p.in;
  const int64_t T_ = in.shape.tokens, D = in.shape.dim, F = in.shape.ffn, E = in.shape.experts;
  const int64_t k = in.shape.topk, P = in.shape.slots();
  const T* w_gate_up = static_cast<const T*>(in.w_gate_up);
  const T* w_down = static_cast<const T*>(in.w_down);

  const Permutation perm = permute(in);
  // The weight gradients are E x (3 D F) elements even when few tokens came.
  const bool parallel = 2.0 * double(P) * double(D) * double(F) + 3.0 * double(E) * double(D) * double(F) >
                        kParallelFlops;
  const std::vector<Acc> w = gather_weights<Acc>(in, perm);
  const int64_t ffn_chunks = (F + kFfnChunk - 1) / kFfnChunk;
  // AVX-512 paths: the NT kernels read both operands along k, so the weight
  // gradients (a sum over the expert's rows) read transposed activations
  // ([X, P], row stride ldt; padded so that the columns of a power-of-two P
  // do not all fall into one cache set), and the data gradients read
  // transposed weight blocks.
  const int64_t ldt = P + 40, nt = kDot ? ldt : 0;
  const Scratch bufs({bytes_of<Op>(P * D), bytes_of<Op>(P * D), bytes_of<Acc>(p.gate_up ? 0 : P * 2 * F),
                      bytes_of<Op>(P * F), bytes_of<Op>(P * 2 * F), bytes_of<Acc>(P * ffn_chunks),
                      bytes_of<Acc>(P * D), bytes_of<Op>(D * nt), bytes_of<Op>(D * nt), bytes_of<Op>(F * nt),
                      bytes_of<Op>(2 * F * nt)});
  Op* const xs = bufs.get<Op>(0);         // [P, D] gathered rows of x
  Op* const dys = bufs.get<Op>(1);        // [P, D] gathered rows of dy
  Acc* const h_acc = bufs.get<Acc>(2);    // [P, 2F] recomputed pre-activations (when not saved)
  Op* const aw = bufs.get<Op>(3);         // [P, F] w silu(g) u
  Op* const dh = bufs.get<Op>(4);         // [P, 2F] gradient of the pre-activations
  Acc* const dw_part = bufs.get<Acc>(5);  // [P, FFN chunks] partial d topk_weights
  Acc* const dxs = bufs.get<Acc>(6);      // [P, D] per-slot dx rows
  Op* const xs_t = bufs.get<Op>(7);       // AVX-512: [D, P] = xs^T
  Op* const dys_t = bufs.get<Op>(8);      //           [D, P] = dys^T
  Op* const aw_t = bufs.get<Op>(9);       //           [F, P] = aw^T
  Op* const dh_t = bufs.get<Op>(10);      //           [2F, P] = dh^T
  gather_rows(static_cast<const T*>(in.x), in.x_row_stride, D, perm, k, xs);
  gather_rows(static_cast<const T*>(p.grad_y), p.grad_y_row_stride, D, perm, k, dys);

  // 2. pre-activations: saved (storage T) or recomputed here (Acc).
  if (!p.gate_up) {
    const std::vector<Task> tasks = make_tasks(perm, E, F, kFfnChunk, false);
    run_tasks(
        int64_t(tasks.size()), parallel, [&] { return Buffer<Acc>(kConvert ? 2 * kFfnChunk * D : 0); },
        [&](int64_t i, Buffer<Acc>& scratch) {
          const int64_t e = tasks[i].expert, c = tasks[i].chunk * kFfnChunk, n = std::min(kFfnChunk, F - c);
          const T* wg_e = w_gate_up + e * 2 * F * D + c * D;
          const T* wu_e = wg_e + F * D;
          const int64_t r = perm.expert_offsets[e], m = perm.rows(e);
          Acc* hg = h_acc + r * 2 * F + c;
          if constexpr (kDot) {
            gemm_nt(m, n, D, xs + r * D, D, wg_e, D, hg, 2 * F);
            gemm_nt(m, n, D, xs + r * D, D, wu_e, D, hg + F, 2 * F);
          } else {
            const auto [wg, ldg] = block_as<T, Acc>(wg_e, D, n, D, scratch.get());
            const auto [wu, ldu] = block_as<T, Acc>(wu_e, D, n, D, scratch.get() + n * D);
            gemm<Acc>(false, true, m, n, D, xs + r * D, D, wg, ldg, Acc(0), hg, 2 * F);
            gemm<Acc>(false, true, m, n, D, xs + r * D, D, wu, ldu, Acc(0), hg + F, 2 * F);
          }
        });
  }

  // 3. dA = dy W_down and the activation gradients on the tile. The AVX-512
  // paths multiply dys by the transposed [n, D] block of W_down[e][:, c:].
  const int64_t ldwt = D + 16;  // transposed weight block row stride (padded, as ldt)
  const int64_t wblock = kDot ? (kFfnChunk * ldwt * int64_t(sizeof(Op)) + int64_t(sizeof(Acc)) - 1) / int64_t(sizeof(Acc))
                              : (kConvert ? D * kFfnChunk : 0);  // in Acc units
  const std::vector<Task> act_tasks = make_tasks(perm, E, F, kFfnChunk, false);
  run_tasks(
      int64_t(act_tasks.size()), parallel, [&] { return Buffer<Acc>(wblock + kRowBlock * kFfnChunk); },
      [&](int64_t i, Buffer<Acc>& scratch) {
        const int64_t e = act_tasks[i].expert, chunk = act_tasks[i].chunk, c = chunk * kFfnChunk;
        const int64_t n = std::min(kFfnChunk, F - c);
        const T* wd_e = w_down + e * D * F + c;  // W_down[e][:, c:c+n]: [D, n], row stride F
        Acc* da = scratch.get() + wblock;
        const Acc* wd = nullptr;
        int64_t ldd = 0;
        Op* wd_t = nullptr;
        if constexpr (kDot) {
          wd_t = reinterpret_cast<Op*>(scratch.get());
          transpose_block(wd_e, F, D, n, wd_t, ldwt);
        } else {
          std::tie(wd, ldd) = block_as<T, Acc>(wd_e, F, D, n, scratch.get());
        }
        const int64_t begin = perm.expert_offsets[e], end = perm.expert_offsets[e + 1];
        for (int64_t r = begin; r < end; r += kRowBlock) {
          const int64_t m = std::min(kRowBlock, end - r);
          if constexpr (kDot) {
            gemm_nt(m, n, D, dys + r * D, D, wd_t, ldwt, da, n);
          } else {
            gemm<Acc>(false, false, m, n, D, dys + r * D, D, wd, ldd, Acc(0), da, n);
          }
          Op* aw_r = aw + r * F + c;
          Op* dg = dh + r * 2 * F + c;
          Op* du = dg + F;
          Acc* part = dw_part + r * ffn_chunks + chunk;
          if (p.gate_up) {
            const T* h = static_cast<const T*>(p.gate_up) + r * 2 * F;
            act_grad_rows(h + c, h + F + c, 2 * F, da, m, n, w.data() + r, aw_r, F, dg, du, 2 * F, part, ffn_chunks);
          } else {
            const Acc* h = h_acc + r * 2 * F;
            act_grad_rows(h + c, h + F + c, 2 * F, da, m, n, w.data() + r, aw_r, F, dg, du, 2 * F, part, ffn_chunks);
          }
        }
      });
  if constexpr (kDot) {
    transpose_parallel(xs, D, P, D, xs_t, ldt);
    transpose_parallel(dys, D, P, D, dys_t, ldt);
    transpose_parallel(aw, F, P, F, aw_t, ldt);
    transpose_parallel(dh, 2 * F, P, 2 * F, dh_t, ldt);
  }

  // 4. weight gradients and dx rows.
  const int64_t down_chunks = (D + kRowChunk - 1) / kRowChunk;
  const int64_t gu_chunks = (2 * F + kRowChunk - 1) / kRowChunk;
  const int64_t dx_chunks = (D + kDimChunk - 1) / kDimChunk;
  struct GradTask {
    int32_t kind, expert, chunk;
  };
  std::vector<GradTask> grad_tasks;
  {
    const std::vector<Task> busy = make_tasks(perm, E, 1, 1, true);  // every expert, busiest first
    for (const Task& t : busy) {
      for (int64_t c = 0; c < gu_chunks; ++c) grad_tasks.push_back({1, t.expert, int32_t(c)});
      for (int64_t c = 0; c < down_chunks; ++c) grad_tasks.push_back({0, t.expert, int32_t(c)});
      if (perm.rows(t.expert) > 0)
        for (int64_t c = 0; c < dx_chunks; ++c) grad_tasks.push_back({2, t.expert, int32_t(c)});
    }
  }
  T* gw_down = static_cast<T*>(p.grad_w_down);
  T* gw_gate_up = static_cast<T*>(p.grad_w_gate_up);
  constexpr bool kTileOut = !std::is_same_v<T, Acc>;  // weight gradients via an Acc tile
  const int64_t ldgt = 2 * F + 16;                     // transposed W_gate_up block row stride (AVX-512)
  const int64_t out_tile = kTileOut ? std::max(kRowChunk * F, kRowChunk * D) : 0;
  const int64_t wgu_block = kDot ? (kDimChunk * ldgt * int64_t(sizeof(Op)) + int64_t(sizeof(Acc)) - 1) /
                                       int64_t(sizeof(Acc))
                                 : (kConvert ? 2 * F * kDimChunk : 0);
  run_tasks(
      int64_t(grad_tasks.size()), parallel, [&] { return Buffer<Acc>(std::max(out_tile, wgu_block)); },
      [&](int64_t i, Buffer<Acc>& scratch) {
        const GradTask task = grad_tasks[i];
        const int64_t e = task.expert, r = perm.expert_offsets[e], m = perm.rows(e);
        if (task.kind == 0) {  // dW_down[e] rows d .. d + n: [n, F] = dys_e[:, d:]^T aw_e
          const int64_t d = task.chunk * kRowChunk, n = std::min(kRowChunk, D - d);
          T* out = gw_down + e * D * F + d * F;
          Acc* acc = kTileOut ? scratch.get() : reinterpret_cast<Acc*>(out);
          if constexpr (kDot) {
            gemm_nt(n, F, m, dys_t + d * ldt + r, ldt, aw_t + r, ldt, acc, F);
          } else {
            gemm<Acc>(true, false, n, F, m, dys + r * D + d, D, aw + r * F, F, Acc(0), acc, F);
          }
          if constexpr (kTileOut) store_block<T, Acc>(acc, F, n, F, out, F);
        } else if (task.kind == 1) {  // dW_gate_up[e] rows q .. q + n: [n, D] = dh_e[:, q:]^T xs_e
          const int64_t q = task.chunk * kRowChunk, n = std::min(kRowChunk, 2 * F - q);
          T* out = gw_gate_up + e * 2 * F * D + q * D;
          Acc* acc = kTileOut ? scratch.get() : reinterpret_cast<Acc*>(out);
          if constexpr (kDot) {
            gemm_nt(n, D, m, dh_t + q * ldt + r, ldt, xs_t + r, ldt, acc, D);
          } else {
            gemm<Acc>(true, false, n, D, m, dh + r * 2 * F + q, 2 * F, xs + r * D, D, Acc(0), acc, D);
          }
          if constexpr (kTileOut) store_block<T, Acc>(acc, D, n, D, out, D);
        } else {  // dxs_e[:, d:d+n] = dh_e Wgu[e][:, d:d+n]
          const int64_t d = task.chunk * kDimChunk, n = std::min(kDimChunk, D - d);
          const T* wgu_e = w_gate_up + e * 2 * F * D + d;  // [2F, n], row stride D
          if constexpr (kDot) {
            Op* wgu_t = reinterpret_cast<Op*>(scratch.get());  // [n, 2F]
            transpose_block(wgu_e, D, 2 * F, n, wgu_t, ldgt);
            gemm_nt(m, n, 2 * F, dh + r * 2 * F, 2 * F, wgu_t, ldgt, dxs + r * D + d, D);
          } else {
            const auto [wgu, ldw] = block_as<T, Acc>(wgu_e, D, 2 * F, n, scratch.get());
            gemm<Acc>(false, false, m, n, 2 * F, dh + r * 2 * F, 2 * F, wgu, ldw, Acc(0), dxs + r * D + d, D);
          }
        }
      });

  // 5. combine per token, fixed order.
  T* dx = static_cast<T*>(p.grad_x);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, k * D));
  cpu::parallel_for(0, T_, grain, [&](int64_t begin, int64_t end) {
    std::vector<Acc> row(static_cast<size_t>(D));
    for (int64_t t = begin; t < end; ++t) {
      std::fill(row.begin(), row.end(), Acc(0));
      for (int64_t j = 0; j < k; ++j) {
        const int64_t pos = perm.slot_pos[t * k + j];
        const Acc* src = dxs + pos * D;
        for (int64_t d = 0; d < D; ++d) row[d] += src[d];
        Acc dwt = Acc(0);
        for (int64_t c = 0; c < ffn_chunks; ++c) dwt += dw_part[pos * ffn_chunks + c];
        if (in.weight_dtype == DType::kFloat64) {
          static_cast<double*>(p.grad_topk_weights)[t * k + j] = double(dwt);
        } else {
          static_cast<float*>(p.grad_topk_weights)[t * k + j] = float(dwt);
        }
      }
      for (int64_t d = 0; d < D; ++d) dx[t * D + d] = store_from<T>(row[d]);
    }
  });
}

template <typename T>
void backward_typed(const BackwardParams& p) {
  const bool auto_path = p.in.cpu_gemm == CpuGemm::kAuto;
  if constexpr (std::is_same_v<T, bf16>) {
    if (auto_path && avx512::cpu_has_bf16()) return backward_path<T, Path::kBf16Dot>(p);
  }
  if constexpr (std::is_same_v<T, float>) {
    if (auto_path && avx512::cpu_has()) return backward_path<T, Path::kF32Avx512>(p);
  }
  backward_path<T, Path::kFp32Tiles>(p);
}

}  // namespace

void backward_cpu(const BackwardParams& p) {
  M1_DISPATCH_DTYPE(p.in.dtype, T, backward_typed<T>(p));
}

}  // namespace m1::moe
