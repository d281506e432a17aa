// tpserve::int4_gemv: y = x @ W^T for the few rows of a decode step (batch 1 up to tens) with int4 weights,
// on CPU, as int8 x int4 dot products (AVX-512 VNNI `vpdpbusd`).
//
// Why: at batch 1 a bf16 + int4 SmolLM2 token spent 3.5 of its ~6.1 ms in PyTorch's
// `_weight_int4pack_mm_for_cpu` (2026-12-06 profile, AVX-512 EPYC): ~19 GB/s over its packed codes
// and bf16 scales, where a 512 MiB sum reads 36. llama.cpp, the batch-1 peer, multiplies its 4-bit
// blocks by activations rounded to int8 per block of 32 (Q8): one `vpdpbusd` does 64 products. This
// kernel does the same on our int4 format, so the codes stream at the machine's read rate.
//
// Arithmetic. The weights are int4's (workers/quantization.py): w = (c - 8) * s + z per group of
// `group` input columns, c in 0..15. Each row of x is rounded to int8 per group, as w8a8 rounds a
// row: sx = max|x_g| / 127, q = round(x / sx). Then, per output n and group g,
//   sum_k w_nk x_k ~= sx_g * (s_ng * sum_k c_nk q_k + (z_ng - 8 s_ng) * sum_k q_k),
// the inner sum exact in int32. So y is exactly x_hat @ W^T (x_hat: x rounded per group) up to
// float32 summation order, with s and z - 8 s held in float16 (workers/quantization.py's
// `int4_gemv_pack` makes them; its Python reference is the test's oracle).
//
// Layout (`int4_gemv_pack`): blocks of 16 output rows, each a run of groups; a group is g / 8
// vectors of 64 bytes, then 16 float16 s and 16 float16 (z - 8 s). Vector j of a group holds, for
// the 16 rows r and t = 0..3, byte 4 r + t = c[r, 8 j + t] | c[r, 8 j + 4 + t] << 4: its low
// nibbles are the 4-column quad 2 j of all 16 rows, in `vpdpbusd`'s order (a 32-bit lane per row,
// four products a lane), its high nibbles quad 2 j + 1. A thread reads its blocks as one stream.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include "int8_codes.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kRows = 16;  // output rows per block: one 32-bit lane each
// Each line is prefetched this far ahead within the thread's range, as tpserve::gemv does.
constexpr int64_t kPrefetchBytes = 8192;

inline int64_t group_bytes(int64_t group) { return group * kRows / 2 + 2 * kRows * 2; }

// x [M, K] (float32 or bfloat16) -> codes q [M, K], and per (m, group): sx and sx * sum(q), rounded
// as w8a8 rounds a row (int8_codes.h).
template <typename T>
void quantize_groups(const T* x, int64_t M, int64_t K, int64_t group, int8_t* q, float* sx, float* sq) {
  const int64_t G = K / group;
  for (int64_t i = 0; i < M * G; ++i) {  // (m, g) = (i / G, i % G): groups tile each row
    int32_t sum = 0;
    sx[i] = tpserve_cpu::int8_codes(x + i * group, group, q + i * group, &sum);
    sq[i] = sx[i] * static_cast<float>(sum);
  }
}

// 16 outputs from float32 into y's dtype.
inline void store16(float* y, const float* v) { std::memcpy(y, v, 16 * sizeof(float)); }
inline void store16(c10::BFloat16* y, const float* v) {
  for (int i = 0; i < 16; ++i) y[i] = c10::BFloat16(v[i]);  // round to nearest even, as .to(bfloat16)
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool kFast = true;

inline int32_t load_quad(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// y[m, blocks b0..b1) for M rows of x (M <= 4: the rows' sums stay in registers). Lines are
// prefetched up to `end`, the end of the calling thread's range.
template <int M, typename Y>
void int4_blocks(const int8_t* q, const float* sx, const float* sq, int64_t K, int64_t group, const uint8_t* w,
                 int64_t b0, int64_t b1, const uint8_t* end, Y* y, int64_t N) {
  const int64_t G = K / group, vectors = group / 8, gb = group_bytes(group);
  const __m512i low = _mm512_set1_epi8(0x0F);
  const uint8_t* p = w + b0 * G * gb;
  for (int64_t b = b0; b < b1; ++b) {
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      // Two chains per row (low and high nibbles), so `vpdpbusd`'s latency does not serialize a group.
      __m512i d0[M], d1[M];
      for (int m = 0; m < M; ++m) d0[m] = d1[m] = _mm512_setzero_si512();
      const int8_t* qg = q + g * group;
      for (int64_t j = 0; j < vectors; ++j) {
        const uint8_t* ahead = p + kPrefetchBytes;
        if (ahead < end) _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(p);
        p += 64;
        const __m512i lo = _mm512_and_si512(v, low);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        for (int m = 0; m < M; ++m) {
          const int8_t* qm = qg + m * K + 8 * j;
          d0[m] = _mm512_dpbusd_epi32(d0[m], lo, _mm512_set1_epi32(load_quad(qm)));
          d1[m] = _mm512_dpbusd_epi32(d1[m], hi, _mm512_set1_epi32(load_quad(qm + 4)));
        }
      }
      if (p + kPrefetchBytes < end) _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes), _MM_HINT_T0);
      const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      const __m512 z = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2 * kRows)));
      p += 4 * kRows;
      for (int m = 0; m < M; ++m) {
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(d0[m], d1[m]));
        acc[m] = _mm512_fmadd_ps(dot, _mm512_mul_ps(s, _mm512_set1_ps(sx[m * G + g])), acc[m]);
        acc[m] = _mm512_fmadd_ps(z, _mm512_set1_ps(sq[m * G + g]), acc[m]);
      }
    }
    for (int m = 0; m < M; ++m) {
      alignas(64) float out[kRows];
      _mm512_store_ps(out, acc[m]);
      store16(y + m * N + b * kRows, out);
    }
  }
}
#else
constexpr bool kFast = false;

