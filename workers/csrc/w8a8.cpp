// tpserve::w8a8_linear: y = x @ W^T with int8 weights and int8 activations (W8A8, dynamic), CPU.
//
// Weights are int8's format (workers/quantization.py): codes [N, K] and a float32 scale per output
// row. Activations are quantized per row (per token) at each call, symmetric: s_m = max|x_m| / 127,
// q = round(x / s_m) in -127..127. Then y[m, n] = (q_m . codes_n) * s_m * scale_n, the dot product
// exact in int32. Why: decode at 64 sequences multiplies 64-row matrices, where bf16 weights are
// compute-bound, and PyTorch's `_int_mm` (u8s8 through oneDNN, `vpdpbusd`: four int8 products a
// lane per instruction, twice vdpbf16ps's two) ran SmolLM2's projections at 64 rows 1.7-1.9x faster
// than oneDNN's bf16 linear on its prepacked weight (2026-12-06, AVX-512 EPYC, one process).
//
// One call does the quantization, the matmul and the scaling (through PyTorch ops these were six
// calls a layer and cost more than the matmul saved). A step of a few rows (`gemv`: the caller's
// probe says where) takes tpserve::gemv on the dequantized rows instead (q * s_m in float32): the
// same products, summed in float32, with W read once.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include "int8_codes.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

template <typename T>
void quantize_rows_impl(const T* x, int64_t M, int64_t K, int8_t* q, float* scale) {
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) scale[m] = tpserve_cpu::int8_codes(x + m * K, K, q + m * K, nullptr);
  });
}

// x [M, K] float32 or bfloat16 -> (codes int8 [M, K], scales float32 [M]).
std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "quantize_rows: x is [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "quantize_rows: x is float32 or bfloat16");
  const at::Tensor xc = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor s = at::empty({M}, x.options().dtype(at::kFloat));
  if (x.scalar_type() == at::kFloat)
    quantize_rows_impl(xc.data_ptr<float>(), M, K, q.data_ptr<int8_t>(), s.data_ptr<float>());
  else
    quantize_rows_impl(xc.data_ptr<c10::BFloat16>(), M, K, q.data_ptr<int8_t>(), s.data_ptr<float>());
  return {q, s};
}

// y[m, n] = acc[m, n] * xs[m] * ws[n], in y's dtype (bf16 rounded to nearest even). Vectorized
// where the machine has AVX-512; the scalar loop (all of it elsewhere) computes the same values.
template <typename T>
void scale_out(const int32_t* acc, const float* xs, const float* ws, int64_t M, int64_t N, T* y) {
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, N));
  at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
#if defined(__AVX512F__)
      const __m512 s = _mm512_set1_ps(xs[m]);
#endif
      const int32_t* ar = acc + m * N;
      T* yr = y + m * N;
      int64_t n = 0;
#if defined(__AVX512F__)
      for (; n + 16 <= N; n += 16) {
        const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(ar + n)), s), _mm512_loadu_ps(ws + n));
        if constexpr (std::is_same_v<T, float>) {
          _mm512_storeu_ps(yr + n, v);
        } else {
          // Round to nearest even into the upper half (no NaN here: finite products of finite values).
          const __m512i b = _mm512_castps_si512(v);
          const __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                                                 _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1))));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(yr + n), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
        }
      }
#endif
      for (; n < N; ++n) yr[n] = static_cast<T>(static_cast<float>(ar[n]) * xs[m] * ws[n]);
    }
  });
}

at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, bool gemv) {
  TORCH_CHECK(x.dim() == 2 && codes.dim() == 2 && x.size(1) == codes.size(1), "w8a8_linear: x [M, K], codes [N, K]");
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.is_contiguous(), "w8a8_linear: codes are contiguous int8");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == codes.size(0) && scale.is_contiguous(),
              "w8a8_linear: one float32 scale per output row");
  const int64_t M = x.size(0), N = codes.size(0);
  auto [q, xs] = quantize_rows(x);
  if (gemv) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("tpserve::gemv", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&)>();
    const at::Tensor xq = q.to(at::kFloat).mul_(xs.unsqueeze(1));
    const at::Tensor y = op.call(xq, codes, scale);
    return y.to(x.scalar_type());
  }
  // [M, N] int32 into a buffer kept between calls (a fresh one is page-faulted in at every call);
  // codes.t() is the [K, N] view _int_mm takes. The buffer is plain memory, viewed afresh at each
  // call: a kept tensor made under inference mode (a served step) refuses writes outside it (a
  // probe or a test), and one made outside it would be a version-counted tensor inside.
  thread_local std::vector<int32_t> buffer;
  if (static_cast<int64_t>(buffer.size()) < M * N) buffer.resize(M * N);
  at::Tensor acc = at::from_blob(buffer.data(), {M, N}, x.options().dtype(at::kInt));
  at::_int_mm_out(acc, q, codes.t());
  at::Tensor y = at::empty({M, N}, x.options());
  if (x.scalar_type() == at::kFloat)
    scale_out(acc.data_ptr<int32_t>(), xs.data_ptr<float>(), scale.data_ptr<float>(), M, N, y.data_ptr<float>());
  else
    scale_out(acc.data_ptr<int32_t>(), xs.data_ptr<float>(), scale.data_ptr<float>(), M, N,
              y.data_ptr<c10::BFloat16>());
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tpserve, m) {
  m.def("quantize_rows(Tensor x) -> (Tensor, Tensor)");
  m.def("w8a8_linear(Tensor x, Tensor codes, Tensor scale, bool gemv) -> Tensor");
}

TORCH_LIBRARY_IMPL(tpserve, CPU, m) {
  m.impl("quantize_rows", &quantize_rows);
  m.impl("w8a8_linear", &w8a8_linear);
}
