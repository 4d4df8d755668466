// Building blocks of the CPU prefill kernels (prefill_fwd_cpu.cpp,
// prefill_bwd_cpu.cpp): fp32/fp64 tiles, the GEMM on tiles, the elementwise
// loops around it, the causal pass both files run, and a dynamic task queue.
//
// Shapes: n tokens in a block (<= bs, the block size), D the inner dim of the
// score product, C the width of a column tile of the value dim.
//
// The causal pass computes, for one sequence, one head and one column tile,
// block by block (Lightning Attention-2):
//
//   A   = (X Y^T) * scale * lambda^(i-j) [j <= i]          [n, n]   intra-block scores
//   out = scale * lambda^(i+1) X S + A Z                    [n, C]   S: state before the block
//   S   = lambda^n S + (lambda^(n-1-j) Y)^T Z               [D, C]
//
// The forward runs it with (X, Y, Z, S) = (q, k, v, S); the dq part of the
// backward with (do, v, k, S^T), since dq_t = scale * do_t S_t^T and S^T
// follows the same recurrence with the roles of k and v exchanged.
//
// Everything is computed in Acc = float (float64 for float64 inputs): input
// tiles are converted to dense Acc tiles once per block, outputs of Acc type
// are written in place. Not a public header.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "common/cpu_runtime.h"
#include "common/dtype.h"
#include "common/macros.h"
#include "lightning/prefill.h"

namespace m1::lightning::cpu_detail {

// Row-major C = alpha op(A) op(B) + beta C on Acc tiles: m1::cpu::sgemm /
// dgemm (BLAS when the process has one). beta == 0 never reads C.
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  cpu::sgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
                 const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  cpu::dgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Per-worker scratch memory, grown on demand and never initialised (every
// element is written before it is read).
template <typename Acc>
class Scratch {
 public:
  Acc* get(int64_t count) {
    if (count > size_) {
      buf_.reset(new Acc[size_t(count)]);
      size_ = count;
    }
    return buf_.get();
  }

 private:
  std::unique_ptr<Acc[]> buf_;
  int64_t size_ = 0;
};

// The block size a sequence of `len` tokens runs with: a block longer than the
// sequence computes the same thing as one of its length, with less scratch.
inline int64_t effective_block(int64_t block, int64_t len) { return std::max<int64_t>(1, std::min(block, len)); }

// A read-only tile: row r at p + r * ld.
template <typename Acc>
struct Tile {
  const Acc* p;
  int64_t ld;
};

// A token-major input [B, T, H, dim] (last dim contiguous) of storage type T.
template <typename T>
struct TokenInput {
  const T* p;
  TokenStrides st;
};

// dst[r, c] = src[r, c] converted to Acc.
template <typename T, typename Acc>
M1_CPU_MULTIVERSION void convert_rows(const T* __restrict src, int64_t src_ld, int64_t rows, int64_t cols,
                                      Acc* __restrict dst, int64_t dst_ld) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * dst_ld + c] = load_as<Acc>(src[r * src_ld + c]);
}

// dst[r, c] = src[r, c] converted to T (rounded to nearest even for 16-bit T).
template <typename T, typename Acc>
M1_CPU_MULTIVERSION void store_rows(const Acc* __restrict src, int64_t src_ld, int64_t rows, int64_t cols,
                                    T* __restrict dst, int64_t dst_ld) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * dst_ld + c] = store_from<T>(src[r * src_ld + c]);
}

// Rows [t0, t0 + rows) of head h, batch row b, columns [c0, c0 + cols) as a
// dense Acc tile in `buf` (ld = cols). Float inputs are copied too: BLAS runs
// measurably faster on a compact 64-row tile than on rows H * D apart.
template <typename T, typename Acc>
Tile<Acc> load_tile(TokenInput<T> x, int64_t b, int64_t t0, int64_t h, int64_t c0, int64_t rows, int64_t cols,
                    Acc* buf) {
  convert_rows<T, Acc>(x.p + token_offset(x.st, b, t0, h) + c0, x.st.token, rows, cols, buf, cols);
  return Tile<Acc>{buf, cols};
}

