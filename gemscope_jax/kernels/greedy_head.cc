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
// and this kernel's f32 sum of E_v . h is within (2 gamma_D + 2u) sqrt(D) max|E_v| ||h|| of the real-number dot.
// `radius` holds ||E_v - s_v q_v|| plus that rounding term (per unit
// ||h||) and `qnorm` holds s_v ||q_v||, both built in greedy_head.py with a
// margin for their own rounding, so every logit lies within
// bound_v = ||h|| radius_v + ||h - t_h round(h / t_h)|| qnorm_v of
// screen_v (both in double). With L the largest screen_v - bound_v, a
// token with screen_v + bound_v (rounded up to a float) below L (less a bfloat16 rounding step when rounding)
// is smaller than some other token's logit and cannot be the argmax; the
// rest (typically 2 to 40 of 262,144 on real text) are computed exactly.
// When more than `max_candidates` remain, or a row is not finite, that row
// falls back to every exact logit.
//
// Shapes: h (B, D) f32; table (V, D) f32 or bf16, row-major; packed
// (ceil(V / 64), ceil(D / 4), 256) u8, the int8 rows q_v + 128 in tiles
// (layout below, built by greedy_head.py); scale, qnorm, radius (V) f32;
// outputs tokens (B) s32 and candidates (B) s32 (how many tokens were
// computed exactly: V on the fallback).
//
// The screen's integer dot runs as unsigned x signed byte dots (AVX-512
// VNNI `vpdpbusd`) over 16 table rows at a time, h's int16 steps split in
// two byte halves (hq = 256 hi + lo): two instructions per 64 bytes of the
// table, against four (widen, multiply-add) row by row with a horizontal
// sum each. Same integers, so the same screen; without VNNI a scalar loop
// computes them.
//
// Caveat: parallelised over blocks of table rows on XLA's thread pool
// (xla_pool.h), every row of h per tile while the tile is in cache, so the
// packed table is read once per call whatever B is; its integer products
// are recomputed per row of h (callers choose the screen for small B).

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

// The packed screen: tiles of 64 table rows (4 blocks of 16); in a tile,
// for each group g of 4 dimensions, 256 bytes: block k's 16 rows r, each
// the 4 bytes q[64 t + 16 k + r][4 g .. 4 g + 3] + 128 (unsigned). One
// unsigned x signed byte dot instruction (VNNI) then adds 4 products into
// each of 16 rows' lanes: no horizontal sums, no widening.
constexpr int64_t kTileRows = 64;
constexpr int64_t kTileGroupBytes = 256;
constexpr int64_t kTilesPerTask = 16;  // 1,024 rows
constexpr double kHalfRange = 16383.0;  // h's int16 steps

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

// The nearest float at or above x (x itself when it is a float; NaN stays
// NaN).
inline float FloatUp(double x) {
  float f = static_cast<float>(x);
  if (double(f) < x) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}

// The nearest float at or below x.
inline float FloatDown(double x) {
  float f = static_cast<float>(x);
  if (double(f) > x) f = std::nextafter(f, -std::numeric_limits<float>::infinity());
  return f;
}

// One row of h as the screen reads it: hq = round(h / step) in int16
// steps, split as hq = 256 hi + lo with lo in [-128, 127] and hi in
// [-64, 64], both bytes, four dimensions to an int32 (for broadcasting);
// the dimensions past D (up to whole groups) are zero.
struct ScreenRow {
  std::vector<int16_t> hq;     // (4 G)
  std::vector<int32_t> hi4;    // (G)
  std::vector<int32_t> lo4;    // (G)
  int32_t hi_sum = 0, lo_sum = 0;
  double norm = 0, step = 1, err = 0;  // ||h|| (rounded up), t_h, its error
  bool finite = true;
};

