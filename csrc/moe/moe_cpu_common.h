// Pieces the CPU forward and backward kernels of fused MoE share: the
// permutation on the thread pool, row gathers into fp32 (or fp64) buffers,
// weight blocks as Acc, the GEMM on tiles, and a dynamic task runner.
//
// Acc is float for float32/bfloat16/float16 storage and double for float64
// (the gradcheck path). 16-bit weights are converted block by block inside the
// task that multiplies them, so no fp32 copy of a whole expert is ever made and
// each weight element is converted once per call.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common/cpu_runtime.h"
#include "common/dtype.h"
#include "common/few_rows_gemm.h"
#include "moe/moe.h"
#include "moe/moe_permute.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#include <xmmintrin.h>
#endif

namespace m1::moe::cpu_detail {

// Uninitialised per-worker buffer (a few MB at most; the large per-call
// buffers come from Scratch below).
template <typename Acc>
struct Buffer {
  std::unique_ptr<Acc[]> data;
  explicit Buffer(int64_t n) : data(n > 0 ? new Acc[size_t(n)] : nullptr) {}
  Acc* get() const { return data.get(); }
};

// The large per-call buffers (gathered rows, activations, per-slot outputs:
// tens to hundreds of MB) come from grow-only arenas kept for the life of the
// process and reused: on these VMs the first touch of fresh pages costs about
// 0.7 ms per MB, up to a fifth of a T = 4096 forward. A call leases one arena
// (a pool serves concurrent calls) and returns it when done, so the memory
// held is the largest single call's scratch (per concurrently running call):
// forward 4 P (2D + F) bytes, backward 4 P (3D + 3F [+ 2F]) bytes (Acc = fp32).
class ArenaPool {
 public:
  struct Arena {
    std::unique_ptr<char[]> data;
    size_t bytes = 0;
  };
  static std::unique_ptr<Arena> take() {
    std::lock_guard<std::mutex> lock(mutex());
    auto& pool = free_list();
    if (pool.empty()) return std::make_unique<Arena>();
    std::unique_ptr<Arena> a = std::move(pool.back());
    pool.pop_back();
    return a;
  }
  static void give_back(std::unique_ptr<Arena> a) {
    std::lock_guard<std::mutex> lock(mutex());
    free_list().push_back(std::move(a));
  }

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static std::vector<std::unique_ptr<Arena>>& free_list() {
    static std::vector<std::unique_ptr<Arena>> pool;
    return pool;
  }
};

// Buffers of `bytes[i]` bytes carved from one leased arena, 64-byte aligned
// (uninitialised: every element is written before it is read).
class Scratch {
 public:
  explicit Scratch(std::initializer_list<size_t> bytes) : arena_(ArenaPool::take()) {
    size_t total = 0;
    for (size_t b : bytes) total += round_up(b);
    if (arena_->bytes < total) {
      arena_->data.reset();
      arena_->data.reset(new char[total]);
      arena_->bytes = total;
    }
    size_t offset = 0;
    for (size_t b : bytes) {
      ptrs_.push_back(arena_->data.get() + offset);
      offset += round_up(b);
    }
  }
  ~Scratch() { ArenaPool::give_back(std::move(arena_)); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  template <typename X>
  X* get(size_t i) const {
    return reinterpret_cast<X*>(ptrs_[i]);
  }

 private:
  static size_t round_up(size_t b) { return (b + 63) / 64 * 64; }
  std::unique_ptr<ArenaPool::Arena> arena_;
  std::vector<char*> ptrs_;
};

// Bytes of n elements of X (n may be 0).
template <typename X>
size_t bytes_of(int64_t n) {
  return size_t(std::max<int64_t>(n, 0)) * sizeof(X);
}

// Expert-sorted order of the T * k slots (moe_permute.h), on the host.
struct Permutation {
  std::vector<int32_t> sorted_slots;    // [T * k]
  std::vector<int32_t> slot_pos;        // [T * k]
  std::vector<int32_t> expert_offsets;  // [E + 1]

