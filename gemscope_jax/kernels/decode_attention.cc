// XLA FFI handler: one decoding token's attention over a layer's KV cache,
// with the token's key and value written into the cache in place.
//
// Purpose: written as XLA ops, a decode step writes the new key and value
// into the loop-carried cache (a dynamic-update-slice), and XLA then makes
// a second updated copy in the layout its dot wants, and a transposed copy
// of the values: about four 256 KB copies a layer a step for Gemma 3 270M
// (2.6 ms of a 31 ms float32 step at batch 1). This call reads each cache
// row once and writes only the new slot.
//
//   k_buf[b, slot] = k_new[b];  v_buf[b, slot] = v_new[b]      (in place)
//   logit[b,k,g,s] = sum_h q[b,k,g,h] k_buf[b,s,k,h]            (f32 sums)
//   logit = allowed[b,s] ? logit : mask_value
//   p = softmax_s(logit) in f32, rounded to the cache's dtype
//   out[b,k,g,h] = sum_s p[b,k,g,s] v_buf[b,s,k,h], rounded to that dtype
//
// what the model's einsum path computes (models/_modules.py, Attention), up
// to the order of the f32 sums and exp's last bit.
//
// Shapes: q (B, K, G, H); k_new, v_new (B, K, H); k_buf, v_buf (B, S, K, H),
// all one dtype, f32 or bf16; slot s32 scalar in [0, S); allowed (B, S)
// pred. Results: out (B, K, G, H) of that dtype; k_buf and v_buf (aliased
// with the inputs).
//
// Parallel over (b, k) pairs on XLA's pool (xla_pool.h); a single pair (batch
// 1, one KV head) is split between two ranges of its query heads, each
// reading the layer's cache rows (512 KB for the 270M, tens of us).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "simd_rows.h"
#include "xla_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using gemscope::Bf16Row;
using gemscope::Bf16ToF32;
using gemscope::Dot;
using gemscope::F32Row;

