// Splitting a CPU kernel's work over XLA's own thread pool.
//
// Why not OpenMP: a custom call runs between XLA's thunks, whose threads
// (XLA's intra-op pool) keep spinning for a while after their own work. An
// OpenMP team started inside the call then shares the cores with them; on
// 2 cores the decode loop's one-row products ran a third slower than the
// same products back to back. Parts scheduled on XLA's pool run on the
// threads that are already awake.
//
// `ParallelFor(pool, parts, body)` calls body(p) once for every p in
// [0, parts), on the calling thread and on up to parts - 1 helpers
// scheduled on the pool. Parts are claimed dynamically, so the call never
// waits for a helper that has not started: the caller claims what is left
// and returns when every claimed part has finished. A helper that starts
// after that finds nothing to claim and touches nothing but the shared
// counters, which it co-owns. Which thread runs a part is not fixed, so a
// part must write only its own outputs (per-part buffers, not per-thread).

#ifndef GEMSCOPE_JAX_KERNELS_XLA_POOL_H_
#define GEMSCOPE_JAX_KERNELS_XLA_POOL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace gemscope {

// How many threads a kernel can count on: the pool's, at least 1.
inline int PoolThreads(xla::ffi::ThreadPool& pool) {
  return static_cast<int>(std::max<int64_t>(1, pool.num_threads()));
}

template <typename Body>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t parts, const Body& body) {
  if (parts <= 1) {
    if (parts == 1) body(0);
    return;
  }
  struct Counters {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto counters = std::make_shared<Counters>();
  const Body* shared_body = &body;
  // Claims parts until none is left. `shared_body` is read only after a
  // claim succeeds, and a claim succeeds only while the caller waits.
  auto drain = [counters, parts, shared_body]() {
    for (int64_t p; (p = counters->next.fetch_add(1)) < parts;) {
      (*shared_body)(p);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers =
      std::min<int64_t>(parts - 1, PoolThreads(pool) - 1);
  for (int64_t i = 0; i < helpers; ++i) {
    auto task = drain;
    pool.Schedule(std::move(task));
  }
  drain();
  while (counters->done.load(std::memory_order_acquire) < parts) {
#if defined(__x86_64__)
    _mm_pause();
#else
    std::this_thread::yield();
#endif
  }
}

}  // namespace gemscope

#endif  // GEMSCOPE_JAX_KERNELS_XLA_POOL_H_
