// Float32 GEMMs (gemm_nt / gemm_nn / gemm_tn of attention.h) and panel packers: one instance
// per ISA level of gemm_isa.inc (whose functions the kernels of that level call directly),
// and the public entry points at the CPU's level.
//
// Single-threaded: the attention kernels call them from inside their parallel tasks.

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "attention.h"
#include "isa.h"
#include "transpose.h"

#if JATTN_X86
#include <immintrin.h>
#endif

namespace jattn {

#define JATTN_ISA_EXTERNAL
#define JATTN_ISA_FILE "gemm_isa.inc"
#include "isa_instances.inc"
#undef JATTN_ISA_EXTERNAL

int64_t gemm_tile_rows(Isa isa) { JATTN_DISPATCH(isa, MR) }

int64_t gemm_panel_width(Isa isa) { JATTN_DISPATCH(isa, NR) }

void gemm_nt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  JATTN_DISPATCH(cpu_isa(), gemm_nt(M, N, K, A, lda, B, ldb, C, ldc, accumulate))
}

void gemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  JATTN_DISPATCH(cpu_isa(), gemm_nn(M, N, K, A, lda, B, ldb, C, ldc, accumulate))
}

void gemm_tn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  JATTN_DISPATCH(cpu_isa(), gemm_tn(M, N, K, A, lda, B, ldb, C, ldc, accumulate))
}

}  // namespace jattn
