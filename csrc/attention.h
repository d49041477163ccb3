// The native CPU attention kernel: the contract between the XLA FFI bindings (ffi.cc), the
// forward kernel (forward.cc) and the backward kernel (backward.cc).
//
// One call covers the whole batch. Layouts are row-major and contiguous:
//   q [B, T, N, H]   k [B, S, K, H]   v [B, S, K, Hv]   out [B, T, N, Hv]   lse [B, N, T]
// with N = K * G: query head n = kh * G + g reads key/value head kh (grouped-query attention).
// Several batch dims are flattened to B by the Python side.
//
// Logits: l = softcap(scale * q.k) + bias, then the mask; the softmax, its row max and row
// sum and the output accumulator are float32 whatever the input dtype. A row that sees no key
// returns zeros, lse = -inf, and zero gradients.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>

namespace jattn {

enum class DType : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

// The knobs of one call (FFI attributes of the same names; 0 / -1 = the heuristic's choice,
// which plan_forward / plan_backward make and jattn_cpu_default_tuning reports). Passing the
// heuristic's values explicitly gives the same plan, and the same bits, as passing 0.
// ffi.cc decodes the attributes into these members in this order: keep the two in step.
struct Tuning {
  int64_t isa = -1;       // -1: the best the CPU has; else an Isa (isa.h), capped to the CPU's
  int64_t threads = 0;    // 0: every thread of the pool; n: at most n for this call
  bool xla_pool = false;  // schedule on XLA's intra-op pool instead of the kernel's own
  // Forward: the target row count of a task (G heads x query positions) and the keys per
  // block; rows of S computed and swept at a time on the pre-packed path; whether decoding
  // may stream K/V position by position; key ranges per task merged by log-sum-exp.
  int64_t block_rows = 0, block_keys = 0, strip = 0;
  bool stream_decode = true;
  int64_t key_splits = 0;
  // Backward: query rows and keys of a (query block, key block) pair.
  int64_t bwd_block_rows = 0, bwd_block_keys = 0;
};
inline size_t dtype_size(DType dt) { return dt == DType::kF32 ? 4 : 2; }  // bytes

// A per-head [T, S] array broadcast over [B, K, G, T, S]: element (b, kh, g, i, j) is at
// data[b * sb + kh * sk + g * sg + i * st + j * ss] (strides in elements; 0 = broadcast).
// data == nullptr: absent.
template <typename E>
struct Broadcast5 {
  const E* data = nullptr;
  int64_t sb = 0, sk = 0, sg = 0, st = 0, ss = 0;
  const E* head(int64_t b, int64_t kh, int64_t g) const { return data + b * sb + kh * sk + g * sg; }
};

struct Problem {
  int64_t B = 0, T = 0, S = 0, K = 0, G = 0, H = 0, Hv = 0;
  // Where value rows lie, in elements of v: position j's row of KV head kh at
  // (b * S + j) * vs + kh * vh. Their own array: vs = K * Hv, vh = Hv; the first Hv
  // features of each key (multi-head latent attention's latent cache; v is then k):
  // vs = K * H, vh = H. set_value_layout() sets both.
  int64_t vs = 0, vh = 0;
  void set_value_layout(bool in_key) {
    vs = K * (in_key ? H : Hv);
    vh = in_key ? H : Hv;
  }
  DType dtype = DType::kF32;
  float scale = 1.0f;
  float softcap = 0.0f;  // 0: none; else l = softcap * tanh(scale * q.k / softcap)
  Tuning tuning;

