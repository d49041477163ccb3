// parallel_for / num_threads (attention.h) over XLA's intra-op pool or a pool of our own.
//
// Work is handed out index by index from an atomic counter; the calling thread takes part, so
// a pool that is busy (or has no free thread) only slows a call down, never deadlocks it.
// Helpers that start after the work is gone return without touching the caller's function.
// Which thread runs which index is left to chance; results do not depend on it because each
// index owns its outputs (the kernels' contract).

#include "threads.h"

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "attention.h"

namespace jattn {
namespace {

thread_local TaskRunner* current_runner = nullptr;
thread_local int parallel_depth = 0;
thread_local int64_t call_cap = 0;    // > 0: ScopedThreadCap's limit  // > 0 inside a parallel_for task: nested calls run inline

int affinity_threads() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  unsigned hw = std::thread::hardware_concurrency();
  return hw ? static_cast<int>(hw) : 1;
}

int env_cap() {
  static const int cap = [] {
    const char* s = std::getenv("JATTN_CPU_THREADS");
    int v = s ? std::atoi(s) : 0;
    return v > 0 ? v : 0;
  }();
  return cap;
}

// A persistent pool: threads wait on one queue of tasks.
class OwnPool final : public TaskRunner {
 public:
  explicit OwnPool(int n) : n_(n) {
    for (int i = 0; i + 1 < n; ++i) threads_.emplace_back([this] { loop(); });
  }
  ~OwnPool() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  int64_t num_threads() const override { return n_; }
  void schedule(std::function<void()> task) override {
    if (threads_.empty()) {
      task();
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(std::move(task));
    }
    cv_.notify_one();
  }

 private:
  void loop() {
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
        if (stop_ && queue_.empty()) return;
        task = std::move(queue_.front());
        queue_.pop_front();
      }
      task();
    }
  }
  int n_;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool stop_ = false;
};

OwnPool& own_pool() {
  // Leaked on purpose: joining threads from a static destructor at exit can hang.
  static OwnPool* pool = new OwnPool(env_cap() ? std::min(env_cap(), affinity_threads())
                                               : affinity_threads());
  return *pool;
}

TaskRunner& runner() { return current_runner ? *current_runner : own_pool(); }

struct ForState {
  explicit ForState(int64_t n, const std::function<void(int64_t)>* fn) : n(n), fn(fn) {}
  const int64_t n;
  const std::function<void(int64_t)>* fn;  // valid while done < n
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
};

void drain(ForState& st) {
  ++parallel_depth;
  for (;;) {
    int64_t i = st.next.fetch_add(1, std::memory_order_relaxed);
    if (i >= st.n) break;
    (*st.fn)(i);
    if (st.done.fetch_add(1, std::memory_order_acq_rel) + 1 == st.n) {
      std::lock_guard<std::mutex> lock(st.mu);
      st.cv.notify_all();
    }
  }
  --parallel_depth;
}

}  // namespace

ScopedTaskRunner::ScopedTaskRunner(TaskRunner* r) : previous_(current_runner) {
  current_runner = r;
}
ScopedTaskRunner::~ScopedTaskRunner() { current_runner = previous_; }

ScopedThreadCap::ScopedThreadCap(int64_t n) : previous_(call_cap) {
  if (n > 0) call_cap = call_cap > 0 ? std::min(call_cap, n) : n;
}
ScopedThreadCap::~ScopedThreadCap() { call_cap = previous_; }

int64_t own_pool_threads() { return own_pool().num_threads(); }

int num_threads() {
  if (parallel_depth > 0) return 1;
  int64_t n = runner().num_threads();
  if (n < 1) n = 1;
  if (env_cap()) n = std::min<int64_t>(n, env_cap());
  if (call_cap > 0) n = std::min(n, call_cap);
  return static_cast<int>(n);
}

void parallel_for(int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  int64_t threads = num_threads();
  if (n == 1 || threads <= 1) {
    ++parallel_depth;
    for (int64_t i = 0; i < n; ++i) fn(i);
    --parallel_depth;
    return;
  }
  auto st = std::make_shared<ForState>(n, &fn);
  int64_t helpers = std::min(threads, n) - 1;
  TaskRunner& r = runner();
  for (int64_t h = 0; h < helpers; ++h) r.schedule([st] { drain(*st); });
  drain(*st);
  if (st->done.load(std::memory_order_acquire) < n) {
    std::unique_lock<std::mutex> lock(st->mu);
    st->cv.wait(lock, [&] { return st->done.load(std::memory_order_acquire) >= n; });
  }
}

}  // namespace jattn
