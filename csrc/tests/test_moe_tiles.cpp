// Host tests of moe/moe_tiles.h, the tile scheduler of the fused gate/up CUDA
// kernel: for random and degenerate expert sizes (experts without rows, all
// rows on one expert, sizes that are and are not multiples of the tile, F
// smaller than and not a multiple of BN), every linear CTA id maps to a
// distinct in-bounds (expert, M-tile, N-tile) item, and together the items
// cover every (row, column) of every expert exactly once. Then the kernel's
// data movement, emulated on the host with the same helpers (row gather of
// A, gate and up rows of B, zero fill of tails, K steps, epilogue offsets),
// against the naive per-slot gate/up products.
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "moe/moe_permute.h"
#include "moe/moe_tiles.h"
#include "tests/check.h"

using namespace m1::moe;

namespace {

void check_schedule(const std::vector<int32_t>& sizes, int64_t ffn, int64_t bm, int64_t bn) {
  const int64_t experts = int64_t(sizes.size());
  std::vector<int32_t> offsets(size_t(experts + 1), 0);
  for (int64_t e = 0; e < experts; ++e) offsets[size_t(e + 1)] = offsets[size_t(e)] + sizes[size_t(e)];
  const int64_t rows_total = offsets.back();
  std::vector<int64_t> tile_offsets(size_t(experts + 1), -1);
  const int64_t n_tiles = ceil_div(ffn, bn);
  const int64_t total = build_tile_offsets(offsets.data(), experts, bm, n_tiles, tile_offsets.data());

  int64_t expected_total = 0;
  for (int32_t s : sizes) expected_total += (int64_t(s) + bm - 1) / bm * ((ffn + bn - 1) / bn);
  M1_EXPECT(total == expected_total, "total %lld != %lld", (long long)total, (long long)expected_total);
  M1_EXPECT(tile_offsets[size_t(experts)] == total, "tile_offsets[E] is the total");
  M1_EXPECT(tile_offsets[0] == 0, "tile_offsets[0] = 0");

  // Every (sorted row, column) of the [rows_total, ffn] output exactly once.
  std::vector<int> cover(size_t(rows_total * ffn), 0);
  int64_t prev_expert = -1;
  for (int64_t t = 0; t < total; ++t) {
    const GateUpTile w = gate_up_tile(offsets.data(), tile_offsets.data(), experts, bm, bn, ffn, t);
    M1_EXPECT(w.expert >= 0 && w.expert < experts, "tile %lld: expert %lld", (long long)t, (long long)w.expert);
    if (w.expert < 0 || w.expert >= experts) return;
    M1_EXPECT(w.expert >= prev_expert, "experts in order along t");
    prev_expert = w.expert;
    M1_EXPECT(sizes[size_t(w.expert)] > 0, "tile %lld given to an expert without rows", (long long)t);
    const int64_t begin = offsets[size_t(w.expert)], end = offsets[size_t(w.expert + 1)];
    M1_EXPECT(w.rows >= 1 && w.rows <= bm && w.cols >= 1 && w.cols <= bn, "tile %lld: %lld rows, %lld cols",
              (long long)t, (long long)w.rows, (long long)w.cols);
    M1_EXPECT(w.row0 >= begin && w.row0 + w.rows <= end, "tile %lld: rows outside its expert", (long long)t);
    M1_EXPECT(w.row0 == begin + w.m_tile * bm && w.col0 == w.n_tile * bn, "tile origin");
    M1_EXPECT(w.col0 >= 0 && w.col0 + w.cols <= ffn, "tile %lld: columns outside F", (long long)t);
    // Full tiles except at the tails.
    M1_EXPECT(w.rows == bm || w.row0 + w.rows == end, "a short M-tile is the expert's last");
    M1_EXPECT(w.cols == bn || w.col0 + w.cols == ffn, "a short N-tile is the last");
    // M-tile fastest: the next id is the next M-tile of the same N-tile, until the expert's M-tiles run out.
    if (t + 1 < tile_offsets[size_t(w.expert + 1)] && w.row0 + w.rows < end) {
      const GateUpTile next = gate_up_tile(offsets.data(), tile_offsets.data(), experts, bm, bn, ffn, t + 1);
      M1_EXPECT(next.expert == w.expert && next.n_tile == w.n_tile && next.m_tile == w.m_tile + 1, "M-tile fastest");
    }
    if (w.row0 < begin || w.row0 + w.rows > end || w.col0 < 0 || w.col0 + w.cols > ffn) continue;
    for (int64_t r = w.row0; r < w.row0 + w.rows; ++r)
      for (int64_t c = w.col0; c < w.col0 + w.cols; ++c) cover[size_t(r * ffn + c)] += 1;
  }
  int64_t wrong = 0;
  for (int v : cover) wrong += v != 1;
  M1_EXPECT(wrong == 0, "%lld (row, column) cells not covered exactly once (E=%lld F=%lld BM=%lld BN=%lld)",
            (long long)wrong, (long long)experts, (long long)ffn, (long long)bm, (long long)bn);
}

void test_schedules() {
  // Degenerate sizes.
  check_schedule({0}, 64, 64, 64);                      // no rows at all: no tiles
  check_schedule({0, 0, 0}, 100, 64, 64);
  check_schedule({1}, 1, 64, 64);                        // one row, one column
  check_schedule({64}, 64, 64, 64);                      // exactly one tile
  check_schedule({65}, 65, 64, 64);                      // one-row / one-column tails
  check_schedule({0, 300, 0, 0}, 130, 64, 64);           // all rows on one expert, others empty
  check_schedule({5, 0, 0, 129, 0, 64, 1}, 40, 64, 64);  // F smaller than BN
  check_schedule({7, 0, 200, 3}, 264, 64, 64);
  check_schedule({17, 33}, 24, 16, 8);                   // other tile shapes
  // Random sizes, with about a third of the experts empty.
  std::mt19937 rng(4);
  for (int trial = 0; trial < 40; ++trial) {
    const int64_t experts = 1 + int64_t(rng() % 40);
    std::vector<int32_t> sizes(static_cast<size_t>(experts));
    for (auto& s : sizes) s = rng() % 3 == 0 ? 0 : int32_t(rng() % 300);
    const int64_t ffn = 1 + int64_t(rng() % 300);
    check_schedule(sizes, ffn, 64, 64);
  }
}

// The table built from a real permutation's offsets: its total is the sum of the per-expert tiles.
void test_from_permutation() {
  const int64_t experts = 8, slots = 1000, ffn = 96;
  std::vector<int32_t> ids(static_cast<size_t>(slots));
  std::mt19937 rng(7);
  for (auto& id : ids) id = int32_t(rng() % 4) * 2;  // odd experts get no rows
  const int64_t chunks = permute_chunks(slots);
  std::vector<int32_t> table(size_t(experts * chunks)), offsets(size_t(experts + 1));
  for (int64_t c = 0; c < chunks; ++c) histogram_chunk(ids.data(), slots, experts, chunks, c, table.data());
  const int64_t total_rows = exclusive_scan(table.data(), experts * chunks);
  expert_offsets_from_cursor(table.data(), experts, chunks, total_rows, offsets.data());
  std::vector<int32_t> sizes(static_cast<size_t>(experts));
  for (int64_t e = 0; e < experts; ++e) sizes[size_t(e)] = offsets[size_t(e + 1)] - offsets[size_t(e)];
  M1_EXPECT(sizes[1] == 0 && sizes[3] == 0, "odd experts empty");
  check_schedule(sizes, ffn, 64, 64);
}

void test_tile_expert_search() {
  // Experts 0, 2, 3 empty: ids 0..3 -> expert 1, 4..5 -> 4, 6..14 -> 5.
  const std::vector<int64_t> offs = {0, 0, 4, 4, 4, 6, 15};
  const int64_t experts = 6;
  for (int64_t t = 0; t < 15; ++t) {
    const int64_t want = t < 4 ? 1 : t < 6 ? 4 : 5;
    M1_EXPECT(tile_expert(offs.data(), experts, t) == want, "tile %lld -> expert %lld", (long long)t,
              (long long)tile_expert(offs.data(), experts, t));
  }
  const std::vector<int64_t> one = {0, 9};
  for (int64_t t = 0; t < 9; ++t) M1_EXPECT(tile_expert(one.data(), 1, t) == 0, "one expert");
}

void test_vector_alignment() {
  M1_EXPECT(rows_are_16b_vectors(0x1000, 64, 64, 2), "aligned bf16 rows");
  M1_EXPECT(!rows_are_16b_vectors(0x1002, 64, 64, 2), "base off by one element");
  M1_EXPECT(!rows_are_16b_vectors(0x1000, 68, 64, 2), "row stride of 68 bf16 = 136 B");
  M1_EXPECT(!rows_are_16b_vectors(0x1000, 64, 60, 2), "60 columns = 120 B");
  M1_EXPECT(rows_are_16b_vectors(0x1000, 4, 4, 4), "float32 rows of 16 B");
  M1_EXPECT(rows_are_16b_vectors(0x1000, 0, 0, 2), "no columns: nothing to read");
}

double silu(double g) { return g / (1.0 + std::exp(-g)); }

// The fused kernel's work on the host: every tile of the schedule, its A rows
// gathered through gate_up_x_row, its B rows through gate_up_w_row, K in steps
// of bk with zeros past D and for tail rows / columns, outputs written through
// gate_up_out. Compared with the naive products of every sorted slot.
void test_emulated_kernel(int64_t tokens, int64_t dim, int64_t ffn, int64_t experts, int64_t topk,
                          int64_t x_row_stride, int64_t bm, int64_t bn, int64_t bk, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> uni(-1.0, 1.0);
  const int64_t slots = tokens * topk;
  std::vector<int32_t> ids(static_cast<size_t>(slots));
  for (auto& id : ids) id = int32_t(rng() % uint32_t(experts)) / 2 * 2;  // odd experts get no rows
  std::vector<double> x(static_cast<size_t>(tokens * x_row_stride)), w(static_cast<size_t>(experts * 2 * ffn * dim));
  std::vector<double> weights(static_cast<size_t>(slots));
  for (auto& v : x) v = uni(rng);
  for (auto& v : w) v = uni(rng);
  for (auto& v : weights) v = uni(rng);

  const int64_t chunks = permute_chunks(slots);
  std::vector<int32_t> table(static_cast<size_t>(experts * chunks)), offsets(static_cast<size_t>(experts + 1));
  std::vector<int32_t> sorted(static_cast<size_t>(slots)), pos(static_cast<size_t>(slots));
  for (int64_t c = 0; c < chunks; ++c) histogram_chunk(ids.data(), slots, experts, chunks, c, table.data());
  const int64_t total_rows = exclusive_scan(table.data(), experts * chunks);
  expert_offsets_from_cursor(table.data(), experts, chunks, total_rows, offsets.data());
  for (int64_t c = 0; c < chunks; ++c)
    scatter_chunk(ids.data(), slots, experts, chunks, c, table.data(), sorted.data(), pos.data());

  std::vector<int64_t> tile_offsets(static_cast<size_t>(experts + 1));
  const int64_t tiles = build_tile_offsets(offsets.data(), experts, bm, ceil_div(ffn, bn), tile_offsets.data());
  const double nan = std::numeric_limits<double>::quiet_NaN();
  std::vector<double> act(static_cast<size_t>(slots * ffn), nan), gate_up(static_cast<size_t>(slots * 2 * ffn), nan);
  const int64_t x_end = (tokens - 1) * x_row_stride + dim, w_end = experts * 2 * ffn * dim;
  int64_t bad_offsets = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    const GateUpTile tile = gate_up_tile(offsets.data(), tile_offsets.data(), experts, bm, bn, ffn, t);
    std::vector<int64_t> a_row(static_cast<size_t>(bm)), g_row(static_cast<size_t>(bn)), u_row(static_cast<size_t>(bn));
    for (int64_t r = 0; r < bm; ++r) {
      a_row[size_t(r)] = gate_up_x_row(tile, sorted.data(), topk, x_row_stride, r);
      const bool ok = r < tile.rows ? a_row[size_t(r)] >= 0 && a_row[size_t(r)] + dim <= x_end : a_row[size_t(r)] == -1;
      bad_offsets += !ok;
    }
    for (int64_t n = 0; n < bn; ++n) {
      g_row[size_t(n)] = gate_up_w_row(tile, ffn, dim, false, n);
      u_row[size_t(n)] = gate_up_w_row(tile, ffn, dim, true, n);
      for (int64_t o : {g_row[size_t(n)], u_row[size_t(n)]}) {
        const bool ok = n < tile.cols ? o >= 0 && o + dim <= w_end : o == -1;
        bad_offsets += !ok;
      }
    }
    for (int64_t r = 0; r < bm; ++r) {
      for (int64_t n = 0; n < bn; ++n) {
        double g = 0, u = 0;
        for (int64_t k0 = 0; k0 < ceil_div(dim, bk) * bk; k0 += bk) {
          for (int64_t kk = 0; kk < bk; ++kk) {
            const int64_t k = k0 + kk;
            const double a = a_row[size_t(r)] >= 0 && k < dim ? x[size_t(a_row[size_t(r)] + k)] : 0.0;
            g += a * (g_row[size_t(n)] >= 0 && k < dim ? w[size_t(g_row[size_t(n)] + k)] : 0.0);
            u += a * (u_row[size_t(n)] >= 0 && k < dim ? w[size_t(u_row[size_t(n)] + k)] : 0.0);
          }
        }
        if (r >= tile.rows || n >= tile.cols) continue;
        const GateUpOut o = gate_up_out(tile, ffn, r, n);
        act[size_t(o.act)] = weights[size_t(sorted[size_t(tile.row0 + r)])] * silu(g) * u;
        gate_up[size_t(o.gate)] = g;
        gate_up[size_t(o.up)] = u;
      }
    }
  }
  M1_EXPECT(bad_offsets == 0, "%lld row offsets out of bounds or not -1 for a tail", (long long)bad_offsets);