// Intra-block causal mask and decay of an n x n score tile:
//   a[i, j] *= rdecay[bs - 1 - i + j] (= scale * lambda^(i-j)) for j <= i, 0 above the diagonal.
// rdecay is the scaled decay table reversed, so each row reads it forwards.
template <typename Acc>
M1_CPU_MULTIVERSION void mask_decay(Acc* __restrict a, int64_t lda, int64_t n, const Acc* __restrict rdecay,
                                    int64_t bs) {
  for (int64_t i = 0; i < n; ++i) {
    Acc* __restrict row = a + i * lda;
    const Acc* __restrict r = rdecay + (bs - 1 - i);
    for (int64_t j = 0; j <= i; ++j) row[j] *= r[j];
    for (int64_t j = i + 1; j < n; ++j) row[j] = Acc(0);
  }
}

// a[r, :] *= f[r].
template <typename Acc>
M1_CPU_MULTIVERSION void scale_rows(Acc* __restrict a, int64_t lda, int64_t rows, int64_t cols,
                                    const Acc* __restrict f) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) a[r * lda + c] *= f[r];
}

// dst[r, :] = f[r] * src[r, :]  (dst ld = cols).
template <typename Acc>
M1_CPU_MULTIVERSION void scaled_copy_rows(Tile<Acc> src, int64_t rows, int64_t cols, const Acc* __restrict f,
                                          Acc* __restrict dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = f[r] * src.p[r * src.ld + c];
}

// Per-call decay tables of one head, all from fill_decay_table (one exp each):
//   d[m]  = lambda^m                           m = 0..bs
//   rsd[x] = scale * lambda^(bs-1-x)           the intra-block mask, reversed
//   qd[i] = scale * lambda^(i+1)               query side of the state term
template <typename Acc>
struct DecayTables {
  std::vector<Acc> d, rsd, qd, kd;

  void fill(float slope, double scale, int64_t bs) {
    d.resize(size_t(bs + 1));
    rsd.resize(size_t(bs));
    qd.resize(size_t(bs));
    kd.resize(size_t(bs));
    fill_decay_table<Acc>(Acc(slope), bs + 1, d.data());
    for (int64_t x = 0; x < bs; ++x) rsd[size_t(x)] = Acc(scale) * d[size_t(intra_decay_exponent(bs - 1, x))];
    for (int64_t i = 0; i < bs; ++i) qd[size_t(i)] = Acc(scale) * d[size_t(query_decay_exponent(i))];
  }
  // kd[j] = lambda^(n-1-j) for a block of n tokens.
  const Acc* key_decay(int64_t n) {
    for (int64_t j = 0; j < n; ++j) kd[size_t(j)] = d[size_t(key_decay_exponent(n, j))];
    return kd.data();
  }
};

// A [rows, cols] state tile read with arbitrary element strides (so that the
// dq pass can read S^T from a [K, V] state) into a dense Acc buffer.
template <typename S, typename Acc>
void load_state(const S* src, int64_t row_stride, int64_t col_stride, int64_t rows, int64_t cols, Acc* dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = load_as<Acc>(src[r * row_stride + c * col_stride]);
}

// One causal pass (see the file comment) over every block of one sequence.
template <typename T, typename S>
struct CausalPass {
  using Acc = acc_t<T>;
  TokenInput<T> x, y, z;  // X, Y: [.., D]; Z: [.., >= c0 + C]
  T* out = nullptr;       // [B, T, H, C_total] contiguous: column c0 of token t at out_st
  TokenStrides out_st{};
  int64_t dim = 0;         // D
  int64_t c0 = 0, cols = 0;  // the column tile of Z, out and S
  // State before the first block: element (r, c) at state_in[r * in_rs + c * in_cs] (c relative to
  // c0), or nullptr for zeros. state_out (optional): [D, C_total] row-major at column c0.
  const S* state_in = nullptr;
  int64_t in_rs = 0, in_cs = 0;
  S* state_out = nullptr;
  int64_t out_rs = 0;
  SeqSpan seq{};
  int64_t head = 0, block = 1;
  float slope = 0.f;
  double scale = 1.0;

  // The fields every pass takes from the op's params: sequence `n`'s span, head `h`'s decay,
  // the block size and the scale.
  void set_sequence_head(const PrefillParams& p, int64_t n, int64_t h) {
    seq = sequence_span(p.cu_seqlens, n, p.seqlen);
    head = h;
    block = p.block_size;
    slope = p.slope[h];
    scale = p.scale;
  }