  int64_t rows(int64_t e) const { return expert_offsets[e + 1] - expert_offsets[e]; }
};

template <typename Id>
Permutation permute_typed(const Id* ids, int64_t slots, int64_t experts) {
  const int64_t chunks = permute_chunks(slots);
  std::vector<int32_t> table(static_cast<size_t>(experts * chunks));
  std::atomic<int64_t> invalid{0};
  cpu::parallel_for(0, chunks, 16, [&](int64_t begin, int64_t end) {
    int64_t bad = 0;
    for (int64_t c = begin; c < end; ++c) bad += histogram_chunk(ids, slots, experts, chunks, c, table.data());
    invalid += bad;
  });
  if (invalid.load() != 0) throw std::invalid_argument("m1.fused_moe: 'topk_ids' has values outside [0, E)");
  Permutation perm;
  perm.sorted_slots.resize(size_t(slots));
  perm.slot_pos.resize(size_t(slots));
  perm.expert_offsets.resize(size_t(experts + 1));
  const int64_t total = exclusive_scan(table.data(), experts * chunks);
  expert_offsets_from_cursor(table.data(), experts, chunks, total, perm.expert_offsets.data());
  cpu::parallel_for(0, chunks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c)
      scatter_chunk(ids, slots, experts, chunks, c, table.data(), perm.sorted_slots.data(), perm.slot_pos.data());
  });
  return perm;
}

inline Permutation permute(const MoeInputs& in) {
  const int64_t slots = in.shape.slots(), experts = in.shape.experts;
  return in.ids_int64 ? permute_typed(static_cast<const int64_t*>(in.topk_ids), slots, experts)
                      : permute_typed(static_cast<const int32_t*>(in.topk_ids), slots, experts);
}

// A value of storage type From as storage type To (a copy when they agree;
// else through float, or double for double).
template <typename To, typename From>
M1_INLINE To cast_value(From x) {
  if constexpr (std::is_same_v<To, From>) {
    return x;
  } else {
    return store_from<To>(load_as<acc_t<To>>(x));
  }
}

// dst[p, :] = src[token of sorted slot p, :] (as type Out) for every position
// p: the rows of a [T, D] tensor (row stride `ld`) in expert-sorted order.
template <typename T, typename Out>
M1_CPU_MULTIVERSION void gather_rows_block(const T* __restrict src, int64_t ld, int64_t dim,
                                           const int32_t* sorted_slots, int64_t topk, int64_t begin, int64_t end,
                                           Out* __restrict dst, int64_t ld_dst) {
  for (int64_t p = begin; p < end; ++p) {
    const T* __restrict row = src + slot_token(sorted_slots[p], topk) * ld;
    Out* __restrict out = dst + p * ld_dst;
    for (int64_t d = 0; d < dim; ++d) out[d] = cast_value<Out>(row[d]);
  }
}

// (dst row stride ld_dst, dim by default)
template <typename T, typename Out>
void gather_rows(const T* src, int64_t ld, int64_t dim, const Permutation& perm, int64_t topk, Out* dst,
                 int64_t ld_dst = -1) {
  if (ld_dst < 0) ld_dst = dim;
  const int64_t slots = int64_t(perm.sorted_slots.size());
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, dim));
  cpu::parallel_for(0, slots, grain, [&](int64_t begin, int64_t end) {
    gather_rows_block(src, ld, dim, perm.sorted_slots.data(), topk, begin, end, dst, ld_dst);
  });
}

// Routing weight of every sorted position, as Acc.
template <typename Acc>
std::vector<Acc> gather_weights(const MoeInputs& in, const Permutation& perm) {
  std::vector<Acc> w(perm.sorted_slots.size());
  for (size_t p = 0; p < w.size(); ++p) {
    const int64_t s = perm.sorted_slots[p];
    w[p] = in.weight_dtype == DType::kFloat64 ? Acc(static_cast<const double*>(in.topk_weights)[s])
                                              : Acc(static_cast<const float*>(in.topk_weights)[s]);
  }
  return w;
}

