// Low-precision products (lowp.h): AVX-512 BF16 dot products and AMX tiles.
//
// Compiled for AVX-512 BF16 and AMX: only called after isa.h's detection has found them (and,
// for AMX, after the kernel has asked Linux for the tile state: amx_usable).

#include "lowp.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "isa.h"
#include "scratch.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define JATTN_LOWP 1
#else
#define JATTN_LOWP 0
#endif

namespace jattn {
namespace lowp {

#if JATTN_LOWP

bool dot_usable() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
    return ((a >> 5) & 1u) != 0 && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  }();
  return ok;
}

bool amx_usable() {
  static const bool ok = [] {
    if (!dot_usable()) return false;
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool amx_bf16 = (d >> 22) & 1u, amx_tile = (d >> 24) & 1u;
    if (!amx_bf16 || !amx_tile) return false;
    // Linux gives a process the AMX tile data state only on request (since 5.16); without it
    // the first tile instruction faults. The request fails where the kernel or the CPU lacks it.
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")

namespace {

inline uint32_t pair_at(const uint16_t* p) {
  uint32_t x;
  std::memcpy(&x, p, 4);
  return x;
}

// ---------------------------------------------------------------------------------------
// AVX-512 BF16: an R x (16 NP) tile of C in registers, one broadcast pair of A and NP panel
// vectors per depth pair (each vdpbf16ps adds two products per lane, in order: the even then
// the odd element of the pair, rounded once per instruction).

template <int R, int NP>
inline void dot_tile(int64_t pairs, const uint16_t* a, int64_t lda, const uint16_t* b,
                     int64_t panel_stride, float* c, int64_t ldc, bool accumulate) {
  __m512 acc[R][NP];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int q = 0; q < NP; ++q)
      acc[r][q] = accumulate ? _mm512_loadu_ps(c + r * ldc + q * kPanel) : _mm512_setzero_ps();
  for (int64_t l = 0; l < pairs; ++l) {
    __m512bh bv[NP];
#pragma GCC unroll 2
    for (int q = 0; q < NP; ++q)
      bv[q] = (__m512bh)_mm512_loadu_si512(b + q * panel_stride + l * 2 * kPanel);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair_at(a + r * lda + 2 * l)));
#pragma GCC unroll 2
      for (int q = 0; q < NP; ++q) acc[r][q] = _mm512_dpbf16_ps(acc[r][q], av, bv[q]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int q = 0; q < NP; ++q) _mm512_storeu_ps(c + r * ldc + q * kPanel, acc[r][q]);
}

template <int NP, int R = 12>
inline void dot_rows(int64_t rows, int64_t pairs, const uint16_t* a, int64_t lda,
                     const uint16_t* b, int64_t panel_stride, float* c, int64_t ldc,
                     bool accumulate) {
  if constexpr (R > 1) {
    if (rows < R) return dot_rows<NP, R - 1>(rows, pairs, a, lda, b, panel_stride, c, ldc, accumulate);
  }
  dot_tile<R, NP>(pairs, a, lda, b, panel_stride, c, ldc, accumulate);
}

void dot_product(int64_t rows, int64_t n, int64_t depth, const uint16_t* a, int64_t lda,
                 const uint16_t* panels, int64_t panel_stride, float* c, int64_t ldc,
                 bool accumulate) {
  const int64_t pairs = round_up(depth, kDepthStep) / 2;
  for (int64_t j = 0; j < n; j += 2 * kPanel) {
    const uint16_t* b = panels + (j / kPanel) * panel_stride;
    for (int64_t r = 0; r < rows; r += 12) {
      const int64_t mr = std::min<int64_t>(12, rows - r);
      if (n - j >= 2 * kPanel)
        dot_rows<2>(mr, pairs, a + r * lda, lda, b, panel_stride, c + r * ldc + j, ldc, accumulate);
      else
        dot_rows<1>(mr, pairs, a + r * lda, lda, b, panel_stride, c + r * ldc + j, ldc, accumulate);
    }
  }
}

// ---------------------------------------------------------------------------------------
// AMX: tiles 0-3 hold a 32 x 32 block of C (2 x 2 tiles of 16 x 16), 4-5 two 16-row slices of
// A (16 x 32 bfloat16), 6-7 two panels' steps of B (16 pairs x 16 columns). Every tile is
// configured 16 rows x 64 bytes; a block with 16 rows or 16 columns uses half of them.

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

template <bool R2, bool C2>
inline void amx_block(int64_t steps, const uint16_t* a, int64_t lda, const uint16_t* b0,
                      const uint16_t* b1, float* c, int64_t ldc, bool accumulate) {
  const int64_t sa = lda * 2, sc = ldc * 4;
  if (accumulate) {
    _tile_loadd(0, c, sc);
    if (R2) _tile_loadd(1, c + 16 * ldc, sc);
    if (C2) _tile_loadd(2, c + 16, sc);
    if (R2 && C2) _tile_loadd(3, c + 16 * ldc + 16, sc);
  } else {
    _tile_zero(0);
    if (R2) _tile_zero(1);
    if (C2) _tile_zero(2);
    if (R2 && C2) _tile_zero(3);
  }
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(4, a + s * kDepthStep, sa);
    _tile_loadd(6, b0 + s * kDepthStep * kPanel, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (R2) {
      _tile_loadd(5, a + 16 * lda + s * kDepthStep, sa);
      _tile_dpbf16ps(1, 5, 6);
    }
    if (C2) {
      _tile_loadd(7, b1 + s * kDepthStep * kPanel, 64);
      _tile_dpbf16ps(2, 4, 7);
      if (R2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, sc);
  if (R2) _tile_stored(1, c + 16 * ldc, sc);
  if (C2) _tile_stored(2, c + 16, sc);
  if (R2 && C2) _tile_stored(3, c + 16 * ldc + 16, sc);
}

// C = A . B with A of at most two steps (depth <= 64) held in tiles 4-7 for the whole row
// (rows 0-15 and 16-31, steps 0 and 1), a panel at a time through tiles 2-3 into C tiles 0-1:
// the A loads of amx_block are gone, which the scores' products (depth = a head, 64 at most
// in the common sizes) are bound by. Measured 1.1-1.7x amx_block's rate on 32 x 256 and
// 32 x 128 blocks (Sapphire Rapids class Xeon).
template <bool R2, bool S2>
inline void amx_resident(int64_t n, const uint16_t* a, int64_t lda, const uint16_t* panels,
                         int64_t panel_stride, float* c, int64_t ldc) {
  const int64_t sa = lda * 2, sc = ldc * 4;
  _tile_loadd(4, a, sa);
  if (R2) _tile_loadd(5, a + 16 * lda, sa);
  if (S2) _tile_loadd(6, a + kDepthStep, sa);
  if (R2 && S2) _tile_loadd(7, a + 16 * lda + kDepthStep, sa);
  for (int64_t j = 0; j < n; j += kPanel) {
    const uint16_t* b = panels + (j / kPanel) * panel_stride;
    _tile_loadd(2, b, 64);
    if (S2) _tile_loadd(3, b + kDepthStep * kPanel, 64);
    _tile_zero(0);
    if (R2) _tile_zero(1);
    _tile_dpbf16ps(0, 4, 2);
    if (R2) _tile_dpbf16ps(1, 5, 2);
    if (S2) _tile_dpbf16ps(0, 6, 3);
    if (R2 && S2) _tile_dpbf16ps(1, 7, 3);
    _tile_stored(0, c + j, sc);
    if (R2) _tile_stored(1, c + 16 * ldc + j, sc);
  }
}

thread_local bool tt_configured = false;

void amx_configure() {
  (void)amx_usable();  // the permission request, if no one has made it yet
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
  tt_configured = true;
}

void amx_product(int64_t rows, int64_t n, int64_t depth, const uint16_t* a, int64_t lda,
                 const uint16_t* panels, int64_t panel_stride, float* c, int64_t ldc,
                 bool accumulate) {
  if (!tt_configured) amx_configure();
  const int64_t steps = round_up(depth, kDepthStep) / kDepthStep;
  const int64_t full = rows / kRowStep * kRowStep;
  if (full < rows) {
    // The last rows (fewer than a tile's 16) through copies with zero rows below them: A's
    // and C's rows past `rows` are never touched.
    const int64_t tail = rows - full, dp = steps * kDepthStep;
    static thread_local LineVector<uint16_t> at;
    static thread_local LineVector<float> ct;
    at.assign(kRowStep * dp, 0);
    ct.resize(kRowStep * n);
    for (int64_t r = 0; r < tail; ++r) {
      std::copy_n(a + (full + r) * lda, dp, at.data() + r * dp);
      if (accumulate) std::copy_n(c + (full + r) * ldc, n, ct.data() + r * n);
    }
    amx_product(kRowStep, n, depth, at.data(), dp, panels, panel_stride, ct.data(), n, accumulate);
    for (int64_t r = 0; r < tail; ++r) std::copy_n(ct.data() + r * n, n, c + (full + r) * ldc);
    rows = full;
  }
  if (!accumulate && steps <= 2) {
    for (int64_t r = 0; r < rows; r += 2 * kRowStep) {
      const uint16_t* ar = a + r * lda;
      float* cr = c + r * ldc;
      const bool r2 = rows - r > kRowStep;
      if (r2 && steps == 2)
        amx_resident<true, true>(n, ar, lda, panels, panel_stride, cr, ldc);
      else if (r2)
        amx_resident<true, false>(n, ar, lda, panels, panel_stride, cr, ldc);
      else if (steps == 2)
        amx_resident<false, true>(n, ar, lda, panels, panel_stride, cr, ldc);
      else
        amx_resident<false, false>(n, ar, lda, panels, panel_stride, cr, ldc);
    }
    return;
  }
  for (int64_t j = 0; j < n; j += 2 * kPanel) {
    const uint16_t* b0 = panels + (j / kPanel) * panel_stride;
    const uint16_t* b1 = b0 + panel_stride;
    const bool c2 = n - j >= 2 * kPanel;
    for (int64_t r = 0; r < rows; r += 2 * kRowStep) {
      const bool r2 = rows - r > kRowStep;
      const uint16_t* ar = a + r * lda;
      float* cr = c + r * ldc + j;
      if (r2 && c2)
        amx_block<true, true>(steps, ar, lda, b0, b1, cr, ldc, accumulate);
      else if (r2)
        amx_block<true, false>(steps, ar, lda, b0, b1, cr, ldc, accumulate);
      else if (c2)
        amx_block<false, true>(steps, ar, lda, b0, b1, cr, ldc, accumulate);
      else
        amx_block<false, false>(steps, ar, lda, b0, b1, cr, ldc, accumulate);
    }
  }
}

}  // namespace

void product(Unit unit, int64_t rows, int64_t n, int64_t depth, const uint16_t* a, int64_t lda,
             const uint16_t* panels, int64_t panel_stride, float* c, int64_t ldc,
             bool accumulate) {
  if (rows <= 0 || n <= 0) return;
  if (unit == Unit::kAmx)
    amx_product(rows, n, depth, a, lda, panels, panel_stride, c, ldc, accumulate);
  else
    dot_product(rows, n, depth, a, lda, panels, panel_stride, c, ldc, accumulate);
}

void to_bf16(const float* src, int64_t n, int64_t npad, uint16_t* dst) {
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + j + 16), _mm512_loadu_ps(src + j));
    _mm512_storeu_si512(dst + j, (__m512i)h);
  }
  for (; j + 16 <= n; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + j)));
  if (j < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - j)) - 1);
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + j));
    _mm256_mask_storeu_epi16(dst + j, m, (__m256i)h);
    j = n;
  }
  std::fill(dst + n, dst + std::max(n, npad), uint16_t{0});
}

