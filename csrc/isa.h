// The ISA levels of the native CPU kernel: detection, the per-call choice, and the one
// dispatch.
//
// Every vectorised routine is written once, over the vector layer of simd.inc, in an .inc
// file that isa_instances.inc includes once per level, each time inside its own namespace and
// under its own `#pragma GCC target`: isa_generic (SSE2, every x86-64; or the compiler's
// baseline elsewhere), isa_avx2 (AVX2 + FMA + F16C) and isa_avx512 (AVX-512F). Two levels
// above avx512 run its code and add a unit for bfloat16 products (lowp.h): avx512_bf16
// (vdpbf16ps dot products) and amx (AMX-BF16 tiles). The CPU's level
// is detected once per process (__builtin_cpu_supports), never taken from the build machine;
// a call runs at that level capped by its Tuning::isa (call_isa), chosen by JATTN_DISPATCH.
// Inside a level's namespace the kernels call that level's GEMMs and packers directly.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <cstdint>

#include "lowp.h"

#if defined(__x86_64__) || defined(__i386__)
#define JATTN_X86 1
#else
#define JATTN_X86 0
#endif

namespace jattn {

enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };

// The best level the CPU has (detected once).
inline Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = Isa::kGeneric;
#if JATTN_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
      best = Isa::kAvx2;
    if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f")) best = Isa::kAvx512;
    if (best == Isa::kAvx512 && lowp::dot_usable()) best = Isa::kAvx512Bf16;
    if (best == Isa::kAvx512Bf16 && lowp::amx_usable()) best = Isa::kAmx;
#endif
    return best;
  }();
  return isa;
}

// The level a call runs at when it asks for none: the best, except that avx512_bf16 gives
// way to avx512 where its dot products do not outrun float32 FMAs (lowp::dot_pays).
inline Isa default_isa() {
  const Isa best = cpu_isa();
  return best == Isa::kAvx512Bf16 && !lowp::dot_pays() ? Isa::kAvx512 : best;
}

// A call's level: `requested` (an Isa value; -1 = the default) capped to what the CPU has.
inline Isa call_isa(int64_t requested) {
  if (requested < 0) return default_isa();
  return static_cast<Isa>(std::min<int64_t>(requested, static_cast<int64_t>(cpu_isa())));
}

// The bfloat16 product unit of a level (none below avx512_bf16).
inline lowp::Unit lowp_unit(Isa isa) {
  if (isa == Isa::kAmx) return lowp::Unit::kAmx;
  if (isa == Isa::kAvx512Bf16) return lowp::Unit::kDot;
  return lowp::Unit::kNone;
}

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAmx:
      return "amx";
    case Isa::kAvx512Bf16:
      return "avx512_bf16";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "generic";
  }
}

// `return isa_<level>::expr;` for the given level: the one dispatch (the levels with a
// bfloat16 unit run the avx512 code).
#if JATTN_X86
#define JATTN_DISPATCH(isa, ...)          \
  switch (isa) {                          \
    case ::jattn::Isa::kAmx:              \
    case ::jattn::Isa::kAvx512Bf16:       \
    case ::jattn::Isa::kAvx512:           \
      return isa_avx512::__VA_ARGS__;     \
    case ::jattn::Isa::kAvx2:             \
      return isa_avx2::__VA_ARGS__;       \
    default:                              \
      return isa_generic::__VA_ARGS__;    \
  }
#else
#define JATTN_DISPATCH(isa, ...) return isa_generic::__VA_ARGS__;
#endif

// The register tile's rows (MR) and columns (NR, the panel width) of a level (gemm.cc).
int64_t gemm_tile_rows(Isa isa);
int64_t gemm_panel_width(Isa isa);

// Cache sizes in bytes (sysconf, with conservative defaults when the OS does not say).
#ifdef _SC_LEVEL1_DCACHE_SIZE
constexpr int kScL1d = _SC_LEVEL1_DCACHE_SIZE, kScL2 = _SC_LEVEL2_CACHE_SIZE;
#else
constexpr int kScL1d = -1, kScL2 = -1;
#endif
inline int64_t cache_bytes(int name, int64_t fallback, int64_t lo, int64_t hi) {
  const long v = name < 0 ? -1 : sysconf(name);
  return v <= 0 ? fallback : std::max(lo, std::min<int64_t>(hi, v));
}
inline int64_t l1d_cache_bytes() {
  static const int64_t v = cache_bytes(kScL1d, 32 << 10, 16 << 10, 128 << 10);
  return v;
}
inline int64_t l2_cache_bytes() {
  static const int64_t v = cache_bytes(kScL2, 256 << 10, 128 << 10, 4 << 20);
  return v;
}

// A prefetch hint the optimiser cannot drop. GCC counts __builtin_prefetch as free of side
// effects, so a loop of nothing but prefetches may be deleted as empty, and whether it is
// depends on flags that should not matter: with -fwrapv (in Python's CFLAGS, so in every
// setuptools build) all of the forward's decode prefetches were gone and decoding ran 1.7x
// slower than the same code built without it. An asm volatile statement is never removed.
static inline void prefetch(const void* p) {
#if JATTN_X86
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p);
#endif
}

// The same into L2 only (prefetcht1): memory a core reads after its current work, which
// must not push that work's operands out of L1.
static inline void prefetch_l2(const void* p) {
#if JATTN_X86
  asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

}  // namespace jattn