// A [rows, cols] block of a row-major matrix (row stride ld) as Acc: the
// matrix itself when its storage already is Acc, else a converted copy in
// `scratch` (at least rows * cols elements). Returns the block and its stride.
template <typename T, typename Acc>
M1_CPU_MULTIVERSION void convert_block(const T* __restrict src, int64_t ld, int64_t rows, int64_t cols,
                                       Acc* __restrict dst) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* __restrict in = src + i * ld;
    Acc* __restrict out = dst + i * cols;
    for (int64_t j = 0; j < cols; ++j) out[j] = load_as<Acc>(in[j]);
  }
}

template <typename T, typename Acc>
std::pair<const Acc*, int64_t> block_as(const T* src, int64_t ld, int64_t rows, int64_t cols, Acc* scratch) {
  if constexpr (std::is_same_v<T, Acc>) {
    (void)rows, (void)cols, (void)scratch;
    return {src, ld};
  } else {
    convert_block(src, ld, rows, cols, scratch);
    return {scratch, cols};
  }
}

// Writes an Acc block into storage of type T (row strides ld_src, ld_dst).
template <typename T, typename Acc>
M1_CPU_MULTIVERSION void store_block(const Acc* __restrict src, int64_t ld_src, int64_t rows, int64_t cols,
                                     T* __restrict dst, int64_t ld_dst) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[i * ld_dst + j] = store_from<T>(src[i * ld_src + j]);
}

// The few-rows GEMM (decode-sized experts: weights read once as stored) is
// shared with the FP32 head: common/few_rows_gemm.h.
using cpu::gemm_nt_few_rows;
using cpu::kFewRows;

// dst[j, i] = src[i, j] for a [rows, cols] block of 16-bit values (row
// strides ld_src, ld_dst): 8 x 8 blocks through SSE2 unpacks (24 per 64
// values) inside 64 x 64 tiles (8 KB each way, so the strided writes stay in
// L1), a scalar loop on the edges.
M1_CPU_MULTIVERSION inline void transpose16(const uint16_t* __restrict src, int64_t ld_src, int64_t rows,
                                            int64_t cols, uint16_t* __restrict dst, int64_t ld_dst) {
  constexpr int64_t kTileSide = 64;
  for (int64_t i0 = 0; i0 < rows; i0 += kTileSide) {
    const int64_t i1 = std::min(rows, i0 + kTileSide);
    for (int64_t j0 = 0; j0 < cols; j0 += kTileSide) {
      const int64_t j1 = std::min(cols, j0 + kTileSide);
      int64_t i = i0;
#if defined(__SSE2__)
      for (; i + 8 <= i1; i += 8) {
        int64_t j = j0;
        for (; j + 8 <= j1; j += 8) {
          __m128i r[8], t[8], u[8];
          for (int q = 0; q < 8; ++q)
            r[q] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + (i + q) * ld_src + j));
          for (int q = 0; q < 4; ++q) {
            t[2 * q] = _mm_unpacklo_epi16(r[2 * q], r[2 * q + 1]);
            t[2 * q + 1] = _mm_unpackhi_epi16(r[2 * q], r[2 * q + 1]);
          }
          // u[0..3]: rows 0-3, column pairs 0-1, 2-3, 4-5, 6-7; u[4..7]: rows 4-7.
          for (int h = 0; h < 2; ++h) {
            u[4 * h + 0] = _mm_unpacklo_epi32(t[4 * h], t[4 * h + 2]);
            u[4 * h + 1] = _mm_unpackhi_epi32(t[4 * h], t[4 * h + 2]);
            u[4 * h + 2] = _mm_unpacklo_epi32(t[4 * h + 1], t[4 * h + 3]);
            u[4 * h + 3] = _mm_unpackhi_epi32(t[4 * h + 1], t[4 * h + 3]);
          }
          for (int q = 0; q < 4; ++q) {
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (j + 2 * q) * ld_dst + i),
                             _mm_unpacklo_epi64(u[q], u[q + 4]));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (j + 2 * q + 1) * ld_dst + i),
                             _mm_unpackhi_epi64(u[q], u[q + 4]));
          }
        }
        for (; j < j1; ++j)
          for (int q = 0; q < 8; ++q) dst[j * ld_dst + i + q] = src[(i + q) * ld_src + j];
      }
