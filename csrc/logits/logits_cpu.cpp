// FP32 logits head on the CPU (see logits.h for the math).
//
// Everything is built from one cell: a tile of Nt tokens x Vb vocabulary
// columns, X = hidden_tile @ weight_block^T / T computed by an fp32 GEMM (IEEE
// fp32 products and sums; bf16/fp16 operands are widened to fp32 first),
// then processed while it is in cache. Extra memory is O(workers x tile), plus
// one fp32 [N, D] buffer for a non-fp32 hidden (its widened copy in the
// forward, the grad_hidden accumulator in the backward); never O(N x V).
//
// logprobs forward: tasks are (token group, vocabulary split); a task walks its
//   vocabulary blocks, widening each weight block once, and for each block runs
//   the GEMM over its token tiles and folds the tile into per-row online
//   log-sum-exp accumulators (logits_common.h), picking the target's logit.
//   Vocabulary splits (more than one only when there are fewer token groups than
//   workers) leave partial accumulators that a final pass merges in split order.
// logprobs backward: per cell, recompute X, turn it into dX = dL/dx in place,
//   then dW_block += dX^T H_tile and dH_tile += dX W_block. To avoid races
//   without per-thread copies of dH or dW, the R workers run in rounds over a
//   "superblock" of R groups of vocabulary blocks: in round r, task q owns group
//   q of the superblock and token group (q + r) mod R, so within a round no two
//   tasks touch the same rows of dH or dW. After R rounds every token has met
//   every block of the superblock; a block's dW was accumulated by one task
//   alone (in fp32, stored once in weight's dtype), and every sum runs in a
//   fixed order, so the result is deterministic for a given thread count.
// logits forward / backward: plain tiled GEMMs (the [N, V] matrix is the output
//   or the incoming gradient there).
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/cpu_runtime.h"
#include "common/dispatch.h"
#include "common/few_rows_gemm.h"
#include "logits/logits.h"
#include "logits/logits_common.h"
#include "logits/logits_cpu_math.h"
#include "moe/moe_gemm_avx512_cpu.h"

// See logits_cpu_math.h: 32-byte vectors only live inside inlined helpers.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace m1::logits {
namespace {

constexpr int64_t kRowTile = 256;      // Nt: tokens per GEMM tile
constexpr int64_t kVocabBlock = 256;   // Vb: vocabulary columns per GEMM tile
constexpr int64_t kMinGroupRows = 64;  // below this many tokens per worker, split the vocabulary instead
constexpr int64_t kGroupBytes = int64_t(2) << 20;  // backward: cap of a task's dW accumulators (non-fp32 weight)

template <typename Acc> constexpr DType kAccDType = DType::kFloat32;
template <> constexpr DType kAccDType<double> = DType::kFloat64;

// The logits tiles X = alpha * H W^T (both operands with D contiguous, C overwritten) run on the
// fused MoE's AVX-512 NT kernel where the CPU has AVX-512: the sgemm inside torch (MKL) takes its
// AVX2 path on AMD CPUs, at about 60% of that kernel's rate. Still IEEE fp32 products and sums
// (FMA), in another order. The gradient GEMMs (dW = dX^T H, dH = dX W) are not NT: sgemm.
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (!ta && tb && beta == 0.0f && avx512::cpu_has()) {
    moe::gemm_nt_f32(m, n, k, a, lda, b, ldb, c, ldc);
    if (alpha != 1.0f)
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) c[i * ldc + j] *= alpha;
    return;
  }
  cpu::sgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
          const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  cpu::dgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Rows [r0, r0 + rows) of a [*, cols] matrix of any storage type, widened into
// dst (ld = cols).
template <typename Acc, typename T>
M1_CPU_MULTIVERSION void widen_rows(const T* src, int64_t ld, int64_t r0, int64_t rows, int64_t cols, Acc* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* __restrict s = src + (r0 + i) * ld;
    Acc* __restrict o = dst + i * cols;
    for (int64_t j = 0; j < cols; ++j) o[j] = load_as<Acc>(s[j]);
  }
}

template <typename Acc>
void widen_rows(const Matrix& m, int64_t r0, int64_t rows, int64_t cols, Acc* dst) {
  M1_DISPATCH_DTYPE(m.dtype, T, widen_rows<Acc, T>(static_cast<const T*>(m.ptr), m.ld, r0, rows, cols, dst));
}

