// The float32 exp of tpserve's CPU kernels (paged_decode.cpp's softmax, fused_ops.cpp's SiLU).
//
// exp(x) = 2^n * exp(r), r = x - n ln2 with |r| <= ln2/2 (ln2 in two parts, so r is exact), and
// exp(r) a degree-6 polynomial: relative error ~2e-7, float32's own. Written in plain float
// arithmetic so `omp simd` loops vectorize it (expf is a scalar library call). Each caller clamps x
// to its range and applies 2^n its own way.
#pragma once

#include <cstdint>
#include <cstring>

namespace tpserve_cpu {

// exp(r) for x's reduced argument r; n (x's nearest multiple of ln2) into n_out.
inline float exp_reduced(float x, int32_t& n_out) {
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest, vectorizable
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln2, in two parts
  float p = 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  n_out = static_cast<int32_t>(n);
  return p;
}

// 2^n as a float, for n in [-126, 127] (an exponent field of its own).
inline float pow2i(int32_t n) {
  const int32_t bits = (n + 127) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof(float));
  return f;
}

}  // namespace tpserve_cpu
