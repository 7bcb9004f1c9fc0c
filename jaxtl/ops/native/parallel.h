// Running a call's independent tasks on XLA's intra-op thread pool
// (ffi::ThreadPool) and the calling thread together.
//
// The calling thread claims tasks too and waits only for tasks that were
// claimed, never for a helper to start: a pool busy with other operations
// cannot deadlock the call, it only leaves more tasks to the caller. A helper
// that starts after the call has returned finds no task left and touches
// nothing but the shared counters (kept alive by a shared_ptr).

#ifndef JAXTL_NATIVE_PARALLEL_H_
#define JAXTL_NATIVE_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace jaxtl {

struct TaskCounters {
  std::atomic<int64_t> next{0};
  int64_t done = 0;
  std::mutex mu;
  std::condition_variable cv;
};

// worker(next) is run on the calling thread and on up to tasks - 1 helpers;
// next() returns the index of an unclaimed task, or -1 when none is left. A
// worker finishes each task it claimed before it calls next() again or
// returns, and should claim before it allocates anything.
template <typename Worker>
void RunTasks(xla::ffi::ThreadPool& pool, int64_t tasks, Worker worker) {
  if (tasks <= 0) return;
  auto counters = std::make_shared<TaskCounters>();
  auto run = [tasks, worker](TaskCounters& c) {
    int64_t claimed = 0;
    worker([&]() -> int64_t {
      const int64_t t = c.next.fetch_add(1);
      if (t >= tasks) return -1;
      ++claimed;
      return t;
    });
    if (claimed) {
      std::lock_guard<std::mutex> lock(c.mu);
      c.done += claimed;
      if (c.done == tasks) c.cv.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks - 1);
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([counters, run] { run(*counters); });
  run(*counters);
  std::unique_lock<std::mutex> lock(counters->mu);
  counters->cv.wait(lock, [&] { return counters->done == tasks; });
}

}  // namespace jaxtl

#endif  // JAXTL_NATIVE_PARALLEL_H_
