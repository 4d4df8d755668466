// Minimal assertion helpers for the ctest unit tests (no test framework, so
// the kernel library builds and tests with nothing but a compiler).
#pragma once

#include <cstdio>
#include <cstdlib>

namespace m1::test {
inline int failures = 0;
}

#define M1_EXPECT(cond, ...)                                                 \
  do {                                                                       \
    if (!(cond)) {                                                           \
      if (++::m1::test::failures <= 20) {                                    \
        std::fprintf(stderr, "%s:%d: EXPECT(%s) failed: ", __FILE__, __LINE__, #cond); \
        std::fprintf(stderr, __VA_ARGS__);                                   \
        std::fprintf(stderr, "\n");                                          \
      }                                                                      \
    }                                                                        \
  } while (0)

#define M1_TEST_MAIN_END()                                                   \
  do {                                                                       \
    if (::m1::test::failures) {                                              \
      std::fprintf(stderr, "%d check(s) failed\n", ::m1::test::failures);   \
      return 1;                                                              \
    }                                                                        \
    std::printf("ok\n");                                                     \
    return 0;                                                                \
  } while (0)
