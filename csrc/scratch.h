// Float buffers the kernels keep from call to call.
//
// Fresh pages cost a page fault and a zeroing each (a few percent of a forward or backward
// pass over a 16 MB copy); a buffer kept by the thread that asked for it costs nothing the
// next time. Buffers larger than a bound are the caller's own and freed with the call, so a
// long sequence does not leave its memory behind. Every buffer is 64-byte aligned (whole cache
// lines: no vector load straddles two).

#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <shared_mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace jattn {

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using AlignedFloats = std::unique_ptr<float[], FreeDeleter>;

// Asks the kernel to back [p, p + bytes) with 2 MiB pages where the system leaves that to the
// program (transparent huge pages in "madvise" mode): a fresh output or buffer of hundreds of
// MB otherwise takes one page fault and one zeroing per 4 KiB on first write, which costs more
// than a decoding step's backward pass itself. Only the whole 2 MiB pages inside the range are
// advised; below 8 MiB, or off Linux, this does nothing. It changes no data.
inline void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  if (p == nullptr || bytes < 4 * kHuge) return;
  const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);  // advice: errors ignored
#else
  (void)p;
  (void)bytes;
#endif
}

// n floats (at least one), 64-byte aligned.
inline AlignedFloats aligned_floats(int64_t n) {
  const size_t bytes = (static_cast<size_t>(n > 0 ? n : 1) * sizeof(float) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes);
  if (p == nullptr) throw std::bad_alloc();
  advise_huge_pages(p, bytes);
  return AlignedFloats(static_cast<float*>(p));
}

// std::vector's storage 64-byte aligned, like every buffer here: AMX tile rows that straddle
// two cache lines made the decode scores' tile step 4-5x slower (csrc/tests/amx_bench.cc, on
// the Sapphire Rapids class Xeon), and malloc aligns to 16 bytes only.
template <class T>
struct LineAllocator {
  using value_type = T;
  LineAllocator() = default;
  template <class U>
  LineAllocator(const LineAllocator<U>&) {}
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64}));
  }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t{64}); }
  template <class U>
  bool operator==(const LineAllocator<U>&) const {
    return true;
  }
  template <class U>
  bool operator!=(const LineAllocator<U>&) const {
    return false;
  }
};
template <class T>
using LineVector = std::vector<T, LineAllocator<T>>;

class Scratch;

// Every Scratch alive, so that release_kept() can free what they keep.
struct ScratchRegistry {
  std::mutex mu;
  std::vector<Scratch*> all;
  static ScratchRegistry& get() {
    static ScratchRegistry r;
    return r;
  }
};

// Held (shared) by every kernel call for its duration; release_kept() takes it exclusively,
// so it frees no buffer a call is using and waits for running calls to end.
inline std::shared_mutex& call_mutex() {
  static std::shared_mutex m;
  return m;
}
struct CallGuard {
  std::shared_lock<std::shared_mutex> lock{call_mutex()};
};

// One reusable buffer. Use as a `static thread_local` of the function that needs it.
class Scratch {
 public:
  Scratch() {
    ScratchRegistry& r = ScratchRegistry::get();
    std::lock_guard<std::mutex> g(r.mu);
    r.all.push_back(this);
  }
  ~Scratch() {
    ScratchRegistry& r = ScratchRegistry::get();
    std::lock_guard<std::mutex> g(r.mu);
    r.all.erase(std::remove(r.all.begin(), r.all.end(), this), r.all.end());
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  int64_t kept_bytes() const { return buf_ ? cap_ * static_cast<int64_t>(sizeof(float)) : 0; }
  void release() {
    buf_.reset();
    cap_ = 0;
  }

  // n floats: this buffer (grown as needed, kept for the next call) when n <= keep, else a
  // buffer held by `own` (freed when the caller drops it).
  float* get(int64_t n, int64_t keep, AlignedFloats& own) {
    if (n > keep) {
      own = aligned_floats(n);
      return own.get();
    }
    if (cap_ < n || !buf_) {
      buf_.reset();  // free the old one before taking the new: no moment with both
      buf_ = aligned_floats(n);
      cap_ = n;
    }
    return buf_.get();
  }

 private:
  AlignedFloats buf_;
  int64_t cap_ = 0;
};

// The bytes every Scratch keeps between calls.
inline int64_t kept_bytes() {
  ScratchRegistry& r = ScratchRegistry::get();
  std::lock_guard<std::mutex> g(r.mu);
  int64_t n = 0;
  for (const Scratch* s : r.all) n += s->kept_bytes();
  return n;
}

// Frees what every Scratch keeps, once no call is running (calls that start meanwhile wait);
// returns the bytes freed. The next call allocates again what it needs.
inline int64_t release_kept() {
  std::unique_lock<std::shared_mutex> calls(call_mutex());
  ScratchRegistry& r = ScratchRegistry::get();
  std::lock_guard<std::mutex> g(r.mu);
  int64_t n = 0;
  for (Scratch* s : r.all) {
    n += s->kept_bytes();
    s->release();
  }
  return n;
}

}  // namespace jattn
