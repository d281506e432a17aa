// tpserve's fused elementwise ops of a decoder layer on CPU: RMSNorm (with the residual add before
// it), rotary embedding, SiLU-and-multiply, the write of new keys and values into the paged cache,
// and the greedy argmax over the logits.
//
// Why: in eager PyTorch each of these is 5-15 ops (casts to float32 and back, pow, mean, rsqrt,
// chunk, neg, cat, ...), each a dispatch of 5-10 us and a pass over memory. A 64-sequence bf16
// decode step of SmolLM2 ran ~1,500 such ops around its 121 matmuls and 30 attention calls, about
// a quarter of the step (2026-12-06 profile, docs/benchmarks.md). vLLM's CPU backend has the same
// ops (its csrc/cpu: rms_norm, fused_add_rms_norm, rotary_embedding, silu_and_mul, reshape_and_cache).
//
// The arithmetic is the reference's, in its order, rounded where it rounds: float32 math, the
// result rounded to the tensor's dtype at the same points as Hugging Face's Llama (RMSNorm rounds
// the normalized row before the weight multiplies it; rotary rounds each product before the sum;
// SiLU rounds before the multiply). Only a norm's sum of squares is added in another order.
// Contraction into FMA is off in this file so the products round as the reference's do.
//
// Built by workers/cpu_kernels.py (-march=native); dtypes float32 and bfloat16, rows contiguous in
// their last dimension.
#pragma GCC optimize("fp-contract=off")

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>

#include "exp_poly.h"

namespace {

// float32 <-> the storage type, written so `omp simd` loops vectorize them (bf16 is the upper half
// of a float32; rounding to it is to nearest, ties to even, NaN kept quiet, as c10::BFloat16's).
inline float to_f(float v) { return v; }
inline float to_f(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename T>
inline T from_f(float f);
template <>
inline float from_f<float>(float f) {
  return f;
}
template <>
inline c10::BFloat16 from_f<c10::BFloat16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  c10::BFloat16 out;
  out.x = static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);
  return out;
}

// What the reference's cast to the dtype does to a float32 value: nothing, or rounding to bf16.
template <typename T>
inline float round_to(float f) {
  return to_f(from_f<T>(f));
}

// exp(x), exp_poly.h's, within ~1 ulp of expf. Past 88.7 it overflows to inf as expf does (2^n is
// applied as two halves, so n = 128 needs no exponent field of its own); below -87 it stays at
// exp(-87), where expf goes subnormal (1 + that is 1 either way).
inline float exp_clamped(float x) {
  int32_t n;
  const float p = tpserve_cpu::exp_reduced(std::min(std::max(x, -87.0f), 89.0f), n);
  const int32_t n1 = n >> 1;
  return p * tpserve_cpu::pow2i(n1) * tpserve_cpu::pow2i(n - n1);
}

// Calls f with a value of the tensor's element type (check_rows has limited it to these two).
template <typename F>
void on_dtype(at::ScalarType st, F&& f) {
  if (st == at::kFloat)
    f(float{});
  else
    f(c10::BFloat16{});
}

// Rows per task: enough elements that a thread's share is worth waking it for.
inline int64_t grain_rows(int64_t row_elems) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elems)); }

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, ": a [rows, n] tensor contiguous in its last dimension");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, name,
              ": float32 or bfloat16, got ", t.scalar_type());
}

