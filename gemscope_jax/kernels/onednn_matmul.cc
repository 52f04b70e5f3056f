// XLA FFI handler running weight matmuls on the CPU with oneDNN.
//
// Purpose: XLA's CPU backend upcasts every bf16 dot to f32, so bf16 runs no
// faster than f32 there; oneDNN's brgemm kernels use the CPU's native bf16
// dot-product instructions (avx512_bf16 / AMX) and reach about twice the f32
// rate. This file computes
//
//   out[m, b, n] = sum_k x[m, k] * w[b, k, n]    (w_transposed = false)
//   out[m, b, n] = sum_k x[m, k] * w[b, n, k]    (w_transposed = true)
//
// with x: (M, K), w: (Bw, K, N) or (Bw, N, K), out: (M, Bw, N) row-major.
// Inputs are both f32 or both bf16; the output is f32 or bf16; accumulation is
// always f32 (a bf16 output is rounded once, at the end).
//
// Caveat: oneDNN parallelizes with its own runtime (OpenMP in Debian's
// libdnnl2), not with XLA's thread pool, so each call uses every core the
// OpenMP runtime sees. Calls are serialized (see ExecMutex) so that XLA
// running two custom calls at once does not put two OpenMP teams on the same
// cores.

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dt = dnnl::memory::data_type;

// Everything a primitive depends on; buffers' addresses are bound per call.
struct Key {
  int64_t m, k, n, bw;
  bool transposed;
  bool in_bf16;
  bool out_bf16;

  bool operator==(const Key& o) const {
    return m == o.m && k == o.k && n == o.n && bw == o.bw &&
           transposed == o.transposed && in_bf16 == o.in_bf16 &&
           out_bf16 == o.out_bf16;
  }
};

struct KeyHash {
  size_t operator()(const Key& key) const {
    size_t h = 0;
    auto mix = [&h](uint64_t v) {
      h ^= std::hash<uint64_t>()(v) + 0x9e3779b97f4a7c15ULL + (h << 6) +
           (h >> 2);
    };
    mix(key.m);
    mix(key.k);
    mix(key.n);
    mix(key.bw);
    mix((key.transposed ? 1 : 0) | (key.in_bf16 ? 2 : 0) |
        (key.out_bf16 ? 4 : 0));
    return h;
  }
};

struct Plan {
  dnnl::matmul prim;
  dnnl::memory::desc src, wei, dst, scratch;
  size_t scratch_bytes = 0;
  std::string impl;  // oneDNN's name for the kernel it chose
};

