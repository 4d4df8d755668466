// Host tests of logits/logits_common.h, the helpers the CPU and CUDA logits
// kernels share: the online log-sum-exp merge (any chunking, empty and -inf
// chunks, NaN), the per-row backward coefficients (against finite differences
// of the forward definitions), and the range partition.
#include <cmath>
#include <initializer_list>
#include <limits>
#include <random>
#include <vector>

#include "logits/logits_common.h"
#include "tests/check.h"

using namespace m1::logits;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Direct definitions in long double: lse = log sum e^z, entropy = -sum p log p.
void direct(const std::vector<double>& z, long double& lse, long double& entropy) {
  long double m = -kInf;
  for (double x : z) m = std::max<long double>(m, x);
  if (m == -kInf) {
    lse = -kInf;
    entropy = 0;
    return;
  }
  long double s = 0;
  for (double x : z) s += std::exp(static_cast<long double>(x) - m);
  lse = m + std::log(s);
  entropy = 0;
  for (double x : z) {
    const long double lp = static_cast<long double>(x) - lse;
    if (x != -kInf) entropy -= std::exp(lp) * lp;
  }
}

// Accumulates z in chunks of random sizes (some empty), merging the chunk
// accumulators in a random order.
template <typename Acc>
LseAcc<Acc> chunked(const std::vector<double>& z, std::mt19937& rng) {
  std::vector<LseAcc<Acc>> parts;
  std::uniform_int_distribution<int> len(0, 9);
  for (size_t i = 0; i < z.size() || parts.empty();) {
    const size_t end = std::min(z.size(), i + size_t(len(rng)));
    LseAcc<Acc> a = lse_empty<Acc>();
    for (; i < end; ++i) a = lse_push(a, Acc(z[i]));
    parts.push_back(a);
    if (z.empty()) break;
  }
  while (parts.size() > 1) {
    std::uniform_int_distribution<size_t> pick(0, parts.size() - 2);
    const size_t k = pick(rng);
    parts[k] = (rng() & 1) ? lse_merge(parts[k], parts[k + 1]) : lse_merge(parts[k + 1], parts[k]);
    parts.erase(parts.begin() + long(k) + 1);
  }
  return parts[0];
}

void test_merge() {
  std::mt19937 rng(5);
  std::normal_distribution<double> nd;
  for (int n : {1, 2, 7, 100, 1000}) {
    for (double scale : {0.1, 3.0, 40.0}) {
      for (int with_inf = 0; with_inf < 2; ++with_inf) {
        std::vector<double> z(static_cast<size_t>(n));
        for (double& x : z) x = scale * nd(rng) + 20.0;
        if (with_inf && n > 2) z[size_t(n / 2)] = -kInf, z[0] = -kInf;  // some -inf, not all
        long double lse, ent;
        direct(z, lse, ent);
        const LseAcc<double> a = chunked<double>(z, rng);
        M1_EXPECT(std::fabs(lse_value(a) - double(lse)) <= 1e-13 * (1 + std::fabs(double(lse))),
                  "double lse n=%d scale=%g: %.17g vs %.17Lg", n, scale, lse_value(a), lse);
        M1_EXPECT(std::fabs(entropy_value(a) - double(ent)) <= 1e-12 * (1 + double(ent)),
                  "double entropy n=%d scale=%g: %.17g vs %.17Lg", n, scale, entropy_value(a), ent);
        // float: rounding of the inputs and of each merge; lse to |lse| * 2^-22,
        // entropy (computed relative to the max) to 1e-5 absolute + relative.
        const LseAcc<float> f = chunked<float>(z, rng);
        M1_EXPECT(std::fabs(double(lse_value(f)) - double(lse)) <= 4e-7 * (1 + std::fabs(double(lse))),
                  "float lse n=%d scale=%g: %.9g vs %.9Lg", n, scale, double(lse_value(f)), lse);
        M1_EXPECT(std::fabs(double(entropy_value(f)) - double(ent)) <= 1e-5 * (1 + double(ent)),
                  "float entropy n=%d scale=%g: %.9g vs %.9Lg", n, scale, double(entropy_value(f)), ent);
      }
    }
  }
  // A peaked row with large logits (entropy ~5e-4): in float the entropy is
  // good to about one rounding of s (6e-8 absolute), where lse - E[z] would
  // lose everything below ulp(1000) = 6e-5.
  {
    std::vector<double> z = {1000.0, 990.0, 985.0, 1000.0 - 30.0};
    long double lse, ent;
    direct(z, lse, ent);
    const LseAcc<float> f = chunked<float>(z, rng);
    M1_EXPECT(std::fabs(double(entropy_value(f)) - double(ent)) <= 2e-7 + 1e-5 * double(ent),
              "peaked float entropy %.9g vs %.9Lg", double(entropy_value(f)), ent);
  }
  // Empty chunks and -inf-only chunks are the identity, on either side.
  const LseAcc<double> e = lse_empty<double>(), only_inf = lse_push(e, -kInf);
  const LseAcc<double> x = lse_push(lse_push(e, 1.5), -0.25);
  for (const LseAcc<double>& id : {e, only_inf}) {
    for (const LseAcc<double>& r : {lse_merge(x, id), lse_merge(id, x)}) {
      M1_EXPECT(r.m == x.m && r.s == x.s && r.t == x.t, "identity merge changed the accumulator");
    }
  }
  M1_EXPECT(lse_value(lse_merge(e, only_inf)) == -kInf, "lse of nothing is -inf");
  M1_EXPECT(only_inf.s == 0 && only_inf.m == -kInf, "a -inf logit adds no mass");
  // NaN propagates from either side and from any position.
  const double nan = std::nan("");
  M1_EXPECT(std::isnan(lse_value(lse_merge(x, lse_push(e, nan)))), "NaN right");
  M1_EXPECT(std::isnan(lse_value(lse_merge(lse_push(e, nan), x))), "NaN left");
  M1_EXPECT(std::isnan(lse_value(lse_push(lse_push(x, nan), 100.0))), "NaN then a larger max");
  M1_EXPECT(std::isnan(lse_value(lse_push(lse_push(e, nan), -kInf))), "NaN then -inf");
}

