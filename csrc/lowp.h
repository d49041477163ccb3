// Low-precision products: bfloat16 x bfloat16 with float32 accumulation, on the CPU's own
// units (lowp.cc): AVX-512 BF16 dot products (vdpbf16ps: two products per float32 lane) or
// AMX tiles (tdpbf16ps: a 16 x 16 float32 tile += 16 x 32 by 32 x 16 bfloat16, about 16x the
// AVX-512 FMA rate). The kernels of the avx512 level call them on bfloat16 inputs when the
// call's ISA level is avx512_bf16 or amx (isa.h); every other case keeps the float32 products.
//
// Operands. A (the rows: queries, weights) is bfloat16 row-major, read in place (leading
// dimension lda, in elements). B is packed into panels of 16 columns, each [depth / 2][16][2]:
// depth pair r of column c holds (B[2r][c], B[2r + 1][c]), the pair layout both units read
// (AMX calls it VNNI). Depth is padded with zeros to a multiple of kDepthStep (one AMX step),
// columns to a multiple of 16; panel p at panels + p * panel_stride. C is float32 row-major.
//
// A's depth padding is read: callers zero it (or, where A's rows run on, make sure B's padding
// pairs are zero and A's values finite). Rows are exact: AMX's last partial 16-row tile goes
// through copies.
#pragma once

#include <cstdint>

namespace jattn {
namespace lowp {

enum class Unit : int { kNone = 0, kDot = 1, kAmx = 2 };

constexpr int64_t kPanel = 16;      // columns per panel
constexpr int64_t kDepthStep = 32;  // depth per step (AMX: one tile's 64 bytes of a row)
constexpr int64_t kRowStep = 16;    // rows per AMX tile

constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
// Elements of one panel of depth d.
constexpr int64_t panel_size(int64_t depth) { return round_up(depth, kDepthStep) * kPanel; }

// Whether this process may use AMX tiles (CPUID and the Linux permission request for the
// tile state, made once) and whether the CPU has AVX-512 BF16: isa.h's detection asks.
bool amx_usable();
bool dot_usable();
// Whether the dot products outrun float32 FMAs on this CPU (measured once, in about 0.1 ms):
// only then is avx512_bf16 a CPU's default level.
bool dot_pays();

// Panels of B = X^T, X [n][d] (rows ldx apart): column c of B is row c of X (keys for S = Q K^T).
void pack_t(int64_t n, int64_t d, const uint16_t* x, int64_t ldx, uint16_t* panels,
            int64_t panel_stride);
// Panels of B = X, X [d][n] (rows ldx apart): depth is X's rows (values for O = P V).
void pack_n(int64_t d, int64_t n, const uint16_t* x, int64_t ldx, uint16_t* panels,
            int64_t panel_stride);

// C[rows][n] (+)= A[rows][depth] . B[depth][n] for n a multiple of 16, depth of B's padding.
void product(Unit unit, int64_t rows, int64_t n, int64_t depth, const uint16_t* a, int64_t lda,
             const uint16_t* panels, int64_t panel_stride, float* c, int64_t ldc,
             bool accumulate);

// Panels of B = the float32 block src [rows][cols] (rows lds apart) rounded to bfloat16:
// depth is src's rows (padded with zero pairs to a multiple of kDepthStep), columns padded to
// 16 with zeros.
void to_pairs(const float* src, int64_t lds, int64_t rows, int64_t cols, uint16_t* panels,
              int64_t panel_stride);

// dst[0, n) = bfloat16(src[0, n)) rounded to nearest even, dst[n, npad) = 0.
void to_bf16(const float* src, int64_t n, int64_t npad, uint16_t* dst);

// acc += P V on AMX with V's rows read in place, unpacked (for decoding, where V is read once:
// packing it into pair panels cost more than the products). A key's weight goes into one of
// a pair's two slots with zero in the other ("spread"), so a tile row of V's own 32 features
// gives the even features' products through the even spread and the odd ones' through the
// odd: twice the tile products of packed panels, no pass over V.
//   even / odd: [16 rows][lda] (uint32 pairs): key j's weight in the low (even) or high (odd)
//     half of element j, zero elsewhere (spread_pairs); rows past the caller's zero.
//   v: [16 * steps][hv] bfloat16 rows vs elements apart, all readable (no padding read).
//   acc: [16][hv] float32 in split order: of every 32 features, the 16 even ones, then the 16
//     odd ones (unsplit restores the order). hv a multiple of 32.
//   v_cold: whether v's rows come from memory rather than a cache (values of their own, not
//     the keys just scored): each 64-feature block's rows are then prefetched into L2 while
//     the block before works.
//   next, next_bytes: memory the caller reads next (or nullptr), prefetched into L2 on the
//     way at a little below a core's streaming rate, as far as the steps go (the steps that
//     do not prefetch values).
void split_values(int64_t steps, const uint32_t* even, const uint32_t* odd, int64_t lda,
                  const uint16_t* v, int64_t vs, int64_t hv, bool v_cold, float* acc,
                  const void* next, int64_t next_bytes);
// even[j] / odd[j] = bfloat16(src[j]) in the low / high half, zero past n up to npad (a
// multiple of 16).
void spread_pairs(const float* src, int64_t n, int64_t npad, uint32_t* even, uint32_t* odd);
// dst[0, hv) = row[0, hv) from split order back to feature order.
void unsplit(const float* row, int64_t hv, float* dst);

// Releases this thread's AMX tile state (a no-op without AMX).
void release();

}  // namespace lowp
}  // namespace jattn
