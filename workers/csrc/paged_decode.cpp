// tpserve::paged_decode: decode attention read in place from the paged KV cache (CPU).
//
// One new token per sequence attends over its whole past. The gather path copies every
// sequence's blocks into a padded batch before SDPA, each layer, each step; this reads each
// block where it lies, through the block table, and reads K and V once per (sequence, KV head)
// for that head's whole query group (GQA), so its memory traffic is the K/V the step needs.
//
// Layouts (workers/paged_cache.py): q, out [T, H, D] (the step's tokens; `rows` names the
// decoding ones); k_cache, v_cache [num_blocks, block_size, KVH, D] (one layer); block_tables
// [B, W] (padded past each sequence's blocks); seq_lens [B] (tokens including the new one);
// kv_index [H] (each query head's KV head). window > 0: keys at positions [len - window, len).
//
// How it stays on the vector units (the first version's scalar exp and per-head element
// conversions lost to SDPA at 64 sequences on an AVX2 EPYC, 2026-12-04):
// - every loop over the head dimension has a compile-time trip count (D = 64 or 128; other
//   sizes take the generic instance), so -march=native unrolls it into whole vector registers;
// - a key or value row is widened to float32 once (bf16 is a 16-bit shift) and then serves every
//   query head of its group;
// - scores for a block of keys are kept per head in a row, exponentiated by a branch-free
//   polynomial the compiler vectorizes (expf is a scalar library call), and each head's output
//   accumulates in float32 over the values of one block at a time.
// Softmax is exact (max-subtracted over the whole row, as SDPA's math path), not online.
// Where the CPU has AVX512_BF16, bf16 caches take `vdpbf16ps` on both sides: query times key rows
// as they lie in the cache, and probabilities (rounded to bf16) times pairs of value rows.
//
// Built by workers/cpu_kernels.py on the machine that runs it (-march=native), loaded into
// the process that imported torch, so at::parallel_for runs on torch's own OpenMP threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include "exp_poly.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// Widen one row of D elements to float32.
template <typename T, int D>
inline void widen(const T* src, float* dst, int64_t d_runtime) {
  const int64_t n = D > 0 ? D : d_runtime;
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    uint32_t* o = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) o[d] = static_cast<uint32_t>(s[d]) << 16;
  } else {
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d]);
  }
}

// exp(x) for x <= 0 (max-subtracted scores), exp_poly.h's; below -87 it is exp(-87) ~ 1.6e-38,
// where expf's result is subnormal or 0 (a probability that small vanishes in the sum either way).
inline float exp_nonpositive(float x) {
  int32_t n;
  const float p = tpserve_cpu::exp_reduced(std::max(x, -87.0f), n);
  return p * tpserve_cpu::pow2i(n);
}

#if defined(__AVX512F__)
// The AVX-512 score path: 16 keys at a time, each key's dot product with a query head kept as a
// vector of partial sums, then the 16 vectors folded into one vector of 16 scores by shuffles
// (46 instructions for 16 scores; a horizontal sum per score costs about 8). Taken for float32
// and bfloat16 with D a multiple of 16; everything else takes the portable loops.
template <typename T>
constexpr bool kVectorScores = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;

template <typename T>
inline __m512 load16(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else {  // bfloat16: the upper half of a float32
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// out[t] = sum of v[t]'s 16 lanes.
inline __m512 fold16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // 128-bit lanes 0+2, 1+3: v[2i] in the low half, v[2i+1] in the high
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // then lanes 0+1: 128-bit lane L of b[i] holds token 4i + L
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_ps(_mm512_unpacklo_ps(b[2 * i], b[2 * i + 1]), _mm512_unpackhi_ps(b[2 * i], b[2 * i + 1]));
  const __m512 d = _mm512_add_ps(
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(c[0]), _mm512_castps_pd(c[1]))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(c[0]), _mm512_castps_pd(c[1]))));
  // Element e of 128-bit lane L is token 4e + L.
  const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(idx, d);
}
#else
template <typename T>
constexpr bool kVectorScores = false;
#endif

#if defined(__AVX512BF16__)
template <typename T, int D>
constexpr bool kPairedValues = std::is_same_v<T, c10::BFloat16> && D > 0 && D % 32 == 0;

