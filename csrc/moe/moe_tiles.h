// Tile scheduling of the fused gate/up kernel (moe_gate_up_cuda.cu), shared
// by the host (which builds the table) and the device (which reads it), and
// unit-tested on the host by csrc/tests/test_moe_tiles.cpp.
//
// Work items: the expert-sorted rows of expert e are expert_offsets[e] ..
// expert_offsets[e + 1] (moe_permute.h). One CTA takes one (expert, M-tile,
// N-tile) item: rows [row0, row0 + rows) of the expert (rows <= BM) and gate
// / up columns [col0, col0 + cols) (cols <= BN) of the F columns.
//
//   m_tiles(e)      = ceil(rows of e / BM)                  0 for an expert without rows
//   n_tiles         = ceil(F / BN)                          the same for every expert
//   tile_offsets[e] = sum over e' < e of m_tiles(e') n_tiles,  [E + 1], [E] = total
//
// A linear CTA id t < total belongs to the expert e with tile_offsets[e] <= t <
// tile_offsets[e + 1] (binary search; experts without rows own no ids), and
// inside it local = t - tile_offsets[e] is ordered M-tile fastest:
//
//   m_tile = local % m_tiles(e),  n_tile = local / m_tiles(e)
//
// so the CTAs that read the same weight tile (one expert, one N-tile) run
// next to each other and share it through L2.
#pragma once

#include <cstdint>

#include "common/macros.h"
#include "moe/moe_permute.h"

namespace m1::moe {

M1_HOST_DEVICE M1_INLINE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Fills tile_offsets[0 .. experts] and returns the total number of tiles.
M1_HOST_DEVICE inline int64_t build_tile_offsets(const int32_t* expert_offsets, int64_t experts, int64_t bm,
                                                 int64_t n_tiles, int64_t* tile_offsets) {
  int64_t total = 0;
  for (int64_t e = 0; e < experts; ++e) {
    tile_offsets[e] = total;
    total += ceil_div(int64_t(expert_offsets[e + 1]) - expert_offsets[e], bm) * n_tiles;
  }
  tile_offsets[experts] = total;
  return total;
}

// The expert owning tile t, for 0 <= t < tile_offsets[experts]: the last e
// with tile_offsets[e] <= t (an expert with tiles, since t < tile_offsets[e + 1]).
M1_HOST_DEVICE inline int64_t tile_expert(const int64_t* tile_offsets, int64_t experts, int64_t t) {
  int64_t lo = 0, hi = experts;  // tile_offsets[lo] <= t < tile_offsets[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (tile_offsets[mid] <= t) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

struct GateUpTile {
  int64_t expert = 0, m_tile = 0, n_tile = 0;
  int64_t row0 = 0, rows = 0;  // expert-sorted rows [row0, row0 + rows), 1 <= rows <= BM
  int64_t col0 = 0, cols = 0;  // gate / up columns [col0, col0 + cols), 1 <= cols <= BN
};

// The work item of linear CTA id t (0 <= t < total; see the file header).
M1_HOST_DEVICE inline GateUpTile gate_up_tile(const int32_t* expert_offsets, const int64_t* tile_offsets,
                                              int64_t experts, int64_t bm, int64_t bn, int64_t ffn, int64_t t) {
  GateUpTile w;
  w.expert = tile_expert(tile_offsets, experts, t);
  const int64_t begin = expert_offsets[w.expert], rows = int64_t(expert_offsets[w.expert + 1]) - begin;
  const int64_t m_tiles = ceil_div(rows, bm);
  const int64_t local = t - tile_offsets[w.expert];
  w.m_tile = local % m_tiles;
  w.n_tile = local / m_tiles;
  w.row0 = begin + w.m_tile * bm;
  w.rows = rows - w.m_tile * bm < bm ? rows - w.m_tile * bm : bm;
  w.col0 = w.n_tile * bn;
  w.cols = ffn - w.col0 < bn ? ffn - w.col0 : bn;
  return w;
}

// Element offset in x of row r of the tile's A operand, the row gather: x row
// of the token of sorted slot row0 + r. -1 for a tail row (r >= rows: zeros).
M1_HOST_DEVICE M1_INLINE int64_t gate_up_x_row(const GateUpTile& w, const int32_t* sorted_slots, int64_t topk,
                                               int64_t x_row_stride, int64_t r) {
  return r < w.rows ? slot_token(sorted_slots[w.row0 + r], topk) * x_row_stride : -1;
}

// Element offset in W_gate_up [E, 2F, D] of row n of the tile's gate (up =
// false: row col0 + n of the expert) or up (row F + col0 + n) B operand. -1
// for a tail row (n >= cols: zeros).
M1_HOST_DEVICE M1_INLINE int64_t gate_up_w_row(const GateUpTile& w, int64_t ffn, int64_t dim, bool up, int64_t n) {
  return n < w.cols ? (w.expert * 2 * ffn + (up ? ffn : 0) + w.col0 + n) * dim : -1;
}

// Where the epilogue writes element (r, n) of the tile (r < rows, n < cols):
// act [P, F] and the gate / up halves of gate_up [P, 2F], rows expert-sorted.
struct GateUpOut {
  int64_t act, gate, up;
};
M1_HOST_DEVICE M1_INLINE GateUpOut gate_up_out(const GateUpTile& w, int64_t ffn, int64_t r, int64_t n) {
  const int64_t row = w.row0 + r, col = w.col0 + n;
  return {row * ffn + col, row * 2 * ffn + col, row * 2 * ffn + ffn + col};
}

// Whether rows of `cols` elements of `elem_bytes` bytes, `row_stride`
// elements apart from `base`, can be read as whole 16-byte vectors (the
// tensor-core path's loads; otherwise the caller takes the unfused path).
M1_HOST_DEVICE M1_INLINE bool rows_are_16b_vectors(uintptr_t base, int64_t row_stride, int64_t cols,
                                                   int64_t elem_bytes) {
  return base % 16 == 0 && (row_stride * elem_bytes) % 16 == 0 && (cols * elem_bytes) % 16 == 0;
}

}  // namespace m1::moe
