/* The variants of _simd_kernels.h for one element type: _simd.h defines CKPT_REAL, CKPT_SQRT and
 * CKPT_FN, then includes this once for float and once for double (no include guard, on
 * purpose). Each copy gets its suffix from CKPT_VARIANT; the AVX copies are compiled under
 * `#pragma GCC target` and exist only where CKPT_SIMD_X86. */
#define CKPT_VARIANT baseline
#include "_simd_kernels.h"
#undef CKPT_VARIANT

#if CKPT_SIMD_X86
#pragma GCC push_options
#pragma GCC target("avx2")
#define CKPT_VARIANT avx2
#include "_simd_kernels.h"
#undef CKPT_VARIANT
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,prefer-vector-width=512")
#define CKPT_VARIANT avx512
#include "_simd_kernels.h"
#undef CKPT_VARIANT
#pragma GCC pop_options
#endif