// The paired-values accumulator of one head back in dimension order. Per slice of 32 dimensions
// it holds the low unpack's 16 sums, then the high one's; in 128-bit lane L, the low unpack took
// dimensions 8L..8L+3 of the slice and the high one 8L+4..8L+7.
template <int D>
inline void unpermute(float* a) {
  float tmp[32];
  for (int c = 0; c < D / 32; ++c) {
    float* s = a + 32 * c;
    for (int L = 0; L < 4; ++L)
      for (int k = 0; k < 4; ++k) {
        tmp[8 * L + k] = s[4 * L + k];
        tmp[8 * L + 4 + k] = s[16 + 4 * L + k];
      }
    std::memcpy(s, tmp, sizeof(tmp));
  }
}
#endif

// Tokens ahead of the one being read whose rows are prefetched: blocks lie anywhere in the cache,
// so the hardware prefetcher loses the stream at every block boundary.
constexpr int64_t kPrefetchAhead = 4;

template <typename T, int D>
void paged_decode_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& rows,
                         const at::Tensor& kv_index, double scale, int64_t window, at::Tensor& out) {
  const int64_t B = block_tables.size(0), W = block_tables.size(1);
  const int64_t H = q.size(1);
  const int64_t d_rt = q.size(2);
  const int64_t Dn = D > 0 ? D : d_rt;
  const int64_t bs = k_cache.size(1), KVH = k_cache.size(2);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* rowp = rows.data_ptr<int64_t>();
  const int64_t* kvi = kv_index.data_ptr<int64_t>();
  const int64_t slot = KVH * Dn;  // elements between two token positions in a block
  const int64_t row_bytes = slot * static_cast<int64_t>(sizeof(T));
  const float sc = static_cast<float>(scale);

  // Query heads in KV-head order, so each KV head's group is a run: order[start[g] .. start[g+1]).
  std::vector<int64_t> order, start(KVH + 1, 0);
  for (int64_t g = 0; g < KVH; ++g) {
    start[g] = static_cast<int64_t>(order.size());
    for (int64_t h = 0; h < H; ++h)
      if (kvi[h] == g) order.push_back(h);
  }
  start[KVH] = static_cast<int64_t>(order.size());
  const int64_t Hq = start[KVH];

  // A task is one sequence, all its heads: a block is then read front to back (bs x KVH x D
  // contiguous). With fewer sequences than threads (batch 1) a sequence's KV heads are cut into
  // as many tasks as fill the threads. Tasks go to threads longest first, each to the least loaded
  // (the step's lengths differ several-fold; parallel_for's contiguous ranges left one thread idle).
  struct Task {
    int64_t b, g0, g1;
  };
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t parts = B >= threads ? 1 : std::min<int64_t>(KVH, (threads + B - 1) / B);
  std::vector<Task> tasks;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < parts; ++i) tasks.push_back({b, KVH * i / parts, KVH * (i + 1) / parts});
  std::sort(tasks.begin(), tasks.end(), [&](const Task& a, const Task& c) {
    return lens[a.b] * (a.g1 - a.g0) > lens[c.b] * (c.g1 - c.g0);
  });
  const int64_t nthreads = std::min<int64_t>(threads, static_cast<int64_t>(tasks.size()));
  std::vector<std::vector<Task>> assigned(std::max<int64_t>(1, nthreads));
  std::vector<int64_t> load(assigned.size(), 0);
  for (const Task& task : tasks) {
    const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
    assigned[t].push_back(task);
    load[t] += lens[task.b] * (task.g1 - task.g0);
  }

  auto row_of = [&](const int64_t* table, int64_t p) { return (table[p / bs] * bs + p % bs) * slot; };
  // Rows [p, p + count) of one block (all KV heads), fetched ahead of their use.
  auto prefetch = [&](const T* cache, const int64_t* table, int64_t p, int64_t count) {
    const char* ahead = reinterpret_cast<const char*>(cache + row_of(table, p));
    for (int64_t off = 0; off < count * row_bytes; off += 64) __builtin_prefetch(ahead + off);
  };

  at::parallel_for(0, nthreads, 1, [&](int64_t tbegin, int64_t tend) {
    std::vector<float> qf(Hq * Dn), scores, acc(Hq * Dn), row(Dn);
    // A key or value row of one KV head as float32: in place, or widened into `buf`.
    auto as_float = [&](const T* src, float* buf) -> const float* {
      if constexpr (std::is_same_v<T, float>) {
        return src;
      } else {
        widen<T, D>(src, buf, d_rt);
        return buf;
      }
    };
    for (int64_t t = tbegin; t < tend; ++t) {
      for (const Task& task : assigned[t]) {
        const int64_t b = task.b, g0 = task.g0, g1 = task.g1;
        const int64_t j0 = start[g0], j1 = start[g1];  // this task's query heads
        const int64_t n = lens[b];
        const int64_t lo = window > 0 ? std::max<int64_t>(0, n - window) : 0;
        const int64_t len = n - lo;
        const int64_t* table = tables + b * W;
        const T* qrow = qp + rowp[b] * H * Dn;
        scores.resize(Hq * len);
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = j0; j < j1; ++j) {
          float* qj = qf.data() + j * Dn;
          widen<T, D>(qrow + order[j] * Dn, qj, d_rt);
#pragma omp simd
          for (int64_t d = 0; d < Dn; ++d) qj[d] *= sc;
        }

        // Scores: each key row widened once, against every query head of its group.
#if defined(__AVX512BF16__)
        if constexpr (std::is_same_v<T, c10::BFloat16> && D > 0 && D % 32 == 0) {
          // Where the CPU has AVX512_BF16: vdpbf16ps multiplies 32 bf16 pairs of the query and the
          // key row as they lie in the cache (no widening) and sums them into 16 float32 lanes; the
          // products are exact in float32. The scale applies to 16 finished scores at once.
          const __m512 scv = _mm512_set1_ps(sc);
          alignas(64) __m512 part[16];
          for (int64_t p = lo; p < n;) {
            const int64_t cnt = std::min<int64_t>({16, n - p, bs - p % bs});  // within one block
            const T* base = kp + row_of(table, p);
            if (p + cnt < n)
              prefetch(kp, table, p + cnt, std::min<int64_t>({16, n - p - cnt, bs - (p + cnt) % bs}));
            for (int64_t g = g0; g < g1; ++g) {
              for (int64_t j = start[g]; j < start[g + 1]; ++j) {
                const T* qraw = qrow + order[j] * D;
                __m512bh qv[D / 32];
                for (int c = 0; c < D / 32; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(qraw + 32 * c);
                for (int64_t tt = 0; tt < cnt; ++tt) {
                  const T* kr = base + tt * slot + g * D;
                  __m512 a = _mm512_setzero_ps();
                  for (int c = 0; c < D / 32; ++c)
                    a = _mm512_dpbf16_ps(a, qv[c], (__m512bh)_mm512_loadu_si512(kr + 32 * c));
                  part[tt] = a;
                }
                for (int64_t tt = cnt; tt < 16; ++tt) part[tt] = _mm512_setzero_ps();
                _mm512_mask_storeu_ps(scores.data() + j * len + (p - lo), static_cast<__mmask16>((1u << cnt) - 1),
                                      _mm512_mul_ps(fold16(part), scv));
              }
            }
            p += cnt;
          }
        } else
#endif
#if defined(__AVX512F__)
        if constexpr (kVectorScores<T> && D > 0 && D % 16 == 0) {
          alignas(64) __m512 part[16];
          for (int64_t p = lo; p < n;) {
            const int64_t cnt = std::min<int64_t>({16, n - p, bs - p % bs});  // within one block
            const T* base = kp + row_of(table, p);
            if (p + cnt < n)  // the next chunk: often another block, anywhere in the cache
              prefetch(kp, table, p + cnt, std::min<int64_t>({16, n - p - cnt, bs - (p + cnt) % bs}));
            for (int64_t g = g0; g < g1; ++g) {
              for (int64_t j = start[g]; j < start[g + 1]; ++j) {
                const float* qj = qf.data() + j * D;
                for (int64_t tt = 0; tt < cnt; ++tt) {
                  const T* kr = base + tt * slot + g * D;
                  __m512 acc0 = _mm512_mul_ps(_mm512_loadu_ps(qj), load16(kr));
                  for (int c = 16; c < D; c += 16) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(qj + c), load16(kr + c), acc0);
                  part[tt] = acc0;
                }
                for (int64_t tt = cnt; tt < 16; ++tt) part[tt] = _mm512_setzero_ps();
                _mm512_mask_storeu_ps(scores.data() + j * len + (p - lo), static_cast<__mmask16>((1u << cnt) - 1),
                                      fold16(part));
              }
            }
            p += cnt;
          }
        } else
#endif
        {
          for (int64_t p = lo; p < n; ++p) {
            if (p + kPrefetchAhead < n) prefetch(kp, table, p + kPrefetchAhead, 1);
            const T* krow = kp + row_of(table, p);
            for (int64_t g = g0; g < g1; ++g) {
              const float* kr = as_float(krow + g * Dn, row.data());
              for (int64_t j = start[g]; j < start[g + 1]; ++j) {
                const float* qj = qf.data() + j * Dn;
                float s = 0.f;
#pragma omp simd reduction(+ : s)
                for (int64_t d = 0; d < Dn; ++d) s += qj[d] * kr[d];
                scores[j * len + (p - lo)] = s;
              }
            }
          }
        }
        // Softmax per query head: max, then the vectorized exp and its sum.
        for (int64_t j = j0; j < j1; ++j) {
          float* s = scores.data() + j * len;
          float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
          for (int64_t i = 0; i < len; ++i) m = std::max(m, s[i]);
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (int64_t i = 0; i < len; ++i) {
            const float e = exp_nonpositive(s[i] - m);
            s[i] = e;
            sum += e;
          }
          const float inv = 1.f / sum;
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) s[i] *= inv;
        }
        // Weighted values, into each query head's float32 accumulator.
#if defined(__AVX512BF16__)
        if constexpr (kPairedValues<T, D>) {
          // vdpbf16ps on pairs of value rows: two rows' bf16 elements interleaved (d of token t,
          // d of token t + 1) in each 32-bit lane, times the two tokens' probabilities rounded to
          // bf16 (as SDPA's CPU kernel rounds them before its bf16 matmul with V), summed into
          // float32. A chunk's rows are interleaved once per KV head into `pairs` and serve its
          // whole query group. The accumulators hold each head's dimensions in the unpacks' lane
          // order; `unpermute` restores it at the end.
          constexpr int kVecs = D / 16;  // per row: D / 32 slices of 32 bf16, a low and a high unpack each
          alignas(64) __m512i pairs[8 * kVecs];
          alignas(32) uint32_t wpair[8];
          for (int64_t p = lo; p < n;) {
            const int64_t cnt = std::min<int64_t>({16, n - p, bs - p % bs});
            const T* base = vp + row_of(table, p);
            if (p + cnt < n) prefetch(vp, table, p + cnt, std::min<int64_t>({16, n - p - cnt, bs - (p + cnt) % bs}));
            const int64_t npairs = (cnt + 1) / 2;
            for (int64_t g = g0; g < g1; ++g) {
              for (int64_t i = 0; i < npairs; ++i) {
                const T* r0 = base + (2 * i) * slot + g * D;
                const T* r1 = 2 * i + 1 < cnt ? r0 + slot : r0;  // an odd chunk's last row pairs with itself, weight 0
                for (int c = 0; c < D / 32; ++c) {
                  const __m512i a = _mm512_loadu_si512(r0 + 32 * c), b = _mm512_loadu_si512(r1 + 32 * c);
                  pairs[i * kVecs + 2 * c] = _mm512_unpacklo_epi16(a, b);
                  pairs[i * kVecs + 2 * c + 1] = _mm512_unpackhi_epi16(a, b);
                }
              }
              for (int64_t j = start[g]; j < start[g + 1]; ++j) {
                float* aj = acc.data() + j * D;
                const __m512 w = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << cnt) - 1),
                                                       scores.data() + j * len + (p - lo));
                _mm256_store_si256(reinterpret_cast<__m256i*>(wpair), (__m256i)_mm512_cvtneps_pbh(w));
                __m512 a[kVecs];
                for (int v = 0; v < kVecs; ++v) a[v] = _mm512_loadu_ps(aj + 16 * v);
                for (int64_t i = 0; i < npairs; ++i) {
                  const __m512bh wt = (__m512bh)_mm512_set1_epi32(static_cast<int>(wpair[i]));
                  for (int v = 0; v < kVecs; ++v) a[v] = _mm512_dpbf16_ps(a[v], (__m512bh)pairs[i * kVecs + v], wt);
                }
                for (int v = 0; v < kVecs; ++v) _mm512_storeu_ps(aj + 16 * v, a[v]);
              }
            }
            p += cnt;
          }
          for (int64_t j = j0; j < j1; ++j) unpermute<D>(acc.data() + j * D);
        } else
