// XLA FFI handler: the elementwise part of a JumpReLU SAE's backward pass.
//
// Purpose: after dL/df = g_recon @ w_dec^T, a JumpReLU training step needs
// the pre-activation gradient and several per-latent sums over the batch,
// each a pass over a (tokens, latents) array. XLA's CPU backend materialises
// most of them as separate arrays and reduces over the token axis slowly;
// here they are one pass that reads dL/df and the pre-activations once and
// writes the pre-activation gradient once (in place of dL/df when XLA lets
// the buffers alias). The pre-activations come as the encoder matmul's output
// and the bias, pre = xw + bias, so they are never materialised either.
// With a = pre > threshold, b = pre < threshold and
// w = |(pre - threshold) / bandwidth| < 1/2 (the straight-through window,
// the same expression as the Python rectangle kernel):
//
//   g_pre[t, i]  = a ? g_f[t, i] : (b ? below_grad : 0)
//   sums[0, i]   = sum_t w * g_f[t, i]      (threshold gradient of the MSE)
//   sums[1, i]   = sum_t w                  (threshold gradient of the L0)
//   sums[2, i]   = sum_t a                  (firing counts: L0, dead latents)
//   sums[3, i]   = sum_t g_pre[t, i]        (b_enc gradient)
//   sums[4, i]   = sum_t b                  (pre-activation loss gradient)
//   sums[5, i]   = sum_t b * (threshold - pre)   (pre-activation loss)
//
// Shapes: g_f, xw, g_pre (T, L) row-major f32; bias, threshold (L);
// sums (6, L).
//
// Caveat: parallelised with OpenMP over blocks of latents (each thread owns
// its columns, so the sums need no reduction across threads and do not depend
// on the thread count); counts are accumulated in f32, exact up to 2^24
// tokens per batch.

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 512;  // latents per task: 6 accumulators in L1
constexpr int64_t kSums = 6;

ffi::Error JumpReluGradImpl(ffi::Buffer<ffi::F32> g_f,
                            ffi::Buffer<ffi::F32> pre,
                            ffi::Buffer<ffi::F32> bias,
                            ffi::Buffer<ffi::F32> threshold, float bandwidth,
                            float below_grad,
                            ffi::ResultBuffer<ffi::F32> g_pre,
                            ffi::ResultBuffer<ffi::F32> sums) {
  const auto dims = pre.dimensions();
  if (dims.size() != 2 || g_f.dimensions().size() != 2 ||
      g_f.dimensions()[0] != dims[0] || g_f.dimensions()[1] != dims[1]) {
    return ffi::Error::InvalidArgument(
        "jumprelu_grad: g_f and xw must be (tokens, latents) of one shape");
  }
  const int64_t rows = dims[0], cols = dims[1];
  if (threshold.element_count() != static_cast<size_t>(cols) ||
      bias.element_count() != static_cast<size_t>(cols) ||
      sums->element_count() != static_cast<size_t>(kSums * cols)) {
    return ffi::Error::InvalidArgument(
        "jumprelu_grad: bias and threshold must be (latents,), sums (6, latents)");
  }
  const float* gf = g_f.typed_data();
  const float* p = pre.typed_data();
  const float* th = threshold.typed_data();
  const float* b = bias.typed_data();
  float* gp = g_pre->typed_data();
  float* out = sums->typed_data();
  const int64_t n_blocks = (cols + kBlock - 1) / kBlock;

#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const int64_t c0 = blk * kBlock;
    const int64_t width = std::min(cols, c0 + kBlock) - c0;
    alignas(64) float s_wg[kBlock], s_w[kBlock], s_a[kBlock], s_gp[kBlock],
        s_b[kBlock], s_gap[kBlock], t[kBlock], bj[kBlock];
    for (int64_t j = 0; j < width; ++j) {
      s_wg[j] = s_w[j] = s_a[j] = s_gp[j] = s_b[j] = s_gap[j] = 0.f;
      t[j] = th[c0 + j];
      bj[j] = b[c0 + j];
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float* gf_r = gf + r * cols + c0;
      const float* p_r = p + r * cols + c0;
      float* gp_r = gp + r * cols + c0;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const float x = p_r[j] + bj[j], g = gf_r[j], tj = t[j];
        const bool act = x > tj;
        const bool below = x < tj;
        const bool win = std::fabs((x - tj) / bandwidth) < 0.5f;
        const float o = act ? g : (below ? below_grad : 0.f);
        gp_r[j] = o;
        s_wg[j] += win ? g : 0.f;
        s_w[j] += win ? 1.f : 0.f;
        s_a[j] += act ? 1.f : 0.f;
        s_gp[j] += o;
        s_b[j] += below ? 1.f : 0.f;
        s_gap[j] += below ? tj - x : 0.f;
      }
    }
    for (int64_t j = 0; j < width; ++j) {
      out[0 * cols + c0 + j] = s_wg[j];
      out[1 * cols + c0 + j] = s_w[j];
      out[2 * cols + c0 + j] = s_a[j];
      out[3 * cols + c0 + j] = s_gp[j];
      out[4 * cols + c0 + j] = s_b[j];
      out[5 * cols + c0 + j] = s_gap[j];
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemscopeJumpReluGrad, JumpReluGradImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g_f
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xw
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // threshold
                                  .Attr<float>("bandwidth")
                                  .Attr<float>("below_grad")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // g_pre
                                  .Ret<ffi::Buffer<ffi::F32>>());  // sums
