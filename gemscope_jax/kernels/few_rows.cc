// XLA FFI handler: a few rows of activations against weight matrices, at
// the speed of reading the weights.
//
// Purpose: decoding at batch 1 multiplies one row by every weight of the
// model, so it is bound by reading the weights from memory. On 2 CPU cores
// oneDNN reads them at about 11 GB/s in these shapes and XLA's dot at about
// 17 GB/s inside the decode loop, against about 25 GB/s that a plain read
// reaches; this kernel streams each weight once, in order, split between
// the threads by contiguous ranges of its rows: 20.6 GB/s over the 270M's
// layer weights back to back, about 14.5 GB/s inside the decode loop.
// Callers use it for one row (at 8 rows it is slower than oneDNN).
//
//   out[m, b, n] = sum_k x[m, k] w[b, k, n]     (w_transposed = false)
//   out[m, b, n] = sum_k x[m, k] w[b, n, k]     (w_transposed = true)
//
// Layout (Bw, K, N): each thread takes a contiguous range of k (rows of
// w[b]) and accumulates all N outputs of its range in its own buffer; the
// buffers are then summed in thread order. Layout (Bw, N, K): each thread
// takes a contiguous range of n and computes those dot products.
// Accumulation is f32 (bf16 weights and x are widened exactly); the sum's
// order depends on the thread count, so results may differ from a
// one-thread run in the last bits.
//
// Shapes: x (M, K) f32 or bf16; w (Bw, K, N) or (Bw, N, K), the same dtype
// as x; out (M, Bw, N) f32; M <= kMaxRows.

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "simd_rows.h"
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

template <typename W, typename T>
void Run(const float* x, const T* w, int64_t m, int64_t bw, int64_t k,
         int64_t n, bool transposed, float* out) {
  const int threads = std::max(1, omp_get_max_threads());
  if (transposed) {
    // Rows (b, n) of w, split into contiguous ranges.
    const int64_t rows = bw * n;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; ++r) {
      const W row{w + r * k};
      const int64_t b = r / n, j = r % n;
      for (int64_t i = 0; i < m; ++i) {
        out[(i * bw + b) * n + j] = Dot(row, x + i * k, k);
      }
    }
    return;
  }
  // Each thread: a contiguous range of k for every b, into its own buffer.
  std::vector<float> partial(static_cast<size_t>(threads) * m * bw * n, 0.f);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    const int64_t k0 = k * t / threads, k1 = k * (t + 1) / threads;
    float* mine = partial.data() + static_cast<size_t>(t) * m * bw * n;
    for (int64_t b = 0; b < bw; ++b) {
      for (int64_t kk = k0; kk < k1; ++kk) {
        const W row{w + (b * k + kk) * n};
        for (int64_t i = 0; i < m; ++i) {
          Axpy(x[i * k + kk], row, mine + (i * bw + b) * n, n);
        }
      }
    }
  }
  const int64_t size = m * bw * n;
  std::memcpy(out, partial.data(), sizeof(float) * size);
  for (int t = 1; t < threads; ++t) {
    const float* p = partial.data() + static_cast<size_t>(t) * size;
    for (int64_t i = 0; i < size; ++i) out[i] += p[i];
  }
}

ffi::Error FewRowsImpl(ffi::AnyBuffer x, ffi::AnyBuffer w, bool w_transposed,
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
    Run<F32Row>(xf.data(), static_cast<const float*>(w.untyped_data()), m, bw,
              k, n, w_transposed, out->typed_data());
  } else if (x.element_type() == ffi::DataType::BF16) {
    const uint16_t* xp = static_cast<const uint16_t*>(x.untyped_data());
    for (int64_t i = 0; i < m * k; ++i) xf[i] = Bf16ToF32(xp[i]);
    Run<Bf16Row>(xf.data(), static_cast<const uint16_t*>(w.untyped_data()), m,
               bw, k, n, w_transposed, out->typed_data());
  } else {
    return ffi::Error::InvalidArgument(
        "few_rows: x and w must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemscopeFewRows, FewRowsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // w
                                  .Attr<bool>("w_transposed")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out