// rows x cols fp32/fp64 (ld = cols) narrowed into rows [r0, r0 + rows) of a
// contiguous matrix of `dtype`.
template <typename Acc, typename T>
M1_CPU_MULTIVERSION void narrow_rows(const Acc* src, int64_t r0, int64_t rows, int64_t cols, T* dst) {
  for (int64_t i = 0; i < rows * cols; ++i) dst[r0 * cols + i] = store_from<T>(src[i]);
}

template <typename Acc>
void narrow_rows(const Acc* src, int64_t r0, int64_t rows, int64_t cols, DType dtype, void* dst) {
  M1_DISPATCH_DTYPE(dtype, T, narrow_rows<Acc, T>(src, r0, rows, cols, static_cast<T*>(dst)));
}

// A matrix as Acc rows: the input itself when it already is Acc, else an Acc
// copy made once (in parallel), owned by this object.
template <typename Acc>
class AccMatrix {
 public:
  AccMatrix(const Matrix& m, int64_t rows, int64_t cols, int64_t grain_rows) {
    if (m.dtype == kAccDType<Acc>) {
      ptr_ = static_cast<const Acc*>(m.ptr);
      ld_ = m.ld;
      return;
    }
    copy_.resize(size_t(rows * cols));
    cpu::parallel_for(0, rows, grain_rows, [&](int64_t r0, int64_t r1) { widen_rows(m, r0, r1 - r0, cols, copy_.data() + r0 * cols); });
    ptr_ = copy_.data();
    ld_ = cols;
  }
  const Acc* row(int64_t r) const { return ptr_ + r * ld_; }
  int64_t ld() const { return ld_; }

 private:
  std::vector<Acc> copy_;
  const Acc* ptr_ = nullptr;
  int64_t ld_ = 0;
};

// Rows [r0, r0 + rows) of a matrix as Acc rows: a view of the matrix when it
// is Acc, else widened into `buf` (owned by the caller's task).
template <typename Acc>
struct BlockView {
  const Acc* ptr;
  int64_t ld;
};

template <typename Acc>
BlockView<Acc> rows_view(const Matrix& m, int64_t r0, int64_t rows, int64_t cols, std::vector<Acc>& buf) {
  if (m.dtype == kAccDType<Acc>) return {static_cast<const Acc*>(m.ptr) + r0 * m.ld, m.ld};
  buf.resize(size_t(rows * cols));
  widen_rows(m, r0, rows, cols, buf.data());
  return {buf.data(), cols};
}

template <typename Acc>
Acc read_vec(const Vector& v, int64_t i) {
  if (v.ptr == nullptr) return Acc(0);
  return static_cast<const Acc*>(v.ptr)[i * v.stride];
}

int64_t target_of(const int64_t* targets, int64_t stride, int64_t row) { return targets[row * stride]; }

// ---------------------------------------------------------------------------
// logprobs forward

// Folds one X tile (rows x w, ld kVocabBlock, columns c0..c0+w) into the rows'
// accumulators and picks the targets' logits.
template <typename Acc>
M1_CPU_MULTIVERSION void fold_tile(const Acc* x, int64_t rows, int64_t w, int64_t c0, const int64_t* targets,
                                   int64_t targets_stride, int64_t row0, LseAcc<Acc>* acc, Acc* z_target) {
  for (int64_t i = 0; i < rows; ++i) {
    const Acc* xi = x + i * kVocabBlock;
    acc[i] = lse_merge(acc[i], vec::chunk_stats(xi, w));
    const int64_t t = target_of(targets, targets_stride, row0 + i);
    if (t >= c0 && t < c0 + w) z_target[i] = xi[t - c0];
  }
}

