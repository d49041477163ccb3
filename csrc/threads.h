// How parallel_for (attention.h) finds its threads.
//
// The FFI handlers (ffi.cc) install XLA's intra-op thread pool for the duration of a call with
// ScopedTaskRunner; elsewhere (a C++ test, a context without a pool) parallel_for uses a
// persistent pool of its own, sized to the process's CPU affinity mask. JATTN_CPU_THREADS=n
// caps the thread count either way (1: run inline), and a call's Tuning::threads caps it
// for that call (ScopedThreadCap). JATTN_CPU_THREADS is the only environment variable the
// library reads.
#pragma once

#include <cstdint>
#include <functional>

namespace jattn {

class TaskRunner {
 public:
  virtual ~TaskRunner() = default;
  virtual int64_t num_threads() const = 0;
  // Runs `task` some time later on another thread (or inline when it cannot).
  virtual void schedule(std::function<void()> task) = 0;
};

// Installs `runner` for parallel_for calls made from this thread while in scope.
class ScopedTaskRunner {
 public:
  explicit ScopedTaskRunner(TaskRunner* runner);
  ~ScopedTaskRunner();
  ScopedTaskRunner(const ScopedTaskRunner&) = delete;
  ScopedTaskRunner& operator=(const ScopedTaskRunner&) = delete;

 private:
  TaskRunner* previous_;
};

// Caps num_threads() (so parallel_for) for calls made from this thread while in scope, at
// n threads (n <= 0: no cap of its own; caps nest): a call's Tuning::threads.
class ScopedThreadCap {
 public:
  explicit ScopedThreadCap(int64_t n);
  ~ScopedThreadCap();
  ScopedThreadCap(const ScopedThreadCap&) = delete;
  ScopedThreadCap& operator=(const ScopedThreadCap&) = delete;

 private:
  int64_t previous_;
};

// The kernel's own pool's thread count (the CPU affinity mask, capped by JATTN_CPU_THREADS).
int64_t own_pool_threads();

}  // namespace jattn
