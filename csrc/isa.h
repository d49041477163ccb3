// Runtime ISA dispatch for the native CPU kernel.
//
// Every vectorised routine is written once, with GCC/Clang vector extensions over a width W
// (floats per vector), in an .inc file that is included several times, each time inside its own
// namespace and under its own `#pragma GCC target`: isa_generic (SSE2, every x86-64; or the
// compiler's baseline elsewhere), isa_avx2 (AVX2 + FMA + F16C) and isa_avx512 (AVX-512F). The
// level is chosen once per process from what the CPU reports (__builtin_cpu_supports), never
// from the build machine; JATTN_CPU_ISA=generic|avx2|avx512 forces a lower one (for tests).
#pragma once

#include <cstdint>

namespace jattn {

enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

// The level in use (detected once; capped by JATTN_CPU_ISA).
Isa cpu_isa();
const char* isa_name(Isa isa);

// Cache sizes in bytes (sysconf, with conservative defaults when the OS does not say).
int64_t l1d_cache_bytes();
int64_t l2_cache_bytes();

// Pre-packed right-hand operands (gemm.cc), for a B that several products reuse: panels of
// gemm_panel_width() columns, each [K][width] contiguous and zero padded, panel p at
// dst + p * panel_stride (panel_stride >= K * width). pack_panels_bt takes B stored [N][K]
// (the product uses its transpose, as gemm_nt), pack_panels_bn B stored [K][N] (as gemm_nn).
// gemm_prepacked: C[M, N] (+)= A[M, K] . B, A row-major read in place.
int64_t gemm_panel_width();
// The micro-kernel's row count: products whose M is a multiple of it have no edge tiles.
int64_t gemm_tile_rows();
void pack_panels_bt(int64_t N, int64_t K, const float* B, int64_t ldb, float* dst,
                    int64_t panel_stride);
void pack_panels_bn(int64_t K, int64_t N, const float* B, int64_t ldb, float* dst,
                    int64_t panel_stride);
void gemm_prepacked(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                    const float* Bp, int64_t panel_stride, float* C, int64_t ldc,
                    bool accumulate);

}  // namespace jattn

#if defined(__x86_64__) || defined(__i386__)
#define JATTN_X86 1
#else
#define JATTN_X86 0
#endif

namespace jattn {

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

}  // namespace jattn