template <typename Acc>
void logprobs_fwd_typed(const LogprobsFwdParams& p) {
  const int64_t N = p.n, D = p.d, V = p.v;
  if (N == 0) return;
  const int64_t R = std::max(1, p.workers);
  const int64_t J = ceil_div(V, kVocabBlock);
  const int64_t groups = std::min(R, ceil_div(N, kMinGroupRows));
  const int64_t splits = std::min(J, ceil_div(R, groups));
  const Acc inv_t = Acc(p.inv_temperature);

  const AccMatrix<Acc> hidden(p.hidden, N, D, kRowTile);
  // Partial accumulators and target logits per (split, row).
  std::vector<LseAcc<Acc>> part(static_cast<size_t>(splits * N), lse_empty<Acc>());
  std::vector<Acc> z_target(static_cast<size_t>(splits * N), Acc(0));

  cpu::parallel_for(0, groups * splits, 1, [&](int64_t task0, int64_t task1) {
    std::vector<Acc> x(static_cast<size_t>(kRowTile * kVocabBlock)), wbuf;
    for (int64_t task = task0; task < task1; ++task) {
      const int64_t g = task / splits, s = task % splits;
      const int64_t g0 = part_begin(N, groups, g), g1 = part_begin(N, groups, g + 1);
      for (int64_t b = part_begin(J, splits, s); b < part_begin(J, splits, s + 1); ++b) {
        const int64_t c0 = b * kVocabBlock, w = std::min(kVocabBlock, V - c0);
        const BlockView<Acc> wb = rows_view(p.weight, c0, w, D, wbuf);
        for (int64_t r0 = g0; r0 < g1; r0 += kRowTile) {
          const int64_t rows = std::min(kRowTile, g1 - r0);
          gemm(false, true, rows, w, D, inv_t, hidden.row(r0), hidden.ld(), wb.ptr, wb.ld, Acc(0), x.data(),
               kVocabBlock);
          fold_tile(x.data(), rows, w, c0, p.targets, p.targets_stride, r0, part.data() + s * N + r0,
                    z_target.data() + s * N + r0);
        }
      }
    }
  });

  Acc* logprobs = static_cast<Acc*>(p.logprobs);
  Acc* entropy = static_cast<Acc*>(p.entropy);
  Acc* lse = static_cast<Acc*>(p.lse);
  cpu::parallel_for(0, N, 4096, [&](int64_t r0, int64_t r1) {
    for (int64_t n = r0; n < r1; ++n) {
      LseAcc<Acc> a = part[size_t(n)];
      for (int64_t s = 1; s < splits; ++s) a = lse_merge(a, part[size_t(s * N + n)]);
      const int64_t t = target_of(p.targets, p.targets_stride, n);
      const bool ignored = t == p.ignore_index;
      const Acc zt = ignored ? Acc(0) : z_target[size_t(part_of(J, splits, t / kVocabBlock) * N + n)];
      const RowOutputs<Acc> out = row_outputs(a, zt, ignored);
      logprobs[n] = out.logprob;
      entropy[n] = out.entropy;
      lse[n] = out.lse;
    }
  });
}

// ---------------------------------------------------------------------------
// logprobs backward

// X tile (rows x w, ld kVocabBlock) -> dL/dx in place.
template <typename Acc>
M1_CPU_MULTIVERSION void dlogits_tile(Acc* x, int64_t rows, int64_t w, int64_t c0, const Acc* lse,
                                      const RowGrad<Acc>* rg, const int64_t* target) {
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t t = target[i];
    vec::chunk_dlogits(x + i * kVocabBlock, w, lse[i], rg[i], (t >= c0 && t < c0 + w) ? t - c0 : -1);
  }
}

// One cell of the backward: token rows [r0, r0 + rows) (h: their Acc rows)
// against vocabulary block [c0, c0 + w) (wb): recompute X, turn it into dX in
// place (x), then dW_block (+)= dX^T H_tile into dw (w x D; `started` says
// whether it already holds a partial sum) and dH_tile += dX W_block into dh
// (the [N, D] accumulator). A null dw or dh is a gradient not wanted.
template <typename Acc>
struct BackwardCell {
  const Acc* lse;
  const RowGrad<Acc>* rg;
  const int64_t* target;
  Acc* dh;
  int64_t d;
  Acc inv_t;

  void run(BlockView<Acc> h, int64_t r0, int64_t rows, BlockView<Acc> wb, int64_t c0, int64_t w, Acc* dw,
           char& started, Acc* x) const {
    gemm(false, true, rows, w, d, inv_t, h.ptr, h.ld, wb.ptr, wb.ld, Acc(0), x, kVocabBlock);
    dlogits_tile(x, rows, w, c0, lse + r0, rg + r0, target + r0);
    if (dw != nullptr) {
      gemm(true, false, w, d, rows, Acc(1), x, kVocabBlock, h.ptr, h.ld, started ? Acc(1) : Acc(0), dw, d);
      started = 1;
    }
    if (dh != nullptr) gemm(false, false, rows, d, w, Acc(1), x, kVocabBlock, wb.ptr, wb.ld, Acc(1), dh + r0 * d, d);
  }
};

