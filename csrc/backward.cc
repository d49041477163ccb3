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
// The inputs are first copied to head-major float32 (dense rows; bf16/f16 converted). This
// file makes the plan (BwdPlan: blocks, chunks, buffers, kernels) and runs the tasks; a task
// (run_task), the sweep and the five products are written once per ISA level
// (backward_isa.inc, instanced by isa_instances.inc, the call's level chosen by
// JATTN_DISPATCH): register tiles of 6 x 8 (generic), 6 x 16 (AVX2) or 12 x 32 (AVX-512)
// floats (microkernel.inc) that read Q_i, dO_i, K_j and P/dS where they lie and pack only
// K_j^T and V_j^T (the GEMMs' packer), once per key block. They serve head sizes that are
// multiples of the tile width (the widest level at or below the call's that divides both
// head sizes is taken); elsewhere the products go through the level's gemm_nt / gemm_tn /
// gemm_nn. Blocks the mask (mask.h) leaves empty are skipped; index masks (causal, window,
// lengths, chunks) are per-row column ranges, and on edge blocks the register tiles they
// leave zero are skipped; segments and the dense mask are evaluated per entry on the blocks
// that need it only.

#include <cmath>
#include <cstring>
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

// The factor of a row's dout and D: exp(-lse_lo) where lse_lo matters, else 1 (attention.h).
inline float lo_factor(const float* lo, int64_t row) {
  if (lo == nullptr || !(std::fabs(lo[row]) > 0x1p-20f)) return 1.0f;  // a NaN lo: NaN rows
  return std::exp(-lo[row]);
}