#endif
#if defined(__AVX512F__)
        if constexpr (kVectorScores<T> && D > 0 && D % 16 == 0) {
          // Per chunk of up to 16 keys of one block and per query head, the accumulator stays in
          // registers; the chunk's value rows are in L1 after the group's first head.
          for (int64_t p = lo; p < n;) {
            const int64_t cnt = std::min<int64_t>({16, n - p, bs - p % bs});
            const T* base = vp + row_of(table, p);
            if (p + cnt < n) prefetch(vp, table, p + cnt, std::min<int64_t>({16, n - p - cnt, bs - (p + cnt) % bs}));
            for (int64_t g = g0; g < g1; ++g) {
              for (int64_t j = start[g]; j < start[g + 1]; ++j) {
                float* aj = acc.data() + j * D;
                const float* w = scores.data() + j * len + (p - lo);
                __m512 a[D / 16];
                for (int c = 0; c < D / 16; ++c) a[c] = _mm512_loadu_ps(aj + 16 * c);
                for (int64_t tt = 0; tt < cnt; ++tt) {
                  const T* vr = base + tt * slot + g * D;
                  const __m512 wt = _mm512_set1_ps(w[tt]);
                  for (int c = 0; c < D / 16; ++c) a[c] = _mm512_fmadd_ps(wt, load16(vr + 16 * c), a[c]);
                }
                for (int c = 0; c < D / 16; ++c) _mm512_storeu_ps(aj + 16 * c, a[c]);
              }
            }
            p += cnt;
          }
        } else
