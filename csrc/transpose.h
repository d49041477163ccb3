// An 8 x 8 float transpose for the panel packer (gemm_isa.inc: pack_b), which the forward's
// pre-packed K blocks and the backward's K_j^T / V_j^T panels share, and for the decode's
// transposed scores (forward_isa.inc: untranspose).
#pragma once

#include <cstdint>

namespace jattn {

typedef float V8 __attribute__((vector_size(32)));
typedef float V8U __attribute__((vector_size(32), aligned(4)));
typedef int32_t V8I __attribute__((vector_size(32)));

// dst[u * ldd + c] = src[c * lds + u] for u, c < 8: three rounds of shuffles of 8-float
// vectors (pairs, then quads, then halves). Always inlined, so that the caller's instruction
// set (SSE, AVX2, AVX-512) chooses the shuffles: vunpck / vshufps / vperm2f128 with AVX.
__attribute__((always_inline)) inline void transpose8(const float* src, int64_t lds, float* dst,
                                                      int64_t ldd) {
  V8 r[8], t[8];
#pragma GCC unroll 8
  for (int c = 0; c < 8; ++c) r[c] = *reinterpret_cast<const V8U*>(src + c * lds);
#pragma GCC unroll 4
  for (int c = 0; c < 8; c += 2) {
    t[c] = __builtin_shuffle(r[c], r[c + 1], V8I{0, 8, 1, 9, 4, 12, 5, 13});
    t[c + 1] = __builtin_shuffle(r[c], r[c + 1], V8I{2, 10, 3, 11, 6, 14, 7, 15});
  }
#pragma GCC unroll 2
  for (int c = 0; c < 8; c += 4)
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      r[c + h] = __builtin_shuffle(t[c + h], t[c + h + 2], V8I{0, 1, 8, 9, 4, 5, 12, 13});
      r[c + h + 2] = __builtin_shuffle(t[c + h], t[c + h + 2], V8I{2, 3, 10, 11, 6, 7, 14, 15});
    }
  // Now r[i] holds columns 0-3 and r[i + 4] columns 4-7 (i < 4), each at depth d[i] in its
  // low half and d[i] + 4 in its high half; the last round joins the halves into rows.
  const int depth[4] = {0, 2, 1, 3};
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    *reinterpret_cast<V8U*>(dst + depth[i] * ldd) =
        __builtin_shuffle(r[i], r[i + 4], V8I{0, 1, 2, 3, 8, 9, 10, 11});
    *reinterpret_cast<V8U*>(dst + (depth[i] + 4) * ldd) =
        __builtin_shuffle(r[i], r[i + 4], V8I{4, 5, 6, 7, 12, 13, 14, 15});
  }
}

}  // namespace jattn
