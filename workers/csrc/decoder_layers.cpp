// tpserve::llama_decode_layers: a decode step's whole stack of Llama decoder layers in one call (CPU).
//
// Why: at batch 1 a bf16 + int4 SmolLM2 token spent ~4 of its ~11 ms in Python and dispatch
// around ~6.6 ms of kernels (2026-12-06 profile: 30 layers x ~12 op calls, each behind nn.Module
// calls, the linear method's row-count choice, dtype casts and the paged cache's bookkeeping).
// llama.cpp runs the same graph from C. Here the layer loop, its views and its choices run in C++,
// and each kernel is the very one the Python path calls (the fused ops, `tpserve::paged_decode`,
// PyTorch's int8/int4 kernels, oneDNN's packed linear, `tpserve::gemv`, `tpserve::w8a8_linear`,
// `tpserve::int4_gemv`),
// in the same order on the same inputs, so the result is bit-equal to the eager step's.
//
// Which kernel each projection takes is decided in Python (workers/layer_stack.py asks each
// layer's linear method for the call its `apply` would make at this many rows) and arrives here
// as a code per projection; this file only carries it out.
//
// Per layer, as LlamaDecoderLayer.forward with vLLM's residual passing:
//   residual, h = add_rms_norm(x, residual)   (the first layer: residual = x, h = rms_norm(x))
//   q, k, v     = qkv_proj(h) cut by heads; q, k rotated
//   the new k, v written into the layer's cache slots; out = paged_decode(q, cache)
//   residual, h = add_rms_norm(all_reduce(o_proj(out)), residual)
//   x           = all_reduce(down_proj(silu_and_mul(gate_up_proj(h))))
// Returns (x, residual) of the last layer: the model's final norm adds them. The all-reduces run at
// tp > 1 only, over the replica's shared segment (shm_all_reduce.h), as RowParallelLinear's do.
//
// The typed handles below repeat each kernel's own C++ signature (by value or by reference, as it
// is registered): the dispatcher refuses a call whose signature differs.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "shm_all_reduce.h"

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

// How a projection multiplies (workers/layers/linear_method.py, each method's `decode_call`).
enum LinearKind : int64_t {
  kDense = 0,        // F.linear(x, a, bias)
  kOneDnn = 1,       // oneDNN's linear on a (its packed weight), bias inside
  kGemv = 2,         // tpserve::gemv(x, a, b?) then + bias   (float weights: b undefined; int8: b = scales)
  kInt8Packed = 3,   // _weight_int8pack_mm(x in bf16, a = codes, b = scales in bf16), back to x's dtype
  kInt4Packed = 4,   // _weight_int4pack_mm_for_cpu(x in bf16, a = packed, arg = group, b = scales), back
  kW8A8 = 5,         // tpserve::w8a8_linear(x, a = codes, b = scales, gemv = arg != 0)
  kInt4Gemv = 6,     // tpserve::int4_gemv(x, a = its packed bytes, arg = group) then + bias
};

constexpr int64_t kLinears = 4;                 // qkv_proj, o_proj, gate_up_proj, down_proj
constexpr int64_t kPerLinear = 3;               // a, b, bias
constexpr int64_t kPerLayer = 2 + kLinears * kPerLinear;  // input norm, post-attention norm, the linears

using OptTensor = std::optional<at::Tensor>;

at::Tensor kernel_input(const at::Tensor& x) {
  // The int kernels' activations: bf16 (or fp16) as they are, float32 as bf16 (`kernel_dtype`).
  const auto st = x.scalar_type();
  return (st == at::kBFloat16 || st == at::kHalf) ? x : x.to(at::kBFloat16);
}

at::Tensor plus_bias(at::Tensor y, const OptTensor& bias) {
  return bias.has_value() ? y.add_(*bias) : y;
}

at::Tensor linear(const at::Tensor& x, int64_t kind, int64_t arg, const OptTensor& a, const OptTensor& b,
                  const OptTensor& bias) {
  switch (kind) {
    case kDense:
      return at::linear(x, *a, bias);
    case kOneDnn: {
      static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
      torch::jit::Stack stack{x, *a, bias.has_value() ? c10::IValue(*bias) : c10::IValue(), std::string("none"),
                              c10::List<std::optional<c10::Scalar>>(), c10::IValue()};
      op.callBoxed(&stack);
      return stack[0].toTensor();
    }
    case kGemv: {
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("tpserve::gemv", "")
                           .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&)>();
      return plus_bias(op.call(x, *a, b), bias);
    }
    case kInt8Packed:
      return plus_bias(at::_weight_int8pack_mm(kernel_input(x), *a, *b).to(x.scalar_type()), bias);
    case kInt4Packed:
      return plus_bias(at::_weight_int4pack_mm_for_cpu(kernel_input(x), *a, arg, *b).to(x.scalar_type()), bias);
    case kW8A8: {
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("tpserve::w8a8_linear", "")
                           .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
      return plus_bias(op.call(x, *a, *b, arg != 0), bias);
    }
    case kInt4Gemv: {
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("tpserve::int4_gemv", "")
                           .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
      return plus_bias(op.call(x, *a, arg), bias);
    }
    default:
      TORCH_CHECK(false, "llama_decode_layers: unknown linear kind ", kind);
  }
}