// vdpbf16ps makes two products per lane where vfmadd231ps makes one, but at half the rate on
// some CPUs (Intel's, measured on a Sapphire Rapids class Xeon: one per cycle against two
// FMAs), where it gains nothing. So time both, each as 24 independent chains for a few
// thousand iterations (about 0.1 ms), and take the dot products only where they make at
// least 1.5x the products per second.
bool dot_pays() {
  static const bool pays = [] {
    if (!dot_usable()) return false;
    auto run = [](bool dot) {
      __m512 acc[24];
      for (int i = 0; i < 24; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(i));
      const __m512 x = _mm512_set1_ps(1.0f);
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(0x3F803F80);
      double best = 1e30;
      for (int rep = 0; rep < 5; ++rep) {
        const auto t0 = __rdtsc();
        for (int it = 0; it < 1000; ++it)
#pragma GCC unroll 24
          for (int i = 0; i < 24; ++i) {
            if (dot)
              acc[i] = _mm512_dpbf16_ps(acc[i], xb, xb);
            else
              acc[i] = _mm512_fmadd_ps(acc[i], x, x);
            asm volatile("" : "+v"(acc[i]));  // keeps every chain
          }
        best = std::min(best, static_cast<double>(__rdtsc() - t0));
      }
      return best;
    };
    const double fma = run(false), dot = run(true);
    return 2.0 * fma >= 1.5 * dot;  // products per unit of time, dot against fma
  }();
  return pays;
}

