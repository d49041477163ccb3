// The backward pass of the native CPU flash-attention kernel (FlashAttention-2 style).
//
// Work is split into tasks (batch b, KV head kh, key chunk c). A task owns, for its KV head,
// the key blocks kb = c, c + C, c + 2C, ... : their dK/dV rows (accumulated in float32 over
// the G query heads of the group and every query block that sees the key block, in a fixed
// order) and its own float32 dQ accumulator. C = 1 unless B * K is too small to keep every
// thread busy; then the C partial dQ are summed in chunk order at the end. Every result is
// computed in an order fixed by the problem and the thread count, never by the scheduling.
//
// Per (query block, key block) pair, with the probabilities recomputed from the saved
// log-sum-exp:
//   S  = Q_i K_j^T,  dP = dO_i V_j^T
//   P = exp(softcap(scale S) + bias - lse), dS = P (dP - D), D = rowsum(dO O) - dlse
//                                     (one fused, vectorised sweep; dropout on P and dP)
//   dV_j += P^T dO_i   dK_j += dS^T Q_i   dQ_i += dS K_j
// The inputs are first copied to head-major float32 (dense rows; bf16/f16 converted). The
// sweep and the five products are written once per ISA level (backward_isa.inc, instanced
// here for AVX2 and AVX-512, chosen at run time): register tiles of 6 x 16 (AVX2) or 12 x 32
// (AVX-512) floats that read Q_i, dO_i, K_j and P/dS where they lie and pack only K_j^T and
// V_j^T, once per key block. They serve head sizes that are multiples of the tile width (the
// widest level that divides both head sizes is taken); elsewhere the products go through
// gemm_nt / gemm_tn / gemm_nn. Blocks the mask leaves empty are skipped; index masks
// (causal, window, lengths) are per-row column ranges, and on edge blocks the register tiles
// they leave zero are skipped; segments and the dense mask are evaluated per entry on the
// blocks that need it only.

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "attention.h"
#include "dtypes.h"
#include "isa.h"
#include "mask.h"
#include "scratch.h"
#include "threads.h"
#include "transpose.h"

#if JATTN_X86
#include <immintrin.h>
#endif

namespace jattn {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// n contiguous elements of base[idx...] -> float.
void load_row(const void* base, int64_t idx, int64_t n, DType dt, float* dst) {
  if (dt == DType::kF32) {
    std::memcpy(dst, static_cast<const float*>(base) + idx, n * sizeof(float));
  } else if (dt == DType::kBF16) {
    const uint16_t* s = static_cast<const uint16_t*>(base) + idx;
    for (int64_t t = 0; t < n; ++t) dst[t] = bf16_to_f32(s[t]);
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(base) + idx;
    for (int64_t t = 0; t < n; ++t) dst[t] = f16_to_f32(s[t]);
  }
}

// n floats -> base[idx...] in dtype dt.
void store_row(void* base, int64_t idx, int64_t n, DType dt, const float* src) {
  if (dt == DType::kF32) {
    std::memcpy(static_cast<float*>(base) + idx, src, n * sizeof(float));
  } else if (dt == DType::kBF16) {
    uint16_t* d = static_cast<uint16_t*>(base) + idx;
    for (int64_t t = 0; t < n; ++t) d[t] = f32_to_bf16(src[t]);
  } else {
    uint16_t* d = static_cast<uint16_t*>(base) + idx;
    for (int64_t t = 0; t < n; ++t) d[t] = f32_to_f16(src[t]);
  }
}

// The row stride of a head-major copy of rows of w floats: w, or w + 16 when w spans an even
// number (>= 4) of cache lines. A power-of-two stride puts a head's rows in a few of the L1's
// sets (at w = 128, 96 rows of a block in 8 sets of 8 ways): the products that walk a block's
// rows then evict their own lines. Measured 15-20% faster dQ and dK/dV products at H = 128.
int64_t padded_ld(int64_t w) {
  const int64_t lines = (w + 15) / 16;
  return lines >= 4 && lines % 2 == 0 ? w + 16 : w;
}

// A [B, L, NH, W] tensor -> float32 [B, NH, L, W] with rows ld floats apart (head-major:
// each head's rows dense instead of NH * W apart), in parallel, into dst.
void head_major_f32(const void* src, DType dt, int64_t B, int64_t L, int64_t NH, int64_t W,
                    int64_t ld, float* dst) {
  constexpr int64_t kRows = 128;
  const int64_t chunks = (L + kRows - 1) / kRows;
  parallel_for(B * chunks, [&](int64_t t) {
    const int64_t b = t / chunks, i0 = (t % chunks) * kRows, i1 = std::min(L, i0 + kRows);
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t n = 0; n < NH; ++n)
        load_row(src, ((b * L + i) * NH + n) * W, W, dt, dst + ((b * NH + n) * L + i) * ld);
  });
}