std::tuple<at::Tensor, at::Tensor> llama_decode_layers(
    const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin, const c10::List<OptTensor>& params,
    at::IntArrayRef kinds, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& rows, const at::Tensor& kv_index,
    double scale, int64_t window, double eps, int64_t num_heads, int64_t num_kv_heads,
    const std::optional<at::Tensor>& shm_state) {
  const int64_t layers = k_cache.size(0);
  TORCH_CHECK(x_in.dim() == 2 && k_cache.dim() == 5 && v_cache.sizes() == k_cache.sizes(),
              "llama_decode_layers: x [T, hidden], caches [layers, NB, bs, KVH, D]");
  TORCH_CHECK(static_cast<int64_t>(params.size()) == layers * kPerLayer &&
                  static_cast<int64_t>(kinds.size()) == layers * kLinears * 2,
              "llama_decode_layers: ", kPerLayer, " params and ", kLinears * 2, " codes per layer");
  const int64_t T = x_in.size(0), D = k_cache.size(4);
  const int64_t q_size = num_heads * D, kv_size = num_kv_heads * D;

  using Dispatcher = c10::Dispatcher;
  static auto rms_norm = Dispatcher::singleton()
                             .findSchemaOrThrow("tpserve::rms_norm", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
  static auto add_rms_norm =
      Dispatcher::singleton()
          .findSchemaOrThrow("tpserve::add_rms_norm", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  static auto rotary = Dispatcher::singleton()
                           .findSchemaOrThrow("tpserve::rotary", "")
                           .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                     const at::Tensor&, const at::Tensor&)>();
  static auto cache_write = Dispatcher::singleton()
                                .findSchemaOrThrow("tpserve::cache_write", "")
                                .typed<void(at::Tensor, at::Tensor, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&)>();
  static auto paged_decode =
      Dispatcher::singleton()
          .findSchemaOrThrow("tpserve::paged_decode", "")
          .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, const at::Tensor&, double, int64_t, at::Tensor)>();
  static auto silu_and_mul =
      Dispatcher::singleton().findSchemaOrThrow("tpserve::silu_and_mul", "").typed<at::Tensor(const at::Tensor&)>();

  auto p = [&](int64_t layer, int64_t i) -> OptTensor { return params.get(layer * kPerLayer + i); };
  auto project = [&](int64_t layer, int64_t which, const at::Tensor& in) {
    const int64_t c = (layer * kLinears + which) * 2, base = 2 + which * kPerLinear;
    return linear(in, kinds[c], kinds[c + 1], p(layer, base), p(layer, base + 1), p(layer, base + 2));
  };

  std::optional<tpserve_shm::Comm> comm;  // tp > 1: the row-parallel partial sums meet here
  if (shm_state.has_value()) comm.emplace(*shm_state);
  auto reduced = [&](at::Tensor y) {
    if (comm) comm->all_reduce(y);
    return y;
  };

  at::Tensor x = x_in, residual, h;
  for (int64_t layer = 0; layer < layers; ++layer) {
    if (layer == 0) {
      residual = x;
      h = rms_norm.call(x, *p(layer, 0), eps);
    } else {
      std::tie(residual, h) = add_rms_norm.call(x, residual, *p(layer, 0), eps);
    }
    const at::Tensor qkv = project(layer, 0, h);
    auto [q, k] = rotary.call(qkv.narrow(1, 0, q_size).view({T, num_heads, D}),
                              qkv.narrow(1, q_size, kv_size).view({T, num_kv_heads, D}), cos, sin);
    const at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({T, num_kv_heads, D});
    const at::Tensor kc = k_cache.select(0, layer), vc = v_cache.select(0, layer);
    cache_write.call(kc, vc, slots, k, v);
    const at::Tensor attn = at::empty(q.sizes(), q.options());
    paged_decode.call(q.contiguous(), kc, vc, block_tables, seq_lens, rows, kv_index, scale, window, attn);
    std::tie(residual, h) =
        add_rms_norm.call(reduced(project(layer, 1, attn.view({T, q_size}))), residual, *p(layer, 1), eps);
    x = reduced(project(layer, 3, silu_and_mul.call(project(layer, 2, h))));
  }
  return {x, residual};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tpserve, m) {
  m.def(
      "llama_decode_layers(Tensor x, Tensor cos, Tensor sin, Tensor?[] params, int[] kinds, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, Tensor slots, Tensor block_tables, Tensor seq_lens, Tensor rows, Tensor kv_index, "
      "float scale, int window, float eps, int num_heads, int num_kv_heads, Tensor(c!)? shm_state) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tpserve, CPU, m) { m.impl("llama_decode_layers", &llama_decode_layers); }

// A plain layer's oneDNN-packed weight is an opaque mkldnn tensor: in the params it makes the
// dispatcher pick the MkldnnCPU kernel for the whole call.
TORCH_LIBRARY_IMPL(tpserve, MkldnnCPU, m) { m.impl("llama_decode_layers", &llama_decode_layers); }
