// Float32 GEMMs (gemm_nt / gemm_nn / gemm_tn of attention.h) with runtime ISA dispatch, and
// the ISA / cache detection shared by the kernels (isa.h).
//
// Single-threaded: the attention kernels call them from inside their parallel tasks.

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "attention.h"
#include "isa.h"
#include "transpose.h"

#if JATTN_X86
#include <immintrin.h>
#endif

namespace jattn {

// ---------------------------------------------------------------------------------------
// Detection.

static Isa detect_isa() {
  Isa best = Isa::kGeneric;
#if JATTN_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    best = Isa::kAvx2;
  if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f")) best = Isa::kAvx512;
#endif
  return best;
}

Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "generic";
  }
}

static int64_t sysconf_or(int name, int64_t fallback, int64_t lo, int64_t hi) {
  long v = sysconf(name);
  if (v <= 0) return fallback;
  return std::max(lo, std::min<int64_t>(hi, v));
}

int64_t l1d_cache_bytes() {
#ifdef _SC_LEVEL1_DCACHE_SIZE
  static const int64_t v = sysconf_or(_SC_LEVEL1_DCACHE_SIZE, 32 << 10, 16 << 10, 128 << 10);
#else
  static const int64_t v = 32 << 10;
#endif
  return v;
}

int64_t l2_cache_bytes() {
#ifdef _SC_LEVEL2_CACHE_SIZE
  static const int64_t v = sysconf_or(_SC_LEVEL2_CACHE_SIZE, 256 << 10, 128 << 10, 4 << 20);
#else
  static const int64_t v = 256 << 10;
#endif
  return v;
}

// ---------------------------------------------------------------------------------------
// The per-ISA instances.

namespace isa_generic {
#define JATTN_W 4
#define JATTN_MR 6
#define JATTN_NR 8
#include "gemm_isa.inc"
#undef JATTN_W
#undef JATTN_MR
#undef JATTN_NR
#undef JATTN_SPLAT
}  // namespace isa_generic

#if JATTN_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace isa_avx2 {
#define JATTN_W 8
#define JATTN_MR 6
#define JATTN_NR 16
#define JATTN_SPLAT _mm256_set1_ps
#include "gemm_isa.inc"
#undef JATTN_W
#undef JATTN_MR
#undef JATTN_NR
#undef JATTN_SPLAT
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
namespace isa_avx512 {
#define JATTN_W 16
#define JATTN_MR 12
#define JATTN_NR 32
#define JATTN_SPLAT _mm512_set1_ps
#include "gemm_isa.inc"
#undef JATTN_W
#undef JATTN_MR
#undef JATTN_NR
#undef JATTN_SPLAT
}  // namespace isa_avx512
#pragma GCC pop_options
#endif

// ---------------------------------------------------------------------------------------
// Dispatch.

static bool trivial(int64_t M, int64_t N, int64_t K, float* C, int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return true;
  if (K <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.0f);
    return true;
  }
  return false;
}

#if JATTN_X86
#define JATTN_DISPATCH(fn, ...)                  \
  switch (cpu_isa()) {                           \
    case Isa::kAvx512:                           \
      return isa_avx512::fn(__VA_ARGS__);        \
    case Isa::kAvx2:                             \
      return isa_avx2::fn(__VA_ARGS__);          \
    default:                                     \
      return isa_generic::fn(__VA_ARGS__);       \
  }
#else
#define JATTN_DISPATCH(fn, ...) return isa_generic::fn(__VA_ARGS__);
#endif

int64_t gemm_tile_rows() {
#if JATTN_X86
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return isa_avx512::MR;
    case Isa::kAvx2:
      return isa_avx2::MR;
    default:
      break;
  }
#endif
  return isa_generic::MR;
}

int64_t gemm_panel_width() {
#if JATTN_X86
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return isa_avx512::NR;
    case Isa::kAvx2:
      return isa_avx2::NR;
    default:
      break;
  }
#endif
  return isa_generic::NR;
}

void pack_panels_bt(int64_t N, int64_t K, const float* B, int64_t ldb, float* dst,
                    int64_t panel_stride) {
  if (N <= 0 || K <= 0) return;
  JATTN_DISPATCH(pack_bt_panels, N, K, B, ldb, dst, panel_stride)
}

void pack_panels_bn(int64_t K, int64_t N, const float* B, int64_t ldb, float* dst,
                    int64_t panel_stride) {
  if (N <= 0 || K <= 0) return;
  JATTN_DISPATCH(pack_bn_panels, K, N, B, ldb, dst, panel_stride)
}

void gemm_prepacked(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                    const float* Bp, int64_t panel_stride, float* C, int64_t ldc,
                    bool accumulate) {
  if (trivial(M, N, K, C, ldc, accumulate)) return;
  JATTN_DISPATCH(gemm_pb, M, N, K, A, lda, Bp, panel_stride, C, ldc, accumulate)
}

void gemm_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if (trivial(M, N, K, C, ldc, accumulate)) return;
  JATTN_DISPATCH(gemm_nt, M, N, K, A, lda, B, ldb, C, ldc, accumulate)
}

void gemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if (trivial(M, N, K, C, ldc, accumulate)) return;
  JATTN_DISPATCH(gemm_nn, M, N, K, A, lda, B, ldb, C, ldc, accumulate)
}

void gemm_tn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if (trivial(M, N, K, C, ldc, accumulate)) return;
  JATTN_DISPATCH(gemm_tn, M, N, K, A, lda, B, ldb, C, ldc, accumulate)
}

}  // namespace jattn
