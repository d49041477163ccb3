// What a mask means on the native side: the one statement of it that the forward
// (forward_isa.inc) and the backward (backward.cc, backward_isa.inc) both read.
//
// Key j is visible from query i of batch element b when every part present allows it:
//   static window    j >= i - left (has_left), j <= i + right (has_right; right < 0: an offset)
//   causal offset    j <= i + offset[b]
//   lengths          i < q_len[b], j < kv_len[b]
//   chunk            i / chunk == j / chunk
//   segment ids      q_seg[b, i] == kv_seg[b, j]
//   dense mask       mask[b, kh, g, i, j] != 0
// The index parts (all but the last two) leave row i one interval [lo(i), hi(i)) of keys, and
// lo and hi are nondecreasing in i (each part's bounds are): a block of rows [i0, i1) sees
// nothing of keys [k0, k1) when hi(i1 - 1) <= k0 or lo(i0) >= k1, and all of them when
// lo(i1 - 1) <= k0 and k1 <= hi(i0). Segments and the dense mask are then evaluated entry by
// entry on the blocks that they leave mixed (classify()).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "attention.h"

namespace jattn {

// The index part of the mask for one batch element.
struct RowBounds {
  bool has_left, has_right;
  int64_t left, right, kv_end, q_end, chunk;
  RowBounds(const Problem& p, int64_t b) {
    has_left = p.has_left;
    left = p.left;
    has_right = p.has_right || p.offset;
    right = p.has_right ? p.right : INT64_MAX / 4;
    if (p.offset) right = p.has_right ? std::min<int64_t>(right, p.offset[b]) : p.offset[b];
    kv_end = p.kv_len ? std::max<int64_t>(0, std::min<int64_t>(p.S, p.kv_len[b])) : p.S;
    q_end = p.q_len ? std::max<int64_t>(0, std::min<int64_t>(p.T, p.q_len[b])) : p.T;
    chunk = p.chunk > 0 ? p.chunk : 0;
  }
  int64_t lo(int64_t i) const {
    int64_t l = has_left ? std::max<int64_t>(0, i - left) : 0;
    if (chunk) l = std::max(l, i / chunk * chunk);
    return l;
  }
  // hi(i) >= lo(i) (an empty row has hi == lo), 0 past q_len.
  int64_t hi(int64_t i) const {
    if (i >= q_end) return 0;
    int64_t h = has_right ? std::min<int64_t>(kv_end, std::max<int64_t>(0, i + right + 1))
                          : kv_end;
    if (chunk) h = std::min(h, (i / chunk + 1) * chunk);
    return std::max(h, lo(i));
  }
  // A range [i_lo, i_hi) of rows that holds every row seeing a key of [j0, j1) (a superset:
  // the rows' own intervals decide).
  void rows_seeing(int64_t j0, int64_t j1, int64_t T, int64_t S, int64_t& i_lo,
                   int64_t& i_hi) const {
    i_lo = 0;
    i_hi = j0 >= kv_end ? 0 : q_end;
    if (has_right) i_lo = std::max<int64_t>(0, j0 - std::min<int64_t>(right, T + S + 1));
    if (has_left) i_hi = std::min<int64_t>(i_hi, j1 + std::min<int64_t>(left, T + S + 1));
    if (chunk && j1 > j0) {
      i_lo = std::max(i_lo, j0 / chunk * chunk);
      i_hi = std::min(i_hi, ((j1 - 1) / chunk + 1) * chunk);
    }
  }
};

// Rows [0, n) of a block, `width` elements each from src (rows ld apart), in buf (rows width
// apart) with rows [valid, n) zero: a key block across a sequence's length is packed from
// this copy, so that no product multiplies a zero weight by what lies past the length (a KV
// cache may hold NaN or inf there, and 0 x NaN is NaN).
template <class T>
inline const T* zero_past(const T* src, int64_t ld, int64_t valid, int64_t n, int64_t width,
                          T* buf) {
  for (int64_t j = 0; j < valid; ++j) std::copy_n(src + j * ld, width, buf + j * width);
  std::fill(buf + valid * width, buf + n * width, T{0});
  return buf;
}

// The smallest and largest id of a span of segment ids (empty: lo > hi).
struct IdRange {
  int32_t lo = 1, hi = 0;
  IdRange() = default;
  IdRange(const int32_t* ids, int64_t n) {
    if (n <= 0) return;
    lo = *std::min_element(ids, ids + n);
    hi = *std::max_element(ids, ids + n);
  }
  void add(int32_t id) {
    if (empty()) {
      lo = hi = id;
    } else {
      lo = std::min(lo, id);
      hi = std::max(hi, id);
    }
  }
  bool empty() const { return lo > hi; }
  bool single() const { return lo == hi; }
  // Whether no id of this range can equal one of o's.
  bool disjoint(const IdRange& o) const { return hi < o.lo || lo > o.hi; }
};

enum class Block { kEmpty, kMixed, kFull };

// The block of query rows [q0, q0 + nv) (all below q_len) of the G heads of KV head kh
// against keys [k0, k0 + kn): empty (no row sees a key), full (every row sees every key: no
// mask code runs), or mixed. qs: the rows' segment ids' range (when there are segments).
inline Block classify(const Problem& p, const RowBounds& rb, int64_t b, int64_t kh, int64_t q0,
                      int64_t nv, int64_t k0, int64_t kn, const IdRange& qs) {
  if (kn <= 0 || nv <= 0 || rb.hi(q0 + nv - 1) <= k0 || rb.lo(q0) >= k0 + kn) return Block::kEmpty;
  bool full = rb.lo(q0 + nv - 1) <= k0 && k0 + kn <= rb.hi(q0);
  if (p.q_seg) {
    const IdRange ks(p.kv_seg + b * p.S + k0, kn);
    if (ks.disjoint(qs)) return Block::kEmpty;
    if (!(qs.single() && ks.single())) full = false;
  }
  if (p.mask.data) {
    bool any = false, all = true;
    const int64_t gn = p.mask.sg ? p.G : 1, in = p.mask.st ? nv : 1, jn = p.mask.ss ? kn : 1;
    for (int64_t g = 0; g < gn; ++g)
      for (int64_t ii = 0; ii < in; ++ii) {
        const uint8_t* mr = p.mask.head(b, kh, g) + (q0 + ii) * p.mask.st + k0 * p.mask.ss;
        for (int64_t j = 0; j < jn; ++j) {
          const bool on = mr[j * p.mask.ss] != 0;
          any |= on;
          all &= on;
        }
      }
    if (!any) return Block::kEmpty;
    if (!all) full = false;
  }
  return full ? Block::kFull : Block::kMixed;
}

// Row i of head g of KV head kh, keys j0 + [0, n): r[j] = -inf where segments or the dense
// mask hide the key (the index parts are the caller's).
inline void mask_row(const Problem& p, int64_t b, int64_t kh, int64_t g, int64_t i, int64_t j0,
                     int64_t n, float* r) {
  if (p.q_seg) {
    const int32_t qid = p.q_seg[b * p.T + i];
    const int32_t* ks = p.kv_seg + b * p.S + j0;
    for (int64_t j = 0; j < n; ++j) r[j] = ks[j] == qid ? r[j] : -INFINITY;
  }
  if (p.mask.data) {
    const int64_t ss = p.mask.ss;
    const uint8_t* mr = p.mask.head(b, kh, g) + i * p.mask.st + j0 * ss;
    for (int64_t j = 0; j < n; ++j) r[j] = mr[j * ss] ? r[j] : -INFINITY;
  }
}

// Whether entry (i, j) survives the per-entry parts (segments, the dense mask) for head g of
// KV head kh; the index parts are the caller's [lo, hi).
inline bool entry_visible(const Problem& p, int64_t b, int64_t kh, int64_t g, int64_t i,
                          int64_t j) {
  if (p.q_seg && p.q_seg[b * p.T + i] != p.kv_seg[b * p.S + j]) return false;
  if (p.mask.data && p.mask.head(b, kh, g)[i * p.mask.st + j * p.mask.ss] == 0) return false;
  return true;
}

}  // namespace jattn