  // Naive: sorted position p holds slot s = sorted[p] of token s / k on expert ids[s].
  double worst = 0;
  for (int64_t p = 0; p < slots; ++p) {
    const int64_t s = sorted[size_t(p)], tok = s / topk, e = ids[size_t(s)];
    for (int64_t c = 0; c < ffn; ++c) {
      double g = 0, u = 0;
      for (int64_t k = 0; k < dim; ++k) {
        g += x[size_t(tok * x_row_stride + k)] * w[size_t((e * 2 * ffn + c) * dim + k)];
        u += x[size_t(tok * x_row_stride + k)] * w[size_t((e * 2 * ffn + ffn + c) * dim + k)];
      }
      const double a = weights[size_t(s)] * silu(g) * u;
      const double errs[3] = {std::abs(act[size_t(p * ffn + c)] - a), std::abs(gate_up[size_t(p * 2 * ffn + c)] - g),
                              std::abs(gate_up[size_t(p * 2 * ffn + ffn + c)] - u)};
      for (double err : errs)
        if (!(err <= worst)) worst = std::isnan(err) ? std::numeric_limits<double>::infinity() : err;  // NaN: unwritten
    }
  }
  M1_EXPECT(worst < 1e-12, "emulated kernel vs naive: max error %.3e (T=%lld D=%lld F=%lld E=%lld k=%lld)", worst,
            (long long)tokens, (long long)dim, (long long)ffn, (long long)experts, (long long)topk);
}

void test_emulated_kernels() {
  // The two kernels' tilings: 64 x 64 with K steps of 32 (tensor cores) and 16 (SIMT fp32).
  for (int64_t bk : {32, 16}) {
    test_emulated_kernel(150, 72, 136, 6, 2, 72, 64, 64, bk, 1);   // row, column and K tails; empty experts
    test_emulated_kernel(100, 40, 200, 4, 3, 48, 64, 64, bk, 2);   // strided x rows
    test_emulated_kernel(1, 8, 8, 1, 1, 8, 64, 64, bk, 3);         // one row
    test_emulated_kernel(130, 64, 64, 2, 1, 64, 64, 64, bk, 4);    // all rows on expert 0: three M-tiles
  }
}

}  // namespace

int main() {
  test_schedules();
  test_from_permutation();
  test_tile_expert_search();
  test_vector_alignment();
  test_emulated_kernels();
  M1_TEST_MAIN_END();
}