// ---------------------------------------------------------------------------------------
// The elementwise sweep over one row of a (query block, key block) pair.

struct RowArgs {
  float* s;          // in: q.k (unscaled); out: P (with dropout: the kept, rescaled weights)
  float* dp;         // in: dO.v; out: dS * softcap' * scale (what the dQ/dK products need)
  const float* add;  // additive bias + mask (-inf) for the row's columns, or nullptr
  float* db;         // dbias row (dS, before the softcap factor and the scale), or nullptr
  int64_t lo, n;     // the columns [lo, n) to compute (the caller zeroes the others)
  int64_t j0;        // first key index of the columns (dropout hash)
  float lse, D;      // row's log-sum-exp, rowsum(dO*O) - dlse
  uint32_t row_hash;
};

struct SweepConsts {
  float scale, cap, inv_cap, inv_keep;
  uint32_t threshold;
};

template <bool kCap, bool kAdd, bool kDrop, bool kDb>
void sweep_row_scalar(const RowArgs& r, const SweepConsts& c, int64_t from) {
  for (int64_t t = from; t < r.n; ++t) {
    float x = r.s[t] * c.scale;
    float th = 0.0f;
    if (kCap) {
      th = std::tanh(x * c.inv_cap);
      x = c.cap * th;
    }
    if (kAdd) x += r.add[t];
    float pv = std::exp(x - r.lse);
    float d = r.dp[t];
    float pd = pv;
    if (kDrop) {
      bool keep = dropout_keep(r.row_hash, r.j0 + t, c.threshold);
      pd = keep ? pv * c.inv_keep : 0.0f;
      d = keep ? d * c.inv_keep : 0.0f;
    }
    float ds = pv * (d - r.D);
    if (kDb) r.db[t] = ds;
    if (kCap) ds *= (1.0f - th * th);
    r.s[t] = pd;
    r.dp[t] = ds * c.scale;
  }
}

using SweepFn = void (*)(const RowArgs&, const SweepConsts&);

// Where a pair's nonzero P / dS entries can be, in register tiles: for each tile of mr rows
// the union [lo, hi) of their column ranges, for each tile of mr columns the rows [lo, hi)
// that reach it (mr: the tile rows of the level in use). The products skip what lies outside
// (on causal / window edges, about half of a diagonal block); what they skip is zero, so the
// results are the same.
struct TileRanges {
  bool full = true;                 // every row sees every column: no skipping
  std::vector<int64_t> rlo, rhi;    // per row tile: columns
  std::vector<int64_t> clo, chi;    // per column tile: rows
};

// One ISA level's sweep and register-tiled block products (backward_isa.inc). Only K_j and
// V_j are packed (once per key block, as panels of K_j^T / V_j^T a tile wide).
struct Kernels {
  int64_t mr;     // rows of a register tile
  int64_t panel;  // its columns: the panel width, which the head dims must be multiples of
  SweepFn (*pick_sweep)(bool cap, bool add, bool drop, bool db);
  // C[rows x panel np] = A[rows x L] . panels
  void (*nt_packed)(int64_t rows, int64_t np, int64_t L, const float* A, int64_t lda,
                    const float* panels, float* C, int64_t ldc, const TileRanges& tr);
  // C[M x N] += A[L x M]^T . B[L x N]
  void (*tn)(int64_t M, int64_t N, int64_t L, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc, const TileRanges& tr);
  // C[M x N] += A[M x L] . B[L x N]
  void (*nn)(int64_t M, int64_t N, int64_t L, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc, const TileRanges& tr);
};

// F::row<kCap, kAdd, kDrop, kDb> for the four flags given at run time (a sweep family F:
// the scalar one below, or one ISA level's in backward_isa.inc).
template <class F, bool... kSet, class... Rest>
SweepFn pick_row(bool flag, Rest... rest) {
  if constexpr (sizeof...(Rest) == 0)
    return flag ? &F::template row<kSet..., true> : &F::template row<kSet..., false>;
  else
    return flag ? pick_row<F, kSet..., true>(rest...) : pick_row<F, kSet..., false>(rest...);
}

