// Forward throughput of the native kernel on a decoding-like or prefill shape, in wall time
// (fastest of the rounds) beside the time to read K and V once at this machine's read bandwidth.
//   g++ -O3 -ffp-contract=fast -std=c++17 -pthread -Icsrc csrc/forward.cc csrc/gemm.cc csrc/lowp.cc
//       csrc/threads.cc csrc/tests/fwd_bench.cc -o /tmp/fwd_bench &&
//   /tmp/fwd_bench [OPTIONS] B T S N K H [rounds [causal]]
// OPTIONS (ab.h): the call's Tuning (--isa, --threads, --blocks ROWS,KEYS, --strip,
// --no-stream, --splits), or --ab "rows,keys;rows,keys;..." to compare those block sizes
// instead, taking turns call by call so that a slow spell of a shared machine falls on every
// one of them alike, printing each one's fastest and median call.
#include <time.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "ab.h"
#include "attention.h"

using namespace jattn;

int main(int argc, char** argv) {
  const BenchOptions opt = parse_options(argc, argv);
  auto arg = [&](int i, long d) { return argc > i ? atol(argv[i]) : d; };
  const int64_t B = arg(1, 8), T = arg(2, 1), S = arg(3, 4096), N = arg(4, 32), K = arg(5, 8),
                H = arg(6, 128), rounds = arg(7, 15);
  const bool causal = arg(8, 0) != 0;
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0, 1);
  std::vector<float> q(B * T * N * H), k(B * S * K * H), v(k.size()), o(q.size()), lse(B * N * T);
  for (auto* x : {&q, &k, &v})
    for (auto& y : *x) y = nd(rng);
  // The read bandwidth over the same bytes (summing K and V), in parallel.
  std::vector<double> sums(num_threads());
  auto read_all = [&] {
    const int64_t chunks = 64 * num_threads(), n = static_cast<int64_t>(k.size());
    std::vector<float> part(chunks);
    parallel_for(chunks, [&](int64_t c) {
      float acc[16] = {};  // 16 independent sums: vectorised, not latency-bound
      const int64_t lo = n * c / chunks / 16 * 16, hi = n * (c + 1) / chunks / 16 * 16;
      for (int64_t i = lo; i < hi; i += 16)
        for (int l = 0; l < 16; ++l) acc[l] += k[i + l] + v[i + l];
      for (int l = 1; l < 16; ++l) acc[0] += acc[l];
      part[c] = acc[0];
    });
    return part[0];
  };
  Problem p;
  p.B = B, p.T = T, p.S = S, p.K = K, p.G = N / K, p.H = H, p.Hv = H;
  p.scale = 1.0f / std::sqrt(static_cast<float>(H));
  p.has_right = causal;  // j <= i
  p.tuning = opt.tuning;
  if (!opt.ab.empty()) {
    ab_compare(
        opt.ab, rounds, 4.0 * B * N * T * S * H * (causal ? 0.5 : 1.0), wall_now,
        [&](const std::string& cfg) { parse_pair(cfg.c_str(), p.tuning.block_rows, p.tuning.block_keys); },
        [&] { forward(p, q.data(), k.data(), v.data(), o.data(), lse.data()); });
    return 0;
  }
  std::vector<double> tf, tr;
  float sink = 0;
  for (int64_t r = 0; r < rounds; ++r) {
    double t0 = wall_now();
    forward(p, q.data(), k.data(), v.data(), o.data(), lse.data());
    tf.push_back(wall_now() - t0);
    t0 = wall_now();
    sink += read_all();
    tr.push_back(wall_now() - t0);
  }
  std::sort(tf.begin(), tf.end());
  std::sort(tr.begin(), tr.end());
  // The fastest round: on a shared machine the others lost time slices to other work.
  const double f = tf[0], rd = tr[0];
  const double gb = 2.0 * B * S * K * H * 4 / 1e9;
  const double flops = 4.0 * B * N * T * S * H * (causal ? 0.5 : 1.0);
  std::printf("threads %d B=%ld T=%ld S=%ld N=%ld K=%ld H=%ld%s: forward %.2f ms (%.1f GFLOP/s; "
              "%.1f GB/s of K+V, %.0f ns/position), read K+V %.2f ms (%.1f GB/s): %.2fx  [%g]\n",
              num_threads(), B, T, S, N, K, H, causal ? " causal" : "", f * 1e3, flops / f * 1e-9,
              gb / f, f / (B * S) * 1e9, rd * 1e3, gb / rd, f / rd, sink * 0);
}