// The unpacks and lane shuffles in their masked forms with every lane set: the same
// instructions, without the undefined source that GCC 12 reports as maybe-uninitialized.
inline __m512i unpacklo32(__m512i a, __m512i b) { return _mm512_maskz_unpacklo_epi32(0xFFFF, a, b); }
inline __m512i unpackhi32(__m512i a, __m512i b) { return _mm512_maskz_unpackhi_epi32(0xFFFF, a, b); }
inline __m512i unpacklo64(__m512i a, __m512i b) { return _mm512_maskz_unpacklo_epi64(0xFF, a, b); }
inline __m512i unpackhi64(__m512i a, __m512i b) { return _mm512_maskz_unpackhi_epi64(0xFF, a, b); }
#define JATTN_LANES(a, b, imm) _mm512_maskz_shuffle_i32x4(0xFFFF, a, b, imm)

// A 16 x 16 transpose of 32-bit elements in registers: r[i] lane j -> r[j] lane i.
static inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = unpacklo32(r[i], r[i + 1]);
    t[i + 1] = unpackhi32(r[i], r[i + 1]);
  }
  // u[4i + j], 128-bit lane L: element 4L + j of rows 4i .. 4i + 3.
  for (int i = 0; i < 16; i += 4) {
    u[i] = unpacklo64(t[i], t[i + 2]);
    u[i + 1] = unpackhi64(t[i], t[i + 2]);
    u[i + 2] = unpacklo64(t[i + 1], t[i + 3]);
    u[i + 3] = unpackhi64(t[i + 1], t[i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i a = JATTN_LANES(u[j], u[4 + j], 0x88);
    const __m512i b = JATTN_LANES(u[j], u[4 + j], 0xDD);
    const __m512i c = JATTN_LANES(u[8 + j], u[12 + j], 0x88);
    const __m512i d = JATTN_LANES(u[8 + j], u[12 + j], 0xDD);
    r[j] = JATTN_LANES(a, c, 0x88);
    r[8 + j] = JATTN_LANES(a, c, 0xDD);
    r[4 + j] = JATTN_LANES(b, d, 0x88);
    r[12 + j] = JATTN_LANES(b, d, 0xDD);
  }
}
#undef JATTN_LANES

// pack_t for an even depth: per panel and 32-deep step, 16 rows of 16 pairs transposed.
static void pack_t_even(int64_t n, int64_t d, const uint16_t* x, int64_t ldx, uint16_t* panels,
                 int64_t panel_stride) {
  const int64_t dp = round_up(d, kDepthStep);
  for (int64_t p = 0; p * kPanel < n; ++p) {
    uint16_t* dst = panels + p * panel_stride;
    const int64_t rows = std::min<int64_t>(kPanel, n - p * kPanel);
    for (int64_t k = 0; k < dp; k += kDepthStep) {
      const int64_t pairs = std::max<int64_t>(0, std::min<int64_t>(16, (d - k) / 2));
      const __mmask16 m = static_cast<__mmask16>((1u << pairs) - 1);
      __m512i r[16];
      for (int64_t c = 0; c < 16; ++c)
        r[c] = c < rows ? _mm512_maskz_loadu_epi32(m, x + (p * kPanel + c) * ldx + k)
                        : _mm512_setzero_si512();
      transpose16(r);
      for (int64_t e = 0; e < 16; ++e) _mm512_storeu_si512(dst + (k + 2 * e) * kPanel, r[e]);
    }
  }
}

alignas(64) static const uint16_t kInterleave[32] = {0,  16, 1,  17, 2,  18, 3,  19, 4,  20, 5,
                                                      21, 6,  22, 7,  23, 8,  24, 9,  25, 10, 26,
                                                      11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
// The same from two registers: element i of the first, then element i of the second.
alignas(64) static const uint16_t kInterleave2[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,
                                                       37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
                                                       11, 43, 12, 44, 13, 45, 14, 46, 15, 47};

// The upper halves of two registers the same way: element 16 + i of the first, then of the
// second.
alignas(64) static const uint16_t kInterleave2Hi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21,
                                                         53, 22, 54, 23, 55, 24, 56, 25, 57, 26, 58,
                                                         27, 59, 28, 60, 29, 61, 30, 62, 31, 63};

// pack_n: rows 2r and 2r + 1 at a time, each read once in memory order, 32 columns (two
// panels) per pair of loads, interleaved element by element (masked loads: zeros past the
// columns and below the depth). Row by row rather than panel by panel: a panel's pass would
// read every cache line of X twice, in passes a whole panel apart.
static void pack_n_vec(int64_t d, int64_t n, const uint16_t* x, int64_t ldx, uint16_t* panels,
                       int64_t panel_stride) {
  const __m512i lo_idx = _mm512_load_si512(kInterleave2);
  const __m512i hi_idx = _mm512_load_si512(kInterleave2Hi);
  const int64_t dp = round_up(d, kDepthStep);
  for (int64_t r = 0; r < dp; r += 2) {
    const uint16_t* x0 = x + std::min(r, d - 1) * ldx;
    const uint16_t* x1 = x + std::min(r + 1, d - 1) * ldx;
    uint16_t* dst = panels + r * kPanel;
    for (int64_t j = 0; j < n; j += 2 * kPanel) {
      const int64_t cols = std::min<int64_t>(2 * kPanel, n - j);
      const __mmask32 m = cols == 2 * kPanel ? ~__mmask32{0} : (__mmask32{1} << cols) - 1;
      const __m512i lo = _mm512_maskz_loadu_epi16(r < d ? m : 0, x0 + j);
      const __m512i hi = _mm512_maskz_loadu_epi16(r + 1 < d ? m : 0, x1 + j);
      uint16_t* p = dst + (j / kPanel) * panel_stride;
      _mm512_storeu_si512(p, _mm512_permutex2var_epi16(lo, lo_idx, hi));
      if (cols > kPanel) _mm512_storeu_si512(p + panel_stride, _mm512_permutex2var_epi16(lo, hi_idx, hi));
    }
  }
}

void to_pairs(const float* src, int64_t lds, int64_t rows, int64_t cols, uint16_t* panels,
              int64_t panel_stride) {
  // Rows 2r and 2r + 1 of a panel's 16 columns: converted together (the second in the upper
  // half), then interleaved element by element.
  const __m512i idx = _mm512_load_si512(kInterleave);
  const int64_t dp = round_up(rows, kDepthStep);
  for (int64_t j = 0; j < cols; j += kPanel) {
    const __mmask16 m = cols - j >= kPanel ? 0xFFFF : static_cast<__mmask16>((1u << (cols - j)) - 1);
    uint16_t* dst = panels + (j / kPanel) * panel_stride;
    for (int64_t r = 0; r < dp; r += 2) {
      const __m512 lo = r < rows ? _mm512_maskz_loadu_ps(m, src + r * lds + j) : _mm512_setzero_ps();
      const __m512 hi =
          r + 1 < rows ? _mm512_maskz_loadu_ps(m, src + (r + 1) * lds + j) : _mm512_setzero_ps();
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
      _mm512_storeu_si512(dst + r * kPanel, _mm512_permutexvar_epi16(idx, both));
    }
  }
}

// Weighted values with V read in place (lowp.h: split_values). Tiles 0-3: C, the even and odd
// outputs of two 32-column blocks; 4-5: the even and odd spreads of 16 keys' weights; 6-7: 16
// value rows of each block, as they lie in memory. Every step also prefetches kAheadLines
// cache lines of `next` into L2: below the rate one core streams memory at (about 8 bytes a
// cycle), so the next keys arrive while the tiles work. A prefetch that finds no free fill
// buffer stalls the core, so a faster rate only moved the wait from the scores' product here.
// Timed cold, MLA's latent decode (8, 1, 16384, 16, 1, 576 / 512): 8 lines a step, with 16
// a row in the caller's softmax, 7.10 ms against 7.69 for 16 a step alone (6 to 10 alike; in
// one process, alternating, Sapphire Rapids class Xeon).
// Values of their own come from memory, where the tile loads' column-block order (every 1 KiB
// row's next 128 bytes) gives the hardware prefetchers no stream: so a block's steps prefetch
// the next block's rows instead (`v_ahead`, `ahead_cols` features of each), at its own rate.
// Timed cold, bfloat16 with values of their own: MLA decode (B, 1, S, 16, 1, 576 / 512) 6-10%
// faster at B = 8, S = 4096 and 16384, 4% at B = 1, S = 16384; GQA decode (4, 1, 2048, 32, 4,
// 128 / 256) 14%; at value heads of 128 alike (two or three blocks ahead alike; the next
// chunk's keys as well on those steps, or the next chunk's first value block on the last
// ones, slower).
constexpr int kAheadLines = 8;
template <bool Two>
static void split_block(int64_t steps, const uint32_t* even, const uint32_t* odd, int64_t lda,
                        const uint16_t* v, int64_t vs, float* c, int64_t ldc, const char*& ahead,
                        const char* ahead_end, const uint16_t* v_ahead, int64_t ahead_cols) {
  const int64_t sa = lda * 4, sv = vs * 2, sc = ldc * 4;
  _tile_loadd(0, c, sc);
  _tile_loadd(1, c + 16, sc);
  if (Two) {
    _tile_loadd(2, c + 32, sc);
    _tile_loadd(3, c + 48, sc);
  }
  for (int64_t s = 0; s < steps; ++s) {
    const uint16_t* vr = v + s * kRowStep * vs;
    if (v_ahead != nullptr) {
      for (int64_t r = 0; r < kRowStep; ++r) {
        const uint16_t* row = v_ahead + (s * kRowStep + r) * vs;
        prefetch_l2(row);
        if (ahead_cols > 32) prefetch_l2(row + 32);
      }
    } else {
      for (int i = 0; i < kAheadLines && ahead < ahead_end; ++i, ahead += 64) prefetch_l2(ahead);
    }
    _tile_loadd(4, even + s * kRowStep, sa);
    _tile_loadd(5, odd + s * kRowStep, sa);
    _tile_loadd(6, vr, sv);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 5, 6);
    if (Two) {
      _tile_loadd(7, vr + 32, sv);
      _tile_dpbf16ps(2, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, sc);
  _tile_stored(1, c + 16, sc);
  if (Two) {
    _tile_stored(2, c + 32, sc);
    _tile_stored(3, c + 48, sc);
  }
}

void split_values(int64_t steps, const uint32_t* even, const uint32_t* odd, int64_t lda,
                  const uint16_t* v, int64_t vs, int64_t hv, bool v_cold, float* acc,
                  const void* next, int64_t next_bytes) {
  if (steps <= 0) return;
  if (!tt_configured) amx_configure();
  const char* ahead = static_cast<const char*>(next);
  const char* const ahead_end = ahead + (next != nullptr ? next_bytes : 0);
  for (int64_t e = 0; e < hv; e += 64) {
    // the block after this one, whose rows this one's steps prefetch (values from memory)
    const int64_t after = std::min<int64_t>(64, hv - e - 64);
    const uint16_t* v_ahead = v_cold && after > 0 ? v + e + 64 : nullptr;
    if (e + 64 <= hv)
      split_block<true>(steps, even, odd, lda, v + e, vs, acc + e, hv, ahead, ahead_end,
                        v_ahead, after);
    else
      split_block<false>(steps, even, odd, lda, v + e, vs, acc + e, hv, ahead, ahead_end,
                         v_ahead, after);
  }
}

void spread_pairs(const float* src, int64_t n, int64_t npad, uint32_t* even, uint32_t* odd) {
  for (int64_t j = 0; j < npad; j += 16) {
    const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, n - j));
    const __mmask16 m = static_cast<__mmask16>((1u << left) - 1);
    // (the maskz forms: gcc 12 warns of the plain ones' undefined pass-through operand)
    const __m512i w = _mm512_maskz_cvtepu16_epi32(
        0xFFFF, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + j)));
    _mm512_storeu_si512(even + j, w);
    _mm512_storeu_si512(odd + j, _mm512_maskz_slli_epi32(0xFFFF, w, 16));
  }
}