struct ScalarSweep {
  template <bool kCap, bool kAdd, bool kDrop, bool kDb>
  static void row(const RowArgs& r, const SweepConsts& c) {
    sweep_row_scalar<kCap, kAdd, kDrop, kDb>(r, c, r.lo);
  }
};

SweepFn generic_sweep(bool cap, bool add, bool drop, bool db) {
  return pick_row<ScalarSweep>(cap, add, drop, db);
}

#if JATTN_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
#define JATTN_W 8
#define JATTN_MR 6
#define JATTN_SPLAT _mm256_set1_ps
#include "backward_isa.inc"
#undef JATTN_W
#undef JATTN_MR
#undef JATTN_SPLAT
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
namespace isa_avx512 {
#define JATTN_W 16
#define JATTN_MR 12
#define JATTN_SPLAT _mm512_set1_ps
#define JATTN_SCALEF(p, n) _mm512_scalef_ps(p, n)
#define JATTN_MAXPS(a, b) _mm512_max_ps(a, b)
#define JATTN_MINPS(a, b) _mm512_min_ps(a, b)
#define JATTN_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)  // a b + c, rounded once
#include "backward_isa.inc"
#undef JATTN_W
#undef JATTN_MR
#undef JATTN_SPLAT
#undef JATTN_SCALEF
#undef JATTN_MAXPS
#undef JATTN_MINPS
#undef JATTN_FMA
}  // namespace isa_avx512
#pragma GCC pop_options

#define JATTN_AVX2 __attribute__((target("avx2,fma")))

// rows [0, n) of X (row stride ldx, width w, a multiple of 8) -> panels [ceil(n/P)][w][P]
// (P = 16 or 32, the tile width of the level in use), zero padded. Rows far apart (keys and
// values read where they lie, a page apart at K * H = 1024) are prefetched a panel ahead: the
// hardware prefetchers do not cross pages. Prefetching past X's last row is harmless (a hint,
// never a fault) and warms the next key block.
JATTN_AVX2 void pack_panels(int64_t n, int64_t w, const float* X, int64_t ldx, int64_t P,
                            float* dst) {
  const bool far = ldx > 2 * w;
  for (int64_t p0 = 0; p0 < n; p0 += P) {
    if (far)
      for (int64_t r = p0 + P; r < p0 + 2 * P; ++r)
        for (int64_t h = 0; h < w; h += 16) prefetch(X + r * ldx + h);
    float* d = dst + (p0 / P) * w * P;
    int64_t nr = std::min<int64_t>(P, n - p0);
    if (nr == P) {
      for (int64_t h0 = 0; h0 < w; h0 += 8)
        for (int64_t g = 0; g < P; g += 8)
          transpose8(X + (p0 + g) * ldx + h0, ldx, d + h0 * P + g, P);
      continue;
    }
    for (int64_t c = 0; c < nr; ++c) {
      const float* src = X + (p0 + c) * ldx;
      for (int64_t h = 0; h < w; ++h) d[h * P + c] = src[h];
    }
    for (int64_t c = nr; c < P; ++c)
      for (int64_t h = 0; h < w; ++h) d[h * P + c] = 0.0f;
  }
}
#endif

// The widest level the CPU has (its sweep serves any head dims), or nullptr.
const Kernels* widest_kernels() {
#if JATTN_X86
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return &isa_avx512::kKernels;
    case Isa::kAvx2:
      return &isa_avx2::kKernels;
    default:
      break;
  }
#endif
  return nullptr;
}