// ---- RMSNorm --------------------------------------------------------------------------------
// y = weight * round(x * rsqrt(mean(x^2) + eps)), as Hugging Face's LlamaRMSNorm; with `residual`,
// x is first round(x + residual) and is returned too (the residual stream's next value).
template <typename T>
void rms_norm_rows(const T* x, int64_t x_stride, const T* res, int64_t res_stride, const T* w, T* sum_out,
                   T* y, int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * x_stride;
      T* yr = y + r * n;
      float ss = 0.f;
      if (res != nullptr) {
        const T* rr = res + r * res_stride;
        T* sr = sum_out + r * n;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < n; ++i) {
          const float v = round_to<T>(to_f(xr[i]) + to_f(rr[i]));
          sr[i] = from_f<T>(v);
          ss += v * v;
        }
        xr = sr;
      } else {
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < n; ++i) {
          const float v = to_f(xr[i]);
          ss += v * v;
        }
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) yr[i] = from_f<T>(to_f(w[i]) * round_to<T>(to_f(xr[i]) * inv));
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "rms_norm x");
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(1) &&
                  weight.scalar_type() == x.scalar_type(),
              "rms_norm: weight [n] contiguous, in x's dtype");
  at::Tensor y = at::empty(x.sizes(), x.options());
  on_dtype(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), nullptr, 0, weight.data_ptr<scalar_t>(), nullptr,
                            y.data_ptr<scalar_t>(), x.size(0), x.size(1), static_cast<float>(eps));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  check_rows(x, "add_rms_norm x");
  check_rows(residual, "add_rms_norm residual");
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "add_rms_norm: x and residual share shape and dtype");
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(1) &&
                  weight.scalar_type() == x.scalar_type(),
              "add_rms_norm: weight [n] contiguous, in x's dtype");
  at::Tensor sum = at::empty(x.sizes(), x.options());
  at::Tensor y = at::empty(x.sizes(), x.options());
  on_dtype(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), residual.data_ptr<scalar_t>(), residual.stride(0),
                            weight.data_ptr<scalar_t>(), sum.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.size(0),
                            x.size(1), static_cast<float>(eps));
  });
  return {sum, y};
}

// ---- rotary embedding (Hugging Face's rotate-half layout) -----------------------------------
// out[i] = x[i] * cos[i] - x[i + d/2] * sin[i], out[i + d/2] = x[i + d/2] * cos[i + d/2] + x[i] * sin[i + d/2]
// in float32, each product rounded before the sum, the result rounded to the dtype.
template <typename T>
void rotate_heads(const T* x, int64_t t_stride, int64_t h_stride, T* out, int64_t T_, int64_t H, int64_t d,
                  const float* cos, const float* sin, int64_t cs_stride) {
  const int64_t half = d / 2;
  at::parallel_for(0, T_, grain_rows(H * d), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* c = cos + t * cs_stride;
      const float* s = sin + t * cs_stride;
      for (int64_t h = 0; h < H; ++h) {
        const T* xr = x + t * t_stride + h * h_stride;
        T* o = out + (t * H + h) * d;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = to_f(xr[i]), x2 = to_f(xr[i + half]);
          const float a = x1 * c[i], b = x2 * s[i];
          const float e = x2 * c[i + half], f = x1 * s[i + half];
          o[i] = from_f<T>(a - b);
          o[i + half] = from_f<T>(e + f);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                          const at::Tensor& sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1,
              "rotary: q [T, H, D] and k [T, KVH, D], contiguous in D");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(2) % 2 == 0 &&
                  q.scalar_type() == k.scalar_type(),
              "rotary: q and k share T, an even D and their dtype");
  const int64_t T_ = q.size(0), d = q.size(2);
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.numel() == T_ * d && sin.numel() == T_ * d,
              "rotary: cos and sin float32, contiguous, T x D values");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "rotary: float32 or bfloat16, got ",
              q.scalar_type());
  at::Tensor qo = at::empty(q.sizes(), q.options());
  at::Tensor ko = at::empty(k.sizes(), k.options());
  on_dtype(q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    rotate_heads<scalar_t>(q.data_ptr<scalar_t>(), q.stride(0), q.stride(1), qo.data_ptr<scalar_t>(), T_, q.size(1), d,
                           cos.data_ptr<float>(), sin.data_ptr<float>(), d);
    rotate_heads<scalar_t>(k.data_ptr<scalar_t>(), k.stride(0), k.stride(1), ko.data_ptr<scalar_t>(), T_, k.size(1), d,
                           cos.data_ptr<float>(), sin.data_ptr<float>(), d);
  });
  return {qo, ko};
}

