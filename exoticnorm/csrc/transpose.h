// b = a^T for a row-major (n, m) array, shared by the CPU kernels (included by pit_cpu.cpp and
// whiten_cpu.cpp; exoticnorm/kernels.py hashes this header into both builds' names).
#pragma once

#include <cstdint>
#include <type_traits>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace exoticnorm {

// b = a^T for a (n, m) row-major; 8 x 8 blocks of floats in AVX2 registers (torch's strided copy of
// a 256 x 120 float transpose takes ~17 us, these ~3), the edges and doubles element by element.
template <typename T>
void transpose_into(const T* a, int64_t n, int64_t m, T* b) {
  int64_t n8 = 0, m8 = 0;
#ifdef __AVX2__
  if constexpr (std::is_same_v<T, float>) {
    n8 = n / 8 * 8;
    m8 = m / 8 * 8;
    for (int64_t i = 0; i < n8; i += 8)
      for (int64_t j = 0; j < m8; j += 8) {
        __m256 r[8], t[8];
        for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(a + (i + k) * m + j);
        for (int k = 0; k < 8; k += 2) {
          t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
          t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
        }
        for (int k = 0; k < 8; k += 4) {
          r[k] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(1, 0, 1, 0));
          r[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(3, 2, 3, 2));
          r[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(1, 0, 1, 0));
          r[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(3, 2, 3, 2));
        }
        for (int k = 0; k < 4; ++k) {
          _mm256_storeu_ps(b + (j + k) * n + i, _mm256_permute2f128_ps(r[k], r[k + 4], 0x20));
          _mm256_storeu_ps(b + (j + k + 4) * n + i, _mm256_permute2f128_ps(r[k], r[k + 4], 0x31));
        }
      }
  }
#endif
  for (int64_t i = 0; i < n; ++i)  // what the blocks left: rows below n8, and columns from m8 on
    for (int64_t j = i < n8 ? m8 : 0; j < m; ++j) b[j * n + i] = a[i * m + j];
}

}  // namespace exoticnorm
