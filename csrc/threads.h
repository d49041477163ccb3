// How parallel_for (attention.h) finds its threads.
//
// The FFI handlers (ffi.cc) install XLA's intra-op thread pool for the duration of a call with
// ScopedTaskRunner; elsewhere (a C++ test, a context without a pool) parallel_for uses a
// persistent pool of its own, sized to the process's CPU affinity mask. JATTN_CPU_THREADS=n
// caps the thread count either way (1: run inline).
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

}  // namespace jattn
