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
// Built by workers/paged_decode_op.py on the machine that runs it (-march=native), loaded into
// the process that imported torch, so at::parallel_for runs on torch's own OpenMP threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename T>
void paged_decode_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& rows,
                         const at::Tensor& kv_index, double scale, int64_t window, at::Tensor& out) {
  const int64_t B = block_tables.size(0), W = block_tables.size(1);
  const int64_t H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), KVH = k_cache.size(2);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t* rowp = rows.data_ptr<int64_t>();
  const int64_t* kvi = kv_index.data_ptr<int64_t>();
  const int64_t slot = KVH * D;  // elements between two token positions in a block
  const float sc = static_cast<float>(scale);

  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> heads;
    std::vector<float> qf, scores, acc;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KVH, g = task % KVH;
      heads.clear();
      for (int64_t h = 0; h < H; ++h)
        if (kvi[h] == g) heads.push_back(h);
      const int64_t G = static_cast<int64_t>(heads.size());
      if (G == 0) continue;
      const int64_t n = lens[b];
      const int64_t lo = window > 0 ? std::max<int64_t>(0, n - window) : 0;
      const int64_t len = n - lo;
      const int64_t* table = tables + b * W;
      const T* qrow = qp + rowp[b] * H * D;
      qf.resize(G * D);
      scores.resize(G * len);
      acc.assign(G * D, 0.f);
      for (int64_t i = 0; i < G; ++i)
        for (int64_t d = 0; d < D; ++d) qf[i * D + d] = static_cast<float>(qrow[heads[i] * D + d]) * sc;

      // Scores: each key row once, against every query head of the group.
      for (int64_t p = lo; p < n; ++p) {
        const T* k = kp + (table[p / bs] * bs + p % bs) * slot + g * D;
        for (int64_t i = 0; i < G; ++i) {
          const float* qi = qf.data() + i * D;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += qi[d] * static_cast<float>(k[d]);
          scores[i * len + (p - lo)] = s;
        }
      }
      // Softmax per query head (max-subtracted, as SDPA's math path).
      for (int64_t i = 0; i < G; ++i) {
        float* s = scores.data() + i * len;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < len; ++j) m = std::max(m, s[j]);
        float sum = 0.f;
        for (int64_t j = 0; j < len; ++j) {
          s[j] = std::exp(s[j] - m);
          sum += s[j];
        }
        const float inv = 1.f / sum;
        for (int64_t j = 0; j < len; ++j) s[j] *= inv;
      }
      // Weighted values: each value row once, into every query head's accumulator.
      for (int64_t p = lo; p < n; ++p) {
        const T* v = vp + (table[p / bs] * bs + p % bs) * slot + g * D;
        for (int64_t i = 0; i < G; ++i) {
          const float w = scores[i * len + (p - lo)];
          float* a = acc.data() + i * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += w * static_cast<float>(v[d]);
        }
      }
      T* orow = op + rowp[b] * H * D;
      for (int64_t i = 0; i < G; ++i)
        for (int64_t d = 0; d < D; ++d) orow[heads[i] * D + d] = static_cast<T>(acc[i * D + d]);
    }
  });
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
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "paged_decode", [&] {
    paged_decode_kernel<scalar_t>(q, k_cache, v_cache, block_tables, seq_lens, rows, kv_index, scale, window,
                                  out);
  });
}

}  // namespace

TORCH_LIBRARY(tpserve, m) {
  m.def(
      "paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
      "Tensor rows, Tensor kv_index, float scale, int window, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(tpserve, CPU, m) { m.impl("paged_decode", &paged_decode); }
