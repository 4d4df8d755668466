// Prefill index helpers of lightning/lightning_common.h (shared by the CPU and
// CUDA kernels) and the torch-free CPU prefill kernels against a naive
// double-precision token recurrence: varlen with empty and length-1 segments,
// carried states, block sizes that do and do not divide the segments, strided
// (fused-qkv) inputs, every storage dtype, and the backward's gradients against
// the recurrence run backwards by hand.
#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <random>
#include <vector>

#include "common/dtype.h"
#include "lightning/lightning_common.h"
#include "lightning/prefill.h"
#include "tests/check.h"

using namespace m1;
using namespace m1::lightning;

namespace {

void test_index_helpers() {
  // Blocks of a sequence cover every token exactly once, in order, each 1..block long.
  for (int64_t len : {0, 1, 2, 63, 64, 65, 255, 256, 257, 1000}) {
    for (int64_t block : {1, 3, 64, 256, 5000}) {
      int64_t next = 0;
      for (int64_t i = 0; i < num_blocks(len, block); ++i) {
        const BlockSpan b = block_span(len, block, i);
        M1_EXPECT(b.start == next && b.len >= 1 && b.len <= block, "len=%ld block=%ld i=%ld", long(len), long(block),
                  long(i));
        next = b.start + b.len;
      }
      M1_EXPECT(next == len, "blocks of len=%ld block=%ld end at %ld", long(len), long(block), long(next));
    }
  }
  // Sequences: batch rows without cu_seqlens, packed segments with it.
  const int64_t cu[] = {0, 5, 5, 6, 20};
  M1_EXPECT(sequence_span(nullptr, 3, 17).batch == 3 && sequence_span(nullptr, 3, 17).start == 0 &&
                sequence_span(nullptr, 3, 17).len == 17,
            "sequence_span without cu_seqlens");
  int64_t covered = 0;
  for (int64_t n = 0; n < 4; ++n) {
    const SeqSpan s = sequence_span(cu, n, 20);
    M1_EXPECT(s.batch == 0 && s.start == covered && s.len == cu[n + 1] - cu[n], "segment %ld", long(n));
    covered += s.len;
  }
  M1_EXPECT(covered == 20, "segments cover T");
  // Work items enumerate (sequence, head, tile) exactly once.
  const int64_t N = 3, H = 5, tiles = 2;
  std::vector<int> seen(size_t(N * H * tiles), 0);
  for (int64_t item = 0; item < N * H * tiles; ++item) {
    const SeqHeadTile w = seq_head_tile(item, H, tiles);
    M1_EXPECT(w.seq < N && w.head < H && w.tile < tiles, "item %ld out of range", long(item));
    seen[size_t((w.seq * H + w.head) * tiles + w.tile)]++;
  }
  M1_EXPECT(std::all_of(seen.begin(), seen.end(), [](int c) { return c == 1; }), "seq_head_tile is a bijection");
  const TokenStrides st{1000, 30, 7};
  M1_EXPECT(token_offset(st, 2, 3, 4) == 2000 + 90 + 28, "token_offset");

  // Decay exponents: a key j of one block reaches a query i of the next block
  // through the state with lambda^(n-1-j) lambda^(i+1) = lambda^(token distance),
  // and within a block with lambda^(i-j); the state of two blocks back decays
  // once more by lambda^n.
  for (int64_t n : {1, 5, 64}) {
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t i = 0; i < n; ++i) {
        const int64_t distance = (n + i) - j;  // query at n + i, key at j
        M1_EXPECT(key_decay_exponent(n, j) + query_decay_exponent(i) == distance, "cross-block n=%ld", long(n));
        M1_EXPECT(key_decay_exponent(n, j) + block_decay_exponent(n) + query_decay_exponent(i) == distance + n,
                  "two blocks n=%ld", long(n));
        if (j <= i) M1_EXPECT(intra_decay_exponent(i, j) == i - j, "intra");
      }
    }
  }
  float table[258];
  fill_decay_table<float>(0.0439f, 258, table);
  for (int64_t m = 0; m < 258; ++m) M1_EXPECT(table[m] == decay_pow<float>(0.0439f, m), "decay table at %ld", long(m));
}

// The recurrence in double, forward and backward, for one problem.
struct Problem {
  int64_t T, H, K, V;
  std::vector<int64_t> cu;  // packed segments (B = 1)
  std::vector<double> q, k, v, s0, dout, dfinal;  // [T, H, K] etc. and [N, H, K, V]
  std::vector<float> slope;
  double scale = 0.7;
  int64_t N() const { return int64_t(cu.size()) - 1; }
};

struct Result {
  std::vector<double> o, final_state, dq, dk, dv, ds0;
};