// ---- SiLU and multiply (SwiGLU's gate) ------------------------------------------------------
// gate_up [T, 2I] (gate, then up) -> round(round(silu(gate)) * up), silu(x) = x / (1 + exp(-x)).
template <typename T>
void silu_mul_rows(const T* gu, int64_t stride, T* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, grain_rows(inter), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* g = gu + r * stride;
      const T* u = g + inter;
      T* o = out + r * inter;
#pragma omp simd
      for (int64_t i = 0; i < inter; ++i) {
        const float x = to_f(g[i]);
        const float act = round_to<T>(x / (1.f + exp_clamped(-x)));
        o[i] = from_f<T>(act * to_f(u[i]));
      }
    }
  });
}

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "silu_and_mul gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "silu_and_mul: gate_up's last dimension is gate and up, even");
  const int64_t inter = gate_up.size(1) / 2;
  at::Tensor out = at::empty({gate_up.size(0), inter}, gate_up.options());
  on_dtype(gate_up.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    silu_mul_rows<scalar_t>(gate_up.data_ptr<scalar_t>(), gate_up.stride(0), out.data_ptr<scalar_t>(), gate_up.size(0),
                            inter);
  });
  return out;
}

// ---- greedy argmax over each row of the logits ----------------------------------------------
// torch.argmax's answer: the first index of the row's largest value, a NaN counting as largest.
// ATen's runs a scalar loop per row (2.5 ms at [64, 49152] float32 here; 5.7 ms on bf16), and the
// cast of bf16 logits to float32 before it another 0.9-2.8 ms.
template <typename T>
void argmax_rows(const T* x, int64_t stride, int64_t* out, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * stride;
      float m = -std::numeric_limits<float>::infinity();
      int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
      for (int64_t i = 0; i < n; ++i) {
        const float v = to_f(xr[i]);
        m = std::max(m, v);
        nan |= (v != v);
      }
      int64_t idx = 0;
      for (int64_t i = 0; i < n; ++i) {
        const float v = to_f(xr[i]);
        if (nan ? v != v : v == m) {
          idx = i;
          break;
        }
      }
      out[r] = idx;
    }
  });
}

at::Tensor argmax(const at::Tensor& logits) {
  check_rows(logits, "argmax logits");
  TORCH_CHECK(logits.size(1) > 0, "argmax: rows of at least one value");
  at::Tensor out = at::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  on_dtype(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    argmax_rows<scalar_t>(logits.data_ptr<scalar_t>(), logits.stride(0), out.data_ptr<int64_t>(), logits.size(0),
                          logits.size(1));
  });
  return out;
}

// ---- the step's new keys and values into their cache slots ----------------------------------
// k_cache, v_cache [num_blocks, block_size, KVH, D] (one layer), contiguous; k, v [T, KVH, D] with
// rows of any stride (v is a view of the qkv output); slots [T] (block * block_size + offset).
// Two index_copy_ calls took 23 us each at 64 rows of SmolLM2 (2026-12-06): a row is 384 bytes.
void cache_write(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slots, const at::Tensor& k,
                 const at::Tensor& v) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes(),
              "cache_write: caches [NB, bs, KVH, D], contiguous, of one shape");
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.size(1) == k_cache.size(2) && k.size(2) == k_cache.size(3) &&
                  v.sizes() == k.sizes() && k.stride(2) == 1 && v.stride(2) == 1 && k.stride(1) == k.size(2) &&
                  v.stride(1) == v.size(2),
              "cache_write: k and v [T, KVH, D], each row's heads contiguous");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type() &&
                  v_cache.scalar_type() == k_cache.scalar_type(),
              "cache_write: k, v and the caches share one dtype");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == k.size(0) && slots.scalar_type() == at::kLong &&
                  slots.is_contiguous(),
              "cache_write: slots [T] int64");
  const int64_t T_ = k.size(0), total = k_cache.size(0) * k_cache.size(1);
  const int64_t row_bytes = k.size(1) * k.size(2) * k.element_size();
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T_; ++t)
    TORCH_CHECK(sl[t] >= 0 && sl[t] < total, "cache_write: slot ", sl[t], " outside the cache's ", total);
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  const int64_t ks = k.stride(0) * k.element_size(), vs = v.stride(0) * v.element_size();
  at::parallel_for(0, T_, grain_rows(row_bytes / 2), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      std::memcpy(kc + sl[t] * row_bytes, kp + t * ks, row_bytes);
      std::memcpy(vc + sl[t] * row_bytes, vp + t * vs, row_bytes);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tpserve, m) {
  m.def("cache_write(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, Tensor k, Tensor v) -> ()");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rotary(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  m.def("argmax(Tensor logits) -> Tensor");
}

TORCH_LIBRARY_IMPL(tpserve, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rotary", &rotary);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("argmax", &argmax);
  m.impl("cache_write", &cache_write);
}
