// XLA FFI handler: the greedy next token of a few rows, without reading the
// whole unembedding table in its own precision.
//
// Purpose: at batch 1 a decode step's largest read is the tied (V, D)
// unembedding (262,144 x 640: 671 MB in float32, 335 MB in bfloat16), read
// only to take one argmax. Here an int8 copy of the table (one scale per
// row: 168 MB) screens every token, and only the few that can still be the
// largest are computed from the table itself. The answer is the argmax of
// the logits this kernel computes from the table (f32 sums, rounded to
// bfloat16 first when `round_bf16`, as a bfloat16 model's logits are), with
// the first index winning ties, as `sampling.argmax` does; NaN counts as
// +inf there and here.
//
// Why it is exact: h is rounded to int16 steps t_h (15 bits), so the
// screen s_v (q_v . round(h / t_h)) t_h is an exact integer dot, scaled.
// For table row E_v with int8 row q_v and scale s_v,
//   |E_v . h - screen_v| <= ||h|| ||E_v - s_v q_v||          (Cauchy-Schwarz)
//                          + s_v ||q_v|| ||h - t_h round(h / t_h)||,
// and this kernel's f32 sum of E_v . h (and the screen's f32 rounding) is
// within (2 gamma_D + 2u) sqrt(D) max|E_v| ||h|| of the real-number dot.
// `radius` holds ||E_v - s_v q_v|| plus that rounding term (per unit
// ||h||) and `qnorm` holds s_v ||q_v||, both built in greedy_head.py with a
// margin for their own rounding, so every logit lies within
// bound_v = ||h|| radius_v + ||h - t_h round(h / t_h)|| qnorm_v of
// screen_v. With L the largest screen_v - bound_v, a token with
// screen_v + bound_v below L (less a bfloat16 rounding step when rounding)
// is smaller than some other token's logit and cannot be the argmax; the
// rest (typically 2 to 40 of 262,144 on real text) are computed exactly.
// When more than `max_candidates` remain, or a row is not finite, that row
// falls back to every exact logit.
//
// Shapes: h (B, D) f32; table (V, D) f32 or bf16, row-major; q (V, D) s8;
// scale, qnorm, radius (V) f32; outputs tokens (B) s32 and candidates (B)
// s32 (how many tokens were computed exactly: V on the fallback).
//
// Caveat: parallelised over blocks of table rows on XLA's thread pool
// (xla_pool.h), every row of h per block, so the int8 table is read once
// per call whatever B is; its integer products are recomputed per row of
// h, so at 8 rows the screen is slower than bfloat16's full unembedding on
// oneDNN (callers choose).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "simd_rows.h"
#include "xla_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using gemscope::Bf16Row;
using gemscope::Dot;
using gemscope::F32Row;

namespace {

constexpr int64_t kRowsPerTask = 1024;
constexpr double kHalfRange = 16383.0;  // h's int16 steps
// Up to this many dims, a row's whole screen sum fits in int32:
// 127 * 16383 * 1032 < 2^31.
constexpr int64_t kInt32SumDims = 1032;

// |logit_v - screen_v| <= this (module comment).
inline double Bound(double norm, double err, float radius, float qnorm) {
  return norm * radius + err * qnorm;
}

// Round-to-nearest-even to bfloat16, returned as the f32 it stands for
// (NaN stays NaN).
inline float RoundBf16(float x) {
  if (std::isnan(x)) return x;
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  bits &= 0xFFFF0000u;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// q_v . hq exactly: int32 lanes (each sums at most D / 32 products of
// |q| <= 127 and |hq| <= 16383: exact for D < 32,000), summed in int32
// where the whole sum fits (D <= kInt32SumDims), else in int64.
inline int64_t DotS8S16(const int8_t* q, const int16_t* hq, int64_t d) {
  int64_t i = 0;
  int64_t s = 0;
#if defined(__AVX512BW__)
  __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
  for (; i + 64 <= d; i += 64) {
    __m512i q0 = _mm512_cvtepi8_epi16(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i)));
    __m512i q1 = _mm512_cvtepi8_epi16(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i + 32)));
#if defined(__AVX512VNNI__)
    a0 = _mm512_dpwssd_epi32(a0, q0, _mm512_loadu_si512(hq + i));
    a1 = _mm512_dpwssd_epi32(a1, q1, _mm512_loadu_si512(hq + i + 32));
#else
    a0 = _mm512_add_epi32(a0, _mm512_madd_epi16(q0, _mm512_loadu_si512(hq + i)));
    a1 = _mm512_add_epi32(a1,
                          _mm512_madd_epi16(q1, _mm512_loadu_si512(hq + i + 32)));
