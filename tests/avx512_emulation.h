/* The AVX-512 intrinsics that cynorm's kernels use, written lane by lane in GCC's generic vectors, for compiling
   the x86-64-v4 build for a CPU without AVX-512 (setup.py, CYNORM_EMULATE_AVX512=1).  tests/test_builds.py then
   checks that build's bits against the baseline build's on machines whose CPU could not run it.  Each function
   follows Intel's definition of the intrinsic it stands in for; masked-off lanes are neither read nor written,
   and a streaming store checks the 64-byte alignment that the hardware would fault on.  For testing results,
   not speed.  Passed to the compiler with -include, ahead of everything: <immintrin.h> is taken first, with its
   own declarations, and the names are then redirected here. */
#if !(defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12))
#error "the kernels' AVX-512 code needs GCC 12 or later, or clang"
#endif
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float cynorm_emu_m512 __attribute__((vector_size(64), aligned(64)));
typedef double cynorm_emu_m512d __attribute__((vector_size(64), aligned(64)));
typedef int32_t cynorm_emu_m512i __attribute__((vector_size(64), aligned(64)));
typedef uint16_t cynorm_emu_mask16;
typedef uint8_t cynorm_emu_mask8;

#define CYNORM_EMU static inline __attribute__((always_inline, unused))

CYNORM_EMU cynorm_emu_m512 cynorm_emu_setzero_ps(void) { return (cynorm_emu_m512){0}; }
CYNORM_EMU cynorm_emu_m512 cynorm_emu_set1_ps(float a) { return a - (cynorm_emu_m512){0}; }
CYNORM_EMU cynorm_emu_m512 cynorm_emu_add_ps(cynorm_emu_m512 a, cynorm_emu_m512 b) { return a + b; }
CYNORM_EMU cynorm_emu_m512 cynorm_emu_sub_ps(cynorm_emu_m512 a, cynorm_emu_m512 b) { return a - b; }
CYNORM_EMU cynorm_emu_m512 cynorm_emu_mul_ps(cynorm_emu_m512 a, cynorm_emu_m512 b) { return a * b; }
CYNORM_EMU cynorm_emu_m512d cynorm_emu_add_pd(cynorm_emu_m512d a, cynorm_emu_m512d b) { return a + b; }

CYNORM_EMU cynorm_emu_m512i cynorm_emu_set1_epi32(int32_t a) { return a - (cynorm_emu_m512i){0}; }
CYNORM_EMU cynorm_emu_m512i cynorm_emu_add_epi32(cynorm_emu_m512i a, cynorm_emu_m512i b) {
    /* (wraps around, as the instruction does, without signed overflow in C) */
    cynorm_emu_m512i r;
    for (int i = 0; i < 16; i++) r[i] = (int32_t)((uint32_t)a[i] + (uint32_t)b[i]);
    return r;
}
CYNORM_EMU cynorm_emu_m512i cynorm_emu_set_epi32(int32_t e15, int32_t e14, int32_t e13, int32_t e12, int32_t e11,
                                                 int32_t e10, int32_t e9, int32_t e8, int32_t e7, int32_t e6,
                                                 int32_t e5, int32_t e4, int32_t e3, int32_t e2, int32_t e1,
                                                 int32_t e0) {
    return (cynorm_emu_m512i){e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15};
}
CYNORM_EMU cynorm_emu_m512i cynorm_emu_mask_blend_epi32(cynorm_emu_mask16 k, cynorm_emu_m512i a,
                                                        cynorm_emu_m512i b) {
    cynorm_emu_m512i r;
    for (int i = 0; i < 16; i++) r[i] = (k >> i & 1) ? b[i] : a[i];
    return r;
}

/* Lane i takes a's lane idx[i] % 16. */
CYNORM_EMU cynorm_emu_m512 cynorm_emu_permutexvar_ps(cynorm_emu_m512i idx, cynorm_emu_m512 a) {
    cynorm_emu_m512 r;
    for (int i = 0; i < 16; i++) r[i] = a[idx[i] & 15];
    return r;
}
/* Lane i takes lane idx[i] % 16 of a, or of b where bit 4 of idx[i] is set. */
CYNORM_EMU cynorm_emu_m512 cynorm_emu_permutex2var_ps(cynorm_emu_m512 a, cynorm_emu_m512i idx, cynorm_emu_m512 b) {
    cynorm_emu_m512 r;
    for (int i = 0; i < 16; i++) r[i] = (idx[i] & 16) ? b[idx[i] & 15] : a[idx[i] & 15];
    return r;
}
/* Quarters (128 bits) 0 and 1 from a, 2 and 3 from b, each chosen by two bits of imm8. */
CYNORM_EMU cynorm_emu_m512 cynorm_emu_shuffle_f32x4(cynorm_emu_m512 a, cynorm_emu_m512 b, int imm8) {
    cynorm_emu_m512 r;
    for (int quarter = 0; quarter < 4; quarter++) {
        int from = imm8 >> (2 * quarter) & 3;
        for (int j = 0; j < 4; j++) r[4 * quarter + j] = quarter < 2 ? a[4 * from + j] : b[4 * from + j];
    }
    return r;
}
/* Within each quarter, lane j takes the quarter's lane chosen by bits 2j and 2j+1 of imm8. */
CYNORM_EMU cynorm_emu_m512 cynorm_emu_permute_ps(cynorm_emu_m512 a, int imm8) {
    cynorm_emu_m512 r;
    for (int i = 0; i < 16; i++) r[i] = a[i / 4 * 4 + (imm8 >> (2 * (i % 4)) & 3)];
    return r;
}
CYNORM_EMU __m256 cynorm_emu_castps512_ps256(cynorm_emu_m512 a) {
    __m256 r;
    memcpy(&r, &a, sizeof r);
    return r;
}
CYNORM_EMU cynorm_emu_m512d cynorm_emu_cvtps_pd(__m256 a) {
    float v[8];
    cynorm_emu_m512d r;
    memcpy(v, &a, sizeof v);
    for (int i = 0; i < 8; i++) r[i] = (double)v[i];
    return r;
}