Result reference(const Problem& pb) {
  const int64_t H = pb.H, K = pb.K, V = pb.V;
  Result r;
  r.o.assign(size_t(pb.T * H * V), 0);
  r.final_state.assign(pb.s0.size(), 0);
  r.dq.assign(size_t(pb.T * H * K), 0);
  r.dk = r.dq;
  r.dv.assign(size_t(pb.T * H * V), 0);
  r.ds0.assign(pb.s0.size(), 0);
  for (int64_t n = 0; n < pb.N(); ++n) {
    for (int64_t h = 0; h < H; ++h) {
      const double lam = std::exp(-double(pb.slope[size_t(h)]));
      const int64_t so = state_offset(n, h, H, K, V);
      std::vector<std::vector<double>> states;  // S_t after token t
      std::vector<double> S(pb.s0.begin() + so, pb.s0.begin() + so + K * V);
      for (int64_t t = pb.cu[size_t(n)]; t < pb.cu[size_t(n) + 1]; ++t) {
        for (int64_t a = 0; a < K; ++a)
          for (int64_t b = 0; b < V; ++b) {
            const double kv = pb.k[size_t((t * H + h) * K + a)] * pb.v[size_t((t * H + h) * V + b)];
            S[size_t(a * V + b)] = lam * S[size_t(a * V + b)] + kv;
          }
        for (int64_t b = 0; b < V; ++b) {
          double acc = 0;
          for (int64_t a = 0; a < K; ++a) acc += pb.q[size_t((t * H + h) * K + a)] * S[size_t(a * V + b)];
          r.o[size_t((t * H + h) * V + b)] = pb.scale * acc;
        }
        states.push_back(S);
      }
      std::copy(S.begin(), S.end(), r.final_state.begin() + so);
      // Backward: G = gradient into S_t, starting from d final_state.
      std::vector<double> G(pb.dfinal.begin() + so, pb.dfinal.begin() + so + K * V);
      for (int64_t t = pb.cu[size_t(n) + 1] - 1; t >= pb.cu[size_t(n)]; --t) {
        const std::vector<double>& St = states[size_t(t - pb.cu[size_t(n)])];
        for (int64_t a = 0; a < K; ++a)
          for (int64_t b = 0; b < V; ++b)
            G[size_t(a * V + b)] += pb.scale * pb.q[size_t((t * H + h) * K + a)] * pb.dout[size_t((t * H + h) * V + b)];
        for (int64_t a = 0; a < K; ++a) {
          double dq = 0, dk = 0;
          for (int64_t b = 0; b < V; ++b) {
            dq += pb.scale * pb.dout[size_t((t * H + h) * V + b)] * St[size_t(a * V + b)];
            dk += G[size_t(a * V + b)] * pb.v[size_t((t * H + h) * V + b)];
          }
          r.dq[size_t((t * H + h) * K + a)] = dq;
          r.dk[size_t((t * H + h) * K + a)] = dk;
        }
        for (int64_t b = 0; b < V; ++b) {
          double dv = 0;
          for (int64_t a = 0; a < K; ++a) dv += pb.k[size_t((t * H + h) * K + a)] * G[size_t(a * V + b)];
          r.dv[size_t((t * H + h) * V + b)] = dv;
        }
        for (double& g : G) g *= lam;
      }
      std::copy(G.begin(), G.end(), r.ds0.begin() + so);
    }
  }
  return r;
}

template <typename X>
double rel_err(const std::vector<X>& got, const std::vector<double>& want) {
  double e = 0, w = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = load_as<double>(got[i]);
    if (!std::isfinite(g)) return INFINITY;
    e += (g - want[i]) * (g - want[i]);
    w += want[i] * want[i];
  }
  return w > 0 ? std::sqrt(e / w) : std::sqrt(e);
}

