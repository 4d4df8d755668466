// The torch-free CPU fused-MoE kernels, linked from the CMake kernel library
// (portable GEMM loop, OpenMP), against naive double-precision loops over
// (token, choice) pairs: y and every gradient, every storage dtype, int32 and
// int64 ids, a row-strided x, experts without tokens, few-row experts (the
// direct 16-bit path) and busy ones (row blocks, several column chunks), and
// a bad id that must throw before anything is written.
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

#include "common/dtype.h"
#include "moe/moe.h"
#include "moe/moe_gemm_avx512_cpu.h"
#include "tests/check.h"

using namespace m1;
using namespace m1::moe;

namespace {

struct Problem {
  int64_t T, D, F, E, k;
  std::vector<double> x, wgu, wd, w, dy;  // exact values (already rounded to the storage dtype)
  std::vector<int64_t> ids;
};

double silu(double g) { return g / (1.0 + std::exp(-g)); }

// Naive reference: y, dx, dwgu, dwd, dw in double.
void reference(const Problem& p, std::vector<double>& y, std::vector<double>& dx, std::vector<double>& dwgu,
               std::vector<double>& dwd, std::vector<double>& dw) {
  const int64_t D = p.D, F = p.F;
  y.assign(size_t(p.T * D), 0.0);
  dx.assign(size_t(p.T * D), 0.0);
  dwgu.assign(size_t(p.E * 2 * F * D), 0.0);
  dwd.assign(size_t(p.E * D * F), 0.0);
  dw.assign(size_t(p.T * p.k), 0.0);
  std::vector<double> h(static_cast<size_t>(2 * F)), a(static_cast<size_t>(F)), dA(static_cast<size_t>(F)), dh(static_cast<size_t>(2 * F));
  for (int64_t t = 0; t < p.T; ++t)
    for (int64_t j = 0; j < p.k; ++j) {
      const int64_t e = p.ids[size_t(t * p.k + j)];
      const double wt = p.w[size_t(t * p.k + j)];
      const double* wg = p.wgu.data() + e * 2 * F * D;
      const double* wdn = p.wd.data() + e * D * F;
      for (int64_t r = 0; r < 2 * F; ++r) {
        double s = 0;
        for (int64_t d = 0; d < D; ++d) s += wg[r * D + d] * p.x[size_t(t * D + d)];
        h[size_t(r)] = s;
      }
      for (int64_t f = 0; f < F; ++f) a[size_t(f)] = silu(h[size_t(f)]) * h[size_t(F + f)];
      double dot = 0;
      for (int64_t d = 0; d < D; ++d) {
        double o = 0;
        for (int64_t f = 0; f < F; ++f) o += wdn[d * F + f] * a[size_t(f)];
        y[size_t(t * D + d)] += wt * o;
        dot += p.dy[size_t(t * D + d)] * o;
      }
      dw[size_t(t * p.k + j)] = dot;
      for (int64_t f = 0; f < F; ++f) {
        double s = 0;
        for (int64_t d = 0; d < D; ++d) s += wdn[d * F + f] * p.dy[size_t(t * D + d)];
        dA[size_t(f)] = s;
        const double g = h[size_t(f)], u = h[size_t(F + f)], sg = 1.0 / (1.0 + std::exp(-g));
        dh[size_t(f)] = wt * s * u * sg * (1.0 + g * (1.0 - sg));
        dh[size_t(F + f)] = wt * s * silu(g);
      }
      for (int64_t d = 0; d < D; ++d)
        for (int64_t f = 0; f < F; ++f) dwd[size_t(e * D * F + d * F + f)] += wt * p.dy[size_t(t * D + d)] * a[size_t(f)];
      for (int64_t r = 0; r < 2 * F; ++r)
        for (int64_t d = 0; d < D; ++d) {
          dwgu[size_t(e * 2 * F * D + r * D + d)] += dh[size_t(r)] * p.x[size_t(t * D + d)];
          dx[size_t(t * D + d)] += wg[r * D + d] * dh[size_t(r)];
        }
    }
}

template <typename T>
double rel_err(const std::vector<T>& got, const std::vector<double>& want) {
  double e2 = 0, r2 = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = load_as<double>(got[i]);
    if (!std::isfinite(g)) return INFINITY;
    e2 += (g - want[i]) * (g - want[i]);
    r2 += want[i] * want[i];
  }
  return r2 > 0 ? std::sqrt(e2 / r2) : std::sqrt(e2);
}

