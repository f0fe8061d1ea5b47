// Per-head diagonal sums of a block of score gradients, for
// longrange/ops/shared_kv/diagonal.py (which builds and loads this file and says what is
// summed where).
#pragma GCC optimize("O3")  // the build's -O2 leaves the row adds scalar
#include <cstdint>

#include <omp.h>

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LONGRANGE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LONGRANGE_CLONES
#endif

LONGRANGE_CLONES void add_row(float* __restrict out, const float* __restrict row, int64_t keys) {
#pragma omp simd
  for (int64_t j = 0; j < keys; ++j) out[j] += row[j];
}

}  // namespace

// grad: rows ordered (position, head), row (i, h) at grad + (i * heads + h) * row_stride,
// keys entries each; entry (i, h, j) is added to out[h * out_stride + j - (first + i) + n - 1].
// A thread owns whole heads, so no two threads write the same value.
extern "C" int longrange_diagonal_sums(const float* grad, int64_t positions, int64_t heads, int64_t keys,
                                       int64_t row_stride, int64_t first, int64_t n, float* out,
                                       int64_t out_stride, int threads) {
  if (positions < 0 || heads < 0 || keys < 0 || first < 0 || first + positions > n) return 1;
#pragma omp parallel for num_threads(threads < 1 ? 1 : threads) schedule(static)
  for (int64_t h = 0; h < heads; ++h) {
    float* values = out + h * out_stride;
    for (int64_t i = 0; i < positions; ++i) {
      add_row(values + (n - 1 - first - i), grad + (i * heads + h) * row_stride, keys);
    }
  }
  return 0;
}
