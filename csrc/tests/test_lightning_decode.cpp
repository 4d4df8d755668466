// The torch-free CPU decode kernel, linked from the CMake kernel library,
// against a naive double-precision loop: every storage dtype, strided q/k/v
// rows (a fused-qkv layout), several steps so the in-place state carries.
#include <array>
#include <cmath>
#include <initializer_list>
#include <random>
#include <vector>

#include "common/dtype.h"
#include "lightning/decode.h"
#include "tests/check.h"

using namespace m1;
using namespace m1::lightning;

namespace {

template <typename T>
void run_case(DType dtype, double tol, int64_t B, int64_t H, int64_t K, int64_t V) {
  std::mt19937 rng(uint32_t(B * 1000 + H * 100 + K + V));
  std::normal_distribution<double> nd;
  const int64_t row = 2 * K + V + 3;  // fused [q | k | v | pad] rows per (b, h)
  std::vector<T> qkv(size_t(B * H * row));
  std::vector<float> slope(static_cast<size_t>(H)), state(static_cast<size_t>(B * H * K * V), 0.f);
  std::vector<double> ref_state(state.size(), 0.0);
  std::vector<T> o(size_t(B * H * V));
  for (int64_t h = 0; h < H; ++h) slope[size_t(h)] = float(0.05 * (h + 1));

  DecodeParams p;
  p.batch = B, p.heads = H, p.dk = K, p.dv = V;
  p.q = qkv.data(), p.k = qkv.data() + K, p.v = qkv.data() + 2 * K;
  p.q_strides = p.k_strides = p.v_strides = RowStrides{H * row, row};
  p.in_dtype = dtype, p.slope = slope.data(), p.state = state.data(), p.o = o.data(), p.scale = 0.5;

  for (int step = 0; step < 3; ++step) {
    for (auto& x : qkv) x = store_from<T>(nd(rng));
    decode_cpu(p);
    double err2 = 0, ref2 = 0, serr2 = 0, sref2 = 0;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const T* base = qkv.data() + (b * H + h) * row;
        const double lam = std::exp(-double(slope[size_t(h)]));
        double* S = ref_state.data() + state_offset(b, h, H, K, V);
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = 0; j < V; ++j)
            S[i * V + j] = lam * S[i * V + j] + load_as<double>(base[K + i]) * load_as<double>(base[2 * K + j]);
        for (int64_t j = 0; j < V; ++j) {
          double want = 0;
          for (int64_t i = 0; i < K; ++i) want += 0.5 * load_as<double>(base[i]) * S[i * V + j];
          const double got = load_as<double>(o[size_t((b * H + h) * V + j)]);
          err2 += (got - want) * (got - want);
          ref2 += want * want;
        }
        for (int64_t e = 0; e < K * V; ++e) {
          const double d = double(state[size_t(state_offset(b, h, H, K, V) + e)]) - S[e];
          serr2 += d * d;
          sref2 += S[e] * S[e];
        }
      }
    const double rel = std::sqrt(err2 / std::max(ref2, 1e-300)), srel = std::sqrt(serr2 / std::max(sref2, 1e-300));
    M1_EXPECT(rel <= tol, "%s B=%ld H=%ld K=%ld V=%ld step %d: output rel err %.3g > %.3g", dtype_name(dtype),
              long(B), long(H), long(K), long(V), step, rel, tol);
    // The state is always float32 here: its error is fp32 rounding whatever the input dtype.
    M1_EXPECT(srel <= 1e-6, "%s step %d: state rel err %.3g", dtype_name(dtype), step, srel);
  }
}

}  // namespace

int main() {
  for (auto [B, H, K, V] :
       std::initializer_list<std::array<int64_t, 4>>{{1, 1, 1, 1}, {2, 3, 16, 24}, {1, 8, 128, 128}, {3, 2, 80, 48}}) {
    // Output tolerance: fp32 accumulation (1e-6), or one rounding of o to a
    // 16-bit format (2^-9 for bf16, 2^-12 for fp16, relative per element).
    run_case<float>(DType::kFloat32, 1e-6, B, H, K, V);
    run_case<double>(DType::kFloat64, 1e-6, B, H, K, V);  // fp32 state bounds the error
    run_case<bf16>(DType::kBFloat16, 4e-3, B, H, K, V);
    run_case<fp16>(DType::kFloat16, 5e-4, B, H, K, V);
  }
  M1_TEST_MAIN_END();
}