template <typename T>
std::vector<T> stored(const std::vector<double>& v) {
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = store_from<T>(v[i]);
  return out;
}

// Rounds p's tensors to T so that the reference sees exactly the kernel's inputs.
template <typename T>
void round_to(std::vector<double>& v) {
  for (double& x : v) x = load_as<double>(store_from<T>(x));
}

template <typename T, typename Id>
void run_case(DType dtype, double tol, Problem p, const char* what, CpuGemm path = CpuGemm::kAuto) {
  round_to<T>(p.x), round_to<T>(p.wgu), round_to<T>(p.wd), round_to<T>(p.dy);
  if (dtype != DType::kFloat64) round_to<float>(p.w);
  std::vector<double> y_ref, dx_ref, dwgu_ref, dwd_ref, dw_ref;
  reference(p, y_ref, dx_ref, dwgu_ref, dwd_ref, dw_ref);

  // x as rows of a wider buffer (row stride D + 3).
  const int64_t ld = p.D + 3;
  std::vector<T> x(static_cast<size_t>(p.T * ld), store_from<T>(1e30));
  for (int64_t t = 0; t < p.T; ++t)
    for (int64_t d = 0; d < p.D; ++d) x[size_t(t * ld + d)] = store_from<T>(p.x[size_t(t * p.D + d)]);
  const std::vector<T> wgu = stored<T>(p.wgu), wd = stored<T>(p.wd), dy = stored<T>(p.dy);
  const std::vector<double> w64 = p.w;
  const std::vector<float> w32(p.w.begin(), p.w.end());
  const std::vector<Id> ids(p.ids.begin(), p.ids.end());

  MoeInputs in;
  in.shape = {p.T, p.D, p.F, p.E, p.k};
  in.dtype = dtype;
  in.x = x.data(), in.x_row_stride = ld, in.w_gate_up = wgu.data(), in.w_down = wd.data();
  in.weight_dtype = dtype == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32;
  in.topk_weights = dtype == DType::kFloat64 ? static_cast<const void*>(w64.data()) : w32.data();
  in.topk_ids = ids.data(), in.ids_int64 = sizeof(Id) == 8;
  in.cpu_gemm = path;

  std::vector<T> y(static_cast<size_t>(p.T * p.D)), gate_up(static_cast<size_t>(p.T * p.k * 2 * p.F));
  ForwardParams fp;
  fp.in = in, fp.y = y.data(), fp.gate_up = gate_up.data();
  forward_cpu(fp);
  const double ey = rel_err(y, y_ref);
  M1_EXPECT(ey <= tol, "%s: y rel err %.3e > %.1e", what, ey, tol);

  for (const bool saved : {true, false}) {
    std::vector<T> dx(static_cast<size_t>(p.T * p.D)), dwgu(wgu.size()), dwd(wd.size());
    std::vector<double> dw64(static_cast<size_t>(p.T * p.k));
    std::vector<float> dw32(static_cast<size_t>(p.T * p.k));
    BackwardParams bp;
    bp.in = in, bp.grad_y = dy.data(), bp.grad_y_row_stride = p.D, bp.gate_up = saved ? gate_up.data() : nullptr;
    bp.grad_x = dx.data(), bp.grad_w_gate_up = dwgu.data(), bp.grad_w_down = dwd.data();
    bp.grad_topk_weights = dtype == DType::kFloat64 ? static_cast<void*>(dw64.data()) : dw32.data();
    backward_cpu(bp);
    const double edw = dtype == DType::kFloat64 ? rel_err(dw64, dw_ref) : rel_err(dw32, dw_ref);
    const double errs[] = {rel_err(dx, dx_ref), rel_err(dwgu, dwgu_ref), rel_err(dwd, dwd_ref), edw};
    const char* names[] = {"dx", "dw_gate_up", "dw_down", "dtopk_weights"};
    for (int i = 0; i < 4; ++i)
      M1_EXPECT(errs[i] <= tol, "%s (%s h): %s rel err %.3e > %.1e", what, saved ? "saved" : "recomputed", names[i],
                errs[i], tol);
  }
}

