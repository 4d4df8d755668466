// Element types of kernel inputs, torch-free, with host/device conversions.
//
// The glue maps at::ScalarType to m1::DType; kernels see storage types only:
// float, double (CPU), m1::bf16 and m1::fp16 (16-bit payloads). Arithmetic is
// always done after load_as<float>() (or double), so the conversions below are
// the only place where 16-bit formats are interpreted. They are exact for
// widening and round to nearest even for narrowing, matching torch's casts.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/macros.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace m1 {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

M1_HOST_DEVICE constexpr const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
  }
  return "unknown";
}

struct alignas(2) bf16 { uint16_t bits; };
struct alignas(2) fp16 { uint16_t bits; };

M1_HOST_DEVICE M1_INLINE float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

M1_HOST_DEVICE M1_INLINE uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

// bfloat16 is the top half of a float32: widening is a shift.
M1_HOST_DEVICE M1_INLINE float bf16_to_float(bf16 h) { return bits_to_float(uint32_t(h.bits) << 16); }

// Round to nearest, ties to even; NaN stays a (quiet) NaN.
M1_HOST_DEVICE M1_INLINE bf16 float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x0040u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(u >> 16)};
}

// IEEE binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits.
M1_HOST_DEVICE M1_INLINE float fp16_to_float(fp16 h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h.bits));
#else
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu;
  const uint32_t man = h.bits & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  // Zero or subnormal: man * 2^-24, exact in float32.
  const float mag = float(man) * 5.9604644775390625e-08f;
  return sign ? -mag : mag;
#endif
}

M1_HOST_DEVICE M1_INLINE fp16 float_to_fp16(float f) {
#if defined(__CUDA_ARCH__)
  return fp16{__half_as_ushort(__float2half_rn(f))};
#else
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return fp16{uint16_t(sign | 0x7e00u)};  // NaN
  if (abs >= 0x477ff000u) return fp16{uint16_t(sign | 0x7c00u)};  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {
    // Result is subnormal (or zero): round |f| / 2^-24 to an integer, ties to even.
    // Adding 0.5 (as a float whose ulp is 1 in that position) rounds in hardware.
    const float scaled = bits_to_float(abs) * 16777216.0f;  // exact: power-of-two scale
    const float rounded = (scaled + 8388608.0f) - 8388608.0f;  // RNE to integer for < 2^23
    return fp16{uint16_t(sign | uint16_t(rounded))};
  }
  // Normal: rebias the exponent, round the 13 dropped mantissa bits to nearest even.
  uint32_t v = abs - 0x38000000u;  // exponent bias 127 -> 15
  v += 0xfffu + ((v >> 13) & 1u);
  return fp16{uint16_t(sign | uint16_t(v >> 13))};
#endif
}

// load_as<Acc>(p[i]) / store_from<T>(x): the only loads and stores kernels use.
template <typename Acc> M1_HOST_DEVICE M1_INLINE Acc load_as(float x) { return Acc(x); }
template <typename Acc> M1_HOST_DEVICE M1_INLINE Acc load_as(double x) { return Acc(x); }
template <typename Acc> M1_HOST_DEVICE M1_INLINE Acc load_as(bf16 x) { return Acc(bf16_to_float(x)); }
template <typename Acc> M1_HOST_DEVICE M1_INLINE Acc load_as(fp16 x) { return Acc(fp16_to_float(x)); }

template <typename T> struct Store;
template <> struct Store<float> {
  template <typename Acc> M1_HOST_DEVICE static M1_INLINE float from(Acc x) { return float(x); }
};
template <> struct Store<double> {
  template <typename Acc> M1_HOST_DEVICE static M1_INLINE double from(Acc x) { return double(x); }
};
template <> struct Store<bf16> {
  template <typename Acc> M1_HOST_DEVICE static M1_INLINE bf16 from(Acc x) { return float_to_bf16(float(x)); }
};
template <> struct Store<fp16> {
  template <typename Acc> M1_HOST_DEVICE static M1_INLINE fp16 from(Acc x) { return float_to_fp16(float(x)); }
};
template <typename T, typename Acc> M1_HOST_DEVICE M1_INLINE T store_from(Acc x) { return Store<T>::from(x); }

// Accumulator type of a storage type: float for every type except double.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

}  // namespace m1