#endif
      for (; i < i1; ++i)
        for (int64_t j = j0; j < j1; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
    }
  }
}

// The same for 32-bit values: 4 x 4 blocks through SSE shuffles inside 64 x 64 tiles.
M1_CPU_MULTIVERSION inline void transpose32(const float* __restrict src, int64_t ld_src, int64_t rows, int64_t cols,
                                            float* __restrict dst, int64_t ld_dst) {
  constexpr int64_t kTileSide = 64;
  for (int64_t i0 = 0; i0 < rows; i0 += kTileSide) {
    const int64_t i1 = std::min(rows, i0 + kTileSide);
    for (int64_t j0 = 0; j0 < cols; j0 += kTileSide) {
      const int64_t j1 = std::min(cols, j0 + kTileSide);
      int64_t i = i0;
#if defined(__SSE2__)
      for (; i + 4 <= i1; i += 4) {
        int64_t j = j0;
        for (; j + 4 <= j1; j += 4) {
          __m128 r0 = _mm_loadu_ps(src + (i + 0) * ld_src + j), r1 = _mm_loadu_ps(src + (i + 1) * ld_src + j);
          __m128 r2 = _mm_loadu_ps(src + (i + 2) * ld_src + j), r3 = _mm_loadu_ps(src + (i + 3) * ld_src + j);
          _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
          _mm_storeu_ps(dst + (j + 0) * ld_dst + i, r0);
          _mm_storeu_ps(dst + (j + 1) * ld_dst + i, r1);
          _mm_storeu_ps(dst + (j + 2) * ld_dst + i, r2);
          _mm_storeu_ps(dst + (j + 3) * ld_dst + i, r3);
        }
        for (; j < j1; ++j)
          for (int q = 0; q < 4; ++q) dst[j * ld_dst + i + q] = src[(i + q) * ld_src + j];
      }
#endif
      for (; i < i1; ++i)
        for (int64_t j = j0; j < j1; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
    }
  }
}

// Transposes of the two operand types the AVX-512 kernels read.
inline void transpose_block(const bf16* src, int64_t ld_src, int64_t rows, int64_t cols, bf16* dst, int64_t ld_dst) {
  transpose16(reinterpret_cast<const uint16_t*>(src), ld_src, rows, cols, reinterpret_cast<uint16_t*>(dst), ld_dst);
}
inline void transpose_block(const float* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst, int64_t ld_dst) {
  transpose32(src, ld_src, rows, cols, dst, ld_dst);
}

// transpose_block over many rows on the thread pool (each chunk of source
// rows writes its own columns of dst).
template <typename X>
void transpose_parallel(const X* src, int64_t ld_src, int64_t rows, int64_t cols, X* dst, int64_t ld_dst) {
  const int64_t grain = std::max<int64_t>(1, ((int64_t(1) << 15) / std::max<int64_t>(1, cols)) / 8);
  cpu::parallel_for(0, (rows + 7) / 8, grain, [&](int64_t b, int64_t e) {
    const int64_t r0 = b * 8, r1 = std::min(rows, e * 8);
    transpose_block(src + r0 * ld_src, ld_src, r1 - r0, cols, dst + r0, ld_dst);
  });
}

// Plain loops for float64 (gradcheck-sized problems only): C = op(A) op(B) + beta C.
inline void dgemm_loop(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const double* a, int64_t lda,
                       const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0.0;
      for (int64_t p = 0; p < k; ++p) acc += (ta ? a[p * lda + i] : a[i * lda + p]) * (tb ? b[j * ldb + p] : b[p * ldb + j]);
      c[i * ldc + j] = acc + (beta == 0.0 ? 0.0 : beta * c[i * ldc + j]);
    }
}