dnnl::engine& Engine() {
  // A function-local static: initialized once, thread-safely, on first use.
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

std::mutex& CacheMutex() {
  static std::mutex* mu = new std::mutex();
  return *mu;
}

std::unordered_map<Key, std::shared_ptr<const Plan>, KeyHash>& Cache() {
  // Leaked on purpose: XLA may still call the handler during interpreter
  // shutdown, after static destructors would have run.
  static auto* cache =
      new std::unordered_map<Key, std::shared_ptr<const Plan>, KeyHash>();
  return *cache;
}

std::mutex& ExecMutex() {
  // Each execution already spreads over every core through OpenMP; letting
  // XLA run two of them concurrently would only oversubscribe the cores
  // (and each OpenMP team spin-waits), so executions take turns.
  static std::mutex* mu = new std::mutex();
  return *mu;
}

std::vector<unsigned char>& Scratch() {
  // Guarded by ExecMutex. One buffer, grown to the largest need and reused:
  // a fresh allocation per call would page-fault megabytes of packed weights.
  static auto* scratch = new std::vector<unsigned char>();
  return *scratch;
}

std::shared_ptr<const Plan> MakePlan(const Key& key) {
  using dims = dnnl::memory::dims;
  const dt in_type = key.in_bf16 ? dt::bf16 : dt::f32;
  const dt out_type = key.out_bf16 ? dt::bf16 : dt::f32;
  const int64_t m = key.m, k = key.k, n = key.n, bw = key.bw;

  auto plan = std::make_shared<Plan>();
  // x is shared by every weight batch: a batch dim of 1 broadcasts it.
  plan->src = dnnl::memory::desc(dims{1, m, k}, in_type, dims{m * k, k, 1});
  // Logical weight dims are always (Bw, K, N); strides say how it is stored.
  plan->wei = key.transposed
                  ? dnnl::memory::desc(dims{bw, k, n}, in_type,
                                       dims{n * k, 1, k})
                  : dnnl::memory::desc(dims{bw, k, n}, in_type,
                                       dims{k * n, n, 1});
  // Logical dst (Bw, M, N) laid out in memory as (M, Bw, N), so the caller
  // gets the interleaved layout without a transpose. With Bw == 1 the
  // strides are written in the canonical dense form: oneDNN compares strides
  // literally, and its brgemm kernels (the AMX ones included) accept only a
  // dense dst; the interleaved form leaves only its (also fast) gemm kernel.
  plan->dst = bw == 1 ? dnnl::memory::desc(dims{1, m, n}, out_type,
                                           dims{m * n, n, 1})
                      : dnnl::memory::desc(dims{bw, m, n}, out_type,
                                           dims{n, bw * n, 1});

  dnnl::primitive_attr attr;
  // The scratchpad (oneDNN's packed copies of the operands) is ours to
  // provide, so it can be reused across calls (see Scratch).
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::matmul::desc desc(plan->src, plan->wei, plan->dst);
  dnnl::matmul::primitive_desc pd(desc, attr, Engine());
  plan->scratch = pd.scratchpad_desc();
  plan->scratch_bytes = plan->scratch.get_size();
  plan->impl = pd.impl_info_str();
  plan->prim = dnnl::matmul(pd);
  return plan;
}

std::shared_ptr<const Plan> GetPlan(const Key& key) {
  {
    std::lock_guard<std::mutex> lock(CacheMutex());
    auto it = Cache().find(key);
    if (it != Cache().end()) return it->second;
  }
  // Created outside the lock (it takes milliseconds) so that calls with
  // cached shapes are not held up; a racing creator's plan is equivalent.
  std::shared_ptr<const Plan> plan = MakePlan(key);
  std::lock_guard<std::mutex> lock(CacheMutex());
  return Cache().emplace(key, std::move(plan)).first->second;
}

std::string DimsString(ffi::AnyBuffer::Dimensions d) {
  std::string s = "(";
  for (size_t i = 0; i < d.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(d[i]);
  }
  return s + ")";
}

// Validates the call; on success fills `key`. Returns an empty string or the
// reason the call is rejected.
std::string Check(const ffi::AnyBuffer& x, const ffi::AnyBuffer& w,
                  const ffi::AnyBuffer& out, bool transposed, Key* key) {
  const auto xt = x.element_type(), wt = w.element_type(),
             ot = out.element_type();
  auto is_float = [](ffi::DataType t) {
    return t == ffi::DataType::F32 || t == ffi::DataType::BF16;
  };
  if (!is_float(xt) || xt != wt) {
    return "x and w must both be float32 or both be bfloat16";
  }
  if (!is_float(ot)) return "out must be float32 or bfloat16";
  if (x.dimensions().size() != 2 || w.dimensions().size() != 3 ||
      out.dimensions().size() != 3) {
    return "expected x of rank 2, w of rank 3 and out of rank 3, got x " +
           DimsString(x.dimensions()) + ", w " + DimsString(w.dimensions()) +
           ", out " + DimsString(out.dimensions());
  }
  const auto xd = x.dimensions(), wd = w.dimensions(), od = out.dimensions();
  const int64_t m = xd[0], k = xd[1], bw = wd[0];
  const int64_t wk = transposed ? wd[2] : wd[1];
  const int64_t n = transposed ? wd[1] : wd[2];
  if (wk != k || od[0] != m || od[1] != bw || od[2] != n) {
    return std::string("shape mismatch: x ") + DimsString(xd) + ", w " +
           DimsString(wd) + (transposed ? " (Bw, N, K)" : " (Bw, K, N)") +
           ", out " + DimsString(od) + " (expected (M, Bw, N))";
  }
  *key = Key{m, k, n, bw, transposed, xt == ffi::DataType::BF16,
             ot == ffi::DataType::BF16};
  return "";
}

ffi::Error MatmulImpl(ffi::AnyBuffer x, ffi::AnyBuffer w, bool w_transposed,
                      ffi::Result<ffi::AnyBuffer> out) {
  Key key;
  std::string why = Check(x, w, *out, w_transposed, &key);
  if (!why.empty()) {
    return ffi::Error::InvalidArgument("gemscope_onednn_matmul: " + why);
  }
  if (key.m == 0 || key.n == 0 || key.bw == 0) return ffi::Error::Success();
  if (key.k == 0) {
    // An empty sum; oneDNN rejects zero-sized reduction dims.
    std::memset(out->untyped_data(), 0, out->size_bytes());
    return ffi::Error::Success();
  }
  try {
    std::shared_ptr<const Plan> plan = GetPlan(key);
    // Streams are cheap but not meant to be shared between threads.
    thread_local dnnl::stream stream(Engine());
    dnnl::memory src(plan->src, Engine(), x.untyped_data());
    dnnl::memory wei(plan->wei, Engine(), w.untyped_data());
    dnnl::memory dst(plan->dst, Engine(), out->untyped_data());
    std::lock_guard<std::mutex> lock(ExecMutex());
    std::vector<unsigned char>& scratch = Scratch();
    if (scratch.size() < plan->scratch_bytes) {
      scratch.resize(plan->scratch_bytes);
    }
    dnnl::memory pad(plan->scratch, Engine(), scratch.data());
    plan->prim.execute(stream, {{DNNL_ARG_SRC, src},
                                {DNNL_ARG_WEIGHTS, wei},
                                {DNNL_ARG_DST, dst},
                                {DNNL_ARG_SCRATCHPAD, pad}});
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(
        std::string("gemscope_onednn_matmul: oneDNN failed on x ") +
        DimsString(x.dimensions()) + ", w " + DimsString(w.dimensions()) +
        (w_transposed ? " (transposed)" : "") + ", out " +
        DimsString(out->dimensions()) + ": " + e.what() + " (status " +
        std::to_string(static_cast<int>(e.status)) + ")");
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("gemscope_onednn_matmul: ") +
                                e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemscopeOnednnMatmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()   // x
                                  .Arg<ffi::AnyBuffer>()   // w
                                  .Attr<bool>("w_transposed")
                                  .Ret<ffi::AnyBuffer>()); // out

// Diagnostics for tests and benchmarks: writes the name of the oneDNN
// implementation chosen for a problem (e.g. "brg:avx512_core_bf16") into
// `buf`. Returns 0 on success, -1 if oneDNN rejects the problem.
extern "C" int gemscope_onednn_impl_name(int64_t m, int64_t k, int64_t n,
                                         int64_t bw, int transposed,
                                         int in_bf16, int out_bf16, char* buf,
                                         size_t len) {
  if (len == 0) return -1;
  buf[0] = '\0';
  try {
    std::shared_ptr<const Plan> plan =
        GetPlan(Key{m, k, n, bw, transposed != 0, in_bf16 != 0, out_bf16 != 0});
    std::strncpy(buf, plan->impl.c_str(), len - 1);
    buf[len - 1] = '\0';
    return 0;
  } catch (const std::exception& e) {
    std::strncpy(buf, e.what(), len - 1);
    buf[len - 1] = '\0';
    return -1;
  }
}
