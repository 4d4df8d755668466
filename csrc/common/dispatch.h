// One dtype switch for every launcher: M1_DISPATCH_DTYPE(dtype, T, ...) runs
// the body with `T` bound to the storage type of `dtype`. Launchers use it so
// each kernel is written once as a template, never copied per dtype.
#pragma once

#include <stdexcept>
#include <string>

#include "common/dtype.h"

#define M1_DTYPE_CASE(ENUM, TYPE, T, ...) \
  case ::m1::DType::ENUM: {               \
    using T = TYPE;                       \
    __VA_ARGS__;                          \
    break;                                \
  }

// All four storage types (CPU kernels).
#define M1_DISPATCH_DTYPE(DTYPE, T, ...)                                                      \
  switch (DTYPE) {                                                                            \
    M1_DTYPE_CASE(kFloat32, float, T, __VA_ARGS__)                                            \
    M1_DTYPE_CASE(kFloat64, double, T, __VA_ARGS__)                                           \
    M1_DTYPE_CASE(kBFloat16, ::m1::bf16, T, __VA_ARGS__)                                      \
    M1_DTYPE_CASE(kFloat16, ::m1::fp16, T, __VA_ARGS__)                                       \
    default:                                                                                  \
      throw std::invalid_argument(std::string("m1: unsupported dtype ") +                    \
                                  ::m1::dtype_name(DTYPE));                                   \
  }

// float32 / bfloat16 / float16 (CUDA kernels: no float64 path on the GPU).
#define M1_DISPATCH_DTYPE_NO_DOUBLE(DTYPE, T, ...)                                            \
  switch (DTYPE) {                                                                            \
    M1_DTYPE_CASE(kFloat32, float, T, __VA_ARGS__)                                            \
    M1_DTYPE_CASE(kBFloat16, ::m1::bf16, T, __VA_ARGS__)                                      \
    M1_DTYPE_CASE(kFloat16, ::m1::fp16, T, __VA_ARGS__)                                       \
    default:                                                                                  \
      throw std::invalid_argument(std::string("m1: unsupported dtype on CUDA ") +            \
                                  ::m1::dtype_name(DTYPE));                                   \
  }
