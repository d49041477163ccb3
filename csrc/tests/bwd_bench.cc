// Backward throughput against the GEMM rate, in process CPU time (robust on a shared
// machine: time slices lost to other processes do not count). Run single-threaded
// (JATTN_CPU_THREADS=1) for a per-core ratio.
//   g++ -O3 -ffp-contract=fast -std=c++17 -pthread -Icsrc csrc/backward.cc csrc/gemm.cc csrc/lowp.cc
//       csrc/threads.cc csrc/tests/bwd_bench.cc -o /tmp/bwd_bench &&
//   JATTN_CPU_THREADS=1 /tmp/bwd_bench [OPTIONS] T causal N [G [H [rounds]]]
// OPTIONS (ab.h): the call's Tuning (--isa, --threads, --bwd-blocks BQ,BK), or
// --ab "bq,bk;bq,bk;..." to compare those block sizes call by call instead (rounds: the 6th
// argument), printing each one's fastest and median CPU time.
#include <time.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "ab.h"
#include "attention.h"

using namespace jattn;

int main(int argc, char** argv) {
  const BenchOptions opt = parse_options(argc, argv);
  const int64_t B = 1, T = argc > 1 ? atol(argv[1]) : 1024, N = argc > 3 ? atol(argv[3]) : 8;
  const int64_t G = argc > 4 ? atol(argv[4]) : 1;  // query heads per KV head
  const int64_t H = argc > 5 ? atol(argv[5]) : 64, S = T, K = N / G;
  const bool causal = argc > 2 && atoi(argv[2]);
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0, 1);
  std::vector<float> q(B * T * N * H), k(B * S * K * H), v(k.size()), o(q.size()),
      dout(q.size()), lse(B * N * T, 6.0f);
  for (auto* x : {&q, &k, &v, &o, &dout})
    for (auto& y : *x) y = nd(rng) * 0.5f;
  Problem p;
  p.B = B, p.T = T, p.S = S, p.K = K, p.G = G, p.H = H, p.Hv = H;
  p.scale = 0.125f;
  p.has_right = causal;
  std::vector<float> dq(q.size()), dk(k.size()), dv(k.size());
  const double flops = 10.0 * B * N * T * S * H * (causal ? 0.5 : 1);
  p.tuning = opt.tuning;
  if (!opt.ab.empty()) {  // "bq,bk;bq,bk;...", in CPU time
    ab_compare(
        opt.ab, argc > 6 ? atol(argv[6]) : 7, flops, cpu_now,
        [&](const std::string& cfg) {
          parse_pair(cfg.c_str(), p.tuning.bwd_block_rows, p.tuning.bwd_block_keys);
        },
        [&] {
          backward(p, q.data(), k.data(), v.data(), o.data(), lse.data(), nullptr, dout.data(), nullptr,
                   dq.data(), dk.data(), dv.data(), nullptr);
        });
    return 0;
  }
  const int64_t n = 512;
  std::vector<float> a(n * n, 0.5f), b(n * n, 0.25f), c(n * n);
  double tg = 1e9, tb = 1e9, tw = 1e9;
  for (int round = 0; round < (T > 4096 ? 2 : 6); ++round) {
    double t0 = cpu_now();
    for (int rep = 0; rep < 10; ++rep)
      gemm_nt(n, n, n, a.data(), n, b.data(), n, c.data(), n, false);
    tg = std::min(tg, (cpu_now() - t0) / 10);
    t0 = cpu_now();
    const double w0 = wall_now();
    backward(p, q.data(), k.data(), v.data(), o.data(), lse.data(), nullptr, dout.data(), nullptr,
             dq.data(), dk.data(), dv.data(), nullptr);
    tb = std::min(tb, cpu_now() - t0);
    tw = std::min(tw, wall_now() - w0);
  }
  const double fg = 2.0 * n * n * n / tg * 1e-9;
  const double fb = flops / tb * 1e-9;
  std::printf("threads %d: gemm_nt 512^3 %.1f GFLOP/s; backward T=S=%ld N=%ld H=%ld %s: %.1f ms "
              "CPU (%.1f ms wall), %.1f GFLOP/s per CPU-second = %.2f of the GEMM rate\n",
              num_threads(), fg, T, N, H, causal ? "causal" : "full", tb * 1e3, tw * 1e3, fb,
              fb / fg);
}