#endif
        {
          for (int64_t p = lo; p < n; ++p) {
            if (p + kPrefetchAhead < n) prefetch(vp, table, p + kPrefetchAhead, 1);
            const T* vrow = vp + row_of(table, p);
            for (int64_t g = g0; g < g1; ++g) {
              const float* vr = as_float(vrow + g * Dn, row.data());
              for (int64_t j = start[g]; j < start[g + 1]; ++j) {
                const float w = scores[j * len + (p - lo)];
                float* a = acc.data() + j * Dn;
#pragma omp simd
                for (int64_t d = 0; d < Dn; ++d) a[d] += w * vr[d];
              }
            }
          }
        }
        T* orow = op + rowp[b] * H * Dn;
        for (int64_t j = j0; j < j1; ++j) {
          T* o = orow + order[j] * Dn;
          const float* a = acc.data() + j * Dn;
          for (int64_t d = 0; d < Dn; ++d) o[d] = static_cast<T>(a[d]);
        }
      }
    }
  });
}

template <typename T>
void dispatch_head_dim(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& rows,
                       const at::Tensor& kv_index, double scale, int64_t window, at::Tensor& out) {
  switch (q.size(2)) {
    case 64:
      return paged_decode_kernel<T, 64>(q, k_cache, v_cache, block_tables, seq_lens, rows, kv_index, scale, window,
                                        out);
    case 128:
      return paged_decode_kernel<T, 128>(q, k_cache, v_cache, block_tables, seq_lens, rows, kv_index, scale,
                                         window, out);
    default:
      return paged_decode_kernel<T, 0>(q, k_cache, v_cache, block_tables, seq_lens, rows, kv_index, scale, window,
                                       out);
  }
}

void paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& rows,
                  const at::Tensor& kv_index, double scale, int64_t window, at::Tensor out) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && q.is_contiguous() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && out.is_contiguous(),
              "paged_decode: q/out [T, H, D] and caches [NB, bs, KVH, D], contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type() &&
                  q.scalar_type() == out.scalar_type(),
              "paged_decode: q, caches and out share one dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong &&
                  rows.scalar_type() == at::kLong && kv_index.scalar_type() == at::kLong,
              "paged_decode: index tensors are int64");
  TORCH_CHECK(block_tables.is_contiguous() && kv_index.size(0) == q.size(1) && q.size(2) == k_cache.size(3),
              "paged_decode: shapes disagree");
  // The cache's dtypes on CPU; each is compiled at every head dim below, so the list stays short
  // (the library is built at a worker's first start on each machine).
  AT_DISPATCH_SWITCH(q.scalar_type(), "paged_decode",
                     AT_DISPATCH_CASE(at::kFloat, [&] {
                       dispatch_head_dim<scalar_t>(q, k_cache, v_cache, block_tables, seq_lens, rows, kv_index,
                                                   scale, window, out);
                     }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       dispatch_head_dim<scalar_t>(q, k_cache, v_cache, block_tables, seq_lens, rows, kv_index,
                                                   scale, window, out);
                     }));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tpserve, m) {
  m.def(
      "paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
      "Tensor rows, Tensor kv_index, float scale, int window, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(tpserve, CPU, m) { m.impl("paged_decode", &paged_decode); }