#endif
  }
  const __m512i lanes = _mm512_add_epi32(a0, a1);
  if (d <= kInt32SumDims) {
    s = _mm512_reduce_add_epi32(lanes);  // |sum| < 127 * 16383 * d < 2^31
  } else {
    s = _mm512_reduce_add_epi64(
            _mm512_cvtepi32_epi64(_mm512_castsi512_si256(lanes))) +
        _mm512_reduce_add_epi64(
            _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(lanes, 1)));
  }
#endif
  for (; i < d; ++i) s += int64_t(q[i]) * int64_t(hq[i]);
  return s;
}

// The logit of table row v as this kernel defines it (module comment).
inline float Exact(const void* table, bool bf16_table, bool round_bf16,
                   int64_t v, const float* h, int64_t d) {
  float s;
  if (bf16_table) {
    s = Dot(Bf16Row{static_cast<const uint16_t*>(table) + v * d}, h, d);
  } else {
    s = Dot(F32Row{static_cast<const float*>(table) + v * d}, h, d);
  }
  if (round_bf16) s = RoundBf16(s);
  return std::isnan(s) ? std::numeric_limits<float>::infinity() : s;
}

// First index of the largest exact logit among `rows` (increasing).
int32_t ArgmaxOf(const std::vector<int32_t>& rows, const void* table,
                 bool bf16_table, bool round_bf16, const float* h,
                 int64_t d) {
  int32_t best = rows[0];
  float best_value = Exact(table, bf16_table, round_bf16, best, h, d);
  for (size_t i = 1; i < rows.size(); ++i) {
    float value = Exact(table, bf16_table, round_bf16, rows[i], h, d);
    if (value > best_value) best = rows[i], best_value = value;
  }
  return best;
}

// First index of the largest exact logit over all V rows (the fallback).
int32_t FullArgmax(ffi::ThreadPool& pool, const void* table,
                   bool bf16_table, bool round_bf16, const float* h,
                   int64_t d, int64_t v_count) {
  const int64_t tasks = (v_count + kRowsPerTask - 1) / kRowsPerTask;
  std::vector<float> task_value(tasks);
  std::vector<int32_t> task_index(tasks);
  gemscope::ParallelFor(pool, tasks, [&](int64_t t) {
    const int64_t lo = t * kRowsPerTask;
    const int64_t hi = std::min(v_count, lo + kRowsPerTask);
    float best_value = -std::numeric_limits<float>::infinity();
    int32_t best = static_cast<int32_t>(lo);
    for (int64_t v = lo; v < hi; ++v) {
      float value = Exact(table, bf16_table, round_bf16, v, h, d);
      if (value > best_value) best = static_cast<int32_t>(v), best_value = value;
    }
    task_value[t] = best_value;
    task_index[t] = best;
  });
  int32_t best = task_index[0];
  float best_value = task_value[0];
  for (int64_t t = 1; t < tasks; ++t) {
    if (task_value[t] > best_value) best = task_index[t], best_value = task_value[t];
  }
  return best;
}

