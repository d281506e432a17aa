// Rounding a span of float32 or bfloat16 values to int8 codes under one symmetric scale: w8a8's
// rows (w8a8.cpp) and int4_gemv's groups (int4_gemv.cpp) round the same way, here once.
//
//   s = max|x| / 127 (at least 1e-12), q = round(x / s) in -127..127, half to even,
//
// as the Python references do (torch.round(x / s): a divide, not x * (1 / s), which rounds
// differently at ties). A NaN in the span makes s NaN, so what the codes multiply comes out NaN,
// as a float matmul's would (std::max and vmaxps would otherwise skip it and round it to a code).
#pragma once

#include <c10/util/BFloat16.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace tpserve_cpu {

// One value's code under scale s. |x / s| <= 127 by construction, so the clamp never saturates a
// finite value.
inline int8_t int8_code(float x, float s) {
  return static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(x / s))));
}

#if defined(__AVX512F__)
// Sixteen elements as float32.
inline __m512 load16_ps(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16_ps(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
#endif

// x[0, n) -> codes q[0, n); returns s. `sum`, if given, receives the sum of the codes.
template <typename T>
inline float int8_codes(const T* x, int64_t n, int8_t* q, int32_t* sum) {
  int64_t n0 = 0;  // where the vector loops stop and the scalar ones go on
  float amax = 0.f;
  bool nan = false;
#if defined(__AVX512F__)
  n0 = n / 16 * 16;
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 unordered = 0;
  for (int64_t k = 0; k < n0; k += 16) {
    const __m512 v = load16_ps(x + k);
    unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
  }
  amax = _mm512_reduce_max_ps(vmax);
  nan = unordered != 0;
#endif
  for (int64_t k = n0; k < n; ++k) {
    const float v = static_cast<float>(x[k]);
    amax = std::max(amax, std::fabs(v));
    nan |= std::isnan(v);
  }
  const float s = nan ? std::nanf("") : std::max(amax / 127.f, 1e-12f);
  int32_t total = 0;
#if defined(__AVX512F__)
  const __m512 vs = _mm512_set1_ps(s);
  __m512i vsum = _mm512_setzero_si512();
  for (int64_t k = 0; k < n0; k += 16) {
    const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(load16_ps(x + k), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m128i c = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(r));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), c);
    vsum = _mm512_add_epi32(vsum, _mm512_cvtepi8_epi32(c));
  }
  total = _mm512_reduce_add_epi32(vsum);
#endif
  for (int64_t k = n0; k < n; ++k) {
    q[k] = int8_code(static_cast<float>(x[k]), s);
    total += q[k];
  }
  if (sum != nullptr) *sum = total;
  return s;
}

}  // namespace tpserve_cpu