template <typename Acc>
void logprobs_bwd_typed(const LogprobsBwdParams& p) {
  const int64_t N = p.n, D = p.d, V = p.v;
  const bool want_h = p.grad_hidden != nullptr, want_w = p.grad_weight != nullptr;
  if (!want_h && !want_w) return;
  const int64_t R = std::max(1, p.workers);
  const int64_t J = ceil_div(V, kVocabBlock);
  const bool h_is_acc = p.hidden.dtype == kAccDType<Acc>, w_is_acc = p.weight.dtype == kAccDType<Acc>;

  // Per-row coefficients of dL/dx (logits_common.h).
  std::vector<RowGrad<Acc>> rg(static_cast<size_t>(N));
  std::vector<Acc> lse(static_cast<size_t>(N));
  std::vector<int64_t> target(static_cast<size_t>(N));
  cpu::parallel_for(0, N, 4096, [&](int64_t r0, int64_t r1) {
    for (int64_t n = r0; n < r1; ++n) {
      const int64_t t = target_of(p.targets, p.targets_stride, n);
      const bool ignored = t == p.ignore_index;
      target[size_t(n)] = ignored ? -1 : t;
      lse[size_t(n)] = read_vec<Acc>(p.lse, n);
      rg[size_t(n)] = row_grad(read_vec<Acc>(p.grad_logprobs, n), read_vec<Acc>(p.grad_entropy, n),
                               read_vec<Acc>(p.grad_lse, n), read_vec<Acc>(p.entropy, n), Acc(p.inv_temperature),
                               ignored);
    }
  });

  // dH accumulates over every vocabulary block: in the output when it is Acc,
  // else in an Acc copy narrowed at the end (the one O(N x D) buffer here).
  std::vector<Acc> dh_buf;
  Acc* dh = nullptr;
  if (want_h) {
    if (!h_is_acc) dh_buf.resize(size_t(N * D));
    dh = h_is_acc ? static_cast<Acc*>(p.grad_hidden) : dh_buf.data();
    cpu::parallel_for(0, N, kRowTile, [&](int64_t r0, int64_t r1) { std::fill(dh + r0 * D, dh + r1 * D, Acc(0)); });
  }

  // A round task owns a group of up to k consecutive vocabulary blocks. Larger
  // groups mean fewer superblocks, hence fewer barriers: with an Acc weight dW
  // accumulates in the output and one superblock spans the vocabulary (R
  // barriers in all); otherwise the group's dW accumulators live across the
  // rounds, so k keeps them within kGroupBytes.
  const int64_t k = (w_is_acc || !want_w)
                        ? ceil_div(J, R)
                        : std::clamp<int64_t>(kGroupBytes / (kVocabBlock * std::max<int64_t>(D, 1) * int64_t(sizeof(Acc))),
                                              1, J);
  std::vector<std::vector<Acc>> dwbuf(static_cast<size_t>(R));  // per task slot: k blocks of dW (weight not Acc)
  if (want_w && !w_is_acc)
    for (auto& buf : dwbuf) buf.resize(size_t(k * kVocabBlock * D));
  std::vector<char> dw_started(static_cast<size_t>(R * k));
  const BackwardCell<Acc> cell{lse.data(), rg.data(), target.data(), dh, D, Acc(p.inv_temperature)};

  for (int64_t sb0 = 0; sb0 < J; sb0 += R * k) {  // superblock: R groups of up to k blocks
    const int64_t blocks = std::min(R * k, J - sb0);
    std::fill(dw_started.begin(), dw_started.end(), 0);
    for (int64_t round = 0; round < R; ++round) {
      cpu::parallel_for(0, R, 1, [&](int64_t q0, int64_t q1) {
        std::vector<Acc> x(size_t(kRowTile * kVocabBlock)), hbuf, wbuf;
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t g = (q + round) % R;  // the token group task q meets in this round
          const int64_t g0 = part_begin(N, R, g), g1 = part_begin(N, R, g + 1);
          const int64_t b0 = sb0 + part_begin(blocks, R, q), b1 = sb0 + part_begin(blocks, R, q + 1);
          auto dw_of = [&](int64_t b) -> Acc* {
            if (!want_w) return nullptr;
            if (w_is_acc) return static_cast<Acc*>(p.grad_weight) + b * kVocabBlock * D;
            return dwbuf[size_t(q)].data() + (b - b0) * kVocabBlock * D;
          };
          // Token tiles outer: a non-Acc hidden tile is widened once per round,
          // a non-Acc weight block once per cell (1 / (6 Nt) of the cell's flops).
          for (int64_t r0 = g0; r0 < g1 && b0 < b1; r0 += kRowTile) {
            const int64_t rows = std::min(kRowTile, g1 - r0);
            const BlockView<Acc> h = rows_view(p.hidden, r0, rows, D, hbuf);
            for (int64_t b = b0; b < b1; ++b) {
              const int64_t c0 = b * kVocabBlock, w = std::min(kVocabBlock, V - c0);
              cell.run(h, r0, rows, rows_view(p.weight, c0, w, D, wbuf), c0, w, dw_of(b),
                       dw_started[size_t(q * k + b - b0)], x.data());
            }
          }
          if (want_w && round == R - 1) {  // every token group has been through the group: its dW is complete
            for (int64_t b = b0; b < b1; ++b) {
              const int64_t c0 = b * kVocabBlock, w = std::min(kVocabBlock, V - c0);
              Acc* dw = dw_of(b);
              if (!dw_started[size_t(q * k + b - b0)]) std::fill(dw, dw + w * D, Acc(0));
              if (!w_is_acc) narrow_rows(dw, c0, w, D, p.weight.dtype, p.grad_weight);
            }
          }
        }
      });
    }
  }

  if (want_h && !h_is_acc) {
    cpu::parallel_for(0, N, kRowTile, [&](int64_t r0, int64_t r1) {
      narrow_rows(dh + r0 * D, r0, r1 - r0, D, p.hidden.dtype, p.grad_hidden);
    });
  }
}