ScreenRow MakeScreenRow(const float* h, int64_t d, int64_t groups) {
  ScreenRow row;
  double ss = 0.0, amax = 0.0;
  for (int64_t i = 0; i < d; ++i) {
    ss += double(h[i]) * h[i];
    amax = std::max(amax, std::fabs(double(h[i])));
  }
  row.finite = std::isfinite(ss);
  row.norm = std::sqrt(ss) * (1.0 + 1e-6);
  row.step = amax > 0 && row.finite ? amax / kHalfRange : 1.0;
  row.hq.assign(static_cast<size_t>(4 * groups), 0);
  double e2 = 0.0;
  for (int64_t i = 0; i < d; ++i) {
    const double r = row.finite ? std::nearbyint(h[i] / row.step) : 0.0;
    row.hq[i] = static_cast<int16_t>(std::max(-kHalfRange, std::min(kHalfRange, r)));
    const double diff = h[i] - row.step * row.hq[i];
    e2 += diff * diff;
  }
  row.err = std::sqrt(e2) * (1.0 + 1e-6);
  row.hi4.resize(groups);
  row.lo4.resize(groups);
  for (int64_t g = 0; g < groups; ++g) {
    int8_t hi[4], lo[4];
    for (int j = 0; j < 4; ++j) {
      const int v = row.hq[4 * g + j];
      const int l = ((v + 128) & 255) - 128;
      lo[j] = static_cast<int8_t>(l);
      hi[j] = static_cast<int8_t>((v - l) / 256);
      row.hi_sum += hi[j];
      row.lo_sum += lo[j];
    }
    std::memcpy(&row.hi4[g], hi, 4);
    std::memcpy(&row.lo4[g], lo, 4);
  }
  return row;
}

// dots[i] = q_(64 t + i) . hq, exactly (as doubles), for one tile.
// The two byte halves of hq give two int32 sums per row, each exact
// (|sum| <= 255 * 128 * 4 G < 2^31 for D < 32,000), less their offset;
// 256 hi + lo is then exact in double.
inline void TileDots(const uint8_t* tile, const ScreenRow& row, int64_t groups,
                     double* dots) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  __m512i h0 = _mm512_setzero_si512(), h1 = h0, h2 = h0, h3 = h0;
  __m512i l0 = h0, l1 = h0, l2 = h0, l3 = h0;
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* p = tile + g * kTileGroupBytes;
    const __m512i bh = _mm512_set1_epi32(row.hi4[g]);
    const __m512i bl = _mm512_set1_epi32(row.lo4[g]);
    const __m512i w0 = _mm512_loadu_si512(p);
    const __m512i w1 = _mm512_loadu_si512(p + 64);
    const __m512i w2 = _mm512_loadu_si512(p + 128);
    const __m512i w3 = _mm512_loadu_si512(p + 192);
    h0 = _mm512_dpbusd_epi32(h0, w0, bh);
    l0 = _mm512_dpbusd_epi32(l0, w0, bl);
    h1 = _mm512_dpbusd_epi32(h1, w1, bh);
    l1 = _mm512_dpbusd_epi32(l1, w1, bl);
    h2 = _mm512_dpbusd_epi32(h2, w2, bh);
    l2 = _mm512_dpbusd_epi32(l2, w2, bl);
    h3 = _mm512_dpbusd_epi32(h3, w3, bh);
    l3 = _mm512_dpbusd_epi32(l3, w3, bl);
  }
  const __m512i hoff = _mm512_set1_epi32(128 * row.hi_sum);
  const __m512i loff = _mm512_set1_epi32(128 * row.lo_sum);
  const __m512d k256 = _mm512_set1_pd(256.0);
  const __m512i hs[4] = {h0, h1, h2, h3};
  const __m512i ls[4] = {l0, l1, l2, l3};
  for (int k = 0; k < 4; ++k) {
    const __m512i hk = _mm512_sub_epi32(hs[k], hoff);
    const __m512i lk = _mm512_sub_epi32(ls[k], loff);
    for (int half = 0; half < 2; ++half) {
      const __m256i h8 = half ? _mm512_extracti64x4_epi64(hk, 1)
                              : _mm512_castsi512_si256(hk);
      const __m256i l8 = half ? _mm512_extracti64x4_epi64(lk, 1)
                              : _mm512_castsi512_si256(lk);
      _mm512_storeu_pd(dots + 16 * k + 8 * half,
                       _mm512_add_pd(_mm512_mul_pd(_mm512_cvtepi32_pd(h8), k256),
                                     _mm512_cvtepi32_pd(l8)));
    }
  }
#else
  for (int64_t i = 0; i < kTileRows; ++i) {
    const int64_t k = i / 16, r = i % 16;
    int64_t s = 0;
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* p = tile + g * kTileGroupBytes + k * 64 + r * 4;
      for (int j = 0; j < 4; ++j) {
        s += (int64_t(p[j]) - 128) * int64_t(row.hq[4 * g + j]);
      }
    }
    dots[i] = static_cast<double>(s);
  }
