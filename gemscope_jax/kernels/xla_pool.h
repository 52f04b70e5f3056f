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
//
// A helper woken from the pool's sleep starts about 18 us after it is
// scheduled; a decode step at batch 1 makes about a hundred calls of
// 50-500 us, so with `linger` the helpers stay awake for 200 us after a
// call and join the next one as soon as it is published (float32 step
// 24.3 -> 22.6 ms). Calls are published on one board; a caller always
// drains its own parts to the end, so a helper that joins late, or not at
// all, costs time and never a result.

#ifndef GEMSCOPE_JAX_KERNELS_XLA_POOL_H_
#define GEMSCOPE_JAX_KERNELS_XLA_POOL_H_

#include <algorithm>
#include <atomic>
#include <chrono>
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

namespace pool_internal {

// One ParallelFor call's work: parts claimed through `next`, counted
// through `done`; `body` is dereferenced only after a successful claim,
// which can happen only while the call is still waiting for its parts.
struct Job {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t parts = 0;
  uint64_t id = 0;
  const void* body = nullptr;
  void (*run)(const void* body, int64_t part) = nullptr;
};

inline void Drain(Job& job) {
  for (int64_t p; (p = job.next.fetch_add(1)) < job.parts;) {
    job.run(job.body, p);
    job.done.fetch_add(1, std::memory_order_release);
  }
}

// How long a helper stays awake after its last part, waiting for the next
// call's (a decode step makes about a hundred calls a few to a few tens of
// microseconds apart; a helper woken from sleep starts about 18 us late).
constexpr auto kLinger = std::chrono::microseconds(200);

// The newest published job (one slot: with calls running at once, helpers
// join the newest; every caller drains its own job to the end whatever
// the helpers do, so a missed job is slower, never wrong).
struct Board {
  std::atomic_flag lock = ATOMIC_FLAG_INIT;
  std::shared_ptr<Job> job;             // guarded by lock
  std::atomic<uint64_t> published{0};   // the id of `job`, 0 for none
  std::atomic<uint64_t> last_id{0};
  std::atomic<int> awake{0};            // helpers in Linger

  // Holds `lock` for its scope.
  struct Hold {
    explicit Hold(std::atomic_flag& f) : flag(f) {
      while (flag.test_and_set(std::memory_order_acquire)) Pause();
    }
    ~Hold() { flag.clear(std::memory_order_release); }
    std::atomic_flag& flag;
  };

  std::shared_ptr<Job> Take() {
    Hold hold(lock);
    return job;
  }
  void Put(std::shared_ptr<Job> j) {
    Hold hold(lock);
    published.store(j ? j->id : 0, std::memory_order_release);
    job = std::move(j);
  }
  void Retract(const Job* j) {
    Hold hold(lock);
    if (job.get() == j) {
      job.reset();
      published.store(0, std::memory_order_release);
    }
  }
  static void Pause() {
#if defined(__x86_64__)
    _mm_pause();
#else
    std::this_thread::yield();
#endif
  }
};

inline Board& TheBoard() {
  static Board board;
  return board;
}

// A helper's task on the pool: work on every job published while it is
// awake, and go back to the pool kLinger after the last one.
inline void Linger() {
  Board& board = TheBoard();
  board.awake.fetch_add(1);
  uint64_t seen = 0;
  auto until = std::chrono::steady_clock::now() + kLinger;
  for (;;) {
    const uint64_t id = board.published.load(std::memory_order_acquire);
    if (id != 0 && id != seen) {
      seen = id;
      std::shared_ptr<Job> job = board.Take();
      if (job) {
        seen = job->id;
        Drain(*job);
      }
      until = std::chrono::steady_clock::now() + kLinger;
      continue;
    }
    if (std::chrono::steady_clock::now() >= until) break;
    Board::Pause();
  }
  board.awake.fetch_sub(1);
}

}  // namespace pool_internal

// `linger`: the helpers stay awake for kLinger after the call, to join the
// next call at once. For chains of small calls with nothing else running
// between them (decoding at batch 1); elsewhere a lingering helper holds a
// pool thread that XLA's own parallel ops would use (decoding at batch 8
// ran 6-8 % slower with it), so the default is off.
template <typename Body>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t parts, const Body& body,
                 bool linger = false) {
  if (parts <= 1) {
    if (parts == 1) body(0);
    return;
  }
  using pool_internal::Job;
  pool_internal::Board& board = pool_internal::TheBoard();
  auto job = std::make_shared<Job>();
  job->parts = parts;
  job->id = board.last_id.fetch_add(1) + 1;
  job->body = &body;
  job->run = [](const void* b, int64_t p) {
    (*static_cast<const Body*>(b))(p);
  };
  board.Put(job);
  const int64_t helpers =
      std::min<int64_t>(parts - 1, PoolThreads(pool) - 1) -
      board.awake.load();
  for (int64_t i = 0; i < helpers; ++i) {
    if (linger) {
      pool.Schedule([] { pool_internal::Linger(); });
    } else {
      pool.Schedule([job] { pool_internal::Drain(*job); });
    }
  }
  pool_internal::Drain(*job);
  while (job->done.load(std::memory_order_acquire) < parts) {
    pool_internal::Board::Pause();
  }
  board.Retract(job.get());
}

}  // namespace gemscope

#endif  // GEMSCOPE_JAX_KERNELS_XLA_POOL_H_
