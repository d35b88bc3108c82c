// AVX2 helpers shared by trilora's CPU kernels (compiled per function with target attributes,
// see isa.h: the extension itself is built without -march flags).

#pragma once

#include "isa.h"

#ifdef TRILORA_X86
#include <immintrin.h>

#define TRILORA_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace trilora_cpu {

// fp32 -> bf16 bits (in the low half of each 32-bit lane), rounding to nearest even on the bit
// pattern; NaN becomes the canonical quiet NaN, as c10::BFloat16 and torch's .to() do.
TRILORA_AVX2 inline __m256i bf16_bits_avx2(__m256 v) {
  const __m256i x = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(x, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  return _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC0)), nan));
}

}  // namespace trilora_cpu

#endif  // TRILORA_X86
