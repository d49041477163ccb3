// Float buffers the kernels keep from call to call.
//
// Fresh pages cost a page fault and a zeroing each (a few percent of a forward or backward
// pass over a 16 MB copy); a buffer kept by the thread that asked for it costs nothing the
// next time. Buffers larger than a bound are the caller's own and freed with the call, so a
// long sequence does not leave its memory behind. Every buffer is 64-byte aligned (whole cache
// lines: no vector load straddles two).

#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

namespace jattn {

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using AlignedFloats = std::unique_ptr<float[], FreeDeleter>;

// n floats (at least one), 64-byte aligned.
inline AlignedFloats aligned_floats(int64_t n) {
  const size_t bytes = (static_cast<size_t>(n > 0 ? n : 1) * sizeof(float) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes);
  if (p == nullptr) throw std::bad_alloc();
  return AlignedFloats(static_cast<float*>(p));
}

// One reusable buffer. Use as a `static thread_local` of the function that needs it.
class Scratch {
 public:
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

}  // namespace jattn