/* Loads and stores of float (ps) and double (pd) vectors, unaligned unless streamed. */
#define CYNORM_EMU_MEMORY(sfx, type, vector, lanes)                                                          \
    CYNORM_EMU vector cynorm_emu_loadu_##sfx(const void* p) {                                              \
        vector r;                                                                                          \
        memcpy(&r, p, sizeof r);                                                                           \
        return r;                                                                                          \
    }                                                                                                      \
    CYNORM_EMU void cynorm_emu_storeu_##sfx(void* p, vector a) { memcpy(p, &a, sizeof a); }               \
    CYNORM_EMU void cynorm_emu_stream_##sfx(void* p, vector a) {                                          \
        if ((uintptr_t)p % 64 != 0)                                                                        \
            abort();   /* the instruction faults on an address off a 64-byte boundary */                   \
        memcpy(p, &a, sizeof a);                                                                           \
    }                                                                                                      \
    CYNORM_EMU vector cynorm_emu_mask_loadu_##sfx(vector src, unsigned k, const void* p) {                \
        for (int i = 0; i < lanes; i++)                                                                    \
            if (k >> i & 1) src[i] = ((const type*)p)[i];                                                  \
        return src;                                                                                        \
    }                                                                                                      \
    CYNORM_EMU vector cynorm_emu_maskz_loadu_##sfx(unsigned k, const void* p) {                           \
        return cynorm_emu_mask_loadu_##sfx((vector){0}, k, p);                                             \
    }                                                                                                      \
    CYNORM_EMU void cynorm_emu_mask_storeu_##sfx(void* p, unsigned k, vector a) {                         \
        for (int i = 0; i < lanes; i++)                                                                    \
            if (k >> i & 1) ((type*)p)[i] = a[i];                                                          \
    }
CYNORM_EMU_MEMORY(ps, float, cynorm_emu_m512, 16)
CYNORM_EMU_MEMORY(pd, double, cynorm_emu_m512d, 8)

#define __m512 cynorm_emu_m512
#define __m512d cynorm_emu_m512d
#define __m512i cynorm_emu_m512i
#define __mmask16 cynorm_emu_mask16
#define __mmask8 cynorm_emu_mask8
#define _mm512_setzero_ps cynorm_emu_setzero_ps
#define _mm512_set1_ps cynorm_emu_set1_ps
#define _mm512_add_ps cynorm_emu_add_ps
#define _mm512_sub_ps cynorm_emu_sub_ps
#define _mm512_mul_ps cynorm_emu_mul_ps
#define _mm512_add_pd cynorm_emu_add_pd
#define _mm512_set1_epi32 cynorm_emu_set1_epi32
#define _mm512_add_epi32 cynorm_emu_add_epi32
#define _mm512_set_epi32 cynorm_emu_set_epi32
#define _mm512_mask_blend_epi32 cynorm_emu_mask_blend_epi32
#define _mm512_permutexvar_ps cynorm_emu_permutexvar_ps
#define _mm512_permutex2var_ps cynorm_emu_permutex2var_ps
#define _mm512_shuffle_f32x4 cynorm_emu_shuffle_f32x4
#define _mm512_permute_ps cynorm_emu_permute_ps
#define _mm512_castps512_ps256 cynorm_emu_castps512_ps256
#define _mm512_cvtps_pd cynorm_emu_cvtps_pd
#define _mm512_loadu_ps cynorm_emu_loadu_ps
#define _mm512_loadu_pd cynorm_emu_loadu_pd
#define _mm512_storeu_ps cynorm_emu_storeu_ps
#define _mm512_storeu_pd cynorm_emu_storeu_pd
#define _mm512_stream_ps cynorm_emu_stream_ps
#define _mm512_stream_pd cynorm_emu_stream_pd
#define _mm512_mask_loadu_ps cynorm_emu_mask_loadu_ps
#define _mm512_mask_loadu_pd cynorm_emu_mask_loadu_pd
#define _mm512_maskz_loadu_ps cynorm_emu_maskz_loadu_ps
#define _mm512_maskz_loadu_pd cynorm_emu_maskz_loadu_pd
#define _mm512_mask_storeu_ps cynorm_emu_mask_storeu_ps
#define _mm512_mask_storeu_pd cynorm_emu_mask_storeu_pd
/* the kernels' AVX-512 code is compiled where this is defined */
#define __AVX512F__ 1
