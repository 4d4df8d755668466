// Lightning attention decode on the GPU (sm_80 and later).
//
// Math (per sequence b, head h; S is the [K, V] fp32 state):
//   S <- lambda_h * S + k^T v,   o = scale * q S
// Tiling: one CTA per (b*h, tile of 32*VEC state columns); its 4 warps split
// the K rows round-robin, each lane owns VEC adjacent columns (VEC = 4: one
// 16-byte load and store of S per row per lane, a warp covers 512 B of a row).
// Each warp keeps a partial o for its rows; the partials are summed through
// shared memory. A decode step is memory-bound (K*V*8 bytes of state traffic
// for K*V*4 flops), which is why there is no tensor-core path here.
#include <stdexcept>
#include <string>

#include "common/dispatch.h"
#include "lightning/decode.h"

namespace m1::lightning {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

template <int VEC> struct Vec;
template <> struct Vec<1> { using type = float; };
template <> struct Vec<4> { using type = float4; };

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) decode_kernel(const DecodeParams p) {
  __shared__ float partial[kWarps][32 * VEC];  // 4 x 128 x 4 B = 2 KB at VEC = 4

  const int64_t bh = blockIdx.x;
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t col = (int64_t(blockIdx.y) * 32 + lane) * VEC;
  const bool active = col < p.dv;  // the launcher guarantees dv % VEC == 0

  const T* q = static_cast<const T*>(p.q) + row_offset(p.q_strides, b, h);
  const T* k = static_cast<const T*>(p.k) + row_offset(p.k_strides, b, h);
  const T* v = static_cast<const T*>(p.v) + row_offset(p.v_strides, b, h);
  float* state = static_cast<float*>(p.state) + state_offset(b, h, p.heads, p.dk, p.dv);
  const float lambda = decay_pow<float>(p.slope[h], 1);
  const float scale = float(p.scale);

  float vv[VEC], acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    vv[j] = active ? load_as<float>(v[col + j]) : 0.f;
    acc[j] = 0.f;
  }

  using V = typename Vec<VEC>::type;
  for (int64_t i = warp; i < p.dk; i += kWarps) {
    const float qi = scale * load_as<float>(q[i]);
    const float ki = load_as<float>(k[i]);
    if (!active) continue;
    V* ptr = reinterpret_cast<V*>(state + i * p.dv + col);
    V s = *ptr;
    float* sf = reinterpret_cast<float*>(&s);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      sf[j] = fmaf(lambda, sf[j], ki * vv[j]);
      acc[j] = fmaf(qi, sf[j], acc[j]);
    }
    *ptr = s;
  }

#pragma unroll
  for (int j = 0; j < VEC; ++j) partial[warp][lane * VEC + j] = acc[j];
  __syncthreads();
  if (warp == 0 && active) {
    T* o = static_cast<T*>(p.o) + bh * p.dv;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += partial[w][lane * VEC + j];
      o[col + j] = store_from<T>(sum);
    }
  }
}

template <typename T, int VEC>
void launch(const DecodeParams& p, cudaStream_t stream) {
  const dim3 grid(unsigned(p.batch * p.heads), unsigned(ceil_div(p.dv, 32 * VEC)));
  decode_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(p);
}

}  // namespace

void decode_cuda(const DecodeParams& p, cudaStream_t stream) {
  if (p.batch * p.heads == 0 || p.dv == 0) return;
  if (p.state_dtype != DType::kFloat32) throw std::invalid_argument("m1: CUDA decode state must be float32");
  const bool vec4 = p.dv % 4 == 0 && reinterpret_cast<uintptr_t>(p.state) % 16 == 0;
  M1_DISPATCH_DTYPE_NO_DOUBLE(p.in_dtype, T, {
    if (vec4) {
      launch<T, 4>(p, stream);
    } else {
      launch<T, 1>(p, stream);
    }
  });
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("m1: lightning decode launch failed: ") + cudaGetErrorString(err));
}

}  // namespace m1::lightning
