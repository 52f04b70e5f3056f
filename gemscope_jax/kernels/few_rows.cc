// XLA FFI handler: a few rows of activations against weight matrices, at
// the speed of reading the weights.
//
// Purpose: decoding at batch 1 multiplies one row by every weight of the
// model, so it is bound by reading the weights from memory. On 2 CPU cores
// oneDNN reads them at about 11 GB/s in these shapes and XLA's dot at about
// 17 GB/s inside the decode loop, against about 28 GB/s that a plain read
// reaches; this kernel streams each weight once, in order, split into
// contiguous ranges of its rows run on XLA's own threads (xla_pool.h):
// about 27 GB/s inside the decode loop (the 270M's 22 MB of layer weights
// in about 830 us a layer, its attention call included; with an OpenMP
// team instead, 14.5 GB/s). Callers use it for one row (at 8 rows it is
// slower than oneDNN).
//
//   out[m, b, n] = sum_k x[m, k] w[b, k, n]     (w_transposed = false)
//   out[m, b, n] = sum_k x[m, k] w[b, n, k]     (w_transposed = true)
//
// The work is cut into kPartsPerThread parts per pool thread. Layout
// (Bw, K, N): each part is a contiguous range of k (rows of w[b]) and
// accumulates all N outputs of its range in its own buffer; the buffers
// are then summed in part order. Layout (Bw, N, K): each part is a
// contiguous range of n, those dot products. Accumulation is f32 (bf16
// weights and x are widened exactly); the sum's order depends on the pool's
// size (not on which thread ran a part), so results may differ from
// another machine's in the last bits.
//
// Shapes: x (M, K) f32 or bf16; w (Bw, K, N) or (Bw, N, K), the same dtype
// as x; out (M, Bw, N) f32; M <= kMaxRows.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "simd_rows.h"
#include "xla_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using gemscope::Bf16Row;
using gemscope::Bf16ToF32;
using gemscope::Dot;
using gemscope::F32Row;

namespace {

constexpr int64_t kMaxRows = 8;

// acc[0:n] += a * row[0:n].
template <typename W>
inline void Axpy(float a, W row, float* acc, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 va = _mm512_set1_ps(a);
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(va, row.Sixteen(i),
                                              _mm512_loadu_ps(acc + i)));
  }
#endif
  for (; i < n; ++i) acc[i] += a * row.One(i);
}

// acc[0:n] += a[0] r0[0:n] + a[1] r1[0:n] + a[2] r2[0:n] + a[3] r3[0:n],
// added in that order: four weight rows per pass over acc, so that acc's
// loads and stores do not bound the reading of the weights.
template <typename W>
inline void Axpy4(const float* a, W r0, W r1, W r2, W r3, float* acc,
                  int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 a0 = _mm512_set1_ps(a[0]), a1 = _mm512_set1_ps(a[1]),
               a2 = _mm512_set1_ps(a[2]), a3 = _mm512_set1_ps(a[3]);
  for (; i + 16 <= n; i += 16) {
    __m512 s = _mm512_loadu_ps(acc + i);
    s = _mm512_fmadd_ps(a0, r0.Sixteen(i), s);
    s = _mm512_fmadd_ps(a1, r1.Sixteen(i), s);
    s = _mm512_fmadd_ps(a2, r2.Sixteen(i), s);
    s = _mm512_fmadd_ps(a3, r3.Sixteen(i), s);
    _mm512_storeu_ps(acc + i, s);
  }
#endif
  for (; i < n; ++i) {
    float s = acc[i];
    s += a[0] * r0.One(i);
    s += a[1] * r1.One(i);
    s += a[2] * r2.One(i);
    s += a[3] * r3.One(i);
    acc[i] = s;
  }
}

// Parts a thread's share is cut into: helpers that start late still get work.
constexpr int64_t kPartsPerThread = 2;