// The widest level whose tile width divides both head dims, or nullptr: the products then go
// through gemm_nt / gemm_tn / gemm_nn.
const Kernels* tile_kernels(int64_t H, int64_t Hv) {
#if JATTN_X86
  auto fits = [&](const Kernels& k) {
    return H > 0 && Hv > 0 && H % k.panel == 0 && Hv % k.panel == 0;
  };
  const Isa isa = cpu_isa();
  if (isa == Isa::kAvx512 && fits(isa_avx512::kKernels)) return &isa_avx512::kKernels;
  if (isa != Isa::kGeneric && fits(isa_avx2::kKernels)) return &isa_avx2::kKernels;
#endif
  return nullptr;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

#ifndef JATTN_BWD_BQ
#define JATTN_BWD_BQ 96
#endif
#ifndef JATTN_BWD_BK
#define JATTN_BWD_BK 96
#endif
constexpr int64_t kBlockQ = JATTN_BWD_BQ, kBlockK = JATTN_BWD_BK;  // the tiled products' blocks

// The block sizes of the pairs (query rows x keys): Tuning::bwd_block_rows / bwd_block_keys,
// or the heuristic's choice for the products in use (kt: the register-tiled ones, or none).
void backward_blocks(const Problem& p, const Kernels* kt, int64_t& bq, int64_t& bk) {
  const bool fast = kt != nullptr;
  const int64_t H = p.H, Hv = p.Hv;
  bq = fast ? kBlockQ : 64;
  bk = fast ? kBlockK : 128;
  if (fast) {
    // Keep one pair's working set (score blocks, K/V panels and copies, dK/dV accumulators,
    // Q/dO copies) within 3/4 of L2: halve the query block, then the key block, as needed.
    auto working_set = [&](int64_t q_, int64_t k_) {
      return 4 * (2 * q_ * k_ + k_ * (3 * H + 2 * Hv) + q_ * (H + Hv));
    };
    const int64_t budget = l2_cache_bytes() * 3 / 4;
    if (working_set(bq, bk) > budget) bq = 48;
    if (working_set(bq, bk) > budget) bk = 48;
  }
  if (p.tuning.bwd_block_rows > 0) bq = std::min<int64_t>(4096, p.tuning.bwd_block_rows);
  if (p.tuning.bwd_block_keys > 0) bk = std::min<int64_t>(4096, p.tuning.bwd_block_keys);
}

}  // namespace

void backward_defaults(const Problem& p, Tuning& t) {
  Problem q = p;
  q.tuning = Tuning{};
  backward_blocks(q, tile_kernels(p.H, p.Hv), t.bwd_block_rows, t.bwd_block_keys);
}

// ---------------------------------------------------------------------------------------

