// What the benchmark harnesses share: their command-line knobs (the call's Tuning) and an
// interleaved A/B comparison of block sizes.
//
// Options, before the positional arguments: --isa N (0 generic, 1 avx2, 2 avx512),
// --threads N, --blocks ROWS,KEYS (forward), --strip N, --no-stream, --splits N,
// --bwd-blocks BQ,BK, and --ab "a;b;c": compare those block sizes (ROWS,KEYS for the forward,
// BQ,BK for the backward) instead. In the comparison the settings take turns call by call
// (round 0 warms the caches up and is not timed), so that a slow spell of a shared machine
// falls on every one of them alike; it prints each one's fastest and median time.
#pragma once

#include <time.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "attention.h"

// Seconds of wall time, and of the process's CPU time (robust on a shared machine: time
// slices lost to other processes do not count).
inline double clock_seconds(clockid_t id) {
  timespec ts;
  clock_gettime(id, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}
inline double wall_now() { return clock_seconds(CLOCK_MONOTONIC); }
inline double cpu_now() { return clock_seconds(CLOCK_PROCESS_CPUTIME_ID); }

struct BenchOptions {
  jattn::Tuning tuning;
  std::string ab;  // --ab's settings, or empty
};

inline bool parse_pair(const char* s, int64_t& a, int64_t& b) {
  long x = 0, y = 0;
  if (std::sscanf(s, "%ld,%ld", &x, &y) != 2 || x <= 0 || y <= 0) return false;
  a = x, b = y;
  return true;
}

// Consumes the leading options of argv; argc / argv then hold the program name and the
// positional arguments. Exits on an unknown option.
inline BenchOptions parse_options(int& argc, char**& argv) {
  BenchOptions o;
  jattn::Tuning& t = o.tuning;
  int a = 1;
  for (; a < argc && std::string(argv[a]).rfind("--", 0) == 0; ++a) {
    const std::string k = argv[a];
    const char* v = a + 1 < argc ? argv[a + 1] : "";
    bool ok = true, takes = true;
    if (k == "--isa") t.isa = std::atol(v);
    else if (k == "--threads") t.threads = std::atol(v);
    else if (k == "--strip") t.strip = std::atol(v);
    else if (k == "--splits") t.key_splits = std::atol(v);
    else if (k == "--blocks") ok = parse_pair(v, t.block_rows, t.block_keys);
    else if (k == "--bwd-blocks") ok = parse_pair(v, t.bwd_block_rows, t.bwd_block_keys);
    else if (k == "--ab") o.ab = v;
    else if (k == "--no-stream") t.stream_decode = false, takes = false;
    else ok = false;
    if (!ok || (takes && a + 1 >= argc)) {
      std::fprintf(stderr, "bad option %s\n", k.c_str());
      std::exit(2);
    }
    a += takes;
  }
  argv[a - 1] = argv[0];
  argc -= a - 1;
  argv += a - 1;
  return o;
}

// set(cfg) applies one of `configs` ("a;b;c") before call().
template <typename Clock, typename Set, typename Call>
void ab_compare(const std::string& configs, int64_t rounds, double flops, Clock now, Set set,
                Call call) {
  std::vector<std::string> cfgs;
  for (std::string rest = configs; !rest.empty();) {
    const size_t cut = rest.find(';');
    cfgs.push_back(rest.substr(0, cut));
    rest = cut == std::string::npos ? "" : rest.substr(cut + 1);
  }
  std::vector<std::vector<double>> times(cfgs.size());
  for (int64_t r = 0; r < rounds + 1; ++r)
    for (size_t i = 0; i < cfgs.size(); ++i) {
      set(cfgs[i]);
      const double t0 = now();
      call();
      if (r > 0) times[i].push_back(now() - t0);
    }
  for (size_t i = 0; i < cfgs.size(); ++i) {
    std::sort(times[i].begin(), times[i].end());
    const double lo = times[i][0], med = times[i][times[i].size() / 2];
    std::printf("blocks %-9s fastest %8.2f ms (%.1f GFLOP/s)  median %8.2f ms\n",
                cfgs[i].c_str(), lo * 1e3, flops / lo * 1e-9, med * 1e3);
  }
}
