// cpu_runtime: the parallel loop covers its range exactly once; sgemm and
// dgemm (BLAS or the portable loop, whichever this build has) match a naive
// triple loop in double (long double for dgemm) for every transpose
// combination, odd sizes and alpha/beta.
#include <array>
#include <atomic>
#include <cmath>
#include <initializer_list>
#include <random>
#include <vector>

#include "common/cpu_runtime.h"
#include "tests/check.h"

using namespace m1::cpu;

namespace {

void test_parallel_for() {
  for (int64_t n : {0, 1, 7, 1000, 100003}) {
    for (int64_t grain : {1, 16, 1 << 20}) {
      std::vector<std::atomic<int>> seen(size_t(n) + 1);
      parallel_for(0, n, grain, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) seen[size_t(i)]++;
      });
      int bad = 0;
      for (int64_t i = 0; i < n; ++i) bad += seen[size_t(i)] != 1;
      M1_EXPECT(bad == 0, "n=%ld grain=%ld: %d indices not visited exactly once", long(n), long(grain), bad);
    }
  }
}

// `unit`: relative bound per unit of sum |a_ip b_pj| (a few ulps of T).
template <typename T, typename Wide, typename Gemm>
void test_gemm(const char* name, Gemm gemm, double unit) {
  std::mt19937 rng(7);
  std::normal_distribution<T> nd;
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      for (auto [m, n, k] : std::initializer_list<std::array<int64_t, 3>>{
               {1, 1, 1}, {3, 5, 7}, {64, 33, 17}, {130, 257, 65}, {4, 0, 3}, {5, 6, 0}}) {
        const int64_t lda = (ta ? m : k) + 3, ldb = (tb ? k : n) + 1, ldc = n + 2;
        std::vector<T> a(size_t((ta ? k : m) * lda + 1)), b(size_t((tb ? n : k) * ldb + 1)),
            c(size_t(m * ldc + 1));
        for (auto* vec : {&a, &b, &c})
          for (T& x : *vec) x = nd(rng);
        std::vector<T> c0 = c;
        const T alpha = T(0.75), beta = (m + n) % 2 ? T(0) : T(-1.5);
        gemm(ta, tb, m, n, k, alpha, a.data(), lda, b.data(), ldb, beta, c.data(), ldc);
        double worst = 0;
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < n; ++j) {
            Wide acc = 0, mag = 0;
            for (int64_t p = 0; p < k; ++p) {
              const Wide x = ta ? a[p * lda + i] : a[i * lda + p];
              const Wide y = tb ? b[j * ldb + p] : b[p * ldb + j];
              acc += x * y;
              mag += x * y < 0 ? -x * y : x * y;
            }
            const Wide cij = c0[i * ldc + j];
            const Wide want = Wide(alpha) * acc + (beta == T(0) ? Wide(0) : Wide(beta) * cij);
            const Wide bound = Wide(unit) * (Wide(alpha) * mag + (beta * cij < 0 ? -beta * cij : beta * cij)) + Wide(1e-300);
            const Wide diff = Wide(c[i * ldc + j]) - want;
            worst = std::max(worst, double((diff < 0 ? -diff : diff) / bound));
          }
        M1_EXPECT(worst <= 1.0, "%s ta=%d tb=%d m=%ld n=%ld k=%ld: error %.3g x bound", name, ta, tb, long(m), long(n),
                  long(k), worst);
        // Padding columns of C (j >= n) are untouched.
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = n; j < ldc; ++j)
            M1_EXPECT(c[i * ldc + j] == c0[i * ldc + j], "%s wrote C[%ld, %ld] outside n", name, long(i), long(j));
      }
}

}  // namespace

int main() {
  test_parallel_for();
  test_gemm<float, double>("sgemm", sgemm, 1e-6);
  test_gemm<double, long double>("dgemm", dgemm, 2e-15);
  std::printf("gemm backend: %s\n", gemm_backend());
  M1_TEST_MAIN_END();
}