// The same arithmetic, one lane at a time: correct on any CPU, not fast (callers use the kernel
// only where `int4_gemv_fast()` says it is built with VNNI).
template <int M, typename Y>
void int4_blocks(const int8_t* q, const float* sx, const float* sq, int64_t K, int64_t group, const uint8_t* w,
                 int64_t b0, int64_t b1, const uint8_t* /*end*/, Y* y, int64_t N) {
  const int64_t G = K / group, vectors = group / 8, gb = group_bytes(group);
  for (int64_t b = b0; b < b1; ++b) {
    float acc[M][kRows] = {};
    const uint8_t* p = w + b * G * gb;
    for (int64_t g = 0; g < G; ++g, p += gb) {
      const uint8_t* scales = p + vectors * 64;
      for (int64_t r = 0; r < kRows; ++r) {
        c10::Half s, z;
        std::memcpy(&s, scales + 2 * r, 2);
        std::memcpy(&z, scales + 2 * kRows + 2 * r, 2);
        for (int m = 0; m < M; ++m) {
          const int8_t* qg = q + m * K + g * group;
          int32_t dot = 0;
          for (int64_t j = 0; j < vectors; ++j)
            for (int64_t t = 0; t < 4; ++t) {
              const uint8_t byte = p[j * 64 + 4 * r + t];
              dot += (byte & 0x0F) * qg[8 * j + t] + (byte >> 4) * qg[8 * j + 4 + t];
            }
          acc[m][r] = std::fma(static_cast<float>(dot), static_cast<float>(s) * sx[m * G + g], acc[m][r]);
          acc[m][r] = std::fma(static_cast<float>(z), sq[m * G + g], acc[m][r]);
        }
      }
    }
    for (int m = 0; m < M; ++m) store16(y + m * N + b * kRows, acc[m]);
  }
}
#endif

// Up to 4 rows of x times blocks b0..b1 (the rows' sums in registers).
template <typename Y>
void int4_rows(int64_t M, const int8_t* q, const float* sx, const float* sq, int64_t K, int64_t group,
               const uint8_t* w, int64_t b0, int64_t b1, const uint8_t* end, Y* y, int64_t N) {
  switch (M) {
    case 1: return int4_blocks<1>(q, sx, sq, K, group, w, b0, b1, end, y, N);
    case 2: return int4_blocks<2>(q, sx, sq, K, group, w, b0, b1, end, y, N);
    case 3: return int4_blocks<3>(q, sx, sq, K, group, w, b0, b1, end, y, N);
    default: return int4_blocks<4>(q, sx, sq, K, group, w, b0, b1, end, y, N);
  }
}