Problem make_problem(int64_t T, int64_t D, int64_t F, int64_t E, int64_t k, uint32_t seed, bool even_only = false,
                     int64_t one_expert = -1) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd;
  std::uniform_real_distribution<double> ud(0.05, 1.0);
  Problem p{T, D, F, E, k, {}, {}, {}, {}, {}, {}};
  auto fill = [&](std::vector<double>& v, int64_t n, double scale) {
    v.resize(size_t(n));
    for (double& x : v) x = scale * nd(rng);
  };
  fill(p.x, T * D, 1.0);
  fill(p.wgu, E * 2 * F * D, 1.0 / std::sqrt(double(D)));
  fill(p.wd, E * D * F, 1.0 / std::sqrt(double(F)));
  fill(p.dy, T * D, 1.0);
  p.w.resize(size_t(T * k));
  p.ids.resize(size_t(T * k));
  std::uniform_int_distribution<int64_t> pick(0, E - 1);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      int64_t e = pick(rng);
      if (even_only) e = (e / 2) * 2;
      if (one_expert >= 0) e = one_expert;
      p.ids[size_t(t * k + j)] = e;
      p.w[size_t(t * k + j)] = ud(rng);
    }
  return p;
}

template <typename Id>
void suite() {
  // fp32: products of length <= 300 in fp32 (~1e-6); 16-bit: one rounding of
  // every output and of the saved pre-activations (see tests/test_moe.py).
  const Problem small = make_problem(37, 24, 20, 5, 2, 1);
  const Problem busy = make_problem(300, 136, 150, 2, 2, 2);       // 300 rows per expert, 2 FFN chunks, 2 dx chunks
  const Problem sparse = make_problem(20, 16, 12, 6, 3, 3, true);  // odd experts get nothing
  const Problem single = make_problem(9, 8, 8, 4, 1, 4, false, 2); // every token on expert 2
  for (const Problem* p : {&small, &busy, &sparse, &single}) {
    run_case<float, Id>(DType::kFloat32, 1e-5, *p, "float32");
    run_case<float, Id>(DType::kFloat32, 1e-5, *p, "float32 fp32 tiles", CpuGemm::kFp32Tiles);
    run_case<double, Id>(DType::kFloat64, 1e-12, *p, "float64");
    // bf16 on both GEMM paths (the AVX512-BF16 one when this CPU has it; it also
    // rounds the activations feeding the down GEMM to bf16: same budget).
    run_case<bf16, Id>(DType::kBFloat16, 4 * 0.001953125, *p, "bfloat16");
    run_case<bf16, Id>(DType::kBFloat16, 4 * 0.001953125, *p, "bfloat16 fp32 tiles", CpuGemm::kFp32Tiles);
    run_case<fp16, Id>(DType::kFloat16, 4 * 0.000244140625, *p, "float16");
  }
}

