// Checks jattn::backward against a float64 brute-force reference on random problems (odd
// sizes, GQA, causal/window/offsets, lengths, segments, dense mask, bias, softcap, dropout,
// the lse cotangent; float32/bfloat16/float16), and that a second run gives the same bits.
//   g++ -O2 -std=c++17 -pthread -Icsrc csrc/backward.cc csrc/gemm.cc csrc/lowp.cc csrc/threads.cc
//       csrc/tests/bwd_harness.cc -o /tmp/bwd_harness && /tmp/bwd_harness [OPTIONS] [v [NAME]]
// OPTIONS (the call's Tuning): --isa N (0 generic, 1 avx2, 2 avx512), --threads N,
// --bwd-blocks BQ,BK; --dump prints dv, dq and lse. Also worth running with --isa 0 (the
// generic level), --threads 1 or 3, JATTN_CPU_THREADS=1|3 and --bwd-blocks 7,13 (odd block
// sizes).
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "attention.h"

using namespace jattn;


// min(int(rate * 2**32), 2**32 - 1), as jattn._dropout.threshold computes it.
static uint32_t threshold_of(float rate) {
  const double t = static_cast<double>(rate) * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

namespace {

float round_to(float x, DType dt) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if (dt == DType::kBF16) {
    u += 0x7FFFu + ((u >> 16) & 1u);
    u &= 0xFFFF0000u;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  if (dt == DType::kF16) return static_cast<float>(static_cast<_Float16>(x));
  return x;
}

uint16_t enc(float x, DType dt) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if (dt == DType::kBF16) return static_cast<uint16_t>(u >> 16);  // x is already rounded
  _Float16 h = static_cast<_Float16>(x);
  uint16_t r;
  std::memcpy(&r, &h, 2);
  return r;
}

float dec(const void* base, int64_t i, DType dt) {
  if (dt == DType::kF32) return static_cast<const float*>(base)[i];
  uint16_t h = static_cast<const uint16_t*>(base)[i];
  if (dt == DType::kBF16) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, e = (h >> 10) & 31, m = h & 1023;
  double v = e == 0 ? std::ldexp(m, -24) : std::ldexp(1024 + m, static_cast<int>(e) - 25);
  return static_cast<float>(sign ? -v : v);
}

struct Buf {
  DType dt;
  std::vector<float> vals;  // the exact values (after rounding to dt)
  std::vector<uint8_t> raw;
  Buf(int64_t n, DType d) : dt(d), vals(n), raw(n * dtype_size(d)) {}
  void set(int64_t i, float x) {
    x = round_to(x, dt);
    vals[i] = x;
    if (dt == DType::kF32)
      reinterpret_cast<float*>(raw.data())[i] = x;
    else
      reinterpret_cast<uint16_t*>(raw.data())[i] = enc(x, dt);
  }
  void* ptr() { return raw.data(); }
};

struct Config {
  std::string name;
  int64_t B = 1, T = 7, S = 7, K = 1, G = 1, H = 16, Hv = 16;
  DType dt = DType::kF32;
  bool causal = false;      // has_right, right = 0 (offset via right)
  int64_t right = 0;
  bool window = false;      // has_left
  int64_t left = 0;
  bool lens = false, offsets = false, seg = false, dense = false, bias = false;
  bool bias_bcast = false;  // bias broadcast over rows (st = 0) and heads
  int64_t chunk = 0;
  float softcap = 0, dropout = 0;
  bool dlse = false;
};

Tuning g_tuning;  // from the command line
bool g_dump = false;

struct Result {
  double dq, dk, dv, db;
};

// A configuration's random problem: inputs, mask parts, bias, seeds, dlse.
struct Inputs {
  Buf q, k, v, dout, out;
  Problem p;
  std::vector<int32_t> qlen, kvlen, offs, qseg, kseg;
  std::vector<uint8_t> mask;
  std::vector<float> bias, dlse;
  std::vector<uint32_t> seeds;
  Inputs(const Config& c, int64_t N)
      : q(c.B * c.T * N * c.H, c.dt), k(c.B * c.S * c.K * c.H, c.dt),
        v(c.B * c.S * c.K * c.Hv, c.dt), dout(c.B * c.T * N * c.Hv, c.dt),
        out(c.B * c.T * N * c.Hv, c.dt) {}
};

void make_inputs(const Config& c, std::mt19937& rng, Inputs& in) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int64_t B = c.B, T = c.T, S = c.S, K = c.K, G = c.G, H = c.H, Hv = c.Hv, N = K * G;
  Buf &q = in.q, &k = in.k, &v = in.v, &dout = in.dout;
  for (auto* bf : {&q, &k, &v, &dout})
    for (size_t i = 0; i < bf->vals.size(); ++i) bf->set(i, nd(rng));
  Problem& p = in.p;
  p.tuning = g_tuning;
  p.chunk = c.chunk;
  p.B = B; p.T = T; p.S = S; p.K = K; p.G = G; p.H = H; p.Hv = Hv;
  p.dtype = c.dt;
  p.scale = 1.0f / std::sqrt(static_cast<float>(H)) * 1.5f;
  p.softcap = c.softcap;
  p.has_right = c.causal; p.right = c.right;
  p.has_left = c.window; p.left = c.left;
  auto &qlen = in.qlen, &kvlen = in.kvlen, &offs = in.offs, &qseg = in.qseg, &kseg = in.kseg;
  qlen.resize(B), kvlen.resize(B), offs.resize(B), qseg.resize(B * T), kseg.resize(B * S);
  for (int64_t b = 0; b < B; ++b) {
    qlen[b] = static_cast<int32_t>(rng() % (T + 1));
    kvlen[b] = static_cast<int32_t>(rng() % (S + 1));
    if (b == 0) { qlen[b] = T; kvlen[b] = S; }
    offs[b] = static_cast<int32_t>(static_cast<int64_t>(rng() % (2 * S + 1)) - S);
  }
  if (c.lens) { p.q_len = qlen.data(); p.kv_len = kvlen.data(); }
  if (c.offsets) p.offset = offs.data();
  if (c.seg) {
    for (int64_t b = 0; b < B; ++b) {
      int32_t s = 0;
      for (int64_t i = 0; i < T; ++i) { if (rng() % 23 == 0) ++s; qseg[b * T + i] = s; }
      s = 0;
      for (int64_t j = 0; j < S; ++j) { if (rng() % 23 == 0) ++s; kseg[b * S + j] = s; }
    }
    p.q_seg = qseg.data(); p.kv_seg = kseg.data();
  }
  std::vector<uint8_t>& mask = in.mask;
  if (c.dense) {
    mask.resize(B * N * T * S);
    for (auto& m : mask) m = (rng() % 4) != 0;
    p.mask.data = mask.data();
    p.mask.sb = N * T * S; p.mask.sk = G * T * S; p.mask.sg = T * S; p.mask.st = S; p.mask.ss = 1;
  }
  std::vector<float>& bias = in.bias;
  if (c.bias) {
    if (c.bias_bcast) {
      bias.resize(B * S);
      for (auto& x : bias) x = nd(rng);
      p.bias.data = bias.data();
      p.bias.sb = S; p.bias.sk = 0; p.bias.sg = 0; p.bias.st = 0; p.bias.ss = 1;
    } else {
      bias.resize(B * N * T * S);
      for (auto& x : bias) x = nd(rng);
      p.bias.data = bias.data();
      p.bias.sb = N * T * S; p.bias.sk = G * T * S; p.bias.sg = T * S; p.bias.st = S; p.bias.ss = 1;
    }
  }
  std::vector<uint32_t>& seeds = in.seeds;
  seeds.resize(B * N);
  for (auto& s : seeds) s = rng();
  if (c.dropout > 0) {
    p.dropout_rate = c.dropout;
    p.dropout_seed = seeds.data();
    p.dropout_threshold = threshold_of(c.dropout);
  }
  std::vector<float>& dlse = in.dlse;
  dlse.resize(B * N * T);
  for (auto& x : dlse) x = nd(rng);
}

