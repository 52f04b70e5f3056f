// Reading weight rows as f32 and their dot products, shared by the CPU
// kernels that stream a weight table (few_rows.cc, greedy_head.cc).
//
// A row type gives element i as f32 one at a time (`One`) and, with
// AVX-512, sixteen at a time (`Sixteen`); bfloat16 widens exactly (a
// shift). `Dot` sums in four 16-lane accumulators (FMA latency), adds them
// as a tree, then the tail: the same order for every row, whatever its
// index, so a row's value does not depend on where it sits in the table.

#ifndef GEMSCOPE_JAX_KERNELS_SIMD_ROWS_H_
#define GEMSCOPE_JAX_KERNELS_SIMD_ROWS_H_

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace gemscope {

inline float Bf16ToF32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

struct F32Row {
  const float* p;
  float One(int64_t i) const { return p[i]; }
#if defined(__AVX512F__)
  __m512 Sixteen(int64_t i) const { return _mm512_loadu_ps(p + i); }
#endif
};

struct Bf16Row {
  const uint16_t* p;
  float One(int64_t i) const { return Bf16ToF32(p[i]); }
#if defined(__AVX512F__)
  __m512 Sixteen(int64_t i) const {
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i))),
        16));
  }
#endif
};

// row . x over n elements, in f32.
template <typename Row>
inline float Dot(Row row, const float* x, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(),
         a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  for (; i + 64 <= n; i += 64) {
    a0 = _mm512_fmadd_ps(row.Sixteen(i), _mm512_loadu_ps(x + i), a0);
    a1 = _mm512_fmadd_ps(row.Sixteen(i + 16), _mm512_loadu_ps(x + i + 16), a1);
    a2 = _mm512_fmadd_ps(row.Sixteen(i + 32), _mm512_loadu_ps(x + i + 32), a2);
    a3 = _mm512_fmadd_ps(row.Sixteen(i + 48), _mm512_loadu_ps(x + i + 48), a3);
  }
  for (; i + 16 <= n; i += 16) {
    a0 = _mm512_fmadd_ps(row.Sixteen(i), _mm512_loadu_ps(x + i), a0);
  }
  s = _mm512_reduce_add_ps(
      _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#else
  constexpr int kLanes = 16;
  float acc[kLanes] = {0};
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += row.One(i + j) * x[i + j];
  }
  for (int j = 0; j < kLanes; ++j) s += acc[j];
#endif
  for (; i < n; ++i) s += row.One(i) * x[i];
  return s;
}

}  // namespace gemscope

#endif  // GEMSCOPE_JAX_KERNELS_SIMD_ROWS_H_