template <typename W, typename T>
void Run(ffi::ThreadPool& pool, const float* x, const T* w, int64_t m,
         int64_t bw, int64_t k, int64_t n, bool transposed, float* out) {
  const int64_t parts = kPartsPerThread * gemscope::PoolThreads(pool);
  if (transposed) {
    // Rows (b, n) of w, split into contiguous ranges.
    const int64_t rows = bw * n;
    gemscope::ParallelFor(pool, parts, [&](int64_t p) {
      for (int64_t r = rows * p / parts; r < rows * (p + 1) / parts; ++r) {
        const W row{w + r * k};
        const int64_t b = r / n, j = r % n;
        for (int64_t i = 0; i < m; ++i) {
          out[(i * bw + b) * n + j] = Dot(row, x + i * k, k);
        }
      }
    }, /*linger=*/m == 1);
    return;
  }
  // Each part: a contiguous range of k for every b, into its own buffer.
  const int64_t size = m * bw * n;
  std::vector<float> partial(static_cast<size_t>(parts * size), 0.f);
  gemscope::ParallelFor(pool, parts, [&](int64_t p) {
    const int64_t k0 = k * p / parts, k1 = k * (p + 1) / parts;
    float* mine = partial.data() + p * size;
    for (int64_t b = 0; b < bw; ++b) {
      const T* wb = w + b * k * n;
      int64_t kk = k0;
      for (; kk + 4 <= k1; kk += 4) {
        const W r0{wb + kk * n}, r1{wb + (kk + 1) * n}, r2{wb + (kk + 2) * n},
            r3{wb + (kk + 3) * n};
        for (int64_t i = 0; i < m; ++i) {
          Axpy4(x + i * k + kk, r0, r1, r2, r3, mine + (i * bw + b) * n, n);
        }
      }
      for (; kk < k1; ++kk) {
        const W row{wb + kk * n};
        for (int64_t i = 0; i < m; ++i) {
          Axpy(x[i * k + kk], row, mine + (i * bw + b) * n, n);
        }
      }
    }
  }, /*linger=*/m == 1);
  std::memcpy(out, partial.data(), sizeof(float) * size);
  for (int64_t p = 1; p < parts; ++p) {
    const float* q = partial.data() + p * size;
    for (int64_t i = 0; i < size; ++i) out[i] += q[i];
  }
}

ffi::Error FewRowsImpl(ffi::ThreadPool pool, ffi::AnyBuffer x,
                       ffi::AnyBuffer w, bool w_transposed,
                       ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3) {
    return ffi::Error::InvalidArgument(
        "few_rows: expects x (M, K) and w (Bw, K, N) or (Bw, N, K)");
  }
  const int64_t m = xd[0], k = xd[1], bw = wd[0];
  const int64_t n = w_transposed ? wd[1] : wd[2];
  const int64_t wk = w_transposed ? wd[2] : wd[1];
  if (wk != k || m > kMaxRows || m < 1 ||
      out->element_count() != static_cast<size_t>(m * bw * n)) {
    return ffi::Error::InvalidArgument(
        "few_rows: contraction sizes differ, or more than 8 rows");
  }
  if (x.element_type() != w.element_type()) {
    return ffi::Error::InvalidArgument("few_rows: x and w dtypes differ");
  }
  std::vector<float> xf(static_cast<size_t>(m * k));
  if (x.element_type() == ffi::DataType::F32) {
    std::memcpy(xf.data(), x.untyped_data(), sizeof(float) * m * k);
    Run<F32Row>(pool, xf.data(), static_cast<const float*>(w.untyped_data()),
                m, bw, k, n, w_transposed, out->typed_data());
  } else if (x.element_type() == ffi::DataType::BF16) {
    const uint16_t* xp = static_cast<const uint16_t*>(x.untyped_data());
    for (int64_t i = 0; i < m * k; ++i) xf[i] = Bf16ToF32(xp[i]);
    Run<Bf16Row>(pool, xf.data(),
                 static_cast<const uint16_t*>(w.untyped_data()), m, bw, k, n,
                 w_transposed, out->typed_data());
  } else {
    return ffi::Error::InvalidArgument(
        "few_rows: x and w must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemscopeFewRows, FewRowsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // w
                                  .Attr<bool>("w_transposed")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out