void unsplit(const float* row, int64_t hv, float* dst) {
  const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  for (int64_t e = 0; e < hv; e += 32) {
    const __m512 ev = _mm512_loadu_ps(row + e), od = _mm512_loadu_ps(row + e + 16);
    _mm512_storeu_ps(dst + e, _mm512_permutex2var_ps(ev, lo, od));
    _mm512_storeu_ps(dst + e + 16, _mm512_permutex2var_ps(ev, hi, od));
  }
}

void release() {
  if (tt_configured) {
    _tile_release();
    tt_configured = false;
  }
}

#pragma GCC pop_options

#else  // not x86-64: no low-precision units

bool dot_usable() { return false; }
bool dot_pays() { return false; }
bool amx_usable() { return false; }
void product(Unit, int64_t, int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t,
             float*, int64_t, bool) {}
void to_bf16(const float*, int64_t, int64_t, uint16_t*) {}
void to_pairs(const float*, int64_t, int64_t, int64_t, uint16_t*, int64_t) {}
void release() {}
void split_values(int64_t, const uint32_t*, const uint32_t*, int64_t, const uint16_t*, int64_t,
                  int64_t, bool, float*, const void*, int64_t) {}
void spread_pairs(const float*, int64_t, int64_t, uint32_t*, uint32_t*) {}
void unsplit(const float*, int64_t, float*) {}

