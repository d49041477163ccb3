// The flash forward pass (attention.h: forward).
//
// Work is split over batch x KV heads x query blocks (and, when that leaves threads idle, as
// in decoding, over key ranges too, merged afterwards through their log-sum-exp). Decoding
// calls (a few query rows per KV head) take one key range of every KV head per work item and
// read K and V in memory order, a position's [K, H] row at a time (attend_positions; with 9 to
// 16 rows per KV head, as multi-head latent attention has, in register or AMX tiles over a
// block of positions: attend_positions_tiled / _lowp). A task packs the G query heads of its
// KV head as rows of one float32 block (K/V read once per group), then per visible key
// block: S = Q K^T (gemm_nt) into a cache-resident block, one fused
// vectorised sweep per row (softcap, bias, and on mixed blocks only the mask; row max), exp2 and
// row sum, rescaling of the accumulator, O += P V (gemm_nn). Logits are in base-2 units
// (log2 e folded into the query scale), or natural ones with a bias (forward_isa.inc: Units).
// Blocks that no row can see are skipped, and blocks
// that every row sees in full run without any mask code.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <utility>
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

// Per-thread scratch blocks, grown on demand and reused from call to call.
struct Workspace {
  LineVector<float> bufs[8];
  float* get(int i, int64_t n) {
    if (static_cast<int64_t>(bufs[i].size()) < n) bufs[i].resize(static_cast<size_t>(n));
    return bufs[i].data();
  }
};

Workspace& workspace() {
  static thread_local Workspace ws;
  return ws;
}

struct Ctx {
  const Problem& p;
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  float* lse_lo;  // lse's rounding residual, or nullptr
  int64_t bq, bk, ldS, nqb, nkb, nsplit;
  bool use_prepack = false;
  bool positions = false;  // decoding: attend_positions over every KV head of a key block
  // Decoding with many rows per KV head: attend_positions in tiles (float32 K/V, or bfloat16
  // with bfloat16 products when unit is set).
  bool tiled = false;
  // Pre-packed K and V blocks (prepack), or nullptr: block (b, kh, kb) at
  // Kp + ((b * K + kh) * nkb + kb) * kblk, panel stride kps (and the same for V).
  const float* Kp = nullptr;
  const float* Vp = nullptr;
  int64_t kblk = 0, kps = 0, vblk = 0, vps = 0;
  int64_t strip = 12;  // rows of S computed and swept at a time (pre-packed path)
  // bfloat16 products (lowp.h) instead of float32 ones: K and V pre-packed as bfloat16
  // panels (the same block addressing, in uint16 elements), Q read as it is, P rounded to
  // bfloat16 before P V.
  lowp::Unit unit = lowp::Unit::kNone;
  const uint16_t* Kh = nullptr;
  const uint16_t* Vh = nullptr;
};

}  // namespace

#define JATTN_ISA_FILE "forward_isa.inc"
#include "isa_instances.inc"

// The forward's plan: the block sizes and the schedule, from the shape, the thread count and
// the call's Tuning (a knob of 0 takes the heuristic's choice). The one place they are
// chosen: forward() runs it, and forward_defaults() reports it.
struct ForwardPlan {
  int64_t rows_target, bq, bk, nqb, nkb, nsplit, strip;
  bool positions;  // decoding: one key block of every KV head per work item
  bool tiled;      // ... in register or AMX tiles (9 (bfloat16: 5) to 16 rows per KV head)
  bool use_prepack;
  lowp::Unit unit;  // bfloat16 products (pre-packed path, bfloat16 decode tiles)
};

