// Interleaved A/B comparison of kernel settings for the benchmark harnesses: the settings in
// `configs` ("a;b;c"), each put in environment variable `env` before its call, take turns
// call by call (round 0 warms the caches up and is not timed), so that a slow spell of a
// shared machine falls on every one of them alike. Prints each one's fastest and median time.
#pragma once

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

template <typename Clock, typename Call>
void ab_compare(const char* configs, const char* env, int64_t rounds, double flops, Clock now,
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
      setenv(env, cfgs[i].c_str(), 1);
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
