// The torch-free CPU logits-head kernels, linked from the CMake kernel library,
// against naive long-double loops on the same (rounded) inputs: log-probs,
// entropy, lse and both gradients for every input dtype, padded row strides,
// ignored targets, temperature, 1 to 3 workers (token groups, vocabulary
// splits and the backward's rounds), sizes that cross the 256-row and
// 256-column tiles; the logits op and its backward. Also the vectorised exp
// of logits_cpu_math.h against std::exp.
#include <array>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <random>
#include <vector>

#include "common/dtype.h"
#include "logits/logits.h"
#include "logits/logits_cpu_math.h"
#include "tests/check.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // see logits_cpu_math.h

using namespace m1;
using namespace m1::logits;

namespace {

using LD = long double;

void test_exp() {
  double worst = 0;
  for (int i = 0; i <= 2000000; ++i) {
    const float x = -87.3f + 87.3f * float(i) / 2000000.f;  // [-87.3, 0]: where the kernels evaluate exp
    const double want = std::exp(double(x));
    const double got = double(vec::exp1(x));
    worst = std::max(worst, std::fabs(got - want) / want);
  }
  // About 1 ulp (2^-23 = 1.2e-7) of float.
  M1_EXPECT(worst <= 2.5e-7, "exp8 relative error %.3g on [-87.3, 0]", worst);
  M1_EXPECT(vec::exp1(0.f) == 1.f, "exp(0) = 1");
  M1_EXPECT(vec::exp1(-88.f) == 0.f && vec::exp1(-1e30f) == 0.f, "exp below -87.3 is 0");
  M1_EXPECT(vec::exp1(-std::numeric_limits<float>::infinity()) == 0.f, "exp(-inf) = 0");
  M1_EXPECT(std::isnan(vec::exp1(std::nanf(""))), "exp(NaN) is NaN");
  M1_EXPECT(std::fabs(vec::exp1(1.f) / 2.718281828f - 1.f) < 3e-7f, "exp(1)");

  // chunk_stats with -inf and NaN logits, against the definitions.
  std::vector<float> z = {1.f, -std::numeric_limits<float>::infinity(), 3.f, -2.f, 0.5f, 7.f, -1.f, 2.f, 4.f, -3.f};
  const LseAcc<float> a = vec::chunk_stats(z.data(), int64_t(z.size()));
  LD s = 0, m = 7, t = 0;
  for (float v : z)
    if (std::isfinite(v)) s += std::exp(LD(v) - m), t += std::exp(LD(v) - m) * (LD(v) - m);
  M1_EXPECT(a.m == 7.f && std::fabs(a.s - double(s)) < 1e-6 && std::fabs(a.t - double(t)) < 1e-6,
            "chunk_stats with a -inf: (%g, %g, %g)", a.m, a.s, a.t);
  z[8] = std::nanf("");
  M1_EXPECT(std::isnan(lse_value(vec::chunk_stats(z.data(), int64_t(z.size())))), "chunk_stats NaN in the vector part");
  z[8] = 4.f;
  z[9] = std::nanf("");
  M1_EXPECT(std::isnan(lse_value(vec::chunk_stats(z.data(), int64_t(z.size())))), "chunk_stats NaN in the tail");
  M1_EXPECT(vec::chunk_stats(z.data(), 0).m == -std::numeric_limits<float>::infinity(), "empty chunk");
}

template <typename T>
std::vector<T> random_matrix(int64_t rows, int64_t ld, std::mt19937& rng, double scale) {
  std::normal_distribution<double> nd;
  std::vector<T> m(static_cast<size_t>(std::max<int64_t>(rows * ld, 1)));
  for (T& x : m) x = store_from<T>(scale * nd(rng));
  return m;
}

double rel_err(const std::vector<LD>& ref, const std::vector<double>& got) {
  LD num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    num += (LD(got[i]) - ref[i]) * (LD(got[i]) - ref[i]);
    den += ref[i] * ref[i];
  }
  return double(std::sqrt(num / (den > 0 ? den : 1)));
}