#endif
}

// For the tile's rows [v0, v0 + n): upper[v] = screen_v + bound_v rounded
// up to a float; returns the largest screen_v - bound_v.
inline double TileBounds(const double* dots, const ScreenRow& row,
                         const float* sp, const float* rp, const float* np,
                         int64_t v0, int64_t n, float* upper) {
  double lower = -std::numeric_limits<double>::infinity();
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512d step = _mm512_set1_pd(row.step);
  const __m512d norm = _mm512_set1_pd(row.norm);
  const __m512d err = _mm512_set1_pd(row.err);
  __m512d low = _mm512_set1_pd(lower);
  for (; i + 8 <= n; i += 8) {
    const int64_t v = v0 + i;
    const __m512d s = _mm512_cvtps_pd(_mm256_loadu_ps(sp + v));
    const __m512d value = _mm512_mul_pd(_mm512_mul_pd(s, step),
                                        _mm512_loadu_pd(dots + i));
    const __m512d bound = _mm512_add_pd(
        _mm512_mul_pd(norm, _mm512_cvtps_pd(_mm256_loadu_ps(rp + v))),
        _mm512_mul_pd(err, _mm512_cvtps_pd(_mm256_loadu_ps(np + v))));
    // max(x, low) keeps low where x is NaN, as std::max(low, x) does.
    low = _mm512_max_pd(_mm512_sub_pd(value, bound), low);
    _mm256_storeu_ps(upper + v, _mm512_cvt_roundpd_ps(
        _mm512_add_pd(value, bound), _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC));
  }
  lower = _mm512_reduce_max_pd(low);
#endif
  for (; i < n; ++i) {
    const int64_t v = v0 + i;
    const double value = double(sp[v]) * row.step * dots[i];
    const double bound = Bound(row.norm, row.err, rp[v], np[v]);
    lower = std::max(lower, value - bound);
    upper[v] = FloatUp(value + bound);
  }
  return lower;
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
  const int64_t rows_per_task = kTileRows * kTilesPerTask;
  const int64_t tasks = (v_count + rows_per_task - 1) / rows_per_task;
  std::vector<float> task_value(tasks);
  std::vector<int32_t> task_index(tasks);
  gemscope::ParallelFor(pool, tasks, [&](int64_t t) {
    const int64_t lo = t * rows_per_task;
    const int64_t hi = std::min(v_count, lo + rows_per_task);
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

// Appends the v with upper[v] >= floor (increasing) to `rows`; false when
// that would pass `cap`.
bool Candidates(const float* upper, int64_t v_count, float floor, int64_t cap,
                std::vector<int32_t>& rows) {
  int64_t v = 0;
#if defined(__AVX512F__)
  const __m512 f = _mm512_set1_ps(floor);
  for (; v + 16 <= v_count; v += 16) {
    __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(upper + v), f, _CMP_GE_OQ);
    while (m) {
      if (static_cast<int64_t>(rows.size()) >= cap) return false;
      rows.push_back(static_cast<int32_t>(v + __builtin_ctz(m)));
      m &= m - 1;
    }
  }
#endif
  for (; v < v_count; ++v) {
    if (upper[v] >= floor) {
      if (static_cast<int64_t>(rows.size()) >= cap) return false;
      rows.push_back(static_cast<int32_t>(v));
    }
  }
  return true;
}

ffi::Error GreedyHeadImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h,
                          ffi::AnyBuffer table, ffi::Buffer<ffi::U8> packed,
                          ffi::Buffer<ffi::F32> scale,
                          ffi::Buffer<ffi::F32> qnorm,
                          ffi::Buffer<ffi::F32> radius, bool round_bf16,
                          int64_t max_candidates,
                          ffi::ResultBuffer<ffi::S32> tokens,
                          ffi::ResultBuffer<ffi::S32> candidates) {
  const auto hd = h.dimensions();
  const auto td = table.dimensions();
  const auto pd = packed.dimensions();
  if (hd.size() != 2 || td.size() != 2 || td[1] != hd[1]) {
    return ffi::Error::InvalidArgument(
        "greedy_head: expects h (B, D) and table (V, D)");
  }
  const int64_t b_count = hd[0], d = hd[1], v_count = td[0];
  const int64_t tiles = (v_count + kTileRows - 1) / kTileRows;
  const int64_t groups = (d + 3) / 4;
  if (pd.size() != 3 || pd[0] != tiles || pd[1] != groups ||
      pd[2] != kTileGroupBytes ||
      scale.element_count() != static_cast<size_t>(v_count) ||
      qnorm.element_count() != static_cast<size_t>(v_count) ||
      radius.element_count() != static_cast<size_t>(v_count) ||
      tokens->element_count() != static_cast<size_t>(b_count) ||
      candidates->element_count() != static_cast<size_t>(b_count)) {
    return ffi::Error::InvalidArgument(
        "greedy_head: expects packed (ceil(V / 64), ceil(D / 4), 256), "
        "scale, qnorm and radius (V), tokens and candidates (B)");
  }
  const bool bf16_table = table.element_type() == ffi::DataType::BF16;
  if (!bf16_table && table.element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument(
        "greedy_head: the table must be float32 or bfloat16");
  }
  if (v_count == 0 || v_count > std::numeric_limits<int32_t>::max() ||
      d >= 32000) {
    return ffi::Error::InvalidArgument("greedy_head: needs 0 < V < 2^31 and D < 32,000");
  }
  const float* hp = h.typed_data();
  const uint8_t* pk = packed.typed_data();
  const float* sp = scale.typed_data();
  const float* np = qnorm.typed_data();
  const float* rp = radius.typed_data();
  const void* tp = table.untyped_data();
  int32_t* out = tokens->typed_data();
  int32_t* counts = candidates->typed_data();

  std::vector<ScreenRow> rows_h;
  rows_h.reserve(b_count);
  for (int64_t b = 0; b < b_count; ++b) {
    rows_h.push_back(MakeScreenRow(hp + b * d, d, groups));
  }

  // Every row of h screened against each tile while it is in cache (the
  // packed table is read once per call); per task and row of h the
  // largest lower end.
  std::vector<float> upper(static_cast<size_t>(b_count * v_count));
  const int64_t tasks = (tiles + kTilesPerTask - 1) / kTilesPerTask;
  std::vector<double> task_lower(static_cast<size_t>(tasks * b_count));
  gemscope::ParallelFor(pool, tasks, [&](int64_t t) {
    double dots[kTileRows];
    std::vector<double> lower(b_count, -std::numeric_limits<double>::infinity());
    const int64_t end = std::min(tiles, (t + 1) * kTilesPerTask);
    for (int64_t tile = t * kTilesPerTask; tile < end; ++tile) {
      const uint8_t* tp8 = pk + tile * groups * kTileGroupBytes;
      const int64_t v0 = tile * kTileRows;
      const int64_t n = std::min(kTileRows, v_count - v0);
      for (int64_t b = 0; b < b_count; ++b) {
        TileDots(tp8, rows_h[b], groups, dots);
        lower[b] = std::max(lower[b],
                            TileBounds(dots, rows_h[b], sp, rp, np, v0, n,
                                       upper.data() + b * v_count));
      }
    }
    for (int64_t b = 0; b < b_count; ++b) task_lower[t * b_count + b] = lower[b];
  }, /*linger=*/b_count == 1);

  std::vector<int32_t> rows;
  for (int64_t b = 0; b < b_count; ++b) {
    const float* hb = hp + b * d;
    double lower = -std::numeric_limits<double>::infinity();
    for (int64_t t = 0; t < tasks; ++t) {
      lower = std::max(lower, task_lower[t * b_count + b]);
    }
    bool full = !rows_h[b].finite || !std::isfinite(lower);
    if (!full) {
      // A bfloat16 rounding step below the lower end: tokens that round to
      // the largest value tie with it and must be computed too.
      const double threshold =
          round_bf16 ? lower - (std::fabs(lower) * 0x1p-7 + 1e-30) : lower;
      rows.clear();
      full = !Candidates(upper.data() + b * v_count, v_count,
                         FloatDown(threshold), max_candidates, rows) ||
             rows.empty();
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
                                  .Arg<ffi::Buffer<ffi::U8>>()   // packed
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // qnorm
                                  .Arg<ffi::Buffer<ffi::F32>>()  // radius
                                  .Attr<bool>("round_bf16")
                                  .Attr<int64_t>("max_candidates")
                                  .Ret<ffi::Buffer<ffi::S32>>()  // tokens
                                  .Ret<ffi::Buffer<ffi::S32>>()); // candidates