ForwardPlan plan_forward(const Problem& p, int64_t threads, Isa isa) {
  const Tuning& t = p.tuning;
  ForwardPlan f;
  // bfloat16 inputs on a level with a bfloat16 unit: products in bfloat16, rows in AMX's
  // 16-row steps (value heads in whole panels of 16; others take the float32 products).
  const bool lowp_ok = p.dtype == DType::kBF16 && lowp_unit(isa) != lowp::Unit::kNone &&
                       p.Hv % lowp::kPanel == 0;
  const int64_t mr = lowp_ok ? lowp::kRowStep : gemm_tile_rows(isa);
  // Key blocks of 256 (a score row of 1 KiB); query blocks of about 128 rows (the G heads of
  // a group packed together), fewer when that leaves threads without work. The same for
  // banded (causal, windowed) masks: on their mixed blocks only the panels a strip of rows
  // can see are computed, so a long key block wastes little of a diagonal (measured against
  // square 120-position blocks, which were the better choice before that: 2-5% faster at
  // T = 1024..4096 on Zen 3). With AMX products, key blocks of 512: the softmax's fixed
  // cost per row and block is then spread over twice the keys (3-6% faster than 256 on the
  // Sapphire Rapids class Xeon, bfloat16, T = 1024..8192, H = 64, 128 and 192, causal or
  // not, in one process; 1024 no faster). Tuning::block_rows / block_keys override both.
  const int64_t rows_target = t.block_rows > 0 ? t.block_rows : 128;
  const bool amx = lowp_ok && lowp_unit(isa) == lowp::Unit::kAmx;
  const int64_t keys = t.block_keys > 0 ? t.block_keys : amx ? 512 : 256;
  f.rows_target = rows_target;
  int64_t bk = std::max<int64_t>(1, std::min<int64_t>(keys, p.S));
  int64_t bq = std::max<int64_t>(1, rows_target / p.G);
  // G * bq a multiple of the GEMM's tile rows where that stays near 128 rows.
  for (int64_t c = bq; c <= bq + mr && c * p.G <= rows_target * 5 / 4; ++c)
    if ((c * p.G) % mr == 0) {
      bq = c;
      break;
    }
  bq = std::min(bq, p.T);
  const int64_t min_bq = std::max<int64_t>(1, 16 / p.G);
  auto tasks = [&](int64_t bq_) { return p.B * p.K * ((p.T + bq_ - 1) / bq_); };
  while (bq > min_bq && tasks(bq) < 4 * threads) bq = std::max(min_bq, bq / 2);
  const int64_t nqb = (p.T + bq - 1) / bq;
  // Decoding streams K and V by position for up to 16 rows per KV head: in tiles
  // (attend_positions_tiled / _lowp) from 9 rows on where K and V are float32, from 5 rows
  // on where they are bfloat16 with bfloat16 products; otherwise as dot products.
  const bool positions = p.G * bq <= 16 && nqb == 1 && p.K <= 64 && t.stream_decode;
  // bfloat16 tiles win from 5 rows on (measured on the AMX Xeon, decode S = 4096, H = 128:
  // 8 rows 3.8 vs 5.1 ms; 4 rows 9.3 vs 8.2), float32 ones from 9 (4 rows: 29 vs 11 ms).
  const bool tiled = positions && (lowp_ok ? p.G * bq > 4 : p.dtype == DType::kF32 && p.G * bq > 8);
  if (positions && t.block_keys <= 0) {
    // Up to 256 keys per block (fewer partial results to merge: at 64, S = 16k spent a
    // third of its time on them), the score block of every head within 64 KiB, and enough
    // blocks for every thread.
    // The bfloat16 tiles score a block in chunks of their own (kLowpChunk), so with one KV
    // head (read once, in order) their blocks can be as long as the threads allow: each
    // block starts its stream cold (its first chunk unprefetched) and adds a partial result.
    // Timed cold (caches emptied before each call, as a model's decoding finds them), up to
    // 8192 keys were 3-5% faster than blocks of 1024 at MLA's 576 / 512 heads, B = 8,
    // S = 4096 and 16384, at the amx and avx512_bf16 levels (warm, 2048 was no faster than
    // 1024); with 8 KV heads of 128 they were 7-9% slower (in-process alternating calls, AMX
    // Xeon).
    // Those long blocks need not be split further than to give the threads equal shares:
    // one block per sequence where the sequences divide among the threads (timed cold, MLA
    // B = 8, S = 4096, 3% faster than the 8 blocks per thread asked of the others, latent
    // or values of their own; B = 1, S = 16384, two blocks of 8192 7% faster than 16 of
    // 1024; in one process, alternating, AMX Xeon, 2 threads).
    const bool long_blocks = tiled && lowp_ok && p.K == 1;
    bk = long_blocks
             ? 8192
             : std::max<int64_t>(16, std::min<int64_t>(256, (64 << 10) / (4 * p.K * p.G * bq)));
    auto blocks = [&] { return p.B * ((p.S + bk - 1) / bk); };
    auto shared = [&] {
      return long_blocks ? blocks() >= threads && (blocks() % threads == 0 ||
                                                   blocks() >= 8 * threads)
                         : blocks() >= 8 * threads;
    };
    while (bk > 16 && !shared()) bk /= 2;
    bk = std::min(bk, p.S);
  }
  const int64_t nkb = p.S > 0 ? (p.S + bk - 1) / bk : 0;
  // Decoding-like calls (few tasks, many keys): split the keys so that every thread works.
  int64_t nsplit = 1;
  if (t.key_splits > 0)
    nsplit = std::max<int64_t>(1, std::min(nkb, t.key_splits));
  else if (tasks(bq) < 2 * threads && nkb > 1)
    nsplit = std::min(nkb, (4 * threads + tasks(bq) - 1) / tasks(bq));
  // Decoding (a few query rows per KV head): one key block of every KV head per work item,
  // read position by position, so that the threads stream K and V in memory order instead
  // of one head's strided rows at a time. Also where one block holds a whole cache (many
  // sequences, or block_keys >= S), which took the general path before: timed cold, B = 32,
  // S = 256, 32/8 heads of 128: bfloat16 4.94 -> 2.55 ms, float32 5.04 -> 3.27; MLA B = 32,
  // S = 1024, 576/512: bfloat16 7.76 -> 2.60 latent, 8.70 -> 3.93 with values of their own,
  // float32 11.4 -> 8.3 and 14.7 -> 12.1 (in one process, alternating, AMX Xeon).
  if (positions && nkb >= 1) nsplit = nkb;
  f.bq = bq;
  f.bk = bk;
  f.nqb = nqb;
  f.nkb = nkb;
  f.nsplit = nsplit;
  f.positions = positions && nkb >= 1;
  f.tiled = tiled && f.positions;
  // Pre-pack K and V when several query blocks read each (not for decoding, where the
  // small-M products stream them once), within a memory bound.
  // With bfloat16 products every non-decoding call packs (the products read only panels).
  const double packed_bytes =
      (lowp_ok ? 2.0 : 4.0) * p.B * p.K * nkb * (bk + 32) * (p.H + p.Hv + 64);
  f.use_prepack = (lowp_ok ? !f.positions : nqb >= 2 && p.G * bq > 4) && packed_bytes < 1.5e9;
  f.unit = lowp_ok && (f.use_prepack || f.tiled) ? lowp_unit(isa) : lowp::Unit::kNone;
  // Strips of whole AMX tiles with bfloat16 products (a 32-row strip's scores, 32 KiB at 256
  // keys, stay in L1).
  f.strip = t.strip > 0 ? t.strip : f.unit != lowp::Unit::kNone ? 32 : std::max<int64_t>(24, 2 * mr);
  return f;
}