// ---------------------------------------------------------------------------
// logits forward and backward

// A few rows (decoding: N = batch): the GEMM is a weight-bandwidth-bound GEMV, which the sgemm in
// libtorch (MKL's AVX2 path on AMD) runs at about 19 GB/s and, for a bf16 weight, only after a
// widened copy of every block. The fused MoE's few-rows kernel reads the weight once, as stored,
// with fp32 products and sums (fp32 accumulators, as sgemm).
constexpr int64_t kFewRowsHead = cpu::kFewRows;

template <typename T>
void logits_fwd_few_rows(const LogitsFwdParams& p, const float* hidden, int64_t ldh) {
  const int64_t N = p.n, D = p.d, V = p.v;
  const T* weight = static_cast<const T*>(p.weight.ptr);
  float* out = static_cast<float*>(p.out);
  cpu::parallel_for(0, ceil_div(V, kVocabBlock), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kVocabBlock, w = std::min(kVocabBlock, V - c0);
      cpu::gemm_nt_few_rows<T>(N, w, D, hidden, ldh, weight + c0 * p.weight.ld, p.weight.ld, out + c0, V);
    }
  });
}

template <typename Acc>
void logits_fwd_typed(const LogitsFwdParams& p) {
  const int64_t N = p.n, D = p.d, V = p.v;
  if (N == 0 || V == 0) return;
  if constexpr (std::is_same_v<Acc, float>) {
    if (N <= kFewRowsHead) {
      const AccMatrix<Acc> hidden(p.hidden, N, D, kRowTile);
      M1_DISPATCH_DTYPE(p.weight.dtype, T, {
        if constexpr (!std::is_same_v<T, double>) return logits_fwd_few_rows<T>(p, hidden.row(0), hidden.ld());
      });
    }
  }
  const int64_t I = ceil_div(N, kRowTile), J = ceil_div(V, kVocabBlock);
  const AccMatrix<Acc> hidden(p.hidden, N, D, kRowTile);
  Acc* out = static_cast<Acc*>(p.out);
  // Cells in vocabulary-major order, so that a worker's consecutive cells
  // share a weight block (widened once).
  cpu::parallel_for(0, I * J, 1, [&](int64_t c_begin, int64_t c_end) {
    std::vector<Acc> wbuf;
    int64_t have = -1;
    BlockView<Acc> wb{};
    for (int64_t cell = c_begin; cell < c_end; ++cell) {
      const int64_t b = cell / I, i = cell % I;
      const int64_t c0 = b * kVocabBlock, w = std::min(kVocabBlock, V - c0);
      const int64_t r0 = i * kRowTile, rows = std::min(kRowTile, N - r0);
      if (have != b) {
        wb = rows_view(p.weight, c0, w, D, wbuf);
        have = b;
      }
      gemm(false, true, rows, w, D, Acc(1), hidden.row(r0), hidden.ld(), wb.ptr, wb.ld, Acc(0), out + r0 * V + c0, V);
    }
  });
}