#endif

// Packing is plain C++ (a pass over K and V per call, not the products' inner loop).

void pack_t(int64_t n, int64_t d, const uint16_t* x, int64_t ldx, uint16_t* panels,
            int64_t panel_stride) {
#if JATTN_LOWP
  if (d % 2 == 0) return pack_t_even(n, d, x, ldx, panels, panel_stride);
#endif
  const int64_t dp = round_up(d, kDepthStep);
  for (int64_t p = 0; p * kPanel < n; ++p) {
    uint16_t* dst = panels + p * panel_stride;
    for (int64_t col = 0; col < kPanel; ++col) {
      const int64_t row = p * kPanel + col;
      const uint16_t* src = x + row * ldx;
      for (int64_t k = 0; k < dp; ++k)
        dst[(k / 2) * 2 * kPanel + col * 2 + (k & 1)] = row < n && k < d ? src[k] : uint16_t{0};
    }
  }
}

void pack_n(int64_t d, int64_t n, const uint16_t* x, int64_t ldx, uint16_t* panels,
            int64_t panel_stride) {
#if JATTN_LOWP
  return pack_n_vec(d, n, x, ldx, panels, panel_stride);
#endif
  const int64_t dp = round_up(d, kDepthStep);
  for (int64_t p = 0; p * kPanel < n; ++p) {
    uint16_t* dst = panels + p * panel_stride;
    for (int64_t k = 0; k < dp; ++k) {
      const uint16_t* src = x + k * ldx + p * kPanel;
      uint16_t* out = dst + (k / 2) * 2 * kPanel + (k & 1);
      const int64_t cols = k < d ? std::min<int64_t>(kPanel, n - p * kPanel) : 0;
      int64_t col = 0;
      for (; col < cols; ++col) out[col * 2] = src[col];
      for (; col < kPanel; ++col) out[col * 2] = 0;
    }
  }
}

}  // namespace lowp
}  // namespace jattn