  void run(Scratch<Acc>& scratch) const {
    const int64_t bs = effective_block(block, seq.len), D = dim, C = cols;
    // Scratch: x, y, yd [bs, D]; z, o [bs, C]; a [bs, bs]; s [D, C].
    Acc* xb = scratch.get(3 * bs * D + 2 * bs * C + bs * bs + D * C);
    Acc *yb = xb + bs * D, *yd = yb + bs * D, *zb = yd + bs * D, *ob = zb + bs * C;
    Acc *a = ob + bs * C, *s = a + bs * bs;
    DecayTables<Acc> dec;
    dec.fill(slope, scale, bs);

    bool zero_state = state_in == nullptr;
    if (!zero_state) load_state<S, Acc>(state_in, in_rs, in_cs, D, C, s);
    const int64_t blocks = num_blocks(seq.len, bs);
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const BlockSpan bk = block_span(seq.len, bs, blk);
      const int64_t n = bk.len, t0 = seq.start + bk.start;
      const Tile<Acc> xt = load_tile<T, Acc>(x, seq.batch, t0, head, 0, n, D, xb);
      const Tile<Acc> yt = load_tile<T, Acc>(y, seq.batch, t0, head, 0, n, D, yb);
      const Tile<Acc> zt = load_tile<T, Acc>(z, seq.batch, t0, head, c0, n, C, zb);
      Acc* o = ob;
      int64_t ldo = C;
      T* dst = out + token_offset(out_st, seq.batch, t0, head) + c0;
      if constexpr (std::is_same_v<T, Acc>) o = dst, ldo = out_st.token;  // write the output in place

      gemm(false, true, n, n, D, Acc(1), xt.p, xt.ld, yt.p, yt.ld, Acc(0), a, bs);  // X Y^T
      mask_decay<Acc>(a, bs, n, dec.rsd.data(), bs);
      if (!zero_state) {
        gemm(false, false, n, C, D, Acc(1), xt.p, xt.ld, s, C, Acc(0), o, ldo);  // X S
        scale_rows<Acc>(o, ldo, n, C, dec.qd.data());
      }
      gemm(false, false, n, C, n, Acc(1), a, bs, zt.p, zt.ld, Acc(zero_state ? 0 : 1), o, ldo);  // + A Z
      if constexpr (!std::is_same_v<T, Acc>) store_rows<T, Acc>(o, ldo, n, C, dst, out_st.token);

      scaled_copy_rows<Acc>(yt, n, D, dec.key_decay(n), yd);
      const Acc block_decay = zero_state ? Acc(0) : dec.d[size_t(block_decay_exponent(n))];
      gemm(true, false, D, C, n, Acc(1), yd, D, zt.p, zt.ld, block_decay, s, C);  // S = lambda^n S + Yd^T Z
      zero_state = false;
    }
    if (state_out != nullptr) {
      for (int64_t r = 0; r < D; ++r)
        for (int64_t c = 0; c < C; ++c) state_out[r * out_rs + c] = zero_state ? S(0) : S(s[r * C + c]);
    }
  }
};

// A work item of a CPU prefill kernel and its estimated cost (for ordering).
struct Task {
  int kind;  // kernel-specific
  int64_t seq, head, c0, cols;
  double cost;
};

// Runs every task once on the torch/OpenMP thread pool, longest first, each
// worker pulling the next task from a shared counter (varlen batches mix long
// and short sequences, so a static split would leave threads idle).
// fn(const Task&, Scratch<Acc>& scratch): scratch is per worker.
template <typename Acc, typename F>
void run_tasks(std::vector<Task> tasks, const F& fn) {
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  const int64_t count = int64_t(tasks.size());
  std::atomic<int64_t> next{0};
  cpu::parallel_for(0, count, 1, [&](int64_t, int64_t) {
    Scratch<Acc> scratch;
    for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) fn(tasks[size_t(i)], scratch);
  });
}

// Column tiles for one (sequence, head) whose work is `share` of the whole call:
// split only when it alone is more than one thread's part, so that a batch
// with fewer (sequence, head) pairs than threads still uses every core (each
// extra tile recomputes the D-wide score tile).
inline int64_t column_tiles(double share, int64_t threads, int64_t cols) {
  const int64_t want = int64_t(share * double(threads) + 0.999);
  return std::clamp<int64_t>(want, 1, std::max<int64_t>(1, cols / 32));
}

}  // namespace m1::lightning::cpu_detail