// Row-major C[m, n] = op(A) op(B) + beta C on one thread (see cpu::sgemm).
// k = 0 is a valid empty sum: C = beta C.
template <typename Acc>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const Acc* a, int64_t lda, const Acc* b, int64_t ldb,
          Acc beta, Acc* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == Acc(0) ? Acc(0) : beta * c[i * ldc + j];
    return;
  }
  if constexpr (std::is_same_v<Acc, float>) {
    cpu::sgemm(ta, tb, m, n, k, 1.f, a, lda, b, ldb, beta, c, ldc);
  } else {
    dgemm_loop(ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc);
  }
}

// Below this many flops a phase runs on the calling thread: waking the pool
// costs more than the work (and much more when other processes hold the cores).
constexpr double kParallelFlops = double(1 << 21);

// Runs fn(i, scratch) for every task i in [0, n), on the thread pool when
// `parallel`. Tasks are handed out one at a time from a shared counter, so
// uneven tasks (experts with more tokens) balance; each worker makes its
// scratch once.
template <typename MakeScratch, typename Fn>
void run_tasks(int64_t n, bool parallel, const MakeScratch& make_scratch, const Fn& fn) {
  if (!parallel) {
    auto scratch = make_scratch();
    for (int64_t i = 0; i < n; ++i) fn(i, scratch);
    return;
  }
  std::atomic<int64_t> next{0};
  cpu::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
         i = next.fetch_add(1, std::memory_order_relaxed))
      fn(i, scratch);
  });
}

// A unit of work: expert e, columns [begin, begin + size) of some dimension.
struct Task {
  int32_t expert;
  int32_t chunk;
};

// Tasks (expert, chunk) covering `extent` columns in chunks of `chunk` for
// every expert with tokens (or every expert when `all_experts`), the experts
// with the most tokens first so that the last tasks handed out are small.
inline std::vector<Task> make_tasks(const Permutation& perm, int64_t experts, int64_t extent, int64_t chunk,
                                    bool all_experts) {
  std::vector<int32_t> order;
  for (int64_t e = 0; e < experts; ++e)
    if (all_experts || perm.rows(e) > 0) order.push_back(int32_t(e));
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return perm.rows(a) > perm.rows(b); });
  const int64_t chunks = (extent + chunk - 1) / chunk;
  std::vector<Task> tasks;
  tasks.reserve(order.size() * size_t(chunks));
  for (int32_t e : order)
    for (int64_t c = 0; c < chunks; ++c) tasks.push_back({e, int32_t(c)});
  return tasks;
}

// cond ? a : b for floats as bit arithmetic: GCC does not if-convert a float
// select under the default -ftrapping-math, which keeps the loop scalar.
M1_INLINE float select_float(bool cond, float a, float b) {
  int32_t ia, ib;
  std::memcpy(&ia, &a, sizeof(ia));
  std::memcpy(&ib, &b, sizeof(ib));
  const int32_t mask = -int32_t(cond);
  const int32_t out = (ia & mask) | (ib & ~mask);
  float f;
  std::memcpy(&f, &out, sizeof(f));
  return f;
}

// exp(x) for float in straight-line arithmetic that vectorises (std::exp is a
// scalar call): x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial for
// exp(r) (relative error < 2.5e-7 over the float range), times 2^n built from
// the exponent bits. x is clamped to [-87, 88] (2^n stays a normal float);
// NaN stays NaN (the comparisons are false).
M1_INLINE float exp_vec(float x) {
  x = select_float(x > 88.f, 88.f, x);
  x = select_float(x < -87.f, -87.f, x);
  // round(x / ln2) by adding and subtracting 1.5 * 2^23 (exact for |x / ln2| < 2^22).
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln2, ln2 split in two
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (int32_t(n) + 127) << 23;  // 2^n, n in [-126, 127]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

M1_INLINE double exp_vec(double x) { return std::exp(x); }

// silu(g) = g * sigmoid(g); its derivative is s (1 + g (1 - s)), s = sigmoid(g).
template <typename Acc>
M1_INLINE Acc sigmoid(Acc g) {
  return Acc(1) / (Acc(1) + exp_vec(-g));
}

}  // namespace m1::moe::cpu_detail