// A [B, L, NH, W] tensor -> float32 [B, NH, L, W] with rows ld floats apart (head-major:
// each head's rows dense instead of NH * W apart), in parallel, into dst; row (b, n, i) times
// lo_factor(lo, (b * NH + n) * L + i) when lo is given.
void head_major_f32(const void* src, DType dt, int64_t B, int64_t L, int64_t NH, int64_t W,
                    int64_t ld, float* dst, const float* lo = nullptr) {
  constexpr int64_t kRows = 128;
  const int64_t chunks = (L + kRows - 1) / kRows;
  parallel_for(B * chunks, [&](int64_t t) {
    const int64_t b = t / chunks, i0 = (t % chunks) * kRows, i1 = std::min(L, i0 + kRows);
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t n = 0; n < NH; ++n) {
        float* const d = dst + ((b * NH + n) * L + i) * ld;
        load_row(src, ((b * L + i) * NH + n) * W, W, dt, d);
        const float f = lo_factor(lo, (b * NH + n) * L + i);
        if (f != 1.0f)
          for (int64_t h = 0; h < W; ++h) d[h] *= f;
      }
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
    const bool hid = kAdd && r.add[t] == -INFINITY;  // as in Sweep::row
    if (kAdd) x = hid ? r.add[t] : x + r.add[t];
    float pv = std::exp(x - r.lse);
    float d = r.dp[t];
    float pd = pv;
    if (kDrop) {
      bool keep = dropout_keep(r.row_hash, r.j0 + t, c.threshold);
      pd = keep ? pv * c.inv_keep : 0.0f;
      d = keep ? d * c.inv_keep : 0.0f;
    }
    float ds = hid ? 0.0f : pv * (d - r.D);
    if (kDb) r.db[t] = ds;
    if (kCap && !hid) ds *= (1.0f - th * th);
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
  // rows [0, n) of X (width w) -> panels [ceil(n / panel)][w][panel] (the shared packer)
  void (*pack)(int64_t n, int64_t w, const float* X, int64_t ldx, float* dst);
  // C[rows x panel np] = A[rows x L] . panels, the sum over L in runs of `run`
  void (*nt_packed)(int64_t rows, int64_t np, int64_t L, const float* A, int64_t lda,
                    const float* panels, float* C, int64_t ldc, const TileRanges& tr,
                    int64_t run);
  // C[M x N] += A[L x M]^T . B[L x N]
  void (*tn)(int64_t M, int64_t N, int64_t L, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc, const TileRanges& tr);
  // C[M x N] += A[M x L] . B[L x N]
  void (*nn)(int64_t M, int64_t N, int64_t L, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc, const TileRanges& tr);
};

// F::row<kCap, kAdd, kDrop, kDb> for the four flags given at run time (F: one ISA level's
// sweep, backward_isa.inc).
template <class F, bool... kSet, class... Rest>
SweepFn pick_row(bool flag, Rest... rest) {
  if constexpr (sizeof...(Rest) == 0)
    return flag ? &F::template row<kSet..., true> : &F::template row<kSet..., false>;
  else
    return flag ? pick_row<F, kSet..., true>(rest...) : pick_row<F, kSet..., false>(rest...);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The backward's plan: everything a task reads (backward_isa.inc: run_task). Rows of the
// head-major copies: q [B, N, T, ldq], dout [B, N, T, ldo]; head (b, kh)'s key row 0 at
// kf + b * khead_b + kh * khead_h (copies [B, K, S, ldk], or the float32 input itself), the
// values likewise.
struct BwdPlan {
  const Problem* p;
  const float* lse;  // [B, N, T]
  const float* D;    // rowsum(dO * O) - dlse, [B, N, T]
  float* dbias;      // or nullptr
  void* dk;
  void* dv;
  const float *qf, *dof, *kf, *vf;
  int64_t ldq, ldo, ldk, ldv, khead_b, khead_h, vhead_b, vhead_h;
  int64_t bq, bk;  // a pair's query rows and keys
  int64_t ldb;     // leading dimension of the score buffers (bk rounded up to the panel)
  int64_t nk;      // key blocks
  int64_t C;       // key chunks per KV head (tasks: B * K * C)
  float* dqacc;    // the chunks' dQ accumulators, [C, B, N, T, ldq]
  int64_t dq_elems;
  const Kernels* kt;  // register-tiled products (a level at or below the call's), or nullptr
  SweepFn sweep_plain, sweep_add;  // without / with an additive row (bias and mask)
  SweepConsts sc;
  bool has_bias, has_mask, has_seg, has_drop, bias_direct;
  // bfloat16 products (lowp.h) on bfloat16 inputs at a level with a unit, instead of the
  // float32 copies and products: K_j and V_j packed from the inputs per key block; Q and dO
  // as bfloat16 head-major rows (qh, doh: [B, N, T, ldqh / ldoh], zero padded) and per KV
  // group transposed (qt, dot: [B, K, H or Hv, ldt], the group's G * T rows as columns, zero
  // padded); dK and dV accumulated transposed. P and dS are rounded to bfloat16 before their
  // products, as on GPUs.
  lowp::Unit unit = lowp::Unit::kNone;
  const void *k = nullptr, *v = nullptr;
  const uint16_t *qh = nullptr, *doh = nullptr, *qt = nullptr, *dot = nullptr;
  int64_t ldqh = 0, ldoh = 0, ldt = 0;
};

}  // namespace

#define JATTN_ISA_FILE "backward_isa.inc"
#include "isa_instances.inc"

namespace {

// One level's sweep and products.
const Kernels* kernels_at(Isa isa) { JATTN_DISPATCH(isa, kKernels_ptr()) }

// The widest level at or below the call's whose tile width divides both head dims, or
// nullptr: the products then go through the call level's gemm_nt / gemm_tn / gemm_nn. The
// generic tiles only serve generic calls (a wider level's GEMM is faster than them).
const Kernels* tile_kernels(int64_t H, int64_t Hv, Isa isa) {
  for (int l = static_cast<int>(isa); l >= 0; --l) {
    if (l == 0 && isa != Isa::kGeneric) break;
    const Kernels* k = kernels_at(static_cast<Isa>(l));
    if (H > 0 && Hv > 0 && H % k->panel == 0 && Hv % k->panel == 0) return k;
  }
  return nullptr;
}

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

// D = (rowsum(dO * O) - dlse) lo_factor, [B, N, T].
void row_dots(const Problem& p, const void* out, const void* dout, const float* dlse,
              const float* lo, float* Dp) {
  const int64_t B = p.B, T = p.T, N = p.K * p.G, Hv = p.Hv;
  constexpr int64_t kRows = 256;
  const int64_t chunks = ceil_div(B * T, kRows);
  parallel_for(chunks, [&](int64_t c) {
    std::vector<float> orow(Hv), dor(Hv);
    int64_t a = c * kRows, e = std::min(B * T, a + kRows);
    for (int64_t bt = a; bt < e; ++bt) {
      int64_t b = bt / T, i = bt % T;
      for (int64_t n = 0; n < N; ++n) {
        int64_t off = (bt * N + n) * Hv;
        load_row(out, off, Hv, p.dtype, orow.data());
        load_row(dout, off, Hv, p.dtype, dor.data());
        float acc = 0.0f;
        for (int64_t h = 0; h < Hv; ++h) acc += dor[h] * orow[h];
        int64_t li = (b * N + n) * T + i;
        Dp[li] = (acc - (dlse ? dlse[li] : 0.0f)) * lo_factor(lo, li);
      }
    }
  });
}

// dq [B, T, N, H] = the chunks' accumulators summed in chunk order, in the input dtype.
void reduce_dq(const Problem& p, const BwdPlan& bp, void* dq) {
  const int64_t B = p.B, T = p.T, N = p.K * p.G, H = p.H;
  constexpr int64_t kRows = 64;
  const int64_t chunks = ceil_div(T, kRows);
  parallel_for(B * chunks, [&](int64_t t) {
    std::vector<float> acc(H);
    const int64_t b = t / chunks, i0 = (t % chunks) * kRows, i1 = std::min(T, i0 + kRows);
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t n = 0; n < N; ++n) {
        const float* src = bp.dqacc + ((b * N + n) * T + i) * bp.ldq;
        std::memcpy(acc.data(), src, H * sizeof(float));
        for (int64_t cc = 1; cc < bp.C; ++cc) {
          const float* s2 = src + cc * bp.dq_elems;
          for (int64_t h = 0; h < H; ++h) acc[h] += s2[h];
        }
        store_row(dq, ((b * T + i) * N + n) * H, H, p.dtype, acc.data());
      }
  });
}

// The plan's schedule and kernels: block sizes, key chunks, the products and the sweeps.
void plan_backward(const Problem& p, Isa isa, BwdPlan& bp) {
  // The register-tiled products where the head dims allow them (kt), the call level's vector
  // sweep (kw) in any case.
  const Kernels* const kt = tile_kernels(p.H, p.Hv, isa);
  const Kernels* const kw = kernels_at(isa);
  bp.kt = kt;
  backward_blocks(p, bp.unit != lowp::Unit::kNone ? kw : kt, bp.bq, bp.bk);
  const int64_t pw = bp.unit != lowp::Unit::kNone ? lowp::kDepthStep : kt ? kt->panel : 16;
  bp.ldb = ceil_div(bp.bk, pw) * pw;
  bp.nk = ceil_div(p.S, bp.bk);
  // Key chunks per KV head: enough tasks to keep every thread busy, bounded by the memory
  // of the partial dQ accumulators.
  const int64_t nt = std::max(1, num_threads());
  bp.C = 1;
  if (bp.nk > 1 && p.B * p.K < 3 * nt) bp.C = std::min<int64_t>(bp.nk, ceil_div(3 * nt, p.B * p.K));
  bp.dq_elems = p.B * p.T * p.K * p.G * bp.ldq;
  while (bp.C > 1 && bp.C * bp.dq_elems * 4 > (int64_t(1) << 29)) --bp.C;

  const bool has_cap = p.softcap > 0.0f;
  bp.has_bias = p.bias.data != nullptr;
  bp.has_mask = p.mask.data != nullptr;
  bp.has_seg = p.q_seg != nullptr && p.kv_seg != nullptr;
  bp.has_drop = p.dropout_rate > 0.0f && p.dropout_seed != nullptr;
  SweepConsts& sc = bp.sc;
  sc.scale = p.scale;
  sc.cap = has_cap ? p.softcap : 1.0f;
  sc.inv_cap = has_cap ? 1.0f / p.softcap : 1.0f;
  sc.inv_keep = bp.has_drop ? 1.0f / (1.0f - p.dropout_rate) : 1.0f;
  sc.threshold = bp.has_drop ? p.dropout_threshold : 0u;
  // Full blocks add the bias straight from its row when it is contiguous along keys.
  bp.bias_direct = bp.has_bias && p.bias.ss == 1;
  const bool db = bp.dbias != nullptr;
  bp.sweep_plain = kw->pick_sweep(has_cap, bp.has_bias, bp.has_drop, db);
  bp.sweep_add = kw->pick_sweep(has_cap, true, bp.has_drop, db);
}

void run_task(Isa isa, const BwdPlan& bp, int64_t task) { JATTN_DISPATCH(isa, run_task(bp, task)) }

// bfloat16 [B, L, NH, W] -> head-major rows [B, NH, L, ld] (zero padded), and per group of G
// heads transposed: [B, NH / G, W, ldt] with the group's G * L rows as columns (zero padded);
// row (b, n, i) times lo_factor (rounded to bfloat16 again) where that is not 1.
void head_major_bf16(const uint16_t* src, int64_t B, int64_t L, int64_t NH, int64_t W, int64_t G,
                     int64_t ld, int64_t ldt, uint16_t* rows, uint16_t* cols,
                     const float* lo = nullptr) {
  const int64_t groups = NH / G;
  parallel_for(B * groups, [&](int64_t t) {
    const int64_t b = t / groups, kh = t % groups;
    uint16_t* ct = cols + t * W * ldt;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t n = kh * G + g;
      for (int64_t i = 0; i < L; ++i) {
        const uint16_t* s = src + ((b * L + i) * NH + n) * W;
        uint16_t* d = rows + ((b * NH + n) * L + i) * ld;
        std::copy_n(s, W, d);
        const float f = lo_factor(lo, (b * NH + n) * L + i);
        if (f != 1.0f) {
          for (int64_t h = 0; h < W; ++h) d[h] = f32_to_bf16(bf16_to_f32(d[h]) * f);
          s = d;  // the transposed copy takes the scaled row
        }
        std::fill(d + W, d + ld, uint16_t{0});
        for (int64_t h = 0; h < W; ++h) ct[h * ldt + g * L + i] = s[h];
      }
    }
    for (int64_t h = 0; h < W; ++h) std::fill(ct + h * ldt + G * L, ct + (h + 1) * ldt, uint16_t{0});
  });
}

}  // namespace