template <typename T>
std::vector<double> to_double(const void* p, int64_t n) {
  std::vector<double> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out[size_t(i)] = load_as<double>(static_cast<const T*>(p)[i]);
  return out;
}

// One configuration: hidden in TH, weight in TW, results in Acc (float, or
// double when both inputs are double).
template <typename TH, typename TW, typename Acc>
void run_case(DType hd, DType wd, int64_t N, int64_t D, int64_t V, double T, int workers) {
  std::mt19937 rng(uint32_t(N * 7919 + D * 31 + V + workers));
  const int64_t ldh = D + 3, ldw = D + 1;
  const std::vector<TH> hidden = random_matrix<TH>(N, ldh, rng, 1.0);
  const std::vector<TW> weight = random_matrix<TW>(V, ldw, rng, 1.0 / std::sqrt(double(std::max<int64_t>(D, 1))) * 3);
  const int64_t ignore = -100;
  std::vector<int64_t> targets(static_cast<size_t>(2 * N + 1));  // stride 2
  for (int64_t n = 0; n < N; ++n) targets[size_t(2 * n)] = (n % 5 == 3) ? ignore : int64_t(rng() % uint32_t(V));
  const DType od = std::is_same_v<Acc, double> ? DType::kFloat64 : DType::kFloat32;

  // Reference on the stored values.
  auto H = [&](int64_t n, int64_t k) { return LD(load_as<double>(hidden[size_t(n * ldh + k)])); };
  auto W = [&](int64_t v, int64_t k) { return LD(load_as<double>(weight[size_t(v * ldw + k)])); };
  const size_t n_sz = static_cast<size_t>(N);
  std::vector<LD> z(static_cast<size_t>(N * V)), lse(n_sz), ent(n_sz), lp(n_sz);
  for (int64_t n = 0; n < N; ++n) {
    LD m = -INFINITY;
    for (int64_t v = 0; v < V; ++v) {
      LD x = 0;
      for (int64_t k = 0; k < D; ++k) x += H(n, k) * W(v, k);
      z[size_t(n * V + v)] = x / LD(T);
      m = std::max(m, z[size_t(n * V + v)]);
    }
    LD s = 0;
    for (int64_t v = 0; v < V; ++v) s += std::exp(z[size_t(n * V + v)] - m);
    lse[size_t(n)] = m + std::log(s);
    LD e = 0;
    for (int64_t v = 0; v < V; ++v) {
      const LD l = z[size_t(n * V + v)] - lse[size_t(n)];
      e -= std::exp(l) * l;
    }
    const int64_t t = targets[size_t(2 * n)];
    const bool ign = t == ignore;
    ent[size_t(n)] = ign ? 0 : e;
    lp[size_t(n)] = ign ? 0 : z[size_t(n * V + t)] - lse[size_t(n)];
  }

  LogprobsFwdParams f;
  f.n = N, f.d = D, f.v = V;
  f.hidden = {hidden.data(), ldh, hd};
  f.weight = {weight.data(), ldw, wd};
  f.targets = targets.data(), f.targets_stride = 2, f.ignore_index = ignore;
  f.inv_temperature = 1.0 / T, f.out_dtype = od, f.workers = workers;
  std::vector<Acc> out_lp(n_sz, Acc(NAN)), out_ent(n_sz, Acc(NAN)), out_lse(n_sz, Acc(NAN));
  f.logprobs = out_lp.data(), f.entropy = out_ent.data(), f.lse = out_lse.data();
  logprobs_fwd_cpu(f);

  // fp32 products over D terms and the exp sums: relative 1e-5 of the
  // vectors' norms (double results: 1e-12).
  const double tol = std::is_same_v<Acc, double> ? 1e-12 : 1e-5;
  const char* name = dtype_name(hd);
  const double e_lp = rel_err(lp, to_double<Acc>(out_lp.data(), N));
  const double e_ent = rel_err(ent, to_double<Acc>(out_ent.data(), N));
  const double e_lse = rel_err(lse, to_double<Acc>(out_lse.data(), N));
  M1_EXPECT(e_lp <= tol && e_ent <= tol && e_lse <= tol,
            "fwd %s/%s N=%ld D=%ld V=%ld T=%g workers=%d: rel err logprob %.3g entropy %.3g lse %.3g", name,
            dtype_name(wd), long(N), long(D), long(V), T, workers, e_lp, e_ent, e_lse);

  // Backward with upstream gradients on all three outputs (grad_entropy expanded: stride 0).
  std::normal_distribution<double> nd;
  std::vector<Acc> g(n_sz), e1(1, Acc(nd(rng))), l(n_sz);
  for (auto& x : g) x = Acc(nd(rng));
  for (auto& x : l) x = Acc(0.3 * nd(rng));
  std::vector<LD> dx(static_cast<size_t>(N * V));
  for (int64_t n = 0; n < N; ++n) {
    const int64_t t = targets[size_t(2 * n)];
    const bool ign = t == ignore;
    for (int64_t v = 0; v < V; ++v) {
      const LD logp = z[size_t(n * V + v)] - lse[size_t(n)], p = std::exp(logp);
      LD dz = LD(l[size_t(n)]) * p;
      if (!ign) dz += LD(g[size_t(n)]) * ((v == t) - p) - LD(e1[0]) * p * (logp + ent[size_t(n)]);
      dx[size_t(n * V + v)] = dz / LD(T);
    }
  }
  std::vector<LD> dh(static_cast<size_t>(N * D), 0), dw(static_cast<size_t>(V * D), 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t v = 0; v < V; ++v)
      for (int64_t k = 0; k < D; ++k) {
        dh[size_t(n * D + k)] += dx[size_t(n * V + v)] * W(v, k);
        dw[size_t(v * D + k)] += dx[size_t(n * V + v)] * H(n, k);
      }

  LogprobsBwdParams b;
  b.n = N, b.d = D, b.v = V;
  b.hidden = f.hidden, b.weight = f.weight;
  b.targets = targets.data(), b.targets_stride = 2, b.ignore_index = ignore;
  b.inv_temperature = 1.0 / T, b.vec_dtype = od, b.workers = workers;
  b.grad_logprobs = {g.data(), 1};
  b.grad_entropy = {e1.data(), 0};
  b.grad_lse = {l.data(), 1};
  b.entropy = {out_ent.data(), 1};
  b.lse = {out_lse.data(), 1};
  std::vector<TH> gh(static_cast<size_t>(std::max<int64_t>(N * D, 1)), store_from<TH>(NAN));
  std::vector<TW> gw(static_cast<size_t>(V * D), store_from<TW>(NAN));
  b.grad_hidden = gh.data(), b.grad_weight = gw.data();
  logprobs_bwd_cpu(b);
  // One rounding to the gradient's dtype (unit roundoff 2^-8 for bf16, 2^-11
  // for fp16) on top of fp32 accumulation.
  auto grad_tol = [&](DType d) {
    return tol + (d == DType::kBFloat16 ? 0x1p-8 : d == DType::kFloat16 ? 0x1p-11 : 0.0);
  };
  const double e_dh = rel_err(dh, to_double<TH>(gh.data(), N * D));
  const double e_dw = rel_err(dw, to_double<TW>(gw.data(), V * D));
  M1_EXPECT(e_dh <= grad_tol(hd) && e_dw <= grad_tol(wd),
            "bwd %s/%s N=%ld D=%ld V=%ld T=%g workers=%d: rel err grad_hidden %.3g grad_weight %.3g", name,
            dtype_name(wd), long(N), long(D), long(V), T, workers, e_dh, e_dw);

  // Deterministic for a given worker count: a second run gives the same bits.
  std::vector<TH> gh2(gh.size());
  std::vector<TW> gw2(gw.size());
  b.grad_hidden = gh2.data(), b.grad_weight = gw2.data();
  logprobs_bwd_cpu(b);
  M1_EXPECT(std::memcmp(gh.data(), gh2.data(), size_t(N * D) * sizeof(TH)) == 0 &&
                std::memcmp(gw.data(), gw2.data(), gw.size() * sizeof(TW)) == 0,
            "bwd not deterministic N=%ld V=%ld workers=%d", long(N), long(V), workers);

  // Only one of the gradients: the other pointer is never written.
  b.grad_hidden = nullptr;
  std::fill(gw2.begin(), gw2.end(), store_from<TW>(NAN));
  logprobs_bwd_cpu(b);
  M1_EXPECT(std::memcmp(gw.data(), gw2.data(), gw.size() * sizeof(TW)) == 0, "grad_weight alone differs");

  // fp32_logits and its backward (upstream gradient G = dx, any values do).
  LogitsFwdParams lf;
  lf.n = N, lf.d = D, lf.v = V, lf.hidden = f.hidden, lf.weight = f.weight, lf.out_dtype = od, lf.workers = workers;
  std::vector<Acc> logits(static_cast<size_t>(std::max<int64_t>(N * V, 1)), Acc(NAN));
  lf.out = logits.data();
  logits_fwd_cpu(lf);
  std::vector<LD> x(static_cast<size_t>(N * V));
  for (size_t i = 0; i < x.size(); ++i) x[i] = z[i] * LD(T);
  const double e_x = rel_err(x, to_double<Acc>(logits.data(), N * V));
  M1_EXPECT(e_x <= tol, "logits %s/%s N=%ld D=%ld V=%ld: rel err %.3g", name, dtype_name(wd), long(N), long(D), long(V),
            e_x);

  const int64_t ldg = V + 2;
  std::vector<Acc> G(static_cast<size_t>(std::max<int64_t>(N * ldg, 1)));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t v = 0; v < V; ++v) G[size_t(n * ldg + v)] = Acc(dx[size_t(n * V + v)]);
  LogitsBwdParams lb;
  lb.n = N, lb.d = D, lb.v = V, lb.grad_out = {G.data(), ldg, od}, lb.hidden = f.hidden, lb.weight = f.weight;
  lb.workers = workers;
  std::fill(gh.begin(), gh.end(), store_from<TH>(NAN));
  std::fill(gw.begin(), gw.end(), store_from<TW>(NAN));
  lb.grad_hidden = gh.data(), lb.grad_weight = gw.data();
  logits_bwd_cpu(lb);
  const double e_lh = rel_err(dh, to_double<TH>(gh.data(), N * D));
  const double e_lw = rel_err(dw, to_double<TW>(gw.data(), V * D));
  M1_EXPECT(e_lh <= grad_tol(hd) && e_lw <= grad_tol(wd),
            "logits bwd %s/%s N=%ld D=%ld V=%ld: rel err grad_hidden %.3g grad_weight %.3g", name, dtype_name(wd),
            long(N), long(D), long(V), e_lh, e_lw);
}

}  // namespace

int main() {
  test_exp();
  for (auto [N, D, V, workers] : std::initializer_list<std::array<int64_t, 4>>{
           {1, 1, 1, 1}, {1, 16, 7, 3}, {5, 33, 600, 3}, {17, 64, 257, 2}, {300, 24, 300, 3}, {600, 8, 520, 1},
           {130, 40, 1000, 2}, {40, 16, 2600, 2}, {50, 8, 3500, 3}, {12, 600, 2100, 2}, {0, 8, 9, 2}}) {
    const int w = int(workers);
    run_case<float, float, float>(DType::kFloat32, DType::kFloat32, N, D, V, 1.0, w);
    run_case<float, float, float>(DType::kFloat32, DType::kFloat32, N, D, V, 0.6, w);
    run_case<bf16, bf16, float>(DType::kBFloat16, DType::kBFloat16, N, D, V, 1.0, w);
    run_case<bf16, float, float>(DType::kBFloat16, DType::kFloat32, N, D, V, 1.3, w);
    run_case<float, fp16, float>(DType::kFloat32, DType::kFloat16, N, D, V, 1.0, w);
    run_case<double, double, double>(DType::kFloat64, DType::kFloat64, N, D, V, 0.8, w);
  }
  M1_TEST_MAIN_END();
}
