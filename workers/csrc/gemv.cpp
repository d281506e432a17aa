// tpserve::gemv: y = x @ W^T for a few rows of x (decode at batch 1 to 4) on CPU, W read once.
//
// At one row a linear layer is a matrix-vector product bound by reading W. PyTorch's paths for it
// do not reach the machine's read bandwidth on our CPUs: `_weight_int8pack_mm` (int8 codes, bf16
// x) ran SmolLM2's gate_up (3072 x 576, 1.8 MB) in 143 us on 2026-12-05's AVX-512 EPYC, 12 GB/s of
// a 55 GB/s read floor, and F.linear's fp32 GEMV was slower still. Here each thread takes a range
// of W's rows, streams them front to back, widens each weight to float32 in registers (int8:
// sign-extend and convert; bf16: a 16-bit shift) and multiplies it into every row of x at once,
// so W is read once whatever the number of rows.
//
// W: [N, K] int8 (with a float32 scale per output row: y = scale * (x @ codes^T)), float32 or
// bfloat16. x: [M, K] float32 or bfloat16, contiguous. y: [M, N] in x's dtype. Accumulation is
// float32. Written in GCC's vector types over compile-time row counts (-march=native makes them
// AVX-512 or AVX2, whichever the machine has; built by workers/cpu_kernels.py).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Sixteen floats as one value: GCC's vector extensions compile these to one AVX-512 register or
// two AVX2 ones, so the same source serves both machine draws. The accumulators live in registers
// across the whole row; the 16 lanes are summed once per output (a per-chunk `omp simd`
// reduction summed them every 64 elements and ran at a third of PyTorch's int8 kernel).
typedef float f32x16 __attribute__((vector_size(64)));
typedef int8_t i8x16 __attribute__((vector_size(16)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline f32x16 load16(const int8_t* p) {  // sign-extend, then convert (GCC scalarizes the generic form)
#if defined(__AVX512F__)
  return reinterpret_cast<f32x16>(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#elif defined(__AVX2__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
  f32x16 v;
  std::memcpy(&v, &lo, sizeof(lo));
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof(lo), &hi, sizeof(hi));
  return v;
#else
  i8x16 v;
  std::memcpy(&v, p, sizeof(v));
  return __builtin_convertvector(__builtin_convertvector(v, i32x16), f32x16);
#endif
}
inline f32x16 load16(const c10::BFloat16* p) {  // bfloat16 is the upper half of a float32
  u16x16 h;
  std::memcpy(&h, p, sizeof(h));
  const u32x16 w = __builtin_convertvector(h, u32x16) << 16;
  f32x16 v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}
inline float widen(float v) { return v; }
inline float widen(int8_t v) { return static_cast<float>(v); }
inline float widen(c10::BFloat16 v) { return static_cast<float>(v); }

inline float hsum(f32x16 v) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

// One W row at a time, front to back: a thread's reads are then one sequential stream, which the
// hardware prefetcher follows (four rows in flight ran at 0.6x the speed of one). The row's dot
// product runs on kChains independent accumulators, so an FMA's latency does not serialize it.
constexpr int kChains = 4;
// Each line of W is also prefetched 8 KiB ahead of its use, within the thread's range: float32
// GEMVs of SmolLM2's shapes at one row went from 21-23 to 23-30 GB/s (three interleaved runs,
// 2026-12-06, AVX-512 EPYC; a 512 MiB sum reads 26-29), and an fp32 batch-1 token from 26.9-27.5
// to 23.6-26.5 ms; int8 and the int4 settings' tokens did not move.
constexpr int64_t kPrefetchBytes = 8192;

// y[m, n0:n1] for M rows of x (float32, widened once by the caller).
template <typename W, int M>
void gemv_rows(const float* x, int64_t K, const W* w, const float* scale, int64_t n0, int64_t n1, float* y,
               int64_t N) {
  const int64_t K16 = K / 16 * 16, Kc = K / (16 * kChains) * (16 * kChains);
  const char* end = reinterpret_cast<const char*>(w + n1 * K);
  for (int64_t n = n0; n < n1; ++n) {
    const W* wr = w + n * K;
    f32x16 acc[kChains][M] = {};
    int64_t k = 0;
    for (; k < Kc; k += 16 * kChains) {
      const char* ahead = reinterpret_cast<const char*>(wr + k) + kPrefetchBytes;
      if (ahead < end)
        for (int64_t b = 0; b < static_cast<int64_t>(16 * kChains * sizeof(W)); b += 64)
          _mm_prefetch(ahead + b, _MM_HINT_T0);
      for (int c = 0; c < kChains; ++c) {
        const f32x16 wv = load16(wr + k + 16 * c);
        for (int m = 0; m < M; ++m) acc[c][m] += load16(x + m * K + k + 16 * c) * wv;
      }
    }
    for (; k < K16; k += 16) {
      const f32x16 wv = load16(wr + k);
      for (int m = 0; m < M; ++m) acc[0][m] += load16(x + m * K + k) * wv;
    }
    for (int m = 0; m < M; ++m) {
      f32x16 a = acc[0][m];
      for (int c = 1; c < kChains; ++c) a += acc[c][m];
      float s = hsum(a);
      for (int64_t i = K16; i < K; ++i) s += x[m * K + i] * widen(wr[i]);
      y[m * N + n] = scale ? s * scale[n] : s;
    }
  }
}

template <typename W>
void gemv_dispatch(const float* x, int64_t M, int64_t K, const W* w, const float* scale, int64_t N, float* y) {
  // Ranges of about 16 KiB of W or more each, so a thread streams long runs.
  const int64_t grain = std::max<int64_t>(1, (16 << 10) / std::max<int64_t>(1, K * sizeof(W)));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    switch (M) {
      case 1: return gemv_rows<W, 1>(x, K, w, scale, n0, n1, y, N);
      case 2: return gemv_rows<W, 2>(x, K, w, scale, n0, n1, y, N);
      case 3: return gemv_rows<W, 3>(x, K, w, scale, n0, n1, y, N);
      default: return gemv_rows<W, 4>(x, K, w, scale, n0, n1, y, N);
    }
  });
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& scale) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "gemv: x [M, K] and weight [N, K]");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 4, "gemv: 1 to 4 rows of x, got ", x.size(0));
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "gemv: x is float32 or bfloat16");
  TORCH_CHECK(weight.is_contiguous(), "gemv: the weight is contiguous");
  const bool int8 = weight.scalar_type() == at::kChar;
  TORCH_CHECK(int8 == scale.has_value(), "gemv: an int8 weight comes with its scales, a float weight without");
  TORCH_CHECK(int8 || weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
              "gemv: the weight is int8, float32 or bfloat16");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor sf;
  if (int8) {
    sf = scale->to(at::kFloat).contiguous();
    TORCH_CHECK(sf.numel() == N, "gemv: one scale per output row");
  }
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (int8) {
    gemv_dispatch(xp, M, K, weight.data_ptr<int8_t>(), sf.data_ptr<float>(), N, yp);
  } else if (weight.scalar_type() == at::kFloat) {
    gemv_dispatch(xp, M, K, weight.data_ptr<float>(), static_cast<const float*>(nullptr), N, yp);
  } else {
    gemv_dispatch(xp, M, K, weight.data_ptr<c10::BFloat16>(), static_cast<const float*>(nullptr), N, yp);
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tpserve, m) { m.def("gemv(Tensor x, Tensor weight, Tensor? scale) -> Tensor"); }

TORCH_LIBRARY_IMPL(tpserve, CPU, m) { m.impl("gemv", &gemv); }