void backward_defaults(const Problem& p, Tuning& t) {
  Problem q = p;
  q.tuning = Tuning{};
  const Isa isa = default_isa();
  const bool lowp = p.dtype == DType::kBF16 && lowp_unit(isa) != lowp::Unit::kNone &&
                    p.H % lowp::kPanel == 0 && p.Hv % lowp::kPanel == 0;
  backward_blocks(q, lowp ? kernels_at(isa) : tile_kernels(p.H, p.Hv, isa), t.bwd_block_rows,
                  t.bwd_block_keys);
}

// ---------------------------------------------------------------------------------------

void backward(const Problem& p, const void* q, const void* k, const void* v, const void* out,
              const float* lse, const float* lse_lo, const void* dout, const float* dlse,
              void* dq, void* dk, void* dv, float* dbias) {
  const int64_t B = p.B, T = p.T, S = p.S, K = p.K, G = p.G, H = p.H, Hv = p.Hv;
  const int64_t N = K * G;
  const DType dt = p.dtype;
  if (B <= 0 || N <= 0) return;
  const CallGuard guard;  // release_kept() waits for the call
  ScopedThreadCap cap(p.tuning.threads);
  const Isa isa = call_isa(p.tuning.isa);

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
  BwdPlan bp;
  bp.p = &p;
  bp.k = k;
  bp.v = v;
  if (dt == DType::kBF16 && H % lowp::kPanel == 0 && Hv % lowp::kPanel == 0)
    bp.unit = lowp_unit(isa);
  bp.lse = lse;
  bp.dbias = dbias;
  bp.dk = dk;
  bp.dv = dv;
  bp.ldq = padded_ld(H);
  bp.ldo = padded_ld(Hv);
  bp.ldk = kv_direct ? K * H : padded_ld(H);
  bp.ldv = kv_direct ? K * Hv : padded_ld(Hv);
  bp.khead_b = kv_direct ? S * K * H : K * S * bp.ldk;
  bp.khead_h = kv_direct ? H : S * bp.ldk;
  bp.vhead_b = kv_direct ? S * K * Hv : K * S * bp.ldv;
  bp.vhead_h = kv_direct ? Hv : S * bp.ldv;
  if (bp.unit != lowp::Unit::kNone) {
    using lowp::round_up;
    bp.ldqh = round_up(H, lowp::kDepthStep);
    bp.ldoh = round_up(Hv, lowp::kDepthStep);
    bp.ldt = round_up(G * T, lowp::kDepthStep) + lowp::kDepthStep;
    auto halves = [](int64_t n) { return (n + 1) / 2; };  // uint16 elements in floats
    auto* qh = reinterpret_cast<uint16_t*>(qcache.get(halves(B * N * T * bp.ldqh), kKeep, qown));
    auto* doh = reinterpret_cast<uint16_t*>(docache.get(halves(B * N * T * bp.ldoh), kKeep, doown));
    auto* qt = reinterpret_cast<uint16_t*>(kcache.get(halves(B * K * H * bp.ldt), kKeep, kown));
    auto* dot = reinterpret_cast<uint16_t*>(vcache.get(halves(B * K * Hv * bp.ldt), kKeep, vown));
    head_major_bf16(static_cast<const uint16_t*>(q), B, T, N, H, G, bp.ldqh, bp.ldt, qh, qt);
    head_major_bf16(static_cast<const uint16_t*>(dout), B, T, N, Hv, G, bp.ldoh, bp.ldt, doh, dot,
                    lse_lo);
    bp.qh = qh, bp.doh = doh, bp.qt = qt, bp.dot = dot;
  } else {
    float* const qf = qcache.get(B * N * T * bp.ldq, kKeep, qown);
    float* const dof = docache.get(B * N * T * bp.ldo, kKeep, doown);
    head_major_f32(q, dt, B, T, N, H, bp.ldq, qf);
    head_major_f32(dout, dt, B, T, N, Hv, bp.ldo, dof, lse_lo);
    bp.qf = qf;
    bp.dof = dof;
  }
  bp.kf = static_cast<const float*>(k);
  bp.vf = static_cast<const float*>(v);
  if (!kv_direct && bp.unit == lowp::Unit::kNone) {
    float* const kc = kcache.get(B * K * S * bp.ldk, kKeep, kown);
    float* const vc = vcache.get(B * K * S * bp.ldv, kKeep, vown);
    head_major_f32(k, dt, B, S, K, H, bp.ldk, kc);
    head_major_f32(v, dt, B, S, K, Hv, bp.ldv, vc);
    bp.kf = kc, bp.vf = vc;
  }
  float* const Dp = dcache.get(B * N * T, kKeep, down);
  row_dots(p, out, dout, dlse, lse_lo, Dp);
  bp.D = Dp;
  if (dbias) {
    int64_t rows = B * N * T;
    constexpr int64_t kRows = 64;
    parallel_for(ceil_div(rows, kRows), [&](int64_t c) {
      int64_t a = c * kRows, e = std::min(rows, a + kRows);
      std::memset(dbias + a * S, 0, (e - a) * S * sizeof(float));
    });
  }
  plan_backward(p, isa, bp);
  bp.dqacc = dqcache.get(bp.C * bp.dq_elems, kKeep, dqown);
  parallel_for(B * K * bp.C, [&](int64_t task) { run_task(isa, bp, task); });
  reduce_dq(p, bp, dq);
}

}  // namespace jattn