// The float64 reference: lse (and out, in in.out) of the forward, and the gradients.
struct Reference {
  std::vector<float> lse;
  std::vector<double> dq, dk, dv, db;
};

void reference(const Config& c, Inputs& in, Reference& r) {
  const int64_t B = c.B, T = c.T, S = c.S, K = c.K, G = c.G, H = c.H, Hv = c.Hv, N = K * G;
  const Problem& p = in.p;
  const Buf &q = in.q, &k = in.k, &v = in.v, &dout = in.dout;
  Buf& out = in.out;
  const auto &qlen = in.qlen, &kvlen = in.kvlen, &offs = in.offs, &qseg = in.qseg, &kseg = in.kseg;
  const auto &mask = in.mask;
  const auto &bias = in.bias, &dlse = in.dlse;
  const auto& seeds = in.seeds;
  std::vector<float>& lse = r.lse;
  lse.assign(B * N * T, 0.0f);
  std::vector<double>&rdq = r.dq, &rdk = r.dk, &rdv = r.dv, &rdb = r.db;
  rdq.assign(B * T * N * H, 0), rdk.assign(B * S * K * H, 0), rdv.assign(B * S * K * Hv, 0);
  rdb.assign(B * N * T * S, 0);
  const double scale = p.scale, rate = c.dropout;
  const uint32_t thr = threshold_of(c.dropout);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t kh = 0; kh < K; ++kh)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t n = kh * G + g;
        std::vector<double> s(T * S), th(T * S), P(T * S), Pd(T * S);
        std::vector<char> vis(T * S), keep(T * S, 1);
        for (int64_t i = 0; i < T; ++i)
          for (int64_t j = 0; j < S; ++j) {
            double x = 0;
            for (int64_t h = 0; h < H; ++h)
              x += static_cast<double>(q.vals[((b * T + i) * N + n) * H + h]) *
                   k.vals[((b * S + j) * K + kh) * H + h];
            x *= scale;
            double t = 0;
            if (c.softcap > 0) { t = std::tanh(x / c.softcap); x = c.softcap * t; }
            if (c.bias) x += c.bias_bcast ? bias[b * S + j] : bias[((b * N + n) * T + i) * S + j];
            bool ok = true;
            if (c.causal && j > i + c.right) ok = false;
            if (c.window && j < i - c.left) ok = false;
            if (c.lens && (i >= qlen[b] || j >= kvlen[b])) ok = false;
            if (c.offsets && j > i + offs[b]) ok = false;
            if (c.seg && qseg[b * T + i] != kseg[b * S + j]) ok = false;
            if (c.chunk && i / c.chunk != j / c.chunk) ok = false;
            if (c.dense && !mask[((b * N + n) * T + i) * S + j]) ok = false;
            s[i * S + j] = x; th[i * S + j] = t; vis[i * S + j] = ok;
            if (c.dropout > 0)
              keep[i * S + j] = dropout_keep(dropout_row_hash(seeds[b * N + n], i), j, thr);
          }
        for (int64_t i = 0; i < T; ++i) {
          double m = -INFINITY;
          for (int64_t j = 0; j < S; ++j) if (vis[i * S + j]) m = std::max(m, s[i * S + j]);
          double l = 0;
          for (int64_t j = 0; j < S; ++j) if (vis[i * S + j]) l += std::exp(s[i * S + j] - m);
          double L = l > 0 ? m + std::log(l) : -INFINITY;
          lse[(b * N + n) * T + i] = static_cast<float>(L);
          for (int64_t j = 0; j < S; ++j) {
            double pv = (l > 0 && vis[i * S + j]) ? std::exp(s[i * S + j] - L) : 0.0;
            P[i * S + j] = pv;
            Pd[i * S + j] = keep[i * S + j] ? pv / (1 - rate) : 0.0;
          }
          for (int64_t h = 0; h < Hv; ++h) {
            double o = 0;
            for (int64_t j = 0; j < S; ++j) o += Pd[i * S + j] * v.vals[((b * S + j) * K + kh) * Hv + h];
            out.set(((b * T + i) * N + n) * Hv + h, static_cast<float>(o));
          }
          // backward row
          double Drow = 0;
          std::vector<double> dP(S);
          for (int64_t j = 0; j < S; ++j) {
            double x = 0;
            for (int64_t h = 0; h < Hv; ++h)
              x += static_cast<double>(dout.vals[((b * T + i) * N + n) * Hv + h]) *
                   v.vals[((b * S + j) * K + kh) * Hv + h];
            dP[j] = keep[i * S + j] ? x / (1 - rate) : 0.0;
            Drow += P[i * S + j] * dP[j];
          }
          double gl = c.dlse ? dlse[(b * N + n) * T + i] : 0.0;
          for (int64_t j = 0; j < S; ++j) {
            double ds = P[i * S + j] * (dP[j] - Drow + gl);
            rdb[((b * N + n) * T + i) * S + j] = ds;
            if (c.softcap > 0) ds *= 1 - th[i * S + j] * th[i * S + j];
            ds *= scale;
            for (int64_t h = 0; h < H; ++h) {
              rdq[((b * T + i) * N + n) * H + h] += ds * k.vals[((b * S + j) * K + kh) * H + h];
              rdk[((b * S + j) * K + kh) * H + h] += ds * q.vals[((b * T + i) * N + n) * H + h];
            }
            for (int64_t h = 0; h < Hv; ++h)
              rdv[((b * S + j) * K + kh) * Hv + h] +=
                  Pd[i * S + j] * dout.vals[((b * T + i) * N + n) * Hv + h];
          }
        }
      }
}