// F(x) = g logprob + e entropy + l lse with z = x / T, by definition.
double objective(const std::vector<double>& x, int64_t target, double T, double g, double e, double l) {
  std::vector<double> z(x.size());
  for (size_t j = 0; j < x.size(); ++j) z[j] = x[j] / T;
  long double lse, ent;
  direct(z, lse, ent);
  const double logprob = target >= 0 ? z[size_t(target)] - double(lse) : 0.0;
  return g * logprob + e * (target >= 0 ? double(ent) : 0.0) + l * double(lse);
}

void test_row_grad() {
  std::mt19937 rng(11);
  std::normal_distribution<double> nd;
  for (int n : {1, 2, 9, 33}) {
    for (double T : {1.0, 0.7, 2.5}) {
      for (int ignored = 0; ignored < 2; ++ignored) {
        std::vector<double> x(static_cast<size_t>(n));
        for (double& v : x) v = 2.0 * nd(rng);
        const int64_t target = ignored ? -1 : int64_t(rng() % unsigned(n));
        const double g = nd(rng), e = nd(rng), l = nd(rng);
        // Forward quantities as the kernels have them.
        LseAcc<double> a = lse_empty<double>();
        for (double v : x) a = lse_push(a, v / T);
        const RowOutputs<double> out = row_outputs(a, ignored ? 0.0 : x[size_t(std::max<int64_t>(target, 0))] / T,
                                                   bool(ignored));
        const RowGrad<double> rg = row_grad(g, e, l, out.entropy, 1.0 / T, bool(ignored));
        for (int j = 0; j < n; ++j) {
          const double logp = x[size_t(j)] / T - out.lse;
          const double analytic = dlogit(rg, std::exp(logp), logp, j == target);
          const double h = 1e-5;
          std::vector<double> xp = x, xm = x;
          xp[size_t(j)] += h;
          xm[size_t(j)] -= h;
          const double fd = (objective(xp, target, T, g, e, l) - objective(xm, target, T, g, e, l)) / (2 * h);
          M1_EXPECT(std::fabs(analytic - fd) <= 1e-7 * (1 + std::fabs(fd)),
                    "dF/dx n=%d T=%g ignored=%d j=%d: %.10g vs finite difference %.10g", n, T, ignored, j, analytic, fd);
        }
        if (!ignored) {
          M1_EXPECT(out.logprob <= 0, "logprob %.17g > 0", out.logprob);
          M1_EXPECT(out.entropy >= 0 && out.entropy <= std::log(double(n)) + 1e-12, "entropy %.17g outside [0, log V]",
                    out.entropy);
        } else {
          M1_EXPECT(out.logprob == 0 && out.entropy == 0, "an ignored row gives logprob = entropy = 0");
        }
      }
    }
  }
}

void test_partition() {
  for (int64_t n : {0, 1, 2, 7, 64, 1000}) {
    for (int64_t parts : {1, 2, 3, 7, 16, 1001}) {
      M1_EXPECT(part_begin(n, parts, 0) == 0 && part_begin(n, parts, parts) == n, "part_begin ends n=%ld parts=%ld",
                long(n), long(parts));
      for (int64_t i = 0; i < parts; ++i) {
        const int64_t size = part_begin(n, parts, i + 1) - part_begin(n, parts, i);
        M1_EXPECT(size == n / parts || size == n / parts + 1, "part size %ld for n=%ld parts=%ld", long(size), long(n),
                  long(parts));
      }
      for (int64_t k = 0; k < n; ++k) {
        const int64_t i = part_of(n, parts, k);
        M1_EXPECT(i >= 0 && i < parts && part_begin(n, parts, i) <= k && k < part_begin(n, parts, i + 1),
                  "part_of(%ld, %ld, %ld) = %ld", long(n), long(parts), long(k), long(i));
      }
    }
  }
  M1_EXPECT(ceil_div(0, 256) == 0 && ceil_div(1, 256) == 1 && ceil_div(256, 256) == 1 && ceil_div(257, 256) == 2,
            "ceil_div");
}

void test_targets() {
  M1_EXPECT(target_valid(0, 7, -100) && target_valid(6, 7, -100) && target_valid(-100, 7, -100), "valid targets");
  M1_EXPECT(!target_valid(7, 7, -100) && !target_valid(-1, 7, -100) && !target_valid(-100, 7, -1), "invalid targets");
  M1_EXPECT(target_valid(3, 7, 3), "ignore_index inside the vocabulary is still ignored, hence valid");
}

}  // namespace

int main() {
  test_merge();
  test_row_grad();
  test_partition();
  test_targets();
  M1_TEST_MAIN_END();
}