// x [M, K] float32 or bfloat16; packed: int4_gemv_pack's bytes, for N output rows (a multiple of
// 16, read from its size); -> y [M, N] in x's dtype. Past 4 rows (a decode step of several
// sequences) each block of 16 output rows (5.6 KiB of SmolLM2's qkv, 14 KiB of its down_proj) is
// read from memory once and multiplied into the rows 4 at a time from L1.
at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& packed, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1, "int4_gemv: x is [M, K], M >= 1");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "int4_gemv: x is float32 or bfloat16");
  TORCH_CHECK(group > 0 && group % 8 == 0 && x.size(1) % group == 0, "int4_gemv: groups of a multiple of 8 columns");
  const int64_t M = x.size(0), K = x.size(1), G = K / group, block_bytes = G * group_bytes(group);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 1 &&
                  packed.numel() > 0 && packed.numel() % block_bytes == 0,
              "int4_gemv: packed is whole blocks of ", block_bytes, " bytes (16 rows of ", K, " columns in groups of ",
              group, "), got ", packed.numel());
  const int64_t blocks = packed.numel() / block_bytes, n = blocks * kRows;
  const at::Tensor xc = x.contiguous();
  std::vector<int8_t> q(M * K);
  std::vector<float> sx(M * G), sq(M * G);
  at::Tensor y = at::empty({M, n}, x.options());
  const uint8_t* w = packed.data_ptr<uint8_t>();
  // Ranges of about 16 KiB of codes or more each, so a thread streams long runs.
  const int64_t grain = std::max<int64_t>(1, (16 << 10) / block_bytes);
  auto run = [&](auto* xp, auto* yp) {
    quantize_groups(xp, M, K, group, q.data(), sx.data(), sq.data());
    at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      const uint8_t* end = w + b1 * block_bytes;
      if (M <= 4) return int4_rows(M, q.data(), sx.data(), sq.data(), K, group, w, b0, b1, end, yp, n);
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t m0 = 0; m0 < M; m0 += 4)
          int4_rows(std::min<int64_t>(4, M - m0), q.data() + m0 * K, sx.data() + m0 * G, sq.data() + m0 * G, K, group,
                    w, b, b + 1, end, yp + m0 * n, n);
    });
  };
  if (x.scalar_type() == at::kFloat)
    run(xc.data_ptr<float>(), y.data_ptr<float>());
  else
    run(xc.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>());
  return y;
}

// The weight the bytes hold, [N, K] in `dtype` (float32 or bfloat16): codes x s + (z - 8 s), for a
// prefill chunk past the packed kernel's rows (F.linear on it). A pass of its own: through PyTorch
// ops (unpack, permute, scale) SmolLM2's gate_up took ~2.7x the time of the plain codes' dequantize.
template <typename T>
void dequantize_blocks(const uint8_t* w, int64_t K, int64_t group, int64_t b0, int64_t b1, T* out) {
  const int64_t G = K / group, vectors = group / 8, gb = group_bytes(group);
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* p = w + b * G * gb;
    for (int64_t g = 0; g < G; ++g, p += gb) {
      float s[kRows], z[kRows];
      for (int64_t r = 0; r < kRows; ++r) {
        c10::Half hs, hz;
        std::memcpy(&hs, p + vectors * 64 + 2 * r, 2);
        std::memcpy(&hz, p + vectors * 64 + 2 * kRows + 2 * r, 2);
        s[r] = static_cast<float>(hs);
        z[r] = static_cast<float>(hz);
      }
      for (int64_t r = 0; r < kRows; ++r) {
        T* row = out + (b * kRows + r) * K + g * group;
        for (int64_t j = 0; j < vectors; ++j)
          for (int64_t t = 0; t < 4; ++t) {
            const uint8_t byte = p[j * 64 + 4 * r + t];
            row[8 * j + t] = static_cast<T>(std::fma(static_cast<float>(byte & 0x0F), s[r], z[r]));
            row[8 * j + 4 + t] = static_cast<T>(std::fma(static_cast<float>(byte >> 4), s[r], z[r]));
          }
      }
    }
  }
}

at::Tensor int4_gemv_dequantize(const at::Tensor& packed, int64_t group, int64_t k, at::ScalarType dtype) {
  TORCH_CHECK(group > 0 && group % 8 == 0 && k > 0 && k % group == 0, "int4_gemv_dequantize: ", k,
              " columns in groups of ", group);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "int4_gemv_dequantize: float32 or bfloat16");
  const int64_t block_bytes = (k / group) * group_bytes(group);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 1 &&
                  packed.numel() > 0 && packed.numel() % block_bytes == 0,
              "int4_gemv_dequantize: packed is whole blocks of ", block_bytes, " bytes, got ", packed.numel());
  const int64_t blocks = packed.numel() / block_bytes;
  at::Tensor out = at::empty({blocks * kRows, k}, packed.options().dtype(dtype));
  const uint8_t* w = packed.data_ptr<uint8_t>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    if (dtype == at::kFloat)
      dequantize_blocks(w, k, group, b0, b1, out.data_ptr<float>());
    else
      dequantize_blocks(w, k, group, b0, b1, out.data_ptr<c10::BFloat16>());
  });
  return out;
}

bool int4_gemv_fast() { return kFast; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(tpserve, m) {
  m.def("int4_gemv(Tensor x, Tensor packed, int group) -> Tensor");
  m.def("int4_gemv_dequantize(Tensor packed, int group, int k, ScalarType dtype) -> Tensor");
  m.def("int4_gemv_fast() -> bool", &int4_gemv_fast);  // no tensor to dispatch on: one kernel for all
}

TORCH_LIBRARY_IMPL(tpserve, CPU, m) {
  m.impl("int4_gemv", &int4_gemv);
  m.impl("int4_gemv_dequantize", &int4_gemv_dequantize);
}