namespace {

// Round-to-nearest-even f32 -> bf16 bits (NaN stays NaN).
inline uint16_t F32ToBf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if (std::isnan(x)) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// The dtype's storage and its f32 view.
struct F32 {
  using T = float;
  using Row = F32Row;
  static float Load(T v) { return v; }
  static T Store(float v) { return v; }
  static float Round(float v) { return v; }
};
struct Bf16 {
  using T = uint16_t;
  using Row = Bf16Row;
  static float Load(T v) { return Bf16ToF32(v); }
  static T Store(float v) { return F32ToBf16(v); }
  static float Round(float v) { return Bf16ToF32(F32ToBf16(v)); }
};

// The buffers are read as D's storage type T.
template <typename D>
void Run(ffi::ThreadPool& pool, const void* q_data, const void* k_new_data,
         const void* v_new_data, void* k_buf_data, void* v_buf_data,
         int64_t slot, const bool* allowed, float mask_value, int64_t b_count,
         int64_t s_count, int64_t k_count, int64_t g_count, int64_t h_count,
         void* out_data) {
  using T = typename D::T;
  const T* q = static_cast<const T*>(q_data);
  const T* k_new = static_cast<const T*>(k_new_data);
  const T* v_new = static_cast<const T*>(v_new_data);
  T* k_buf = static_cast<T*>(k_buf_data);
  T* v_buf = static_cast<T*>(v_buf_data);
  T* out = static_cast<T*>(out_data);
  // The new key and value into their slot, before any part reads it.
  for (int64_t b = 0; b < b_count; ++b) {
    for (int64_t k = 0; k < k_count; ++k) {
      const int64_t at = ((b * s_count + slot) * k_count + k) * h_count;
      const int64_t from = (b * k_count + k) * h_count;
      std::memcpy(k_buf + at, k_new + from, sizeof(T) * h_count);
      std::memcpy(v_buf + at, v_new + from, sizeof(T) * h_count);
    }
  }
  // Parts: (b, k, a range of query heads); at least two, when there are
  // two heads, so that both threads work (and stay awake for the next
  // call) even at batch 1 with one KV head.
  const int64_t splits =
      b_count * k_count >= 2 ? 1 : std::min<int64_t>(g_count, 2);
  gemscope::ParallelFor(pool, b_count * k_count * splits, [&](int64_t part) {
    const int64_t pair = part / splits, piece = part % splits;
    const int64_t b = pair / k_count, k = pair % k_count;
    const int64_t g0 = g_count * piece / splits;
    const int64_t g1 = g_count * (piece + 1) / splits;
    std::vector<float> qf(g_count * h_count), p(g_count * s_count),
        acc(g_count * h_count, 0.f);
    const T* qb = q + (b * k_count + k) * g_count * h_count;
    for (int64_t i = g0 * h_count; i < g1 * h_count; ++i) {
      qf[i] = D::Load(qb[i]);
    }
    const bool* ok = allowed + b * s_count;
    for (int64_t s = 0; s < s_count; ++s) {
      const typename D::Row row{k_buf + ((b * s_count + s) * k_count + k) *
                                            h_count};
      for (int64_t g = g0; g < g1; ++g) {
        p[g * s_count + s] =
            ok[s] ? Dot(row, qf.data() + g * h_count, h_count) : mask_value;
      }
    }
    for (int64_t g = g0; g < g1; ++g) {
      float* pg = p.data() + g * s_count;
      const float top = *std::max_element(pg, pg + s_count);
      float sum = 0.f;
      for (int64_t s = 0; s < s_count; ++s) {
        pg[s] = std::exp(pg[s] - top);
        sum += pg[s];
      }
      for (int64_t s = 0; s < s_count; ++s) pg[s] = D::Round(pg[s] / sum);
    }
    for (int64_t s = 0; s < s_count; ++s) {
      const T* row = v_buf + ((b * s_count + s) * k_count + k) * h_count;
      for (int64_t g = g0; g < g1; ++g) {
        const float w = p[g * s_count + s];
        if (w == 0.f) continue;
        float* a = acc.data() + g * h_count;
        for (int64_t h = 0; h < h_count; ++h) a[h] += w * D::Load(row[h]);
      }
    }
    T* ob = out + (b * k_count + k) * g_count * h_count;
    for (int64_t i = g0 * h_count; i < g1 * h_count; ++i) {
      ob[i] = D::Store(acc[i]);
    }
  }, /*linger=*/b_count == 1);
}

ffi::Error DecodeAttentionImpl(
    ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k_new,
    ffi::AnyBuffer v_new, ffi::AnyBuffer k_in, ffi::AnyBuffer v_in,
    ffi::Buffer<ffi::S32> slot, ffi::Buffer<ffi::PRED> allowed,
    float mask_value, ffi::Result<ffi::AnyBuffer> out,
    ffi::Result<ffi::AnyBuffer> k_buf, ffi::Result<ffi::AnyBuffer> v_buf) {
  const auto qd = q.dimensions();
  const auto cd = k_in.dimensions();
  if (qd.size() != 4 || cd.size() != 4 || k_new.dimensions().size() != 3 ||
      allowed.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument(
        "decode_attention: expects q (B, K, G, H), k_new and v_new (B, K, "
        "H), k_buf and v_buf (B, S, K, H), allowed (B, S)");
  }
  const int64_t b = qd[0], k = qd[1], g = qd[2], h = qd[3], s = cd[1];
  const auto nd = k_new.dimensions();
  if (cd[0] != b || cd[2] != k || cd[3] != h || nd[0] != b || nd[1] != k ||
      nd[2] != h || v_new.element_count() != k_new.element_count() ||
      v_in.element_count() != k_in.element_count() ||
      allowed.dimensions()[0] != b || allowed.dimensions()[1] != s ||
      out->element_count() != q.element_count() ||
      k_buf->element_count() != k_in.element_count() ||
      v_buf->element_count() != v_in.element_count()) {
    return ffi::Error::InvalidArgument(
        "decode_attention: B, K, H or S differ between the operands");
  }
  const auto dtype = q.element_type();
  for (auto t : {k_new.element_type(), v_new.element_type(),
                 k_in.element_type(), v_in.element_type()}) {
    if (t != dtype) {
      return ffi::Error::InvalidArgument(
          "decode_attention: q, the new key and value and the cache must "
          "share one dtype");
    }
  }
  if (dtype != ffi::DataType::F32 && dtype != ffi::DataType::BF16) {
    return ffi::Error::InvalidArgument(
        "decode_attention: float32 or bfloat16 only");
  }
  const int64_t at = slot.typed_data()[0];
  if (at < 0 || at >= s) {
    return ffi::Error::InvalidArgument("decode_attention: slot outside [0, S)");
  }
  // Unaliased buffers (XLA could not update in place): start from a copy.
  for (auto [in, res] : {std::pair{&k_in, &k_buf}, std::pair{&v_in, &v_buf}}) {
    if ((*res)->untyped_data() != in->untyped_data()) {
      std::memcpy((*res)->untyped_data(), in->untyped_data(),
                  in->size_bytes());
    }
  }
  const bool* ok = allowed.typed_data();
  const auto run = dtype == ffi::DataType::F32 ? Run<F32> : Run<Bf16>;
  run(pool, q.untyped_data(), k_new.untyped_data(), v_new.untyped_data(),
      k_buf->untyped_data(), v_buf->untyped_data(), at, ok, mask_value, b, s,
      k, g, h, out->untyped_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemscopeDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k_new
                                  .Arg<ffi::AnyBuffer>()  // v_new
                                  .Arg<ffi::AnyBuffer>()  // k_buf
                                  .Arg<ffi::AnyBuffer>()  // v_buf
                                  .Arg<ffi::Buffer<ffi::S32>>()   // slot
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // allowed
                                  .Attr<float>("mask_value")
                                  .Ret<ffi::AnyBuffer>()   // out
                                  .Ret<ffi::AnyBuffer>()   // k_buf
                                  .Ret<ffi::AnyBuffer>()); // v_buf
