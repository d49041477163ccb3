// The AMX tile sequences the bfloat16 kernels are built of, timed alone: a tile product, a
// tile load, and the decode scores' step (two products on K rows read in place, three loads),
// with the operands in L1 or L2 and with the tile rows on cache lines or 16 bytes off them.
// What it found on the Sapphire Rapids class Xeon: a product 4.3 ns, a load 2.2 ns, the step
// 4.6 ns a product from L1 and 7.1 ns from L2, and 25-29 ns when the rows straddle two lines.
//   g++ -O2 -std=c++17 -mamx-tile -mamx-bf16 csrc/tests/amx_bench.cc -o /tmp/amx_bench &&
//   /tmp/amx_bench
// (Exits with a message where the CPU or Linux offers no AMX tile state.)
#include <immintrin.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

namespace {

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

double now() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

// The fastest of 30 rounds of `iters` calls of f, in ns per tile product (per `per` of them).
template <class F>
double best_ns(int64_t iters, int per, F f) {
  double best = 1e9;
  for (int round = 0; round < 30; ++round) {
    const double t0 = now();
    for (int64_t i = 0; i < iters; ++i) f(i);
    best = std::min(best, now() - t0);
  }
  return best / static_cast<double>(iters * per) * 1e9;
}

}  // namespace

int main() {
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureTileData = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureTileData) != 0) {
    std::puts("no AMX tile state on this machine");
    return 0;
  }
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  _tile_loadconfig(&cfg);

  // K rows of MLA's 576 bfloat16 features (1152 bytes apart), as the decode scores read them.
  constexpr int64_t kH = 576, kSteps = kH / 32, kStride = kH * 2;
  // Blocks of 32 keys: 1 block (36 KiB) stays in L1, 8 blocks (288 KiB) come from L2.
  constexpr int64_t kBlocks = 8;
  std::vector<uint16_t> store(kBlocks * 32 * kH + 64);  // + room to align and to go 16 B off
  uint16_t* base = store.data() + (64 - reinterpret_cast<uintptr_t>(store.data()) % 64) / 2;
  for (auto& x : store) x = 0x3f80;  // 1.0
  alignas(64) static uint16_t panel[kSteps * 512 + 32];  // Q: one pair panel per step
  alignas(64) static float c[2 * 256];

  std::printf("tile product:  %.2f ns\n", best_ns(20000, 4, [](int64_t) {
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 5, 7);
                _tile_dpbf16ps(2, 4, 6);
                _tile_dpbf16ps(3, 5, 7);
              }));
  std::printf("tile load:     %.2f ns\n", best_ns(20000, 4, [&](int64_t) {
                _tile_loadd(4, base, kStride);
                _tile_loadd(5, base + 32, kStride);
                _tile_loadd(6, base + 64, kStride);
                _tile_loadd(7, base + 96, kStride);
              }));
  for (const int64_t blocks : {int64_t{1}, kBlocks})
    for (const int64_t off : {int64_t{0}, int64_t{8}}) {  // 8 elements: 16 bytes off a line
      const uint16_t* k = base + off;
      const uint16_t* q = panel + off;
      const double ns = best_ns(200, 2 * kSteps, [&](int64_t i) {
        const uint16_t* a = k + (i % blocks) * 32 * kH;
        _tile_zero(0);
        _tile_zero(1);
        for (int64_t s = 0; s < kSteps; ++s) {
          _tile_loadd(4, a + s * 32, kStride);
          _tile_loadd(6, q + s * 512, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_loadd(5, a + 16 * kH + s * 32, kStride);
          _tile_dpbf16ps(1, 5, 6);
        }
        _tile_stored(0, c, 64);
        _tile_stored(1, c + 256, 64);
      });
      std::printf("scores step, %s, rows %s: %.2f ns a product\n", blocks == 1 ? "L1" : "L2",
                  off == 0 ? "on cache lines" : "16 bytes off", ns);
    }
  _tile_release();
  return 0;
}
