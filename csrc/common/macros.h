// Portability macros shared by the CPU (g++) and CUDA (nvcc) kernel code.
//
// Kernel code in csrc/ is torch-free: it sees raw pointers, strides and sizes.
// Helpers that both devices run are marked M1_HOST_DEVICE so the CPU path (and
// the ctest unit tests) exercise exactly the index math the CUDA path uses.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define M1_HOST_DEVICE __host__ __device__
#define M1_DEVICE __device__
#else
#define M1_HOST_DEVICE
#define M1_DEVICE
#endif

#define M1_INLINE inline __attribute__((always_inline))

// Compiles the marked CPU function twice, for x86-64-v3 (AVX2 + FMA) and for the
// baseline ISA, and picks one at load time (GCC/Clang function multi-versioning).
// Loops inside such a function vectorise for AVX2 without building the whole
// extension with -march=native, so a built wheel still runs on older x86 CPUs.
// Only the function itself is cloned: keep its hot loops inside it (or in
// M1_INLINE helpers), not behind calls to out-of-line functions.
#if defined(__x86_64__) && !defined(__CUDACC__) && (defined(__GNUC__) || defined(__clang__))
#define M1_CPU_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define M1_CPU_MULTIVERSION
#endif