Result run(const Config& c, uint32_t seed, bool verbose) {
  std::mt19937 rng(seed);
  const int64_t B = c.B, T = c.T, S = c.S, K = c.K, G = c.G, H = c.H, Hv = c.Hv, N = K * G;
  Inputs in(c, N);
  make_inputs(c, rng, in);
  Reference ref;
  reference(c, in, ref);
  const Problem& p = in.p;
  Buf &q = in.q, &k = in.k, &v = in.v, &dout = in.dout, &out = in.out;
  std::vector<float>& lse = ref.lse;
  std::vector<float>& dlse = in.dlse;
  const std::vector<double>&rdq = ref.dq, &rdk = ref.dk, &rdv = ref.dv, &rdb = ref.db;
  Buf dq(B * T * N * H, c.dt), dk(B * S * K * H, c.dt), dv(B * S * K * Hv, c.dt);
  // Garbage: every element must be written.
  for (auto* bf : {&dq, &dk, &dv}) std::fill(bf->raw.begin(), bf->raw.end(), uint8_t{0xFF});
  std::vector<float> db(c.bias ? B * N * T * S : 0, NAN);
  backward(p, q.ptr(), k.ptr(), v.ptr(), out.ptr(), lse.data(), nullptr, dout.ptr(),
           c.dlse ? dlse.data() : nullptr, dq.ptr(), dk.ptr(), dv.ptr(),
           c.bias ? db.data() : nullptr);
  {  // a second run gives the same bits
    Buf dq2(B * T * N * H, c.dt), dk2(B * S * K * H, c.dt), dv2(B * S * K * Hv, c.dt);
    std::vector<float> db2(db.size());
    backward(p, q.ptr(), k.ptr(), v.ptr(), out.ptr(), lse.data(), nullptr, dout.ptr(),
             c.dlse ? dlse.data() : nullptr, dq2.ptr(), dk2.ptr(), dv2.ptr(),
             c.bias ? db2.data() : nullptr);
    if (dq2.raw != dq.raw || dk2.raw != dk.raw || dv2.raw != dv.raw ||
        db != db2) {  // (NaN-free: every entry is written)
      std::printf("NONDETERMINISTIC %s\n", c.name.c_str());
      return Result{INFINITY, INFINITY, INFINITY, INFINITY};
    }
  }
  auto err = [&](const void* got, const std::vector<double>& want, bool is_f32buf) {
    double mx = 0, e = 0;
    for (size_t i = 0; i < want.size(); ++i) mx = std::max(mx, std::fabs(want[i]));
    for (size_t i = 0; i < want.size(); ++i) {
      double gv = is_f32buf ? static_cast<const float*>(got)[i] : dec(got, i, c.dt);
      double d = std::fabs(gv - want[i]);
      if (!(d <= 1e300)) return static_cast<double>(INFINITY);  // NaN
      e = std::max(e, d);
    }
    return e / (mx < 1e-6 ? 1.0 : std::max(mx, 0.1));  // absolute where the gradient is ~0 (one visible key)
  };
  if (g_dump) {
    for (size_t i = 0; i < rdv.size(); ++i) std::printf("dv[%zu] got %g want %g\n", i, dec(dv.ptr(), i, c.dt), rdv[i]);
    for (size_t i = 0; i < rdq.size(); ++i) std::printf("dq[%zu] got %g want %g\n", i, dec(dq.ptr(), i, c.dt), rdq[i]);
    for (size_t i = 0; i < lse.size(); ++i) std::printf("lse[%zu] %g\n", i, lse[i]);
  }
  Result r;
  r.dq = err(dq.ptr(), rdq, false);
  r.dk = err(dk.ptr(), rdk, false);
  r.dv = err(dv.ptr(), rdv, false);
  r.db = c.bias ? err(db.data(), rdb, true) : 0;
  if (verbose)
    std::printf("%-28s dq %.2e dk %.2e dv %.2e db %.2e\n", c.name.c_str(), r.dq, r.dk, r.dv, r.db);
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  // Options first, then [v [NAME]].
  int a = 1;
  for (; a < argc && argv[a][0] == '-' && argv[a][1] == '-'; ++a) {
    const std::string o = argv[a];
    if (o == "--dump") {
      g_dump = true;
    } else if (a + 1 < argc && o == "--isa") {
      g_tuning.isa = std::atol(argv[++a]);
    } else if (a + 1 < argc && o == "--threads") {
      g_tuning.threads = std::atol(argv[++a]);
    } else if (a + 1 < argc && o == "--bwd-blocks") {
      long bq = 0, bk = 0;
      if (std::sscanf(argv[++a], "%ld,%ld", &bq, &bk) == 2) g_tuning.bwd_block_rows = bq, g_tuning.bwd_block_keys = bk;
    } else {
      std::fprintf(stderr, "unknown option %s\n", o.c_str());
      return 2;
    }
  }
  argc -= a - 1;
  argv += a - 1;
  std::vector<Config> cs;
  auto add = [&](Config c) { cs.push_back(c); };
  for (int64_t t : {1, 7, 129}) {
    for (int64_t s : {1, 7, 129, 300}) {
      Config c; c.T = t; c.S = s; c.name = "plain T" + std::to_string(t) + " S" + std::to_string(s);
      add(c);
      c.causal = true; c.name = "causal T" + std::to_string(t) + " S" + std::to_string(s); add(c);
    }
  }
  { Config c; c.name = "gqa causal"; c.B = 2; c.K = 2; c.G = 2; c.T = 129; c.S = 200; c.causal = true; c.H = 16; c.Hv = 24; add(c); }
  { Config c; c.name = "window"; c.T = 300; c.S = 300; c.causal = true; c.window = true; c.left = 37; add(c); }
  { Config c; c.name = "window only"; c.T = 300; c.S = 260; c.window = true; c.left = 70; add(c); }
  { Config c; c.name = "causal neg right"; c.T = 200; c.S = 150; c.causal = true; c.right = -60; add(c); }
  { Config c; c.name = "small neg right"; c.T = 3; c.S = 3; c.H = 1; c.Hv = 1; c.causal = true; c.right = -1; add(c); }
  { Config c; c.name = "lens+offsets"; c.B = 3; c.T = 150; c.S = 170; c.lens = true; c.offsets = true; add(c); }
  { Config c; c.name = "chunk"; c.B = 2; c.T = 300; c.S = 280; c.chunk = 64; add(c); }
  { Config c; c.name = "chunk causal window"; c.T = 300; c.S = 300; c.chunk = 100; c.causal = true; c.window = true; c.left = 30; add(c); }
  { Config c; c.name = "segments"; c.B = 2; c.T = 300; c.S = 300; c.seg = true; add(c); }
  { Config c; c.name = "segments causal"; c.B = 2; c.T = 300; c.S = 300; c.seg = true; c.causal = true; add(c); }
  { Config c; c.name = "dense"; c.B = 2; c.K = 2; c.G = 2; c.T = 130; c.S = 140; c.dense = true; add(c); }
  { Config c; c.name = "bias"; c.B = 2; c.K = 2; c.G = 2; c.T = 130; c.S = 140; c.bias = true; add(c); }
  { Config c; c.name = "bias causal dlse"; c.B = 1; c.K = 1; c.G = 2; c.T = 130; c.S = 140; c.bias = true; c.causal = true; c.dlse = true; add(c); }
  { Config c; c.name = "bias bcast dense"; c.B = 2; c.K = 2; c.G = 2; c.T = 70; c.S = 140; c.bias = true; c.bias_bcast = true; c.dense = true; add(c); }
  { Config c; c.name = "softcap"; c.T = 130; c.S = 140; c.softcap = 2.0f; c.causal = true; add(c); }
  { Config c; c.name = "softcap bias"; c.T = 130; c.S = 140; c.softcap = 5.0f; c.bias = true; add(c); }
  { Config c; c.name = "dropout"; c.B = 2; c.K = 2; c.G = 2; c.T = 130; c.S = 140; c.dropout = 0.3f; add(c); }
  { Config c; c.name = "dropout causal bias"; c.T = 130; c.S = 140; c.dropout = 0.2f; c.causal = true; c.bias = true; add(c); }
  { Config c; c.name = "dlse"; c.T = 129; c.S = 129; c.dlse = true; add(c); }
  { Config c; c.name = "everything"; c.B = 3; c.K = 2; c.G = 2; c.T = 129; c.S = 200; c.H = 16; c.Hv = 8;
    c.causal = true; c.right = 30; c.window = true; c.left = 50; c.lens = true; c.offsets = true; c.seg = true;
    c.dense = true; c.bias = true; c.softcap = 3.0f; c.dropout = 0.1f; c.dlse = true; add(c); }
  { Config c; c.name = "H64 gqa"; c.B = 1; c.K = 2; c.G = 3; c.T = 257; c.S = 257; c.H = 64; c.Hv = 64; c.causal = true; add(c); }
  { Config c; c.name = "empty T"; c.T = 0; c.S = 20; add(c); }
  { Config c; c.name = "empty S"; c.T = 20; c.S = 0; add(c); }
  // Head sizes off the AVX2 path's multiples of 16 (the GEMM fallback).
  { Config c; c.name = "H8 causal"; c.T = 129; c.S = 140; c.H = 8; c.Hv = 8; c.causal = true; add(c); }
  { Config c; c.name = "H24 Hv8 bias"; c.K = 2; c.G = 2; c.T = 70; c.S = 140; c.H = 24; c.Hv = 8; c.bias = true; c.dlse = true; add(c); }
  { Config c; c.name = "H32 Hv48 seg"; c.T = 200; c.S = 190; c.H = 32; c.Hv = 48; c.seg = true; c.softcap = 4.0f; add(c); }
  std::vector<Config> all;
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16})
    for (Config c : cs) {
      c.dt = dt;
      c.name = std::string(dt == DType::kF32 ? "f32 " : dt == DType::kBF16 ? "bf16 " : "f16 ") + c.name;
      all.push_back(c);
    }
  if (argc > 2) {  // only configurations whose name contains argv[2]
    std::vector<Config> sel;
    for (auto& c : all) if (c.name.find(argv[2]) != std::string::npos) sel.push_back(c);
    all = sel;
  }
  int fails = 0;
  for (size_t i = 0; i < all.size(); ++i) {
    const Config& c = all[i];
    double tol = c.dt == DType::kF32 ? 2e-5 : c.dt == DType::kBF16 ? 2e-2 : 3e-3;
    Result r = run(c, 1234 + static_cast<uint32_t>(i), argc > 1);
    double worst = std::max(std::max(r.dq, r.dk), std::max(r.dv, r.db));
    if (!(worst <= tol)) {
      ++fails;
      std::printf("FAIL %-28s dq %.2e dk %.2e dv %.2e db %.2e\n", c.name.c_str(), r.dq, r.dk, r.dv, r.db);
    }
  }
  std::printf("%d of %zu configurations failed\n", fails, all.size());
  return fails != 0;
}