  // Static mask parts: key j is visible from query i only if j >= i - left (when has_left)
  // and j <= i + right (when has_right; right may be negative: a causal offset).
  bool has_left = false, has_right = false;
  int64_t left = 0, right = 0;
  // Chunked attention (0: none): key j visible from query i only if i / chunk == j / chunk.
  int64_t chunk = 0;
  // Per-batch parts, int32 [B] (nullptr when absent): i < q_len[b], j < kv_len[b],
  // j <= i + offset[b].
  const int32_t* q_len = nullptr;
  const int32_t* kv_len = nullptr;
  const int32_t* offset = nullptr;
  // Segment ids, int32 [B, T] and [B, S] (both or neither): visible only where equal.
  const int32_t* q_seg = nullptr;
  const int32_t* kv_seg = nullptr;
  // Dense mask (uint8, nonzero = attend) and additive float32 bias.
  Broadcast5<uint8_t> mask;
  Broadcast5<float> bias;
  // Dropout of the normalised weights at `dropout_rate` (kept ones scaled by 1 / (1 - rate)),
  // decided by dropout_keep() below from the per-head seeds uint32 [B, K, G].
  float dropout_rate = 0.0f;
  const uint32_t* dropout_seed = nullptr;
  // The keep threshold of dropout_keep(), computed by the caller from the rate as every
  // kernel computes it (jattn._dropout.threshold: from the Python float, not this float32).
  uint32_t dropout_threshold = 0;
  // Attention sinks, float32 [B, K, G] (nullptr: none): per query head a logit that joins
  // every row's softmax denominator without a value. The forward counts it in out and lse;
  // the backward, given that lse, needs nothing more (the sinks' own gradient, from lse and
  // rowsum(dO * O), is the Python side's).
  const float* sinks = nullptr;
};

// Runs fn(i) for i in [0, n) on the kernel's threads and returns when all are done. Which
// thread runs which i must not change the result: each i owns its outputs.
void parallel_for(int64_t n, const std::function<void(int64_t)>& fn);
// The threads parallel_for uses from here: the pool's (or the runner's), capped by
// JATTN_CPU_THREADS and by the call's Tuning::threads (ScopedThreadCap, threads.h).
int num_threads();

// out, lse and lse_lo (either may be nullptr when not wanted). lse_lo is what rounding lse
// to float32 left out (lse + lse_lo is the row's log-sum-exp to about twice float32's
// precision): the backward scales dout and dlse by exp(-lse_lo), so that a row whose lse
// rounds away its sum's logarithm (logits near 1e38) still gets weights that sum to 1.
void forward(const Problem& p, const void* q, const void* k, const void* v, void* out,
             float* lse, float* lse_lo = nullptr);

// What the heuristics pick for this shape at `threads` threads (the knobs of Tuning that
// concern each pass; the others are left alone): passing them explicitly gives the same plan.
void forward_defaults(const Problem& p, int64_t threads, Tuning& t);
void backward_defaults(const Problem& p, Tuning& t);

// Gradients from the saved out, lse and lse_lo (the forward's, [B, N, T]; lse_lo may be
// nullptr) and the cotangents dout [B, T, N, Hv] (input dtype) and dlse [B, N, T] (float32,
// nullptr = zero). A row whose lse_lo matters (|lse_lo| > 2^-20) has its dout and D scaled by
// exp(-lse_lo): its recomputed weights exp(x - lse) are exp(lse_lo) times the true ones.
// dq, dk, dv in the input dtype. dbias, when not nullptr, is float32 [B, K, G, T, S] (the
// gradient of the logits after softcap, before the mask: zero where masked); the Python side
// sums it down to the bias's broadcast shape.
void backward(const Problem& p, const void* q, const void* k, const void* v, const void* out,
              const float* lse, const float* lse_lo, const void* dout, const float* dlse,
              void* dq, void* dk, void* dv, float* dbias);

// ---------------------------------------------------------------------------------------
// Matrix products on float32 blocks (gemm.cc) at the CPU's ISA level, for callers outside
// the kernels (the harnesses); gemm_decl.inc says what they compute. The kernels call their
// own level's instances directly.
void gemm_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc, bool accumulate);
void gemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc, bool accumulate);
void gemm_tn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc, bool accumulate);

// ---------------------------------------------------------------------------------------
// Shared by both kernels.

// The murmur3 finaliser, as jattn._dropout._fmix32.
inline uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  return x ^ (x >> 16);
}

// jattn._dropout.keep_mask for one entry: row_hash = fmix32(seed ^ (i * 0x85EBCA77)) once per
// row, then keep iff fmix32(row_hash ^ (j * 0xC2B2AE3D + 1)) >= threshold.
inline uint32_t dropout_row_hash(uint32_t head_seed, int64_t i) {
  return fmix32(head_seed ^ (static_cast<uint32_t>(i) * 0x85EBCA77u));
}
inline bool dropout_keep(uint32_t row_hash, int64_t j, uint32_t threshold) {
  return fmix32(row_hash ^ (static_cast<uint32_t>(j) * 0xC2B2AE3Du + 1u)) >= threshold;
}


}  // namespace jattn