void backward(const Problem& p, const void* q, const void* k, const void* v, const void* out,
              const float* lse, const void* dout, const float* dlse, void* dq, void* dk,
              void* dv, float* dbias) {
  const int64_t B = p.B, T = p.T, S = p.S, K = p.K, G = p.G, H = p.H, Hv = p.Hv;
  const int64_t N = K * G;
  const DType dt = p.dtype;
  if (B <= 0 || N <= 0) return;
  ScopedThreadCap cap(p.tuning.threads);

  const size_t esize = dtype_size(dt);
  advise_huge_pages(dq, B * T * N * H * esize);
  advise_huge_pages(dk, B * S * K * H * esize);
  advise_huge_pages(dv, B * S * K * Hv * esize);

  // Head-major float32 copies: q [B, N, T, H], k [B, K, S, H], v [B, K, S, Hv],
  // dout [B, N, T, Hv], rows ldq / ldk / ldv / ldo floats apart. These, D and the dQ
  // accumulators are kept from call to call by the calling thread, up to kKeep floats each.
  constexpr int64_t kKeep = int64_t{8} << 20;
  static thread_local Scratch qcache, kcache, vcache, docache, dcache, dqcache;
  AlignedFloats qown, kown, vown, doown, down, dqown;  // those larger than kKeep
  // Few query rows per KV head (decoding): each key row is used by a few small products, and
  // copying K and V (a pass over them, often into fresh pages) would cost more than those
  // products; float32 keys and values are then read where they lie, rows K * H apart.
  const bool kv_direct = dt == DType::kF32 && G * T <= 16;
  const int64_t ldq = padded_ld(H), ldo = padded_ld(Hv);
  const int64_t ldk = kv_direct ? K * H : padded_ld(H), ldv = kv_direct ? K * Hv : padded_ld(Hv);
  // Where head (b, kh)'s key row 0 lies: head-major copies [B, K, S, ld], or the input itself.
  const int64_t khead_b = kv_direct ? S * K * H : K * S * ldk, khead_h = kv_direct ? H : S * ldk;
  const int64_t vhead_b = kv_direct ? S * K * Hv : K * S * ldv, vhead_h = kv_direct ? Hv : S * ldv;
  float* const qf = qcache.get(B * N * T * ldq, kKeep, qown);
  float* const dof = docache.get(B * N * T * ldo, kKeep, doown);
  head_major_f32(q, dt, B, T, N, H, ldq, qf);
  head_major_f32(dout, dt, B, T, N, Hv, ldo, dof);
  const float* kf = static_cast<const float*>(k);
  const float* vf = static_cast<const float*>(v);
  if (!kv_direct) {
    float* const kc = kcache.get(B * K * S * ldk, kKeep, kown);
    float* const vc = vcache.get(B * K * S * ldv, kKeep, vown);
    head_major_f32(k, dt, B, S, K, H, ldk, kc);
    head_major_f32(v, dt, B, S, K, Hv, ldv, vc);
    kf = kc, vf = vc;
  }

  // D = rowsum(dO * O) - dlse, [B, N, T].
  float* const Dp = dcache.get(B * N * T, kKeep, down);
  {
    constexpr int64_t kRows = 256;
    int64_t chunks = ceil_div(B * T, kRows);
    parallel_for(chunks, [&](int64_t c) {
      std::vector<float> orow(Hv);
      int64_t a = c * kRows, e = std::min(B * T, a + kRows);
      for (int64_t bt = a; bt < e; ++bt) {
        int64_t b = bt / T, i = bt % T;
        for (int64_t n = 0; n < N; ++n) {
          int64_t off = (bt * N + n) * Hv;
          load_row(out, off, Hv, dt, orow.data());
          const float* dor = dof + ((b * N + n) * T + i) * ldo;
          float acc = 0.0f;
          for (int64_t h = 0; h < Hv; ++h) acc += dor[h] * orow[h];
          int64_t li = (b * N + n) * T + i;
          Dp[li] = acc - (dlse ? dlse[li] : 0.0f);
        }
      }
    });
  }
  const float* Dv = Dp;

  if (dbias) {
    int64_t rows = B * N * T;
    constexpr int64_t kRows = 64;
    parallel_for(ceil_div(rows, kRows), [&](int64_t c) {
      int64_t a = c * kRows, e = std::min(rows, a + kRows);
      std::memset(dbias + a * S, 0, (e - a) * S * sizeof(float));
    });
  }

  // The register-tiled products where the head dims allow them (kt), the widest vector
  // sweep the CPU has (kw) in any case.
  const Kernels* const kt = tile_kernels(H, Hv);
  const Kernels* const kw = widest_kernels();
  const bool fast = kt != nullptr;
  const int64_t mr = fast ? kt->mr : 1, pw = fast ? kt->panel : 16;
  int64_t bq, bk;
  backward_blocks(p, kt, bq, bk);
  const int64_t ldb = ceil_div(bk, pw) * pw;  // leading dimension of the score buffers
  const int64_t nk = ceil_div(S, bk);

  // Key chunks per KV head: enough tasks to keep every thread busy, bounded by the memory
  // of the partial dQ accumulators.
  const int64_t nt = std::max(1, num_threads());
  int64_t C = 1;
  if (nk > 1 && B * K < 3 * nt) C = std::min<int64_t>(nk, ceil_div(3 * nt, B * K));
  const int64_t dq_elems = B * T * N * ldq;
  while (C > 1 && C * dq_elems * 4 > (int64_t(1) << 29)) --C;
  // dQ accumulators, head-major [C, B, N, T, H] (rows ldq apart).
  float* const dqacc = dqcache.get(C * dq_elems, kKeep, dqown);

  const bool has_cap = p.softcap > 0.0f;
  const bool has_bias = p.bias.data != nullptr;
  const bool has_mask = p.mask.data != nullptr;
  const bool has_seg = p.q_seg != nullptr && p.kv_seg != nullptr;
  const bool has_drop = p.dropout_rate > 0.0f && p.dropout_seed != nullptr;
  SweepConsts sc;
  sc.scale = p.scale;
  sc.cap = has_cap ? p.softcap : 1.0f;
  sc.inv_cap = has_cap ? 1.0f / p.softcap : 1.0f;
  sc.inv_keep = has_drop ? 1.0f / (1.0f - p.dropout_rate) : 1.0f;
  sc.threshold = has_drop ? dropout_threshold(p.dropout_rate) : 0u;
  // Full blocks add the bias straight from its row when it is contiguous along keys.
  const bool bias_direct = has_bias && p.bias.ss == 1;
  const auto pick = kw ? kw->pick_sweep : &generic_sweep;
  const SweepFn sweep_plain = pick(has_cap, has_bias, has_drop, dbias != nullptr);
  const SweepFn sweep_add = pick(has_cap, true, has_drop, dbias != nullptr);

  const int64_t ntasks = B * K * C;
  parallel_for(ntasks, [&](int64_t task) {
    const int64_t c = task % C;
    const int64_t bkh = task / C;
    const int64_t b = bkh / K, kh = bkh % K;
    const RowBounds rb(p, b);

    std::vector<float> sbuf(bq * ldb), dpbuf(bq * ldb), addbuf(bq * ldb);
    std::vector<float> dkacc(bk * H), dvacc(bk * Hv), tmp(std::max(H, Hv));
    std::vector<int64_t> rlo(bq), rhi(bq);
    // Tiled products: K_j^T / V_j^T as panels pw columns wide.
    std::vector<float> kpan(fast ? ldb * H : 0), vpan(fast ? ldb * Hv : 0);
    TileRanges tr;
    if (fast) {
      tr.rlo.resize(ceil_div(bq, mr));
      tr.rhi.resize(ceil_div(bq, mr));
      tr.clo.resize(ceil_div(bk, mr));
      tr.chi.resize(ceil_div(bk, mr));
    }
    std::vector<RowArgs> rows_args(bq);

    // This task's dQ accumulator (chunk c): heads kh*G .. kh*G+G-1 of batch b.
    float* const dqa = dqacc + c * dq_elems;
    std::memset(dqa + (b * N + kh * G) * T * ldq, 0, G * T * ldq * sizeof(float));

    for (int64_t kb = c; kb < nk; kb += C) {
      const int64_t j0 = kb * bk, j1 = std::min(S, j0 + bk), cols = j1 - j0;
      std::fill(dkacc.begin(), dkacc.end(), 0.0f);
      std::fill(dvacc.begin(), dvacc.end(), 0.0f);
      const float* Kj = kf + b * khead_b + kh * khead_h + j0 * ldk;
      const float* Vj = vf + b * vhead_b + kh * vhead_h + j0 * ldv;
      const int64_t npan = ceil_div(cols, pw);
#if JATTN_X86
      if (fast && j0 < rb.kv_end) {
        pack_panels(cols, H, Kj, ldk, pw, kpan.data());
        pack_panels(cols, Hv, Vj, ldv, pw, vpan.data());
      }
#endif

      // Rows that can see a key of [j0, j1) by the index bounds.
      int64_t i_lo, i_hi;
      rb.rows_seeing(j0, j1, T, S, i_lo, i_hi);
      // Key-side segment range of the block (packed sequences are mostly sorted).
      int32_t kseg_min = 0, kseg_max = 0;
      bool kseg_const = false;
      if (has_seg && cols > 0) {
        const int32_t* ks = p.kv_seg + b * S + j0;
        kseg_min = kseg_max = ks[0];
        for (int64_t t = 1; t < cols; ++t) {
          kseg_min = std::min(kseg_min, ks[t]);
          kseg_max = std::max(kseg_max, ks[t]);
        }
        kseg_const = kseg_min == kseg_max;
      }

      // The pairs' query rows are blocks of bq rows of one query head, or all G * T rows of
      // the group's heads in one block when they fit (decoding: one product of G * T rows
      // instead of G of T). Rows are flat indices f = g * T + i, consecutive in the head-major
      // copies, the log-sum-exp, D and the dQ accumulators.
      const int64_t head0 = (b * N + kh * G) * T;  // flat row 0 of the group
      const bool merged = G > 1 && G * T <= bq;
      const int64_t heads = merged ? 1 : G;  // query heads taken one at a time
      const int64_t qb0 = merged ? 0 : i_lo / bq, qb1 = merged ? 1 : ceil_div(i_hi, bq);
      for (int64_t g = 0; g < heads && i_lo < i_hi; ++g) {
        for (int64_t qb = qb0; qb < qb1; ++qb) {
          const int64_t f0 = merged ? 0 : g * T + qb * bq;
          const int64_t f1 = merged ? G * T : g * T + std::min(T, qb * bq + bq);
          // Per-row visible column range within the block; -inf lse rows see nothing.
          int64_t first = -1, last = -1;
          int32_t qseg_min = 0, qseg_max = 0;
          for (int64_t f = f0; f < f1; ++f) {
            const int64_t i = f % T;
            int64_t a = std::max(rb.lo(i), j0), e = std::min(rb.hi(i), j1);
            if (!(lse[head0 + f] > kNegInf) || a >= e) {
              rlo[f - f0] = rhi[f - f0] = 0;
              continue;
            }
            rlo[f - f0] = a - j0;
            rhi[f - f0] = e - j0;
            if (has_seg) {
              int32_t s = p.q_seg[b * T + i];
              if (first < 0) qseg_min = qseg_max = s;
              qseg_min = std::min(qseg_min, s);
              qseg_max = std::max(qseg_max, s);
            }
            if (first < 0) first = f;
            last = f;
          }
          if (first < 0) continue;
          // Index bounds are column ranges per row; only segments and the dense mask need
          // per-entry work.
          bool need_entry = has_mask;
          if (has_seg) {
            if (qseg_max < kseg_min || qseg_min > kseg_max) continue;  // no equal ids
            if (!(kseg_const && qseg_min == qseg_max)) need_entry = true;
          }
          const int64_t r0 = first, rows = last + 1 - first;
          const float* Qi = qf + (head0 + r0) * ldq;
          const float* dOi = dof + (head0 + r0) * ldo;

          // Per-row arguments (and the additive mask rows of a mixed block).
          bool any = false;
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t f = r0 + r, gr = f / T, i = f % T;
            const uint32_t seed = has_drop ? p.dropout_seed[(b * K + kh) * G + gr] : 0u;
            const float* bias_h = has_bias ? p.bias.head(b, kh, gr) : nullptr;
            const uint8_t* mask_h = has_mask ? p.mask.head(b, kh, gr) : nullptr;
            RowArgs& ra = rows_args[r];
            ra.s = sbuf.data() + r * ldb;
            ra.dp = dpbuf.data() + r * ldb;
            ra.lo = 0;
            ra.n = cols;
            ra.j0 = j0;
            ra.lse = lse[head0 + f];
            ra.D = Dv[head0 + f];
            ra.row_hash = has_drop ? dropout_row_hash(seed, i) : 0u;
            ra.db = dbias ? dbias + (head0 + f) * S + j0 : nullptr;
            ra.add = nullptr;
            const int64_t a = rlo[f - f0], e = rhi[f - f0];
            if (a >= e) {
              ra.lo = ra.n = 0;  // an empty row: zero P and dS
              continue;
            }
            ra.lo = a;
            ra.n = e;
            if (need_entry) {
              float* ad = addbuf.data() + r * ldb;
              const float* br = bias_h ? bias_h + i * p.bias.st + j0 * p.bias.ss : nullptr;
              const uint8_t* mr = mask_h ? mask_h + i * p.mask.st + j0 * p.mask.ss : nullptr;
              const int32_t qs = has_seg ? p.q_seg[b * T + i] : 0;
              const int32_t* ks = has_seg ? p.kv_seg + b * S + j0 : nullptr;
              bool row_any = false;
              for (int64_t t = a; t < e; ++t) {
                bool vis = true;
                if (mr) vis = mr[t * p.mask.ss] != 0;
                if (vis && ks) vis = ks[t] == qs;
                ad[t] = vis ? (br ? br[t * p.bias.ss] : 0.0f) : kNegInf;
                row_any |= vis;
              }
              if (!row_any) {
                ra.lo = ra.n = 0;
                continue;
              }
              ra.add = ad;
            } else if (has_bias) {
              const float* br = bias_h + i * p.bias.st + j0 * p.bias.ss;
              if (bias_direct) {
                ra.add = br;
              } else {
                float* ad = addbuf.data() + r * ldb;
                for (int64_t t = a; t < e; ++t) ad[t] = br[t * p.bias.ss];
                ra.add = ad;
              }
            }
            any = true;
          }
          if (!any) continue;

          float* dqi = dqa + (head0 + r0) * ldq;
#if JATTN_X86
          if (fast) {
            // Tile ranges of a pair whose rows do not all see all of its columns.
            tr.full = true;
            for (int64_t r = 0; r < rows && tr.full; ++r)
              tr.full = rows_args[r].lo == 0 && rows_args[r].n == cols;
            if (!tr.full) {
              const int64_t nrt = ceil_div(rows, mr), nct = ceil_div(cols, mr);
              for (int64_t t = 0; t < nct; ++t) tr.clo[t] = rows, tr.chi[t] = 0;
              for (int64_t t = 0; t < nrt; ++t) {
                int64_t lo_ = cols, hi_ = 0;
                for (int64_t r = t * mr; r < std::min(rows, t * mr + mr); ++r) {
                  const RowArgs& ra = rows_args[r];
                  if (ra.n <= ra.lo) continue;
                  lo_ = std::min(lo_, ra.lo);
                  hi_ = std::max(hi_, ra.n);
                  for (int64_t ct = ra.lo / mr; ct * mr < ra.n; ++ct) {
                    tr.clo[ct] = std::min(tr.clo[ct], r);
                    tr.chi[ct] = std::max(tr.chi[ct], r + 1);
                  }
                }
                tr.rlo[t] = lo_;
                tr.rhi[t] = hi_;
              }
            }
            kt->nt_packed(rows, npan, H, Qi, ldq, kpan.data(), sbuf.data(), ldb, tr);
            kt->nt_packed(rows, npan, Hv, dOi, ldo, vpan.data(), dpbuf.data(), ldb, tr);
          } else
#endif
          {
            gemm_nt(rows, cols, H, Qi, ldq, Kj, ldk, sbuf.data(), ldb, false);
            gemm_nt(rows, cols, Hv, dOi, ldo, Vj, ldv, dpbuf.data(), ldb, false);
          }
          const SweepFn fn = need_entry ? sweep_add : sweep_plain;
          for (int64_t r = 0; r < rows; ++r) {
            const RowArgs& ra = rows_args[r];
            float* sr = sbuf.data() + r * ldb;
            float* dr = dpbuf.data() + r * ldb;
            if (ra.n <= ra.lo) {
              std::memset(sr, 0, cols * sizeof(float));
              std::memset(dr, 0, cols * sizeof(float));
              continue;
            }
            if (ra.lo > 0) {
              std::memset(sr, 0, ra.lo * sizeof(float));
              std::memset(dr, 0, ra.lo * sizeof(float));
            }
            if (ra.n < cols) {
              std::memset(sr + ra.n, 0, (cols - ra.n) * sizeof(float));
              std::memset(dr + ra.n, 0, (cols - ra.n) * sizeof(float));
            }
            fn(ra, sc);
          }
#if JATTN_X86
          if (fast) {
            kt->tn(cols, Hv, rows, sbuf.data(), ldb, dOi, ldo, dvacc.data(), Hv, tr);
            kt->tn(cols, H, rows, dpbuf.data(), ldb, Qi, ldq, dkacc.data(), H, tr);
            kt->nn(rows, H, cols, dpbuf.data(), ldb, Kj, ldk, dqi, ldq, tr);
          } else
#endif
          {
            gemm_tn(cols, Hv, rows, sbuf.data(), ldb, dOi, ldo, dvacc.data(), Hv, true);
            gemm_tn(cols, H, rows, dpbuf.data(), ldb, Qi, ldq, dkacc.data(), H, true);
            gemm_nn(rows, H, cols, dpbuf.data(), ldb, Kj, ldk, dqi, ldq, true);
          }
        }
      }

      for (int64_t t = 0; t < cols; ++t) {
        store_row(dk, ((b * S + j0 + t) * K + kh) * H, H, dt, dkacc.data() + t * H);
        store_row(dv, ((b * S + j0 + t) * K + kh) * Hv, Hv, dt, dvacc.data() + t * Hv);
      }
    }
  });

  {
    // dq [B, T, N, H] = the chunks' accumulators summed in chunk order, in the input dtype.
    constexpr int64_t kRows = 64;
    const int64_t chunks = ceil_div(T, kRows);
    parallel_for(B * chunks, [&](int64_t t) {
      std::vector<float> acc(H);
      const int64_t b = t / chunks, i0 = (t % chunks) * kRows, i1 = std::min(T, i0 + kRows);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t n = 0; n < N; ++n) {
          const float* src = dqacc + ((b * N + n) * T + i) * ldq;
          std::memcpy(acc.data(), src, H * sizeof(float));
          for (int64_t cc = 1; cc < C; ++cc) {
            const float* s2 = src + cc * dq_elems;
            for (int64_t h = 0; h < H; ++h) acc[h] += s2[h];
          }
          store_row(dq, ((b * T + i) * N + n) * H, H, dt, acc.data());
        }
    });
  }
}

}  // namespace jattn
