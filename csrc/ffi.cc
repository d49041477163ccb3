// XLA FFI handlers of the native CPU kernel: JattnCpuForward and JattnCpuBackward decode the
// call's buffers and attributes into a jattn::Problem and run forward() / backward() on the
// kernel's own thread pool, or XLA's intra-op pool (the xla_pool attribute).
//
// Operands (jattn/kernels/cpu.py builds them), in this order:
//   q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv]        float32, bfloat16 or float16
//   q_len [B], kv_len [B], offset [B]                       int32
//   q_seg [B, T], kv_seg [B, S]                             int32
//   mask [Bm, Km, Gm, Tm, Sm]                               uint8 (each dim full or 1)
//   bias [Bb, Kb, Gb, Tb, Sb]                               float32 (each dim full or 1)
//   seeds [B, K, G]                                         uint32
//   sinks [B, K, G]                                         float32 (attention sinks)
// An optional operand that is absent is passed with zero elements. Forward returns out
// [B, T, N, Hv], lse [B, N, T] and lse_lo [B, N, T] (float32: lse's rounding residual,
// attention.h). Backward takes, after
// those, out [B, T, N, Hv], lse and lse_lo [B, N, T] (float32; lse_lo may have zero
// elements), dout [B, T, N, Hv], dlse [B, N, T]
// (float32, or zero elements for a zero cotangent), and returns dq, dk, dv and dbias
// (float32 [B, K, G, T, S], or zero elements when the bias needs no gradient).
// Attributes (all of them, by name; CallAttrs below):
//   scale, softcap (0: none), dropout_rate                float32
//   dropout_threshold (int64)                             jattn._dropout.threshold(rate)
//   has_left, has_right (bool); left, right (int64)       the static window (mask.h)
//   chunk (int64; 0: none)                                chunked attention (mask.h)
//   value_dim (int64; 0: v is its own array)              > 0: the values are each key's
//     first value_dim features and v is k (the forward only; the backward takes 0)
//   isa (int64; -1: the best the CPU has, else an Isa, capped to the CPU's)
//   threads (int64; 0: every thread), xla_pool (bool)     where the call runs
//   block_rows, block_keys, strip, key_splits (int64), stream_decode (bool): the forward's
//   bwd_block_rows, bwd_block_keys (int64): the backward's           knobs (Tuning)

#include <algorithm>
#include <cstdint>
#include <string>

#include "attention.h"
#include "isa.h"
#include "scratch.h"
#include "threads.h"
// The XLA FFI headers are not clean under -Wall -Wextra: their warnings are not ours.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wreturn-type"
#include "xla/ffi/api/ffi.h"
#pragma GCC diagnostic pop

namespace ffi = xla::ffi;

namespace jattn {
namespace {

class XlaRunner final : public TaskRunner {
 public:
  XlaRunner(ffi::ThreadPool& pool, int64_t n) : pool_(pool), n_(n) {}
  int64_t num_threads() const override { return n_; }
  void schedule(std::function<void()> task) override { pool_.Schedule(std::move(task)); }

 private:
  ffi::ThreadPool& pool_;
  int64_t n_;
};

// The call's threads while in scope: the kernel's own pool, or XLA's intra-op pool when
// `xla` (the xla_pool attribute).
class ScopedPool {
 public:
  ScopedPool(ffi::ThreadPool& pool, bool xla)
      : runner_(pool, pool.num_threads()),
        scope_(xla && pool.num_threads() >= 1 ? &runner_ : nullptr) {}