// Runs the CPU kernels on `pb` with q, k, v stored as one fused [T, H, 2K + V + 1] tensor of E.
template <typename E>
void run_case(DType dtype, const Problem& pb, int64_t block, double tol) {
  const int64_t tokens = pb.T, H = pb.H, K = pb.K, V = pb.V, row = 2 * K + V + 1;
  std::vector<E> qkv(size_t(tokens * H * row)), dout(size_t(tokens * H * V));
  Problem rounded = pb;  // the reference sees the inputs after rounding to E
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < H; ++h) {
      E* r = qkv.data() + (t * H + h) * row;
      for (int64_t a = 0; a < K; ++a) {
        r[a] = store_from<E>(pb.q[size_t((t * H + h) * K + a)]);
        r[K + a] = store_from<E>(pb.k[size_t((t * H + h) * K + a)]);
        rounded.q[size_t((t * H + h) * K + a)] = load_as<double>(r[a]);
        rounded.k[size_t((t * H + h) * K + a)] = load_as<double>(r[K + a]);
      }
      for (int64_t b = 0; b < V; ++b) {
        r[2 * K + b] = store_from<E>(pb.v[size_t((t * H + h) * V + b)]);
        rounded.v[size_t((t * H + h) * V + b)] = load_as<double>(r[2 * K + b]);
        dout[size_t((t * H + h) * V + b)] = store_from<E>(pb.dout[size_t((t * H + h) * V + b)]);
        rounded.dout[size_t((t * H + h) * V + b)] = load_as<double>(dout[size_t((t * H + h) * V + b)]);
      }
    }
  std::vector<float> s0(pb.s0.begin(), pb.s0.end()), dfinal(pb.dfinal.begin(), pb.dfinal.end());
  for (size_t i = 0; i < s0.size(); ++i) rounded.s0[i] = s0[i], rounded.dfinal[i] = dfinal[i];
  const Result want = reference(rounded);

  std::vector<E> o(size_t(tokens * H * V)), dq(size_t(tokens * H * K)), dk(dq.size()), dv(o.size());
  std::vector<float> final_state(s0.size()), ds0(s0.size());
  PrefillParams p;
  p.batch = 1, p.seqlen = tokens, p.heads = H, p.dk = K, p.dv = V, p.num_seqs = pb.N(), p.block_size = block;
  p.cpu_threads = 2;
  p.q = qkv.data(), p.k = qkv.data() + K, p.v = qkv.data() + 2 * K;
  p.q_strides = p.k_strides = p.v_strides = TokenStrides{tokens * H * row, H * row, row};
  p.in_dtype = dtype, p.slope = pb.slope.data(), p.cu_seqlens = pb.cu.data(), p.initial_state = s0.data();
  p.scale = pb.scale, p.o = o.data(), p.final_state = final_state.data();
  p.grad_o = dout.data(), p.grad_o_strides = TokenStrides{tokens * H * V, H * V, V}, p.grad_final_state = dfinal.data();
  p.grad_q = dq.data(), p.grad_k = dk.data(), p.grad_v = dv.data(), p.grad_initial_state = ds0.data();
  prefill_fwd_cpu(p);
  prefill_bwd_cpu(p);

  const struct {
    const char* name;
    double err, tol;
  } checks[] = {
      {"o", rel_err(o, want.o), tol},
      {"final_state", rel_err(final_state, want.final_state), 1e-5},
      {"dq", rel_err(dq, want.dq), tol},
      {"dk", rel_err(dk, want.dk), tol},
      {"dv", rel_err(dv, want.dv), tol},
      {"d initial_state", rel_err(ds0, want.ds0), 1e-5},
  };
  for (const auto& c : checks) {
    M1_EXPECT(c.err <= c.tol, "%s %s T=%ld H=%ld K=%ld V=%ld block=%ld: rel err %.3g > %.3g", dtype_name(dtype), c.name,
              long(tokens), long(H), long(K), long(V), long(block), c.err, c.tol);
  }
}

Problem make_problem(std::vector<int64_t> lengths, int64_t H, int64_t K, int64_t V, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd;
  Problem pb;
  pb.H = H, pb.K = K, pb.V = V;
  pb.cu = {0};
  for (int64_t len : lengths) pb.cu.push_back(pb.cu.back() + len);
  pb.T = pb.cu.back();
  auto fill = [&](std::vector<double>& x, int64_t count, double sd) {
    x.resize(size_t(count));
    for (double& e : x) e = sd * nd(rng);
  };
  fill(pb.q, pb.T * H * K, 1.0);
  fill(pb.k, pb.T * H * K, 1.0 / std::sqrt(double(K)));
  fill(pb.v, pb.T * H * V, 1.0);
  fill(pb.dout, pb.T * H * V, 1.0);
  fill(pb.s0, pb.N() * H * K * V, 1.0);
  fill(pb.dfinal, pb.N() * H * K * V, 1.0);
  for (int64_t h = 0; h < H; ++h) pb.slope.push_back(float(0.02 + 0.4 * double(h)));
  return pb;
}

}  // namespace

int main() {
  test_index_helpers();
  const Problem pb = make_problem({37, 0, 1, 70, 9}, 2, 12, 20, 1);
  for (int64_t block : {1, 7, 16, 64, 200}) run_case<float>(DType::kFloat32, pb, block, 1e-5);
  run_case<double>(DType::kFloat64, pb, 16, 1e-12);
  // 16-bit inputs: every output is rounded once to its dtype (unit roundoff 2^-8, 2^-11).
  run_case<bf16>(DType::kBFloat16, pb, 16, 0.00390625 + 1e-5);
  run_case<fp16>(DType::kFloat16, pb, 16, 0.00048828125 + 1e-5);
  run_case<float>(DType::kFloat32, make_problem({130}, 1, 7, 3, 2), 64, 1e-5);  // one sequence, K != V
  M1_TEST_MAIN_END();
}