void forward_defaults(const Problem& p, int64_t threads, Tuning& t) {
  Problem q = p;
  q.tuning = Tuning{};
  if (p.B <= 0 || p.T <= 0 || p.K <= 0 || p.G <= 0) return;
  const ForwardPlan f = plan_forward(q, std::max<int64_t>(1, threads), default_isa());
  t.block_rows = f.rows_target;
  t.block_keys = f.bk;
  t.strip = f.strip;
  t.stream_decode = f.positions;
  t.key_splits = f.nsplit;
}

void forward(const Problem& given, const void* q, const void* k, const void* v, void* out,
             float* lse, float* lse_lo) {
  if (given.B <= 0 || given.T <= 0 || given.K <= 0 || given.G <= 0) return;
  Problem p = given;
  if (p.vs == 0) p.set_value_layout(false);  // (a caller that left it unset: v its own array)
  const CallGuard guard;  // release_kept() waits for the call
  ScopedThreadCap cap(p.tuning.threads);
  advise_huge_pages(out, p.B * p.T * p.K * p.G * p.Hv * dtype_size(p.dtype));
  const Isa isa = call_isa(p.tuning.isa);
  const ForwardPlan f = plan_forward(p, num_threads(), isa);
  Ctx c{p, q, k, v, out, lse, lse_lo, f.bq, f.bk, (f.bk + 15) / 16 * 16, f.nqb, f.nkb, f.nsplit};
  c.positions = f.positions;
  c.tiled = f.tiled;
  c.use_prepack = f.use_prepack;
  c.strip = f.strip;
  c.unit = f.unit;
  JATTN_DISPATCH(isa, run(c))
}

}  // namespace jattn