 private:
  XlaRunner runner_;
  ScopedTaskRunner scope_;
};

bool present(const ffi::AnyBuffer& b) { return b.element_count() > 0; }

}  // namespace

// The call's attributes, bound by name (XLA_FFI_REGISTER_STRUCT_ATTR_DECODING below: the
// members in this order, Tuning's in its own order).
struct CallAttrs {
  float scale, softcap, dropout_rate;
  int64_t dropout_threshold;
  bool has_left, has_right;
  int64_t left, right, chunk;
  int64_t value_dim;  // > 0: the values are each key's first value_dim features (v is k)
  Tuning tuning;
};

namespace {

// The xla_pool attribute: schedule onto XLA's intra-op pool from the FFI context instead of
// the kernel's own pool (threads.cc). Measured on a loaded 2-core Zen 3 (jax 0.10), a
// [1, 2048, 8, 64] forward took about 250 ms with the own pool and 340 ms through XLA's at
// the same CPU time: tasks handed to XLA's pool from inside a handler started late.

template <typename E>
ffi::Error broadcast5(const ffi::AnyBuffer& buf, const Problem& p, const char* what,
                      Broadcast5<E>& out) {
  if (!present(buf)) return ffi::Error::Success();
  auto d = buf.dimensions();
  if (d.size() != 5) return ffi::Error::InvalidArgument(std::string(what) + " must be 5-D");
  const int64_t full[5] = {p.B, p.K, p.G, p.T, p.S};
  int64_t stride[5];
  int64_t s = 1;
  for (int i = 4; i >= 0; --i) {
    if (d[i] != 1 && d[i] != full[i])
      return ffi::Error::InvalidArgument(std::string(what) + ": dimension " +
                                         std::to_string(i) + " is neither 1 nor full");
    stride[i] = d[i] == 1 ? 0 : s;
    s *= d[i];
  }
  out.data = static_cast<const E*>(buf.untyped_data());
  out.sb = stride[0];
  out.sk = stride[1];
  out.sg = stride[2];
  out.st = stride[3];
  out.ss = stride[4];
  return ffi::Error::Success();
}

ffi::Error decode(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                  const ffi::AnyBuffer& q_len, const ffi::AnyBuffer& kv_len,
                  const ffi::AnyBuffer& offset, const ffi::AnyBuffer& q_seg,
                  const ffi::AnyBuffer& kv_seg, const ffi::AnyBuffer& mask,
                  const ffi::AnyBuffer& bias, const ffi::AnyBuffer& seeds,
                  const ffi::AnyBuffer& sinks, const CallAttrs& a, Problem& p) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("q, k, v must be 4-D [B, T|S, heads, dim]");
  if (q.element_type() != k.element_type() || q.element_type() != v.element_type())
    return ffi::Error::InvalidArgument("q, k, v must share a dtype");
  switch (q.element_type()) {
    case ffi::DataType::F32:
      p.dtype = DType::kF32;
      break;
    case ffi::DataType::BF16:
      p.dtype = DType::kBF16;
      break;
    case ffi::DataType::F16:
      p.dtype = DType::kF16;
      break;
    default:
      return ffi::Error::InvalidArgument("unsupported dtype (float32, bfloat16, float16)");
  }
  p.B = qd[0];
  p.T = qd[1];
  const int64_t N = qd[2];
  p.H = qd[3];
  p.S = kd[1];
  p.K = kd[2];
  p.Hv = vd[3];
  if (kd[0] != p.B || vd[0] != p.B || kd[3] != p.H || vd[1] != p.S || vd[2] != p.K ||
      p.K <= 0 || N % p.K != 0)
    return ffi::Error::InvalidArgument("inconsistent q/k/v shapes");
  p.G = N / p.K;
  if (a.value_dim < 0 || a.value_dim > p.H || (a.value_dim > 0 && vd[3] != p.H))
    return ffi::Error::InvalidArgument("value_dim must be in [0, H], with v shaped as k");
  if (a.value_dim > 0) p.Hv = a.value_dim;
  p.set_value_layout(a.value_dim > 0);
  p.scale = a.scale;
  p.softcap = a.softcap;
  p.dropout_rate = a.dropout_rate;
  if (a.dropout_threshold < 0 || a.dropout_threshold > 0xFFFFFFFFll)
    return ffi::Error::InvalidArgument("dropout_threshold must fit in uint32");
  p.dropout_threshold = static_cast<uint32_t>(a.dropout_threshold);
  p.has_left = a.has_left;
  p.has_right = a.has_right;
  p.left = a.left;
  p.right = a.right;
  if (a.chunk < 0) return ffi::Error::InvalidArgument("chunk must be >= 0");
  p.chunk = a.chunk;
  p.tuning = a.tuning;
  auto i32 = [](const ffi::AnyBuffer& b) {
    return present(b) ? static_cast<const int32_t*>(b.untyped_data()) : nullptr;
  };
  p.q_len = i32(q_len);
  p.kv_len = i32(kv_len);
  p.offset = i32(offset);
  p.q_seg = i32(q_seg);
  p.kv_seg = i32(kv_seg);
  if ((p.q_seg == nullptr) != (p.kv_seg == nullptr))
    return ffi::Error::InvalidArgument("q_seg and kv_seg come together");
  if (present(seeds)) p.dropout_seed = static_cast<const uint32_t*>(seeds.untyped_data());
  if (p.dropout_rate > 0.0f && !p.dropout_seed)
    return ffi::Error::InvalidArgument("dropout needs seeds");
  if (present(sinks)) {
    if (sinks.element_type() != ffi::DataType::F32 || static_cast<int64_t>(sinks.element_count()) != p.B * p.K * p.G)
      return ffi::Error::InvalidArgument("sinks must be float32 [B, K, G]");
    p.sinks = static_cast<const float*>(sinks.untyped_data());
  }
  if (auto e = broadcast5<uint8_t>(mask, p, "mask", p.mask); e.failure()) return e;
  if (auto e = broadcast5<float>(bias, p, "bias", p.bias); e.failure()) return e;
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                       ffi::AnyBuffer v, ffi::AnyBuffer q_len, ffi::AnyBuffer kv_len,
                       ffi::AnyBuffer offset, ffi::AnyBuffer q_seg, ffi::AnyBuffer kv_seg,
                       ffi::AnyBuffer mask, ffi::AnyBuffer bias, ffi::AnyBuffer seeds,
                       ffi::AnyBuffer sinks, ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> lse,
                       ffi::Result<ffi::AnyBuffer> lse_lo, CallAttrs attrs) {
  Problem p;
  if (auto e =
          decode(q, k, v, q_len, kv_len, offset, q_seg, kv_seg, mask, bias, seeds, sinks, attrs, p);
      e.failure())
    return e;
  const ScopedPool on(pool, p.tuning.xla_pool);
  float* lse_ptr = present(*lse) ? static_cast<float*>(lse->untyped_data()) : nullptr;
  float* lo_ptr = present(*lse_lo) ? static_cast<float*>(lse_lo->untyped_data()) : nullptr;
  forward(p, q.untyped_data(), k.untyped_data(), v.untyped_data(), out->untyped_data(),
          lse_ptr, lo_ptr);
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                        ffi::AnyBuffer v, ffi::AnyBuffer q_len, ffi::AnyBuffer kv_len,
                        ffi::AnyBuffer offset, ffi::AnyBuffer q_seg, ffi::AnyBuffer kv_seg,
                        ffi::AnyBuffer mask, ffi::AnyBuffer bias, ffi::AnyBuffer seeds,
                        ffi::AnyBuffer sinks, ffi::AnyBuffer out, ffi::AnyBuffer lse,
                        ffi::AnyBuffer lse_lo, ffi::AnyBuffer dout,
                        ffi::AnyBuffer dlse, ffi::Result<ffi::AnyBuffer> dq,
                        ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                        ffi::Result<ffi::AnyBuffer> dbias, CallAttrs attrs) {
  Problem p;
  if (auto e =
          decode(q, k, v, q_len, kv_len, offset, q_seg, kv_seg, mask, bias, seeds, sinks, attrs, p);
      e.failure())
    return e;
  if (attrs.value_dim != 0)
    return ffi::Error::InvalidArgument("the backward takes value_dim = 0 (v its own array)");
  const ScopedPool on(pool, p.tuning.xla_pool);
  const float* dlse_ptr = present(dlse) ? static_cast<const float*>(dlse.untyped_data()) : nullptr;
  const float* lo_ptr = present(lse_lo) ? static_cast<const float*>(lse_lo.untyped_data()) : nullptr;
  float* dbias_ptr = present(*dbias) ? static_cast<float*>(dbias->untyped_data()) : nullptr;
  backward(p, q.untyped_data(), k.untyped_data(), v.untyped_data(), out.untyped_data(),
           static_cast<const float*>(lse.untyped_data()), lo_ptr, dout.untyped_data(), dlse_ptr,
           dq->untyped_data(), dk->untyped_data(), dv->untyped_data(), dbias_ptr);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jattn

#define JATTN_COMMON_ARGS            \
  .Ctx<ffi::ThreadPool>()            \
      .Arg<ffi::AnyBuffer>() /* q */ \
      .Arg<ffi::AnyBuffer>() /* k */ \
      .Arg<ffi::AnyBuffer>() /* v */ \
      .Arg<ffi::AnyBuffer>() /* q_len */ \
      .Arg<ffi::AnyBuffer>() /* kv_len */ \
      .Arg<ffi::AnyBuffer>() /* offset */ \
      .Arg<ffi::AnyBuffer>() /* q_seg */ \
      .Arg<ffi::AnyBuffer>() /* kv_seg */ \
      .Arg<ffi::AnyBuffer>() /* mask */ \
      .Arg<ffi::AnyBuffer>() /* bias */ \
      .Arg<ffi::AnyBuffer>() /* seeds */ \
      .Arg<ffi::AnyBuffer>() /* sinks */

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(
    jattn::CallAttrs, ffi::StructMember<float>("scale"), ffi::StructMember<float>("softcap"),
    ffi::StructMember<float>("dropout_rate"), ffi::StructMember<int64_t>("dropout_threshold"),
    ffi::StructMember<bool>("has_left"),
    ffi::StructMember<bool>("has_right"), ffi::StructMember<int64_t>("left"),
    ffi::StructMember<int64_t>("right"), ffi::StructMember<int64_t>("chunk"),
    ffi::StructMember<int64_t>("value_dim"), ffi::StructMember<int64_t>("isa"),
    ffi::StructMember<int64_t>("threads"),
    ffi::StructMember<bool>("xla_pool"), ffi::StructMember<int64_t>("block_rows"),
    ffi::StructMember<int64_t>("block_keys"), ffi::StructMember<int64_t>("strip"),
    ffi::StructMember<bool>("stream_decode"), ffi::StructMember<int64_t>("key_splits"),
    ffi::StructMember<int64_t>("bwd_block_rows"), ffi::StructMember<int64_t>("bwd_block_keys"));

#define JATTN_ATTRS .Attrs<jattn::CallAttrs>()

#pragma GCC visibility push(default)
// The names in the comments are jattn/kernels/cpu.py's tables of the same contract
// (OPERANDS, BACKWARD_OPERANDS, FORWARD_RESULTS, BACKWARD_RESULTS); a test reads both.
XLA_FFI_DEFINE_HANDLER_SYMBOL(JattnCpuForward, jattn::ForwardImpl,
                              ffi::Ffi::Bind() JATTN_COMMON_ARGS
                                  .Ret<ffi::AnyBuffer>() /* out */
                                  .Ret<ffi::AnyBuffer>() /* lse */
                                  .Ret<ffi::AnyBuffer>() /* lse_lo */ JATTN_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(JattnCpuBackward, jattn::BackwardImpl,
                              ffi::Ffi::Bind() JATTN_COMMON_ARGS
                                  .Arg<ffi::AnyBuffer>() /* out */
                                  .Arg<ffi::AnyBuffer>() /* lse */
                                  .Arg<ffi::AnyBuffer>() /* lse_lo */
                                  .Arg<ffi::AnyBuffer>() /* dout */
                                  .Arg<ffi::AnyBuffer>() /* dlse */
                                  .Ret<ffi::AnyBuffer>() /* dq */
                                  .Ret<ffi::AnyBuffer>() /* dk */
                                  .Ret<ffi::AnyBuffer>() /* dv */
                                  .Ret<ffi::AnyBuffer>() /* dbias */ JATTN_ATTRS);
#pragma GCC visibility pop

// For jattn.kernels.cpu (CpuConfig.default_for): what the library runs with.
#define JATTN_EXPORT extern "C" __attribute__((visibility("default")))

// The name of the level a call runs at by default ("generic", "avx2", "avx512",
// "avx512_bf16", "amx").
JATTN_EXPORT const char* jattn_cpu_isa() { return jattn::isa_name(jattn::default_isa()); }

// The best level the CPU has (an Isa value: 0 generic ... 4 amx), the cap of Tuning::isa.
JATTN_EXPORT int jattn_cpu_best_isa() { return static_cast<int>(jattn::cpu_isa()); }

// The bytes the kernel keeps between calls (scratch.h), and their release: it waits for the
// calls running and returns the bytes freed.
JATTN_EXPORT int64_t jattn_cpu_kept_bytes() { return jattn::kept_bytes(); }
JATTN_EXPORT int64_t jattn_cpu_release() { return jattn::release_kept(); }

// The kernel's own pool's thread count (after the JATTN_CPU_THREADS cap).
JATTN_EXPORT int64_t jattn_cpu_threads() { return jattn::own_pool_threads(); }

// What the heuristics pick (at the default ISA level) for q [B, T, K * G, H], k [B, S, K, H],
// v [B, S, K, Hv] of `dtype` (a DType: 0 float32, 1 bfloat16, 2 float16) at `threads` threads
// (0, or more than the pool has: jattn_cpu_threads()): out = {block_rows, block_keys, strip,
// stream_decode (0/1), key_splits, bwd_block_rows, bwd_block_keys}.
JATTN_EXPORT void jattn_cpu_default_tuning(int64_t B, int64_t T, int64_t S, int64_t K, int64_t G,
                                           int64_t H, int64_t Hv, int64_t dtype,
                                           int64_t threads, int64_t out[7]) {
  for (int i = 0; i < 7; ++i) out[i] = 0;
  if (B <= 0 || T <= 0 || K <= 0 || G <= 0 || dtype < 0 || dtype > 2) return;
  const int64_t pool = jattn::own_pool_threads();
  jattn::Problem p;
  p.B = B, p.T = T, p.S = S, p.K = K, p.G = G, p.H = H, p.Hv = Hv;
  p.set_value_layout(false);
  p.dtype = static_cast<jattn::DType>(dtype);
  jattn::Tuning t;
  jattn::forward_defaults(p, threads > 0 ? std::min(threads, pool) : pool, t);
  jattn::backward_defaults(p, t);
  const int64_t v[7] = {t.block_rows, t.block_keys,     t.strip,         t.stream_decode ? 1 : 0,
                        t.key_splits, t.bwd_block_rows, t.bwd_block_keys};
  for (int i = 0; i < 7; ++i) out[i] = v[i];
}
