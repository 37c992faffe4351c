// What the C++ custom calls that split their work over XLA's intra-op threads share.
//
// The FFI ThreadPool (not OpenMP) shares the threads XLA already runs, so a kernel never
// oversubscribes the cores; the caller and the pool's threads take work items from one atomic
// counter, so a busy pool (e.g. two streams at batch 32) only means the caller does more items
// itself, never a wait on a task that cannot start.
#ifndef BIREAL_JAX_OPS_CPU_CSRC_FFI_THREADS_H_
#define BIREAL_JAX_OPS_CPU_CSRC_FFI_THREADS_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace bireal {

// Runs body(i) for i in [0, n): the caller and up to `pool.num_threads()` pool tasks take
// indices from a shared counter; returns when all are done. Tasks that start late find the
// counter exhausted and return without touching anything but the shared state.
template <typename F>
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, F&& body) {
  if (n <= 0) return;
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  // The caller is one of the workers: num_threads − 1 helpers keep one thread per core.
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads() - 1), n - 1);
  // The body is only ever called for an index below n, i.e. while the caller still waits.
  auto* fn = &body;
  auto work = [state, n, fn] {
    for (int64_t i; (i = state->next.fetch_add(1, std::memory_order_relaxed)) < n;) {
      (*fn)(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  while (state->done.load(std::memory_order_acquire) < n) {
#if defined(__x86_64__)
    _mm_pause();
#endif
    std::this_thread::yield();
  }
}

}  // namespace bireal

#endif  // BIREAL_JAX_OPS_CPU_CSRC_FFI_THREADS_H_