template <typename Acc>
void logits_bwd_typed(const LogitsBwdParams& p) {
  const int64_t N = p.n, D = p.d, V = p.v;
  const int64_t I = ceil_div(N, kRowTile), J = ceil_div(V, kVocabBlock);
  const Acc* g = static_cast<const Acc*>(p.grad_out.ptr);
  const int64_t ldg = p.grad_out.ld;
  const bool h_is_acc = p.hidden.dtype == kAccDType<Acc>, w_is_acc = p.weight.dtype == kAccDType<Acc>;

  if (p.grad_hidden != nullptr) {  // dH_i = sum_b G[i, b] W_b: token tiles own their rows
    cpu::parallel_for(0, I, 1, [&](int64_t i0, int64_t i1) {
      std::vector<Acc> wbuf, acc_buf(h_is_acc ? 0 : size_t(kRowTile * D));
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r0 = i * kRowTile, rows = std::min(kRowTile, N - r0);
        Acc* dh = h_is_acc ? static_cast<Acc*>(p.grad_hidden) + r0 * D : acc_buf.data();
        if (V == 0) std::fill(dh, dh + rows * D, Acc(0));
        for (int64_t b = 0; b < J; ++b) {
          const int64_t c0 = b * kVocabBlock, w = std::min(kVocabBlock, V - c0);
          const BlockView<Acc> wb = rows_view(p.weight, c0, w, D, wbuf);
          gemm(false, false, rows, D, w, Acc(1), g + r0 * ldg + c0, ldg, wb.ptr, wb.ld, b ? Acc(1) : Acc(0), dh, D);
        }
        if (!h_is_acc) narrow_rows(dh, r0, rows, D, p.hidden.dtype, p.grad_hidden);
      }
    });
  }
  if (p.grad_weight != nullptr) {  // dW_b = sum_i G[i, b]^T H_i: vocabulary blocks own their rows
    const AccMatrix<Acc> hidden(p.hidden, N, D, kRowTile);
    cpu::parallel_for(0, J, 1, [&](int64_t b0, int64_t b1) {
      std::vector<Acc> acc_buf(w_is_acc ? 0 : size_t(kVocabBlock * D));
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t c0 = b * kVocabBlock, w = std::min(kVocabBlock, V - c0);
        Acc* dw = w_is_acc ? static_cast<Acc*>(p.grad_weight) + c0 * D : acc_buf.data();
        if (N == 0) std::fill(dw, dw + w * D, Acc(0));
        for (int64_t i = 0; i < I; ++i) {
          const int64_t r0 = i * kRowTile, rows = std::min(kRowTile, N - r0);
          gemm(true, false, w, D, rows, Acc(1), g + r0 * ldg + c0, ldg, hidden.row(r0), hidden.ld(),
               i ? Acc(1) : Acc(0), dw, D);
        }
        if (!w_is_acc) narrow_rows(dw, c0, w, D, p.weight.dtype, p.grad_weight);
      }
    });
  }
}

template <typename F>
void dispatch_acc(DType out_dtype, const F& f) {
  if (out_dtype == DType::kFloat64) {
    f(double{});
  } else {
    f(float{});
  }
}

}  // namespace

void logprobs_fwd_cpu(const LogprobsFwdParams& p) {
  dispatch_acc(p.out_dtype, [&](auto acc) { logprobs_fwd_typed<decltype(acc)>(p); });
}

void logprobs_bwd_cpu(const LogprobsBwdParams& p) {
  dispatch_acc(p.vec_dtype, [&](auto acc) { logprobs_bwd_typed<decltype(acc)>(p); });
}

void logits_fwd_cpu(const LogitsFwdParams& p) {
  dispatch_acc(p.out_dtype, [&](auto acc) { logits_fwd_typed<decltype(acc)>(p); });
}

void logits_bwd_cpu(const LogitsBwdParams& p) {
  dispatch_acc(p.grad_out.dtype, [&](auto acc) { logits_bwd_typed<decltype(acc)>(p); });
}

}  // namespace m1::logits