// gemm_nt_f32 / gemm_nt_bf16 against double sums, on tile edges and k tails,
// when the CPU has AVX-512 / AVX512-BF16.
void avx512_gemms() {
  if (!avx512::cpu_has()) {
    std::printf("AVX-512 not available: gemm_nt_f32 and gemm_nt_bf16 not tested on this CPU\n");
    return;
  }
  std::mt19937 rng(9);
  std::normal_distribution<float> nd;
  // m from 64 takes the packed outer-product kernel: 14-row micro-tiles (79 = 5 x 14 + 9), 32-row
  // panels of B, depth blocks of 256 (k = 600: two full blocks and a tail).
  for (int64_t m : {1, 3, 4, 5, 50, 64, 79}) {
    for (int64_t n : {1, 4, 7, 31, 33, 65}) {
      for (int64_t k : {0, 1, 15, 16, 17, 100, 256, 600}) {
        const int64_t lda = k + 5, ldb = k + 3, ldc = n + 2;
        std::vector<float> a(static_cast<size_t>(m * lda)), b(static_cast<size_t>(n * ldb));
        for (float& v : a) v = nd(rng);
        for (float& v : b) v = nd(rng);
        std::vector<float> c(static_cast<size_t>(m * ldc), 12345.f);
        gemm_nt_f32(m, n, k, a.data(), lda, b.data(), ldb, c.data(), ldc);
        // fp32 summation: |error| <= k 2^-24 sum_q |a b| per element (the standard bound).
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t j = 0; j < n; ++j) {
            double want = 0, mag = 0;
            for (int64_t q = 0; q < k; ++q) {
              want += double(a[size_t(i * lda + q)]) * b[size_t(j * ldb + q)];
              mag += std::fabs(double(a[size_t(i * lda + q)]) * b[size_t(j * ldb + q)]);
            }
            const double got = c[size_t(i * ldc + j)];
            M1_EXPECT(std::fabs(got - want) <= double(k) * 5.96e-8 * mag, "gemm_nt_f32 m=%ld n=%ld k=%ld: %g vs %g",
                      long(m), long(n), long(k), got, want);
          }
          for (int64_t j = n; j < ldc; ++j) M1_EXPECT(c[size_t(i * ldc + j)] == 12345.f, "f32: wrote past n");
        }
      }
    }
  }
  if (!avx512::cpu_has_bf16()) {
    std::printf("AVX512-BF16 not available: gemm_nt_bf16 not tested on this CPU\n");
    return;
  }
  // m from 128: the packed kernel on bf16 pairs (k = 513, 1100: depth blocks of 512 values and odd
  // tails, whose last value has no partner). Row padding is NaN: reading past k poisons the result.
  for (int64_t m : {1, 3, 4, 5, 50, 128, 143}) {
    for (int64_t n : {1, 4, 7, 31, 33, 65}) {
      for (int64_t k : {0, 1, 31, 32, 33, 100, 513, 1100}) {
        const int64_t lda = k + 5, ldb = k + 3, ldc = n + 2;
        std::vector<bf16> a(static_cast<size_t>(m * lda)), b(static_cast<size_t>(n * ldb));
        for (size_t q = 0; q < a.size(); ++q)
          a[q] = float_to_bf16(int64_t(q) % lda < k ? nd(rng) : std::numeric_limits<float>::quiet_NaN());
        for (size_t q = 0; q < b.size(); ++q)
          b[q] = float_to_bf16(int64_t(q) % ldb < k ? nd(rng) : std::numeric_limits<float>::quiet_NaN());
        std::vector<float> c(static_cast<size_t>(m * ldc), 12345.f);
        gemm_nt_bf16(m, n, k, a.data(), lda, b.data(), ldb, c.data(), ldc);
        // bf16 products are exact in fp32; the sums round: the same bound as fp32.
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t j = 0; j < n; ++j) {
            double want = 0, mag = 0;
            for (int64_t q = 0; q < k; ++q) {
              const double pq = double(bf16_to_float(a[size_t(i * lda + q)])) * bf16_to_float(b[size_t(j * ldb + q)]);
              want += pq;
              mag += std::fabs(pq);
            }
            const double got = c[size_t(i * ldc + j)];
            M1_EXPECT(std::fabs(got - want) <= double(k) * 5.96e-8 * mag, "gemm_nt_bf16 m=%ld n=%ld k=%ld: %g vs %g",
                      long(m), long(n), long(k), got, want);
          }
          for (int64_t j = n; j < ldc; ++j) M1_EXPECT(c[size_t(i * ldc + j)] == 12345.f, "wrote past n");
        }
      }
    }
  }
}

void bad_id_throws() {
  Problem p = make_problem(5, 8, 8, 3, 2, 5);
  std::vector<float> x(40, 1.f), wgu(3 * 16 * 8, 1.f), wd(3 * 8 * 8, 1.f), w(10, 0.5f), y(40, 7.f);
  std::vector<int64_t> ids(p.ids);
  ids[7] = 3;  // E = 3
  ForwardParams fp;
  fp.in.shape = {5, 8, 8, 3, 2};
  fp.in.x = x.data(), fp.in.x_row_stride = 8, fp.in.w_gate_up = wgu.data(), fp.in.w_down = wd.data();
  fp.in.topk_weights = w.data(), fp.in.topk_ids = ids.data(), fp.y = y.data();
  bool threw = false;
  try {
    forward_cpu(fp);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  M1_EXPECT(threw, "an id outside [0, E) must throw");
  for (float v : y) M1_EXPECT(v == 7.f, "y written before the id check");
}

}  // namespace

int main() {
  suite<int64_t>();
  suite<int32_t>();
  avx512_gemms();
  bad_id_throws();
  M1_TEST_MAIN_END();
}
