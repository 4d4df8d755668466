// Index and decay helpers of lightning attention shared by the CPU and CUDA
// kernels (and unit-tested on the host by csrc/tests/test_lightning_common.cpp).
//
// Decay: head h decays its state by lambda_h = exp(-slope_h) per token, so a
// contribution n tokens old is weighted lambda_h^n = exp(-slope_h * n). Always
// computed as one exp of the product, never as repeated multiplication, so
// every kernel (and every block size) gets the same factor to the last bit.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace m1::lightning {

M1_HOST_DEVICE M1_INLINE float exp_(float x) { return ::expf(x); }
M1_HOST_DEVICE M1_INLINE double exp_(double x) { return ::exp(x); }

// lambda^n for decay rate `slope` (>= 0) and integer distance n >= 0.
template <typename Acc>
M1_HOST_DEVICE M1_INLINE Acc decay_pow(Acc slope, int64_t n) {
  return exp_(-slope * Acc(n));
}

M1_HOST_DEVICE M1_INLINE constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Element offsets of the token-major layouts, [B, H, D] rows with strides in
// elements and a contiguous last dimension.
struct RowStrides {
  int64_t batch;
  int64_t head;
};

M1_HOST_DEVICE M1_INLINE int64_t row_offset(RowStrides s, int64_t b, int64_t h) {
  return b * s.batch + h * s.head;
}

// Offset of the [K, V] state of (b, h) in a contiguous [B, H, K, V] tensor.
M1_HOST_DEVICE M1_INLINE int64_t state_offset(int64_t b, int64_t h, int64_t heads, int64_t dk, int64_t dv) {
  return ((b * heads + h) * dk) * dv;
}

// ---------------------------------------------------------------------------
// Prefill (blockwise) helpers. Token-major tensors [B, T, H, D] with element
// strides for batch, token and head and a contiguous last dimension.
struct TokenStrides {
  int64_t batch;
  int64_t token;
  int64_t head;
};

M1_HOST_DEVICE M1_INLINE int64_t token_offset(TokenStrides s, int64_t b, int64_t t, int64_t h) {
  return b * s.batch + t * s.token + h * s.head;
}

// One independent sequence of a prefill call: tokens [start, start + len) of
// batch row `batch`. Without cu_seqlens (cu == nullptr) sequence n is batch
// row n, all T tokens; with cu_seqlens (B == 1) it is segment n of row 0.
struct SeqSpan {
  int64_t batch;
  int64_t start;
  int64_t len;
};

M1_HOST_DEVICE M1_INLINE SeqSpan sequence_span(const int64_t* cu, int64_t n, int64_t seqlen) {
  if (cu == nullptr) return SeqSpan{n, 0, seqlen};
  return SeqSpan{0, cu[n], cu[n + 1] - cu[n]};
}

// Blocks of a sequence of `len` tokens cut at multiples of `block` (the last
// one may be short; an empty sequence has none).
M1_HOST_DEVICE M1_INLINE int64_t num_blocks(int64_t len, int64_t block) { return ceil_div(len, block); }

// Block `i` of a sequence: offset within the sequence and length (1..block).
struct BlockSpan {
  int64_t start;
  int64_t len;
};

M1_HOST_DEVICE M1_INLINE BlockSpan block_span(int64_t len, int64_t block, int64_t i) {
  const int64_t start = i * block;
  const int64_t rest = len - start;
  return BlockSpan{start, rest < block ? rest : block};
}

// A column tile [start, start + len) of a dimension of size `dim` cut into
// tiles of `tile` columns (the last may be short).
M1_HOST_DEVICE M1_INLINE BlockSpan tile_span(int64_t dim, int64_t tile, int64_t i) { return block_span(dim, tile, i); }

// Work item of a kernel that loops over the blocks of one (sequence, head,
// column tile): the flat index enumerates sequences slowest, tiles fastest.
struct SeqHeadTile {
  int64_t seq;
  int64_t head;
  int64_t tile;
};

M1_HOST_DEVICE M1_INLINE SeqHeadTile seq_head_tile(int64_t item, int64_t heads, int64_t tiles) {
  return SeqHeadTile{item / (heads * tiles), (item / tiles) % heads, item % tiles};
}

// Decay exponents of the blockwise algorithm (Lightning Attention-2) for a
// block of n tokens, i and j the positions of a query and a key in the block:
//   intra-block   o_i += lambda^(i-j) (q_i . k_j) v_j             j <= i
//   from state    o_i += lambda^(i+1) q_i S                       S before the block
//   state update  S   <- lambda^n S + sum_j lambda^(n-1-j) k_j^T v_j
M1_HOST_DEVICE M1_INLINE int64_t intra_decay_exponent(int64_t i, int64_t j) { return i - j; }
M1_HOST_DEVICE M1_INLINE int64_t query_decay_exponent(int64_t i) { return i + 1; }
M1_HOST_DEVICE M1_INLINE int64_t key_decay_exponent(int64_t n, int64_t j) { return n - 1 - j; }
M1_HOST_DEVICE M1_INLINE int64_t block_decay_exponent(int64_t n) { return n; }

// table[m] = lambda^m for m = 0..count-1. Every exponent above is in [0, block],
// so a table of block + 1 entries serves a whole call, and each entry is the
// same single exp as decay_pow: one rounding, whatever the block size (the
// device's exp may differ from the host's in the last bit).
template <typename Acc>
M1_HOST_DEVICE M1_INLINE void fill_decay_table(Acc slope, int64_t count, Acc* table) {
  for (int64_t m = 0; m < count; ++m) table[m] = decay_pow<Acc>(slope, m);
}

}  // namespace m1::lightning