ffi::Error GreedyHeadImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h,
                          ffi::AnyBuffer table, ffi::Buffer<ffi::S8> q,
                          ffi::Buffer<ffi::F32> scale,
                          ffi::Buffer<ffi::F32> qnorm,
                          ffi::Buffer<ffi::F32> radius, bool round_bf16,
                          int64_t max_candidates,
                          ffi::ResultBuffer<ffi::S32> tokens,
                          ffi::ResultBuffer<ffi::S32> candidates) {
  const auto hd = h.dimensions();
  const auto td = table.dimensions();
  if (hd.size() != 2 || td.size() != 2 || q.dimensions().size() != 2 ||
      td[1] != hd[1] || q.dimensions()[0] != td[0] ||
      q.dimensions()[1] != td[1] ||
      scale.element_count() != static_cast<size_t>(td[0]) ||
      qnorm.element_count() != static_cast<size_t>(td[0]) ||
      radius.element_count() != static_cast<size_t>(td[0]) ||
      tokens->element_count() != static_cast<size_t>(hd[0]) ||
      candidates->element_count() != static_cast<size_t>(hd[0])) {
    return ffi::Error::InvalidArgument(
        "greedy_head: expects h (B, D), table and q (V, D), scale, qnorm "
        "and radius (V), tokens and candidates (B)");
  }
  const bool bf16_table = table.element_type() == ffi::DataType::BF16;
  if (!bf16_table && table.element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument(
        "greedy_head: the table must be float32 or bfloat16");
  }
  const int64_t b_count = hd[0], d = hd[1], v_count = td[0];
  if (v_count == 0 || v_count > std::numeric_limits<int32_t>::max() ||
      d >= 32000) {
    return ffi::Error::InvalidArgument("greedy_head: needs 0 < V < 2^31 and D < 32,000");
  }
  const float* hp = h.typed_data();
  const int8_t* qp = q.typed_data();
  const float* sp = scale.typed_data();
  const float* np = qnorm.typed_data();
  const float* rp = radius.typed_data();
  const void* tp = table.untyped_data();
  int32_t* out = tokens->typed_data();
  int32_t* counts = candidates->typed_data();

  // Per row of h: ||h|| rounded up, its int16 steps and their error; a
  // row that is not finite takes the fallback.
  std::vector<double> norm(b_count), step(b_count), err(b_count);
  std::vector<int16_t> hq(static_cast<size_t>(b_count * d));
  std::vector<bool> finite(b_count);
  for (int64_t b = 0; b < b_count; ++b) {
    const float* hb = hp + b * d;
    double ss = 0.0, amax = 0.0;
    for (int64_t i = 0; i < d; ++i) {
      ss += double(hb[i]) * hb[i];
      amax = std::max(amax, std::fabs(double(hb[i])));
    }
    finite[b] = std::isfinite(ss);
    norm[b] = std::sqrt(ss) * (1.0 + 1e-6);
    step[b] = amax > 0 && finite[b] ? amax / kHalfRange : 1.0;
    double e2 = 0.0;
    for (int64_t i = 0; i < d; ++i) {
      const double r = finite[b] ? std::nearbyint(hb[i] / step[b]) : 0.0;
      hq[b * d + i] = static_cast<int16_t>(
          std::max(-kHalfRange, std::min(kHalfRange, r)));
      const double diff = hb[i] - step[b] * hq[b * d + i];
      e2 += diff * diff;
    }
    err[b] = std::sqrt(e2) * (1.0 + 1e-6);
  }

  // The screen for every row of h, reading q once; per task the largest
  // lower end.
  std::vector<float> screen(static_cast<size_t>(b_count * v_count));
  const int64_t tasks = (v_count + kRowsPerTask - 1) / kRowsPerTask;
  std::vector<double> task_lower(static_cast<size_t>(tasks * b_count));
  gemscope::ParallelFor(pool, tasks, [&](int64_t t) {
    const int64_t lo = t * kRowsPerTask;
    const int64_t hi = std::min(v_count, lo + kRowsPerTask);
    for (int64_t b = 0; b < b_count; ++b) {
      const int16_t* hqb = hq.data() + b * d;
      double lower = -std::numeric_limits<double>::infinity();
      for (int64_t v = lo; v < hi; ++v) {
        const double value =
            double(sp[v]) * step[b] * DotS8S16(qp + v * d, hqb, d);
        screen[b * v_count + v] = static_cast<float>(value);
        lower = std::max(lower, value - Bound(norm[b], err[b], rp[v], np[v]));
      }
      task_lower[t * b_count + b] = lower;
    }
  });

  std::vector<int32_t> rows;
  for (int64_t b = 0; b < b_count; ++b) {
    const float* hb = hp + b * d;
    double lower = -std::numeric_limits<double>::infinity();
    for (int64_t t = 0; t < tasks; ++t) {
      lower = std::max(lower, task_lower[t * b_count + b]);
    }
    bool full = !finite[b] || !std::isfinite(lower);
    if (!full) {
      // A bfloat16 rounding step below the lower end: tokens that round to
      // the largest value tie with it and must be computed too.
      const double threshold =
          round_bf16 ? lower - (std::fabs(lower) * 0x1p-7 + 1e-30) : lower;
      rows.clear();
      const float* sb = screen.data() + b * v_count;
      for (int64_t v = 0; v < v_count; ++v) {
        if (double(sb[v]) + Bound(norm[b], err[b], rp[v], np[v]) >= threshold) {
          if (static_cast<int64_t>(rows.size()) >= max_candidates) {
            full = true;
            break;
          }
          rows.push_back(static_cast<int32_t>(v));
        }
      }
      full = full || rows.empty();
    }
    if (full) {
      out[b] = FullArgmax(pool, tp, bf16_table, round_bf16, hb, d, v_count);
      counts[b] = static_cast<int32_t>(v_count);
    } else {
      out[b] = ArgmaxOf(rows, tp, bf16_table, round_bf16, hb, d);
      counts[b] = static_cast<int32_t>(rows.size());
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemscopeGreedyHead, GreedyHeadImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // h
                                  .Arg<ffi::AnyBuffer>()         // table
                                  .Arg<ffi::Buffer<ffi::S8>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // qnorm
                                  .Arg<ffi::Buffer<ffi::F32>>()  // radius
                                  .Attr<bool>("round_bf16")
                                  .Attr<int64_t>("max_candidates")
                                  .Ret<ffi::Buffer<ffi::S32>>()  // tokens
                                  .Ret<ffi::Buffer<ffi::S32>>()); // candidates
