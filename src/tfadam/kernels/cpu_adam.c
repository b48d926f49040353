/*
 * tfadam CPU kernels: the update rule of tfadam/rule.py, fused, multi-tensor,
 * threaded. No torch or Python headers: compiled on first use by
 * tfadam/kernels/native.py and called through ctypes with raw data pointers
 * (ctypes releases the GIL for the duration of a call).
 *
 * Every operation of the rule is rounded to the variable's dtype T, in the
 * rule's order. Compiled with -ffp-contract=off (an FMA would skip the
 * rounding of the product) and without -ffast-math (which would reassociate,
 * flush subnormals and replace sqrt/div by approximations); -fno-math-errno
 * only lets sqrt become the IEEE sqrtps/sqrtpd instruction.
 *
 * float16 and bfloat16 are computed op by op in float32 and rounded back to T
 * after EVERY operation, by explicit bit and float manipulation (never through
 * _Float16 arithmetic, where GCC may keep excess precision). This equals correctly rounded T
 * arithmetic for + - * / sqrt (float32 has more than 2p+2 bits for both).
 */
#ifndef TFADAM_PART
#define TFADAM_PART 0 /* the whole library in one unit */
#endif

#include <math.h>
#include <pthread.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
/* TF quirk: TF runs its CPU kernels with flush-to-zero and denormals-are-zero
 * on (rule.TFArithmetic), so every thread that computes here does too. */
#define TF_MXCSR_FTZ_DAZ 0x8040u
#define TF_FLOAT_MODE_ENTER unsigned tf_saved_csr = _mm_getcsr(); _mm_setcsr(tf_saved_csr | TF_MXCSR_FTZ_DAZ)
#define TF_FLOAT_MODE_LEAVE _mm_setcsr(tf_saved_csr)
#define TF_FLOAT_MODE_SET _mm_setcsr(_mm_getcsr() | TF_MXCSR_FTZ_DAZ)
#else
#error "tfadam's C kernels need x86-64 (flush-to-zero as TF's CPU kernels); the reference is used elsewhere"
#endif
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define RESTRICT __restrict__
#define INLINE static inline __attribute__((always_inline))
/* Loops that must keep their restrict pointers (vectorised without alias checks). */
#define NOINLINE static __attribute__((noinline))

/* ------------------------------------------------------------------------ */
/* Element types: LOAD (storage -> compute), ROUND (compute -> nearest T,     */
/* still in compute type), STORE (rounded compute value -> storage).          */
/* ------------------------------------------------------------------------ */

INLINE float f32_load(float x) { return x; }
INLINE float f32_round(float x) { return x; }
INLINE float f32_store(float x) { return x; }

INLINE double f64_load(double x) { return x; }
INLINE double f64_round(double x) { return x; }
INLINE double f64_store(double x) { return x; }

INLINE uint32_t bits_of(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}
INLINE float float_of(uint32_t u) {
    float x;
    memcpy(&x, &u, 4);
    return x;
}

/* Selections are written as bit masks: a ternary would let GCC sink one arm's
 * float operation into a branch (it may trap, so it is not speculated back),
 * and the loop would not vectorise. */
INLINE uint32_t select_bits(uint32_t mask, uint32_t yes, uint32_t no) {
    return (yes & mask) | (no & ~mask);
}
INLINE uint32_t mask_of(int condition) { return (uint32_t)0 - (uint32_t)(condition != 0); }

/* bfloat16: round to nearest even by bit manipulation: add 0x7FFF plus the
 * lowest kept bit, then drop the low 16 bits.
 *
 * Inside the kernels no NaN test is needed: every NaN that arises there was
 * loaded from a bfloat16 (low 16 bits zero) or made by an invalid operation
 * (the default NaN 0xFFC00000), and arithmetic propagates a NaN's payload,
 * so a NaN's low 16 bits are zero, the bias cannot carry out of them, and the
 * NaN passes through unchanged. bf16_bits is the conversion for ANY float
 * (used by the loader's self-test): a NaN becomes ±0x7FC0, as in Eigen. */
INLINE float bf16_round(float x) { return float_of((bits_of(x) + 0x7FFFu + ((bits_of(x) >> 16) & 1u)) & 0xFFFF0000u); }
/* A NaN other than the default one never gets here: its block goes to the
 * reference (see NaN blocks), which drops the payload as Eigen does. */
INLINE float bf16_load(uint16_t h) { return float_of((uint32_t)h << 16); }
INLINE uint16_t bf16_store(float x) { return (uint16_t)(bits_of(x) >> 16); } /* x already rounded */
INLINE uint16_t bf16_bits(float x) {
    uint32_t u = bits_of(x);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)(((u >> 16) & 0x8000u) | 0x7FC0u);
    return (uint16_t)(bits_of(bf16_round(x)) >> 16);
}

/* float16, by bit manipulation and float arithmetic only, so that the loops
 * vectorise (GCC vectorises no _Float16 conversion without AVX512-FP16).
 *
 * f16_round: round to nearest even at float16's precision, in float. Adding
 * M = 2^(E+13) to |x| (E = x's exponent; at least 2^-1, which gives the fixed
 * 2^-24 quantum of float16 subnormals) makes the float addition round |x| to
 * a multiple of 2^(E-10), float16's ulp, ties to even; subtracting M is
 * exact. |x| >= 65520 rounds to inf. A NaN passes through (quiet, payload and
 * sign kept): every NaN in these kernels was loaded from a float16 or made
 * by an invalid operation, so its low 13 bits are zero already. */
INLINE float f16_round(float x) {
    float ax = fabsf(x);
    uint32_t magic = (bits_of(ax) & 0x7F800000u) + (13u << 23);
    magic = magic > 0x3F000000u ? magic : 0x3F000000u;
    float r = (ax + float_of(magic)) - float_of(magic);
    r = ax >= 65520.0f ? INFINITY : r;
    /* The sign by bits, not copysignf(r, x): GCC takes x = g*g to be
     * non-negative and would make it fabsf(r), turning a -NaN into +NaN. */
    return float_of(bits_of(r) | (bits_of(x) & 0x80000000u));
}
/* x: a float16 value held in a float (already rounded), inf or NaN. */
INLINE uint16_t f16_store(float x) {
    uint32_t u = bits_of(x), a = u & 0x7FFFFFFFu;
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t normal = (a >> 13) - 0x1C000u; /* rebias the exponent 127 -> 15 */
    /* a float16 subnormal is k * 2^-24, k < 1024: 0.5 + k * 2^-24 is exact and
     * holds k in its low bits */
    uint32_t subnormal = bits_of(float_of(a) + 0.5f) - 0x3F000000u;
    uint32_t special = ((a >> 13) & 0x3FFu) | 0x7C00u | (mask_of(a > 0x7F800000u) & 0x200u);
    uint32_t h = select_bits(mask_of(a >= 0x7F800000u), special,
                             select_bits(mask_of(a < 0x38800000u), subnormal, normal));
    return (uint16_t)(h | sign);
}
INLINE float f16_load(uint16_t b) {
    uint32_t a = b & 0x7FFFu, sign = ((uint32_t)b & 0x8000u) << 16;
    uint32_t normal = (a << 13) + 0x38000000u; /* rebias the exponent 15 -> 127 */
    uint32_t special = (a << 13) + 0x70000000u;  /* exponent 31 -> 255 */
    special |= mask_of(a > 0x7C00u) & 0x00400000u; /* a NaN comes out quiet */
    /* subnormal k * 2^-24 (k = a < 1024): (0.5 + k * 2^-24) - 0.5, exact */
    uint32_t subnormal = bits_of(float_of(0x3F000000u | a) - 0.5f);
    uint32_t r = select_bits(mask_of(a >= 0x7C00u), special,
                             select_bits(mask_of(a < 0x400u), subnormal, normal));
    return float_of(r | sign);
}
/* Any float to float16 bits (the loader's self-test; NaN: quiet, top payload). */
INLINE uint16_t f16_bits(float x) {
    if (x != x) return f16_store(float_of(bits_of(x) | 0x00400000u));
    return f16_store(f16_round(x));
}

/* ------------------------------------------------------------------------ */
/* The loop bodies below (macros) are written once, over an element type T:  */
/* T_ld / T_st load and store element i of a storage array, T_ldc / T_stc    */
/* of a compute-type scratch array, T_max is the AMSGrad maximum, T_set1 a   */
/* constant. They run one element at a time with the scalar types, and 16   */
/* at a time with the AVX-512 float16 type (f16v) where there is one.        */
/* ------------------------------------------------------------------------ */

#define SCALAR_ACCESS(T, S, C)                                                                \
    INLINE C T##_ld(const S *p, int64_t i) { return T##_load(p[i]); }                         \
    INLINE void T##_st(S *p, int64_t i, C x) { p[i] = T##_store(x); }                         \
    INLINE C T##_ldc(const C *p, int64_t i) { return p[i]; }                                  \
    INLINE void T##_stc(C *p, int64_t i, C x) { p[i] = x; }                                   \
    /* TF's cwiseMax(vhat, v): v if vhat < v, else vhat (a NaN v keeps vhat); a select, so  \
     * denormals-are-zero is applied by hand (rule.TFArithmetic.maximum) */                   \
    INLINE C T##_max(C h, C v) { return T##_daz((h < v) ? v : h); }                           \
    INLINE C T##_set1(double x) { return (C)x; }                                              \
    INLINE void T##_keep(S *RESTRICT to, const S *RESTRICT from, int64_t i) { to[i] = from[i]; } \
    INLINE int T##_isnan(C x) { return x != x; }

#include <float.h>
INLINE float f32_daz(float x) { return fabsf(x) < FLT_MIN ? copysignf(0.0f, x) : x; }
INLINE double f64_daz(double x) { return fabs(x) < DBL_MIN ? copysign(0.0, x) : x; }
INLINE float bf16_daz(float x) { return f32_daz(x); }
INLINE float f16_daz(float x) { return x; } /* float16 is computed in float32: never subnormal */
SCALAR_ACCESS(f32, float, float)
SCALAR_ACCESS(f64, double, double)
SCALAR_ACCESS(f16, uint16_t, float)
SCALAR_ACCESS(bf16, uint16_t, float)
#define f32_sqrt sqrtf
#define f64_sqrt sqrt
#define f16_sqrt sqrtf
#define bf16_sqrt sqrtf

#if defined(__AVX512F__) && !defined(TFADAM_NO_VECTOR_F16)
#include <immintrin.h>
/* float16, 16 elements at a time: AVX-512's conversions vcvtph2ps and
 * vcvtps2ph (round to nearest even) are exact IEEE conversions, so rounding
 * to float16 is a conversion there and back, 2 instructions instead of ~10
 * bit operations (GCC does not vectorise _Float16 conversions by itself).
 * + - * / on __m512 are GCC vector operators: one rounding each, no FMA
 * (-ffp-contract=off). */
#define F16V_RNE _MM_FROUND_TO_NEAREST_INT
INLINE __m512 f16v_ld(const uint16_t *p, int64_t i) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + i)));
}
INLINE void f16v_st(uint16_t *p, int64_t i, __m512 x) {
    _mm256_storeu_si256((__m256i *)(p + i), _mm512_cvtps_ph(x, F16V_RNE));
}
INLINE __m512 f16v_ldc(const float *p, int64_t i) { return _mm512_loadu_ps(p + i); }
INLINE void f16v_stc(float *p, int64_t i, __m512 x) { _mm512_storeu_ps(p + i, x); }
INLINE __m512 f16v_round(__m512 x) { return _mm512_cvtph_ps(_mm512_cvtps_ph(x, F16V_RNE)); }
INLINE __m512 f16v_sqrt(__m512 x) { return _mm512_sqrt_ps(x); }
INLINE __m512 f16v_max(__m512 h, __m512 v) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(h, v, _CMP_LT_OQ), h, v);
}
INLINE __m512 f16v_set1(double x) { return _mm512_set1_ps((float)x); }
INLINE void f16v_keep(uint16_t *to, const uint16_t *from, int64_t i) {
    _mm256_storeu_si256((__m256i *)(to + i), _mm256_loadu_si256((const __m256i *)(from + i)));
}
INLINE int f16v_isnan(__m512 x) { return (int)_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q); }
#define f16_VECTOR(ELEMENT) LOOP(f16v, __m512, 16, ELEMENT)
#define HAVE_F16V 1
#else
#define f16_VECTOR(ELEMENT)
#endif

#if defined(__AVX512F__) && !defined(TFADAM_NO_CHECKED_DENSE)
#include <immintrin.h>
/* float32 and float64, 16 and 8 at a time, for the dense step's checked loop
 * (see DENSE_ELEMENT): GCC does not vectorise a loop that can stop early.
 * Plain IEEE operations, as GCC's own vectorised loops use. */
INLINE __m512 f32v_ld(const float *p, int64_t i) { return _mm512_loadu_ps(p + i); }
INLINE void f32v_st(float *p, int64_t i, __m512 x) { _mm512_storeu_ps(p + i, x); }
INLINE __m512 f32v_round(__m512 x) { return x; }
INLINE __m512 f32v_sqrt(__m512 x) { return _mm512_sqrt_ps(x); }
INLINE __m512 f32v_set1(double x) { return _mm512_set1_ps((float)x); }
INLINE void f32v_keep(float *to, const float *from, int64_t i) { _mm512_storeu_ps(to + i, _mm512_loadu_ps(from + i)); }
INLINE int f32v_isnan(__m512 x) { return (int)_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q); }
INLINE __m512 f32v_max(__m512 h, __m512 v) { /* as f32_max: TF's select, then DAZ */
    __m512 r = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(h, v, _CMP_LT_OQ), h, v);
    __mmask16 tiny = _mm512_cmp_ps_mask(_mm512_abs_ps(r), _mm512_set1_ps(FLT_MIN), _CMP_LT_OQ);
    return _mm512_mask_and_ps(r, tiny, r, _mm512_set1_ps(-0.0f));
}
INLINE __m512d f64v_ld(const double *p, int64_t i) { return _mm512_loadu_pd(p + i); }
INLINE void f64v_st(double *p, int64_t i, __m512d x) { _mm512_storeu_pd(p + i, x); }
INLINE __m512d f64v_round(__m512d x) { return x; }
INLINE __m512d f64v_sqrt(__m512d x) { return _mm512_sqrt_pd(x); }
INLINE __m512d f64v_set1(double x) { return _mm512_set1_pd(x); }
INLINE void f64v_keep(double *to, const double *from, int64_t i) { _mm512_storeu_pd(to + i, _mm512_loadu_pd(from + i)); }
INLINE int f64v_isnan(__m512d x) { return (int)_mm512_cmp_pd_mask(x, x, _CMP_UNORD_Q); }
INLINE __m512d f64v_max(__m512d h, __m512d v) {
    __m512d r = _mm512_mask_blend_pd(_mm512_cmp_pd_mask(h, v, _CMP_LT_OQ), h, v);
    __mmask8 tiny = _mm512_cmp_pd_mask(_mm512_abs_pd(r), _mm512_set1_pd(DBL_MIN), _CMP_LT_OQ);
    return _mm512_mask_and_pd(r, tiny, r, _mm512_set1_pd(-0.0));
}
/* Lanes [i, i + 16) (8) of p that hold a NaN other than the default one. */
INLINE __mmask16 f32v_odd1(const float *p, int64_t i) {
    __m512i u = _mm512_loadu_si512((const void *)(p + i));
    __m512i a = _mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF));
    __mmask16 nan = _mm512_cmpgt_epu32_mask(a, _mm512_set1_epi32(0x7F800000));
    return _mm512_mask_cmpneq_epu32_mask(nan, u, _mm512_set1_epi32((int)0xFFC00000u));
}
INLINE __mmask8 f64v_odd1(const double *p, int64_t i) {
    __m512i u = _mm512_loadu_si512((const void *)(p + i));
    __m512i a = _mm512_and_si512(u, _mm512_set1_epi64(0x7FFFFFFFFFFFFFFFll));
    __mmask8 nan = _mm512_cmpgt_epu64_mask(a, _mm512_set1_epi64(0x7FF0000000000000ll));
    return _mm512_mask_cmpneq_epu64_mask(nan, u, _mm512_set1_epi64((long long)0xFFF8000000000000ull));
}
/* Whether the inputs of a vector hold such a NaN (inline: a diverged model has
 * default NaNs everywhere, and tests this for every vector). */
INLINE int f32v_odd(const float *t, const float *g, const float *m, const float *v,
                    const float *h, int64_t i) {
    return (f32v_odd1(t, i) | f32v_odd1(g, i) | f32v_odd1(m, i) | f32v_odd1(v, i) |
            (h ? f32v_odd1(h, i) : 0)) != 0;
}
INLINE int f64v_odd(const double *t, const double *g, const double *m, const double *v,
                    const double *h, int64_t i) {
    return (f64v_odd1(t, i) | f64v_odd1(g, i) | f64v_odd1(m, i) | f64v_odd1(v, i) |
            (h ? f64v_odd1(h, i) : 0)) != 0;
}
#define f32_DENSE_VECTOR(ELEMENT) LOOP(f32v, __m512, 16, ELEMENT)
#define f64_DENSE_VECTOR(ELEMENT) LOOP(f64v, __m512d, 8, ELEMENT)
#define f32_CHECKED 1
#define f64_CHECKED 1

#if defined(__AVX512BW__) && defined(__AVX512VL__)
/* bfloat16, 16 at a time: widened by a shift; rounded to nearest even as
 * bf16_round, with the lowest kept bit tested into a mask (4 instructions
 * instead of 5: the step is compute-bound, 12 roundings per element). */
INLINE __m512 bf16v_ld(const uint16_t *p, int64_t i) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p + i)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
INLINE void bf16v_st(uint16_t *p, int64_t i, __m512 x) { /* x already rounded */
    __m512i u = _mm512_srli_epi32(_mm512_castps_si512(x), 16);
    _mm256_storeu_si256((__m256i *)(p + i), _mm512_cvtepi32_epi16(u));
}
INLINE __m512 bf16v_round(__m512 x) {
    __m512i u = _mm512_castps_si512(x);
    __mmask16 odd = _mm512_test_epi32_mask(u, _mm512_set1_epi32(0x10000));
    __m512i t = _mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF));
    t = _mm512_mask_add_epi32(t, odd, t, _mm512_set1_epi32(1));
    return _mm512_castsi512_ps(_mm512_and_si512(t, _mm512_set1_epi32((int)0xFFFF0000u)));
}
INLINE __m512 bf16v_sqrt(__m512 x) { return _mm512_sqrt_ps(x); }
INLINE __m512 bf16v_set1(double x) { return _mm512_set1_ps((float)x); }
INLINE void bf16v_keep(uint16_t *to, const uint16_t *from, int64_t i) {
    _mm256_storeu_si256((__m256i *)(to + i), _mm256_loadu_si256((const __m256i *)(from + i)));
}
INLINE int bf16v_isnan(__m512 x) { return f32v_isnan(x); }
INLINE __m512 bf16v_max(__m512 h, __m512 v) { return f32v_max(h, v); } /* bf16_daz is f32_daz */
/* Lanes [i, i + 16) of 16-bit values p that hold a NaN other than the
 * default one: magnitude above inf (the format's), and not dflt. */
INLINE __mmask16 h16_odd1(const uint16_t *p, int64_t i, short inf, short dflt) {
    __m256i u = _mm256_loadu_si256((const __m256i *)(p + i));
    __m256i a = _mm256_and_si256(u, _mm256_set1_epi16(0x7FFF));
    __mmask16 nan = _mm256_cmpgt_epu16_mask(a, _mm256_set1_epi16(inf));
    return _mm256_mask_cmpneq_epu16_mask(nan, u, _mm256_set1_epi16(dflt));
}
INLINE int h16_odd(const uint16_t *t, const uint16_t *g, const uint16_t *m, const uint16_t *v,
                   const uint16_t *h, int64_t i, short inf, short dflt) {
    return (h16_odd1(t, i, inf, dflt) | h16_odd1(g, i, inf, dflt) | h16_odd1(m, i, inf, dflt) |
            h16_odd1(v, i, inf, dflt) | (h ? h16_odd1(h, i, inf, dflt) : 0)) != 0;
}
INLINE int bf16v_odd(const uint16_t *t, const uint16_t *g, const uint16_t *m, const uint16_t *v,
                     const uint16_t *h, int64_t i) {
    return h16_odd(t, g, m, v, h, i, 0x7F80, (short)0xFFC0);
}
/* The 16-bit formats, 128 elements a step: float32 vectors operated on
 * together. Their loops are latency-bound (a rounding after each of 12
 * operations), so each operation gets VN independent vectors. Measured for
 * bfloat16 per core (16 x 1M, ms; the machine drifts, compare within a
 * row): the kept-copies loop that GCC vectorises 20-25; even/odd words with
 * bf16v_round, 2 vectors a step 17-20, 4: 15.5-17.5, 8: 15.8-17.4;
 * vcvtne2ps2bf16 (below), 2 vectors no faster than bf16v_round, 4: 13.3 /
 * 14.6 against 14.4 / 15.7, 8: 12.7 / 14.0. */
#define VN 8
typedef struct {
    __m512 x[VN];
} vecN;
#define VECN_MAP1(name, expr)                                                                 \
    INLINE vecN vecN_##name(vecN a) {                                                        \
        for (int k = 0; k < VN; ++k) a.x[k] = expr(a.x[k]);                                  \
        return a;                                                                            \
    }
#define VECN_MAP2(name, expr)                                                                 \
    INLINE vecN vecN_##name(vecN a, vecN b) {                                                \
        for (int k = 0; k < VN; ++k) a.x[k] = expr(a.x[k], b.x[k]);                          \
        return a;                                                                            \
    }
#define VECN_ADD(a, b) ((a) + (b))
#define VECN_SUB(a, b) ((a) - (b))
#define VECN_MUL(a, b) ((a) * (b))
#define VECN_DIV(a, b) ((a) / (b))
VECN_MAP1(sqrt, _mm512_sqrt_ps)
VECN_MAP2(add, VECN_ADD)
VECN_MAP2(sub, VECN_SUB)
VECN_MAP2(mul, VECN_MUL)
VECN_MAP2(div, VECN_DIV)
INLINE vecN vecN_set1(double x) {
    vecN r;
    for (int k = 0; k < VN; ++k) r.x[k] = _mm512_set1_ps((float)x);
    return r;
}
INLINE int vecN_isnan(vecN a) {
    int nan = 0;
    for (int k = 0; k < VN; ++k) nan |= f32v_isnan(a.x[k]);
    return nan;
}

/* bfloat16: 32 stored values are one 512-bit word; as float32 they are two
 * vectors, the even elements and the odd ones, made by a shift and a mask
 * and put back by one ternary-logic instruction, where bf16v needs a
 * cross-lane widening or narrowing per 16 values. Every operation is
 * elementwise, so computing in that order is computing in the stored one. */
typedef struct {
    __m512i w[VN / 2]; /* the same values as stored: word w is x[2w] (even) and x[2w + 1] */
} bf16wN;
INLINE void bf16p_unpack(vecN *a, int w, __m512i u) {
    a->x[2 * w] = _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
    a->x[2 * w + 1] = _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000u)));
}
INLINE vecN bf16p_ld(const uint16_t *p, int64_t i) {
    vecN r;
    for (int w = 0; w < VN / 2; ++w) bf16p_unpack(&r, w, _mm512_loadu_si512((const void *)(p + i + 32 * w)));
    return r;
}
INLINE bf16wN bf16p_words(vecN a) { /* a already rounded */
    bf16wN r;
    for (int w = 0; w < VN / 2; ++w)
        r.w[w] = _mm512_ternarylogic_epi32(_mm512_srli_epi32(_mm512_castps_si512(a.x[2 * w]), 16),
                                           _mm512_castps_si512(a.x[2 * w + 1]),
                                           _mm512_set1_epi32((int)0xFFFF0000u), 0xF8); /* a | (b & c) */
    return r;
}
INLINE void bf16p_st(uint16_t *p, int64_t i, bf16wN a) {
    for (int w = 0; w < VN / 2; ++w) _mm512_storeu_si512((void *)(p + i + 32 * w), a.w[w]);
}
#ifdef __AVX512BF16__
/* vcvtne2ps2bf16 rounds two vectors to nearest even at once and puts the odd
 * elements' words after the even ones'; one word shuffle restores the stored
 * order: 4 instructions per 32 roundings instead of 8. It reads denormal
 * inputs as zero and there are none: TF's flush-to-zero is on for the
 * operations whose results it rounds. A NaN other than the default one never
 * gets here (checked); the default one converts as bf16v_round keeps it.
 * Returns a rounded; *words: the same values as stored. */
INLINE vecN bf16p_round_w(vecN a, bf16wN *words) {
    const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                           24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                           16, 0);
    for (int w = 0; w < VN / 2; ++w) {
        __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(a.x[2 * w + 1], a.x[2 * w]);
        words->w[w] = _mm512_permutexvar_epi16(order, packed);
        bf16p_unpack(&a, w, words->w[w]);
    }
    return a;
}
#else
VECN_MAP1(bf16_round_bits, bf16v_round)
INLINE vecN bf16p_round_w(vecN a, bf16wN *words) {
    a = vecN_bf16_round_bits(a);
    *words = bf16p_words(a);
    return a;
}
#endif
INLINE vecN bf16p_round(vecN a) {
    bf16wN unused;
    return bf16p_round_w(a, &unused);
}

/* DENSE_ELEMENT, 16 * VN elements at a time, in format P (bf16p, f16p: ld,
 * round, round_w, words, st, max), whose 16-lane form is V (V##_odd); returns
 * where it stopped (see checked). Then V, 16 at a time, and one at a time. */
#define DEFINE_DENSE_N(P, WORDS, V)                                                           \
    INLINE int P##_odd(const uint16_t *t, const uint16_t *g, const uint16_t *m,              \
                       const uint16_t *v, const uint16_t *h, int64_t i) {                    \
        int odd = 0;                                                                         \
        for (int k = 0; k < VN; ++k) odd |= V##_odd(t, g, m, v, h, i + 16 * k);              \
        return odd;                                                                          \
    }                                                                                        \
    INLINE int64_t P##_dense_n(uint16_t *tp, const uint16_t *gp, uint16_t *mp, uint16_t *vp, \
                               uint16_t *hp, int64_t n, const double *coef, int nesterov,   \
                               int amsgrad) {                                               \
        const vecN alpha = vecN_set1(coef[0]), b1 = vecN_set1(coef[1]);                      \
        const vecN omb1 = vecN_set1(coef[3]), omb2 = vecN_set1(coef[4]);                     \
        const vecN eps = vecN_set1(coef[5]);                                                 \
        int64_t i = 0;                                                                       \
        for (; i + 16 * VN <= n; i += 16 * VN) {                                             \
            vecN g = P##_ld(gp, i), m = P##_ld(mp, i), v = P##_ld(vp, i);                    \
            vecN th = P##_ld(tp, i);                                                         \
            WORDS mw, vw, tw; /* the new m, v, θ as they will be stored */                   \
            m = P##_round_w(vecN_add(m, P##_round(vecN_mul(P##_round(vecN_sub(g, m)), omb1))), &mw); \
            vecN gg = P##_round(vecN_mul(g, g));                                             \
            v = P##_round_w(vecN_add(v, P##_round(vecN_mul(P##_round(vecN_sub(gg, v)), omb2))), &vw); \
            vecN d = v;                                                                      \
            if (amsgrad) d = P##_max(P##_ld(hp, i), v);                                      \
            vecN den = P##_round(vecN_add(P##_round(vecN_sqrt(d)), eps));                    \
            vecN num = m;                                                                    \
            if (nesterov)                                                                    \
                num = P##_round(vecN_add(P##_round(vecN_mul(g, omb1)),                       \
                                         P##_round(vecN_mul(b1, m))));                       \
            th = P##_round_w(                                                                \
                vecN_sub(th, P##_round(vecN_div(P##_round(vecN_mul(num, alpha)), den))), &tw); \
            if ((vecN_isnan(v) | vecN_isnan(th)) && P##_odd(tp, gp, mp, vp, amsgrad ? hp : NULL, i)) \
                break;                                                                       \
            P##_st(mp, i, mw);                                                               \
            P##_st(vp, i, vw);                                                               \
            if (amsgrad) P##_st(hp, i, P##_words(d));                                        \
            P##_st(tp, i, tw);                                                               \
        }                                                                                    \
        return i;                                                                            \
    }
#define DENSE_N_THEN(P, V, ELEMENT)                                                           \
    i = P##_dense_n(tp, (const uint16_t *)gp, mp, vp, hp, n, coef, nesterov, amsgrad);       \
    LOOP(V, __m512, 16, ELEMENT)
/* bfloat16: TF's max then denormals-are-zero, as f32v_max (bf16_daz is f32_daz) */
VECN_MAP2(max_daz, f32v_max)
#define bf16p_max vecN_max_daz
DEFINE_DENSE_N(bf16p, bf16wN, bf16v)
#define bf16_DENSE_VECTOR(ELEMENT) DENSE_N_THEN(bf16p, bf16v, ELEMENT)
#define bf16_CHECKED 1

#ifdef HAVE_F16V
/* float16: each vector 16 values, converted by vcvtph2ps / vcvtps2ph (exact
 * IEEE conversions, round to nearest even), as f16v. */
INLINE int f16v_odd(const uint16_t *t, const uint16_t *g, const uint16_t *m, const uint16_t *v,
                    const uint16_t *h, int64_t i) {
    return h16_odd(t, g, m, v, h, i, 0x7C00, (short)0xFE00);
}
typedef struct {
    __m256i h[VN]; /* the same values as stored */
} f16wN;
INLINE vecN f16p_ld(const uint16_t *p, int64_t i) {
    vecN r;
    for (int k = 0; k < VN; ++k) r.x[k] = f16v_ld(p, i + 16 * k);
    return r;
}
INLINE f16wN f16p_words(vecN a) { /* a already rounded: the conversion is exact */
    f16wN r;
    for (int k = 0; k < VN; ++k) r.h[k] = _mm512_cvtps_ph(a.x[k], F16V_RNE);
    return r;
}
INLINE vecN f16p_round_w(vecN a, f16wN *words) {
    *words = f16p_words(a);
    for (int k = 0; k < VN; ++k) a.x[k] = _mm512_cvtph_ps(words->h[k]);
    return a;
}
INLINE vecN f16p_round(vecN a) {
    f16wN unused;
    return f16p_round_w(a, &unused);
}
INLINE void f16p_st(uint16_t *p, int64_t i, f16wN a) {
    for (int k = 0; k < VN; ++k) _mm256_storeu_si256((__m256i *)(p + i + 16 * k), a.h[k]);
}
VECN_MAP2(max_f16, f16v_max) /* float16 is computed in float32: never subnormal */
#define f16p_max vecN_max_f16
DEFINE_DENSE_N(f16p, f16wN, f16v)
#define f16_DENSE_VECTOR(ELEMENT) DENSE_N_THEN(f16p, f16v, ELEMENT)
#define f16_CHECKED 1
#endif
#else
#define bf16_DENSE_VECTOR(ELEMENT)
#define bf16_CHECKED 0
#endif
#else /* the kept-copies loops, which GCC vectorises by itself */
#define f32_DENSE_VECTOR(ELEMENT)
#define f64_DENSE_VECTOR(ELEMENT)
#define bf16_DENSE_VECTOR(ELEMENT)
#define f32_CHECKED 0
#define f64_CHECKED 0
#define bf16_CHECKED 0
#endif
#define f32_VECTOR(ELEMENT)
#define f64_VECTOR(ELEMENT)
#define bf16_VECTOR(ELEMENT)
#ifndef f16_CHECKED /* float16 keeps copies here */
#define f16_DENSE_VECTOR f16_VECTOR
#define f16_CHECKED 0
#ifdef HAVE_F16V
INLINE int f16v_odd(const uint16_t *t, const uint16_t *g, const uint16_t *m, const uint16_t *v,
                    const uint16_t *h, int64_t i) { /* never called: float16 is not checked */
    (void)t, (void)g, (void)m, (void)v, (void)h, (void)i;
    return 0;
}
#endif
#endif

/* Elements i, i+W, ... while W of them remain, with type T; the constants of
 * ELEMENT (ELEMENT_CONSTS) are made once, in T. */
#define LOOP(T, C, W, ELEMENT)                                                                \
    {                                                                                        \
        ELEMENT##_CONSTS(T, C)                                                               \
        for (; i + (W) <= n; i += (W)) ELEMENT(T, C, i)                                      \
    }

/* The scalars of a step, each exactly a T (see rule.Coefficients). */
#define ADAM_CONSTS(T, C)                                                                     \
    const C alpha = T##_set1(coef[0]), b1 = T##_set1(coef[1]), b2 = T##_set1(coef[2]);        \
    const C omb1 = T##_set1(coef[3]), omb2 = T##_set1(coef[4]), eps = T##_set1(coef[5]);      \
    (void)alpha, (void)b1, (void)b2, (void)omb1, (void)omb2, (void)eps;

/* ------------------------------------------------------------------------ */
/* Threads: torch's own OpenMP team where the loader could link to it       */
/* (TFADAM_OPENMP, below); otherwise a small persistent pool of our own.    */
/* Either way work is handed out in chunks.                                 */
/*                                                                          */
/* Pool: the caller's thread works too, and takes chunks until none are left; it  */
/* then waits only for chunks already being worked on, never for a helper   */
/* that the OS has not scheduled yet (on a busy machine that wait can last a */
/* whole time slice). Idle helpers sleep on a condition variable: no         */
/* spinning to steal cores from other threads (torch's, TensorFlow's).       */
/* Which thread computes an element never changes its bits.                  */
/* ------------------------------------------------------------------------ */

/* slot: 0 for the calling thread, 1.. for helpers: an index for scratch. */
typedef void (*range_fn)(void *ctx, int slot, int64_t lo, int64_t hi);

#define MAX_THREADS 64
#ifndef CHUNKS_PER_THREAD
#define CHUNKS_PER_THREAD 64 /* small chunks: a thread idles at most ~one chunk at the end */
#endif

typedef struct {
    range_fn fn;
    void *ctx;
    int64_t total, chunk, nchunks;
    int helpers; /* helpers 1..helpers may take chunks */
} job_t;

static struct {
    pthread_mutex_t lock; /* guards generation, job, started */
    pthread_cond_t wake, done;
    uint32_t generation;
    job_t job;
    int started;
    /* (generation << 32) | next chunk: a helper that read an old job can
     * never take a chunk of a newer one (its compare-and-swap fails) */
    _Atomic uint64_t next;
    _Atomic int64_t finished;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER};

/* One job at a time; a second caller (another Python thread) runs alone. */
static pthread_mutex_t pool_user = PTHREAD_MUTEX_INITIALIZER;

static void run_chunks(const job_t *job, uint32_t generation, int slot) {
    for (;;) {
        uint64_t current = atomic_load(&pool.next);
        if ((uint32_t)(current >> 32) != generation) return;
        int64_t c = (int64_t)(current & 0xFFFFFFFFu);
        if (c >= job->nchunks) return;
        if (!atomic_compare_exchange_weak(&pool.next, &current, current + 1)) continue;
        int64_t lo = c * job->chunk, hi = lo + job->chunk;
        job->fn(job->ctx, slot, lo, hi < job->total ? hi : job->total);
        if (atomic_fetch_add(&pool.finished, 1) + 1 == job->nchunks) {
            pthread_mutex_lock(&pool.lock);
            pthread_cond_signal(&pool.done);
            pthread_mutex_unlock(&pool.lock);
        }
    }
}

static void *helper(void *arg) {
    int slot = (int)(intptr_t)arg;
    TF_FLOAT_MODE_SET; /* helpers run only these kernels */
    pthread_mutex_lock(&pool.lock);
    uint32_t seen = pool.generation;
    for (;;) {
        while (pool.generation == seen) pthread_cond_wait(&pool.wake, &pool.lock);
        seen = pool.generation;
        job_t job = pool.job;
        pthread_mutex_unlock(&pool.lock);
        if (slot <= job.helpers) run_chunks(&job, seen, slot);
        pthread_mutex_lock(&pool.lock);
    }
    return NULL;
}

/* In a child after fork() the helpers do not exist: start afresh. */
static void pool_after_fork_in_child(void) {
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.done, NULL);
    pthread_mutex_init(&pool_user, NULL);
    pool.started = 0;
}

/* Make sure `wanted` helpers exist (under pool.lock); returns how many do. */
static int pool_grow(int wanted) {
    static int registered = 0;
    if (!registered) {
        pthread_atfork(NULL, NULL, pool_after_fork_in_child);
        registered = 1;
    }
    while (pool.started < wanted) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, helper, (void *)(intptr_t)(pool.started + 1)) != 0)
            break;
        pthread_detach(thread);
        ++pool.started;
    }
    return pool.started < wanted ? pool.started : wanted;
}

/* Work below `grain` units per thread is not worth waking a helper.
 * At most min(nthreads, MAX_THREADS) threads. */
static int parts_for(int64_t total, int64_t grain, int nthreads) {
    int64_t parts = total / (grain > 0 ? grain : 1);
    if (parts > nthreads) parts = nthreads;
    if (parts > MAX_THREADS) parts = MAX_THREADS;
    return parts < 1 ? 1 : (int)parts;
}

/* Chunk bounds are multiples of `align`; each thread takes ~CHUNKS_PER_THREAD. */
static int64_t chunk_for(int64_t total, int parts, int64_t align) {
    int64_t chunk = (total + (int64_t)parts * CHUNKS_PER_THREAD - 1) / ((int64_t)parts * CHUNKS_PER_THREAD);
    if (align < 1) align = 1;
    return (chunk + align - 1) / align * align;
}

/* fn over [0, total) in `chunk`s on the pool: the caller plus parts - 1 helpers. */
static void pool_parallel_for(range_fn fn, void *ctx, int64_t total, int64_t chunk, int parts) {
    if (pthread_mutex_trylock(&pool_user) != 0) {
        fn(ctx, 0, 0, total);
        return;
    }
    job_t job = {fn, ctx, total, chunk, (total + chunk - 1) / chunk, 0};
    pthread_mutex_lock(&pool.lock);
    job.helpers = pool_grow(parts - 1);
    uint32_t generation = ++pool.generation;
    pool.job = job;
    atomic_store(&pool.finished, 0);
    atomic_store(&pool.next, (uint64_t)generation << 32);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    run_chunks(&job, generation, 0);
    if (atomic_load(&pool.finished) < job.nchunks) {
        pthread_mutex_lock(&pool.lock);
        while (atomic_load(&pool.finished) < job.nchunks) pthread_cond_wait(&pool.done, &pool.lock);
        pthread_mutex_unlock(&pool.lock);
    }
    pthread_mutex_unlock(&pool_user);
}

#ifdef TFADAM_OPENMP
/* Built with -fopenmp and linked to the OpenMP runtime torch loaded (see
 * native.py), the kernels run on torch's own threads. Measured why: after a
 * torch op those threads still spin at their barrier for a while, and our
 * helpers had to wait for them to give up the cores (a D1 step right after
 * torch's fused step took 11.3-11.6 ms instead of ~9.5). */
int omp_get_thread_num(void);
static int use_openmp = 1;
/* GNU libgomp hangs in a child forked after a parallel region (torch's own
 * ops do too, which is why DataLoader workers run single-threaded); a child
 * uses the pool instead. */
static void openmp_after_fork_in_child(void) { use_openmp = 0; }
__attribute__((constructor)) static void openmp_register_fork_handler(void) {
    pthread_atfork(NULL, NULL, openmp_after_fork_in_child);
}

static void openmp_parallel_for(range_fn fn, void *ctx, int64_t total, int64_t chunk, int parts) {
    int64_t nchunks = (total + chunk - 1) / chunk;
    _Atomic int64_t next = 0;
#pragma omp parallel num_threads(parts)
    {
        /* torch's threads: set TF's float mode for our chunks, then give theirs back */
        TF_FLOAT_MODE_ENTER;
        int slot = omp_get_thread_num();
        for (int64_t c; (c = atomic_fetch_add(&next, 1)) < nchunks;) {
            int64_t lo = c * chunk, hi = lo + chunk;
            fn(ctx, slot, lo, hi < total ? hi : total);
        }
        TF_FLOAT_MODE_LEAVE;
    }
}
#if TFADAM_PART != 2
int tfadam_threading(void) { return use_openmp; }
#endif
#elif TFADAM_PART != 2
int tfadam_threading(void) { return 0; }
#endif

/* fn over [0, total) on up to `nthreads` threads; chunk bounds are multiples
 * of `align` (cache lines, or table rows). Slots used: 0 .. parts_for() - 1. */
static void parallel_for(range_fn fn, void *ctx, int64_t total, int64_t grain, int64_t align,
                         int nthreads) {
    if (total <= 0) return;
    int parts = parts_for(total, grain, nthreads);
    int64_t chunk = chunk_for(total, parts, align);
    if (parts <= 1) {
        TF_FLOAT_MODE_ENTER;
        fn(ctx, 0, 0, total);
        TF_FLOAT_MODE_LEAVE;
        return;
    }
#ifdef TFADAM_OPENMP
    if (use_openmp) {
        openmp_parallel_for(fn, ctx, total, chunk, parts);
        return;
    }
#endif
    TF_FLOAT_MODE_ENTER;
    pool_parallel_for(fn, ctx, total, chunk, parts);
    TF_FLOAT_MODE_LEAVE;
}

/* ------------------------------------------------------------------------ */
/* NaN blocks. When two different NaNs meet in one operation, which one the   */
/* result carries (sign, payload) depends on the order of the operands in the  */
/* machine instruction, which the compiler is free to swap for + and *. With   */
/* at most one NaN among an element's inputs every NaN in its computation is  */
/* that one (or the default NaN of an invalid operation), whatever the order.  */
/* So where an element's inputs hold a NaN other than the default one, the   */
/* rest of its block (checked loops) or the whole block (kept copies) is left */
/* untouched here and reported; the caller runs the reference on it          */
/* (bitwise-equal by design).                                                 */
/* ------------------------------------------------------------------------ */

#define NAN_BLOCK 256 /* elements; chunk bounds are multiples of it */
/* Each thread's copy of a block's old θ, m, v, vhat (in cache: 32 KB at most). */
static __thread double keep_buffer[4 * NAN_BLOCK] __attribute__((aligned(64)));

/* Whether p[0..n) holds a NaN other than the default NaN (the one an invalid
 * operation makes: sign set, quiet, no payload). When every NaN is that one,
 * the order of operands cannot matter either. Integer tests: they vectorise. */
static int f32_any_nan(const float *RESTRICT p, int64_t n) {
    const uint32_t *u = (const uint32_t *)p;
    uint32_t bad = 0;
    for (int64_t i = 0; i < n; ++i) bad |= ((u[i] & 0x7FFFFFFFu) > 0x7F800000u) & (u[i] != 0xFFC00000u);
    return bad != 0;
}
static int f64_any_nan(const double *RESTRICT p, int64_t n) {
    const uint64_t *u = (const uint64_t *)p;
    uint64_t bad = 0;
    for (int64_t i = 0; i < n; ++i)
        bad |= ((u[i] & 0x7FFFFFFFFFFFFFFFull) > 0x7FF0000000000000ull) & (u[i] != 0xFFF8000000000000ull);
    return bad != 0;
}
static int f16_any_nan(const uint16_t *RESTRICT p, int64_t n) {
    uint32_t bad = 0;
    for (int64_t i = 0; i < n; ++i) bad |= ((p[i] & 0x7FFFu) > 0x7C00u) & (p[i] != 0xFE00u);
    return bad != 0;
}
static int bf16_any_nan(const uint16_t *RESTRICT p, int64_t n) {
    uint32_t bad = 0;
    for (int64_t i = 0; i < n; ++i) bad |= ((p[i] & 0x7FFFu) > 0x7F80u) & (p[i] != 0xFFC0u);
    return bad != 0;
}

/* Multi-tensor ranges: tensor i owns elements [offset[i], offset[i+1]). */
static int64_t first_tensor(const int64_t *offset, int64_t count, int64_t at) {
    int64_t lo = 0, hi = count; /* last i with offset[i] <= at */
    while (hi - lo > 1) {
        int64_t mid = (lo + hi) / 2;
        if (offset[mid] <= at)
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

#define DENSE_GRAIN 32768 /* elements per thread, at least */
#define ALIGN 64          /* chunk boundaries, in elements (cache lines) */

/* ------------------------------------------------------------------------ */
/* Dense: TF's ApplyAdam (rule.dense_update), per element:                   */
/*   m = m + (g - m) * (1 - b1)                                               */
/*   v = v + (g*g - v) * (1 - b2)                                             */
/*   [vhat = max(vhat, v)]                                                    */
/*   theta = theta - (num * alpha) / (sqrt(v or vhat) + eps)                  */
/*   num = m, or nesterov: g*(1 - b1) + b1*m                                  */
/* ------------------------------------------------------------------------ */

typedef struct {
    void **theta, **grad, **m, **v, **vhat;
    const int64_t *offset; /* count + 1 prefix sums of the sizes */
    int64_t count;
    double coef[6]; /* alpha, beta1, beta2, 1-beta1, 1-beta2, epsilon: each exactly a T */
} dense_job;


/* One element (or a vector) of TF's ApplyAdam; nesterov, amsgrad and checked
 * are constants.
 *
 * A NaN among the inputs always reaches the new v or θ (every operation but
 * AMSGrad's max propagates it, and a NaN v that the max drops is the new v),
 * so testing those two outputs flags every element with a NaN input, in 2
 * compares instead of 5 (measured: the 5 cost ~8% per core).
 *
 * checked (float32/float64 with AVX-512): nothing is stored before that test;
 * where it fires and the inputs hold a NaN other than the default one, the
 * loop stops there, leaving the element and the rest of its block as they
 * were, for the reference. Otherwise (a loop GCC vectorises by itself): the
 * old θ, m, v, vhat are kept aside while the block is updated, and put back
 * afterwards if the flag was set and such a NaN is found among them. */
#define DENSE_ELEMENT_CONSTS ADAM_CONSTS
#define DENSE_ELEMENT(T, C, i)                                                                \
    {                                                                                        \
        C g = T##_ld(gp, i), m = T##_ld(mp, i), v = T##_ld(vp, i);                           \
        C th = T##_ld(tp, i);                                                                \
        if (!checked) {                                                                      \
            T##_keep(km, mp, i);                                                             \
            T##_keep(kv, vp, i);                                                             \
            T##_keep(kt, tp, i);                                                             \
        }                                                                                    \
        m = T##_round(m + T##_round(T##_round(g - m) * omb1));                               \
        v = T##_round(v + T##_round(T##_round(T##_round(g * g) - v) * omb2));                \
        C d = v;                                                                             \
        if (amsgrad) {                                                                       \
            C h = T##_ld(hp, i);                                                             \
            if (!checked) T##_keep(kh, hp, i);                                               \
            d = T##_max(h, v);                                                               \
        }                                                                                    \
        C den = T##_round(T##_round(T##_sqrt(d)) + eps);                                     \
        C num = m;                                                                           \
        if (nesterov) num = T##_round(T##_round(g * omb1) + T##_round(b1 * m));              \
        th = T##_round(th - T##_round(T##_round(num * alpha) / den));                        \
        if (!checked)                                                                        \
            nan |= T##_isnan(v) | T##_isnan(th);                                             \
        else if ((T##_isnan(v) | T##_isnan(th)) && T##_odd(tp, gp, mp, vp, amsgrad ? hp : NULL, i)) \
            break;                                                                           \
        T##_st(mp, i, m);                                                                    \
        T##_st(vp, i, v);                                                                    \
        if (amsgrad) T##_st(hp, i, d);                                                       \
        T##_st(tp, i, th);                                                                   \
    }

/* Updates n elements in place; returns how many (n, or where a checked loop
 * stopped). Unchecked, the old θ, m, v (and vhat) are kept in kt, km, kv (kh)
 * and *nan says whether the new v or θ holds a NaN. */
#define DEFINE_DENSE(NAME, S, C, NESTEROV, AMSGRAD)                                            \
    static int64_t dense_##NAME##_##NESTEROV##AMSGRAD(                                         \
        S *RESTRICT tp, const S *RESTRICT gp, S *RESTRICT mp, S *RESTRICT vp, S *RESTRICT hp, \
        int64_t n, const double *coef, S *RESTRICT kt, S *RESTRICT km, S *RESTRICT kv,       \
        S *RESTRICT kh, int *nan_out) {                                                      \
        const int nesterov = NESTEROV, amsgrad = AMSGRAD, checked = NAME##_CHECKED;          \
        (void)hp, (void)kh, (void)nesterov, (void)amsgrad;                                   \
        int nan = 0;                                                                         \
        int64_t i = 0;                                                                       \
        NAME##_DENSE_VECTOR(DENSE_ELEMENT)                                                   \
        LOOP(NAME, C, 1, DENSE_ELEMENT)                                                      \
        *nan_out = nan;                                                                      \
        return i;                                                                            \
    }

#define DEFINE_DENSE_ALL(NAME, S, C)                                                         \
    /* Whether the inputs of n elements hold a NaN other than the default one. */            \
    __attribute__((noinline)) static int NAME##_odd_inputs(                                   \
        const S *t, const S *g, const S *m, const S *v, const S *h, int64_t n) {             \
        return NAME##_any_nan(t, n) | NAME##_any_nan(g, n) | NAME##_any_nan(m, n) |          \
               NAME##_any_nan(v, n) | (h ? NAME##_any_nan(h, n) : 0);                        \
    }                                                                                        \
    /* Element i of a scalar loop (a checked loop's tail). */                                \
    INLINE int NAME##_odd(const S *t, const S *g, const S *m, const S *v, const S *h,        \
                          int64_t i) {                                                       \
        return NAME##_odd_inputs(t + i, g + i, m + i, v + i, h ? h + i : NULL, 1);           \
    }                                                                                        \
    DEFINE_DENSE(NAME, S, C, 0, 0)                                                           \
    DEFINE_DENSE(NAME, S, C, 0, 1)                                                           \
    DEFINE_DENSE(NAME, S, C, 1, 0)                                                           \
    DEFINE_DENSE(NAME, S, C, 1, 1)                                                           \
    typedef struct {                                                                         \
        dense_job job;                                                                       \
        int nesterov, amsgrad;                                                               \
        uint16_t *nan_blocks;                                                                \
        _Atomic int skipped;                                                                 \
    } dense_##NAME##_job;                                                                    \
    /* Elements [lo, hi) of the concatenated tensors. A NaN block that meets a NaN \
     * other than the default one is left to the reference: checked, from where   \
     * the update stopped (the loop runs over whole tensor pieces: a call per     \
     * block cost 4-8% per core); unchecked, whole, put back as it was.          */ \
    static void dense_##NAME##_range(void *ctx, int slot, int64_t lo, int64_t hi) {           \
        (void)slot;                                                                          \
        dense_##NAME##_job *d = (dense_##NAME##_job *)ctx;                                   \
        const dense_job *j = &d->job;                                                        \
        const double *k = j->coef;                                                           \
        S *keep = (S *)keep_buffer;                                                          \
        S *kt = keep, *km = keep + NAN_BLOCK, *kv = keep + 2 * NAN_BLOCK;                    \
        S *kh = keep + 3 * NAN_BLOCK;                                                        \
        int64_t (*update)(S *, const S *, S *, S *, S *, int64_t, const double *, S *, S *,  \
                          S *, S *, int *) =                                                 \
            d->nesterov ? (d->amsgrad ? dense_##NAME##_11 : dense_##NAME##_10)               \
                        : (d->amsgrad ? dense_##NAME##_01 : dense_##NAME##_00);              \
        int64_t first = first_tensor(j->offset, j->count, lo);                               \
        if (NAME##_CHECKED) { /* whole tensor pieces: one call each, not one per block */     \
            int64_t resume = lo; /* nothing below it is ours any more */                     \
            for (int64_t i = first; i < j->count && j->offset[i] < hi; ++i) {                \
                int64_t end = (hi < j->offset[i + 1] ? hi : j->offset[i + 1]) - j->offset[i]; \
                for (int64_t a = resume - j->offset[i]; a < end;) {                          \
                    if (a < 0) a = 0;                                                        \
                    int flagged = 0;                                                         \
                    S *hp = j->vhat ? (S *)j->vhat[i] + a : NULL;                            \
                    int64_t done = update((S *)j->theta[i] + a, (const S *)j->grad[i] + a,   \
                                          (S *)j->m[i] + a, (S *)j->v[i] + a, hp, end - a, k, \
                                          kt, km, kv, kh, &flagged);                         \
                    if (a + done == end) break;                                              \
                    /* stopped at a NaN other than the default one: the reference takes the  \
                     * rest of its block, in this tensor and any after it */                 \
                    int64_t at = j->offset[i] + a + done, block = at / NAN_BLOCK;            \
                    d->nan_blocks[block] = (uint16_t)(at - block * NAN_BLOCK + 1);           \
                    atomic_fetch_add(&d->skipped, 1);                                        \
                    resume = (block + 1) * NAN_BLOCK;                                        \
                    a = resume - j->offset[i];                                               \
                }                                                                            \
            }                                                                                \
            return;                                                                          \
        }                                                                                    \
        for (int64_t blo = lo; blo < hi; blo += NAN_BLOCK) {                                 \
            int64_t bhi = blo + NAN_BLOCK < hi ? blo + NAN_BLOCK : hi;                       \
            while (first + 1 < j->count && j->offset[first + 1] <= blo) ++first;             \
            int nan = 0;                                                                     \
            int64_t resume = -1; /* checked: where the update stopped, in the block */      \
            for (int pass = 0; pass < 3; ++pass) {                                           \
                for (int64_t i = first; i < j->count && j->offset[i] < bhi; ++i) {           \
                    int64_t a = blo > j->offset[i] ? blo - j->offset[i] : 0;                 \
                    int64_t b = (bhi < j->offset[i + 1] ? bhi : j->offset[i + 1]) - j->offset[i]; \
                    if (b <= a) continue;                                                    \
                    S *tp = (S *)j->theta[i] + a, *mp = (S *)j->m[i] + a;                    \
                    S *vp = (S *)j->v[i] + a, *hp = j->vhat ? (S *)j->vhat[i] + a : NULL;    \
                    const S *gp = (const S *)j->grad[i] + a;                                 \
                    int64_t n = b - a, at = j->offset[i] + a - blo;                          \
                    if (pass == 0) { /* update (unchecked: keeping the old values) */        \
                        int flagged = 0;                                                     \
                        int64_t done = update(tp, gp, mp, vp, hp, n, k, kt + at, km + at,    \
                                              kv + at, kh + at, &flagged);                   \
                        nan |= flagged;                                                      \
                        if (done < n) {                                                      \
                            resume = at + done;                                              \
                            break;                                                           \
                        }                                                                    \
                    } else if (pass == 1) { /* which NaNs: the old values, in cache */       \
                        nan = NAME##_odd_inputs(kt + at, gp, km + at, kv + at,               \
                                                hp ? kh + at : NULL, n);                     \
                        if (nan) break;                                                      \
                    } else { /* put the block back as it was */                              \
                        memcpy(tp, kt + at, (size_t)n * sizeof(S));                          \
                        memcpy(mp, km + at, (size_t)n * sizeof(S));                          \
                        memcpy(vp, kv + at, (size_t)n * sizeof(S));                          \
                        if (hp) memcpy(hp, kh + at, (size_t)n * sizeof(S));                  \
                    }                                                                        \
                }                                                                            \
                if (resume >= 0 || !nan) break;                                              \
            }                                                                                \
            if (resume >= 0 || nan) {                                                        \
                d->nan_blocks[blo / NAN_BLOCK] = (uint16_t)(resume >= 0 ? resume + 1 : 1);   \
                atomic_fetch_add(&d->skipped, 1);                                            \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
    /* Returns how many NaN blocks it left to the caller, marked in nan_blocks (one         \
     * uint16 per NAN_BLOCK elements of the concatenated tensors: 0, or 1 + the offset in   \
     * the block from which the elements are untouched). */                                  \
    int tfadam_dense_##NAME(int64_t count, void **theta, void **grad, void **m, void **v,     \
                            void **vhat, const int64_t *offset, const double *coef,          \
                            int nesterov, int nthreads, uint16_t *nan_blocks) {              \
        dense_##NAME##_job d = {{theta, grad, m, v, vhat, offset, count, {0}},               \
                                nesterov != 0, vhat != NULL, nan_blocks, 0};                 \
        memcpy(d.job.coef, coef, sizeof d.job.coef);                                         \
        parallel_for(dense_##NAME##_range, &d, offset[count], DENSE_GRAIN, NAN_BLOCK, nthreads); \
        return (int)atomic_load(&d.skipped);                                                 \
    }

/* The loader compiles this file twice in parallel (TFADAM_PART 1 and 2, one
 * per core) and links the halves: first-use compile time is the cold start.
 * Part 2 is float16 (the costliest to compile), part 1 everything else. */
#if TFADAM_PART != 2
DEFINE_DENSE_ALL(f32, float, float)
DEFINE_DENSE_ALL(f64, double, double)
#endif
#if TFADAM_PART != 1
DEFINE_DENSE_ALL(f16, uint16_t, float)
#endif
#if TFADAM_PART != 2
DEFINE_DENSE_ALL(bf16, uint16_t, float)
#endif

/* ------------------------------------------------------------------------ */
/* The memory-traffic floor of the benchmark: 4 reads, 3 writes per element, */
/* trivial arithmetic, same threading. Not an optimizer.                     */
/* ------------------------------------------------------------------------ */

#define DEFINE_FLOOR(NAME, S)                                                                 \
    static void floor_##NAME##_range(void *ctx, int slot, int64_t lo, int64_t hi) {           \
        (void)slot;                                                                          \
        const dense_job *j = (const dense_job *)ctx;                                         \
        for (int64_t i = first_tensor(j->offset, j->count, lo);                              \
             i < j->count && j->offset[i] < hi; ++i) {                                       \
            int64_t a = lo > j->offset[i] ? lo - j->offset[i] : 0;                           \
            int64_t b = (hi < j->offset[i + 1] ? hi : j->offset[i + 1]) - j->offset[i];      \
            S *RESTRICT tp = (S *)j->theta[i], *RESTRICT mp = (S *)j->m[i];                  \
            S *RESTRICT vp = (S *)j->v[i];                                                   \
            const S *RESTRICT gp = (const S *)j->grad[i];                                    \
            for (int64_t e = a; e < b; ++e) {                                                \
                S g = gp[e];                                                                 \
                mp[e] = (S)(mp[e] + g);                                                      \
                vp[e] = (S)(vp[e] - g);                                                      \
                tp[e] = (S)(tp[e] + g);                                                      \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
    int tfadam_floor_##NAME(int64_t count, void **theta, void **grad, void **m, void **v,     \
                            const int64_t *offset, int nthreads) {                           \
        dense_job j = {theta, grad, m, v, NULL, offset, count, {0}};                         \
        parallel_for(floor_##NAME##_range, &j, offset[count], DENSE_GRAIN, ALIGN, nthreads); \
        return 0;                                                                            \
    }

/* 4-byte elements as float32, 2-byte elements (float16/bfloat16 traffic) as
 * 16-bit integers, 8-byte elements as float64. */
#if TFADAM_PART != 2
DEFINE_FLOOR(f32, float)
DEFINE_FLOOR(u16, uint16_t)
DEFINE_FLOOR(f64, double)
#endif

/* ------------------------------------------------------------------------ */
/* Sparse rows (IndexedSlices over dim 0).                                    */
/*                                                                          */
/* Deduplication as TF: each unique row's value is accumulated from +0, in    */
/* order of occurrence, every addition rounded to T. The occurrences are       */
/* grouped by a stable radix sort of (row, position), so that each group       */
/* lists its positions in order of occurrence.                               */
/* ------------------------------------------------------------------------ */

typedef struct {
    int64_t row, pos;
} occurrence;

/* Returns 0, or -1 (out of memory), or -2 (an index out of [0, nrows)).
 * On success *sorted holds k occurrences sorted by (row, pos). */
static int sort_occurrences(const int64_t *indices, int64_t k, int64_t nrows,
                            occurrence **sorted) {
    *sorted = NULL;
    occurrence *a = (occurrence *)malloc((size_t)(k > 0 ? k : 1) * sizeof(occurrence));
    if (!a) return -1;
    int ordered = 1;
    int64_t max_row = 0;
    for (int64_t p = 0; p < k; ++p) {
        int64_t r = indices[p];
        if (r < 0 || r >= nrows) {
            free(a);
            return -2;
        }
        if (p > 0 && r < indices[p - 1]) ordered = 0;
        if (r > max_row) max_row = r;
        a[p].row = r;
        a[p].pos = p;
    }
    if (!ordered) {
        occurrence *b = (occurrence *)malloc((size_t)k * sizeof(occurrence));
        if (!b) {
            free(a);
            return -1;
        }
        enum { BITS = 11, BUCKETS = 1 << BITS };
        int64_t count[BUCKETS];
        for (int shift = 0; shift < 63 && (max_row >> shift) > 0; shift += BITS) {
            memset(count, 0, sizeof count);
            for (int64_t p = 0; p < k; ++p) ++count[(a[p].row >> shift) & (BUCKETS - 1)];
            int64_t total = 0;
            for (int q = 0; q < BUCKETS; ++q) {
                int64_t c = count[q];
                count[q] = total;
                total += c;
            }
            for (int64_t p = 0; p < k; ++p) b[count[(a[p].row >> shift) & (BUCKETS - 1)]++] = a[p];
            occurrence *t = a;
            a = b;
            b = t;
        }
        free(b);
    }
    *sorted = a;
    return 0;
}

/* A sparse call: table (nrows x rowlen), occurrences sorted, group g spans
 * occurrences [start[g], start[g+1]). mode: 0 eager, 1 graph, 2 lazy.
 * scratch: one row of the compute type per thread slot, allocated before anything
 * is modified, so that running out of memory leaves the table untouched. */
typedef struct {
    void *theta, *m, *v;
    const void *values;
    int64_t nrows, rowlen, ngroups;
    const occurrence *occ;
    const int64_t *start;
    double coef[6];
    int mode;
    char *scratch;
    size_t scratch_row_bytes, keep_elements; /* per thread slot: one summed row, 3 kept blocks */
    uint8_t *nan_rows;
    _Atomic int64_t skipped;
} sparse_job;

static int64_t first_group_at_or_after(const sparse_job *j, int64_t row) {
    int64_t lo = 0, hi = j->ngroups; /* first g with occ[start[g]].row >= row */
    while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if (j->occ[j->start[mid]].row < row)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 32 /* groups: 8 -> 32 took S2 from 1.71 to 1.30 ms in the bench */
#endif
#define PREFETCH_LINES 8 /* per row and array: the hardware prefetcher does the rest */

static inline void prefetch_rows(const sparse_job *j, int64_t g, size_t size) {
    int64_t row = j->occ[j->start[g]].row;
    size_t bytes = (size_t)j->rowlen * size;
    size_t lines = (bytes + 63) / 64;
    if (lines > PREFETCH_LINES) lines = PREFETCH_LINES;
    const char *t = (const char *)j->theta + (size_t)row * bytes;
    const char *m = (const char *)j->m + (size_t)row * bytes;
    const char *v = (const char *)j->v + (size_t)row * bytes;
    const char *src = (const char *)j->values + (size_t)j->occ[j->start[g]].pos * bytes;
    for (size_t q = 0; q < lines; ++q) {
        __builtin_prefetch(t + 64 * q, 1, 3);
        __builtin_prefetch(m + 64 * q, 1, 3);
        __builtin_prefetch(v + 64 * q, 1, 3);
        __builtin_prefetch(src + 64 * q, 0, 3);
    }
}

#define ZERO_ELEMENT_CONSTS(T, C)
#define ZERO_ELEMENT(T, C, i) T##_stc(acc, i, T##_set1(0.0));
#define SUM_ELEMENT_CONSTS(T, C)
#define SUM_ELEMENT(T, C, i) T##_stc(acc, i, T##_round(T##_ldc(acc, i) + T##_ld(src, i)));

/* Untouched rows of the dense-equivalent update (rule.sparse_update). */
#define DECAY_ELEMENT_CONSTS ADAM_CONSTS
#define DECAY_ELEMENT(T, C, i)                                                                \
    {                                                                                        \
        C m0 = T##_ld(mp, i), v0 = T##_ld(vp, i), th = T##_ld(tp, i);                        \
        T##_keep(km, mp, i);                                                                 \
        T##_keep(kv, vp, i);                                                                 \
        T##_keep(kt, tp, i);                                                                 \
        C m = T##_round(m0 * b1);                                                            \
        C v = T##_round(v0 * b2);                                                            \
        T##_st(mp, i, m);                                                                    \
        T##_st(vp, i, v);                                                                    \
        C den = T##_round(T##_round(T##_sqrt(v)) + eps);                                     \
        th = T##_round(th - T##_round(T##_round(alpha * m) / den));                          \
        T##_st(tp, i, th);                                                                   \
        nan |= T##_isnan(v) | T##_isnan(th); /* every NaN input gets there (see dense) */    \
    }

/* Touched rows: dense-equivalent (eager or graph) and lazy share this form:
 *   m = m*b1 + G*(1-b1);  v = v*b2 + (G*G)*(1-b2)   [graph: G*(G*(1-b2))]
 *   theta = theta - (alpha*m) / (sqrt(v) + eps) */
#define TOUCH_ELEMENT_CONSTS ADAM_CONSTS
#define TOUCH_ELEMENT(T, C, i)                                                                \
    {                                                                                        \
        C g = T##_ldc(G, i);                                                                 \
        C m0 = T##_ld(mp, i), v0 = T##_ld(vp, i), th = T##_ld(tp, i);                        \
        T##_keep(km, mp, i);                                                                 \
        T##_keep(kv, vp, i);                                                                 \
        T##_keep(kt, tp, i);                                                                 \
        C m = T##_round(T##_round(m0 * b1) + T##_round(g * omb1));                           \
        C inc;                                                                               \
        if (graph)                                                                           \
            inc = T##_round(g * T##_round(g * omb2));                                        \
        else                                                                                 \
            inc = T##_round(T##_round(g * g) * omb2);                                        \
        C v = T##_round(T##_round(v0 * b2) + inc);                                           \
        T##_st(mp, i, m);                                                                    \
        T##_st(vp, i, v);                                                                    \
        C den = T##_round(T##_round(T##_sqrt(v)) + eps);                                     \
        th = T##_round(th - T##_round(T##_round(alpha * m) / den));                          \
        T##_st(tp, i, th);                                                                   \
        nan |= T##_isnan(v) | T##_isnan(th); /* every NaN input gets there (see dense) */    \
    }

/* This thread slot's scratch: the summed row (acc) and the kept θ, m, v. */
#define SLOT_SCRATCH(S, C)                                                                    \
    char *mine = j->scratch + (size_t)slot * (j->scratch_row_bytes + 3 * j->keep_elements * sizeof(S)); \
    C *acc = (C *)mine;                                                                      \
    S *kt = (S *)(mine + j->scratch_row_bytes), *km = kt + j->keep_elements;                \
    S *kv = km + j->keep_elements;

#define DEFINE_SPARSE(NAME, S, C)                                                             \
    /* The summed gradient of group g, from +0 in order of occurrence. */                    \
    INLINE void sum_##NAME(const sparse_job *j, int64_t g, C *RESTRICT acc) {                \
        const S *values = (const S *)j->values;                                              \
        int64_t n = j->rowlen, i = 0;                                                        \
        NAME##_VECTOR(ZERO_ELEMENT)                                                          \
        LOOP(NAME, C, 1, ZERO_ELEMENT)                                                       \
        for (int64_t o = j->start[g]; o < j->start[g + 1]; ++o) {                            \
            const S *RESTRICT src = values + j->occ[o].pos * n;                              \
            i = 0;                                                                           \
            NAME##_VECTOR(SUM_ELEMENT)                                                       \
            LOOP(NAME, C, 1, SUM_ELEMENT)                                                    \
        }                                                                                    \
    }                                                                                        \
    /* Update n elements in place, keeping the old θ, m, v in kt, km, kv; return     \
     * whether any input was a NaN. */                                                   \
    NOINLINE int sparse_##NAME##_decay(S *RESTRICT tp, S *RESTRICT mp, S *RESTRICT vp,          \
                                     int64_t n, const double *coef, S *RESTRICT kt,          \
                                     S *RESTRICT km, S *RESTRICT kv) {                       \
        int nan = 0;                                                                         \
        int64_t i = 0;                                                                       \
        NAME##_VECTOR(DECAY_ELEMENT)                                                         \
        LOOP(NAME, C, 1, DECAY_ELEMENT)                                                      \
        return nan;                                                                          \
    }                                                                                        \
    NOINLINE int sparse_##NAME##_touch(S *RESTRICT tp, S *RESTRICT mp, S *RESTRICT vp,          \
                                     const C *RESTRICT G, int64_t n, const double *coef,     \
                                     int graph, S *RESTRICT kt, S *RESTRICT km,              \
                                     S *RESTRICT kv) {                                       \
        int nan = 0;                                                                         \
        int64_t i = 0;                                                                       \
        NAME##_VECTOR(TOUCH_ELEMENT)                                                         \
        LOOP(NAME, C, 1, TOUCH_ELEMENT)                                                      \
        return nan;                                                                          \
    }                                                                                        \
    /* After an update of rows [r, r + count) that met a NaN: if a NaN other than the      \
     * default one was among the inputs (the old rows, kept; for a touched row also its   \
     * gradient rows), put the rows back and mark them for the caller's reference. */      \
    static void sparse_##NAME##_settle(sparse_job *j, int64_t r, int64_t count,               \
                                       const S *kt, const S *km, const S *kv, int64_t g) {   \
        int64_t n = count * j->rowlen;                                                       \
        int odd = NAME##_any_nan(kt, n) | NAME##_any_nan(km, n) | NAME##_any_nan(kv, n);    \
        if (g >= 0)                                                                          \
            for (int64_t o = j->start[g]; o < j->start[g + 1] && !odd; ++o)                  \
                odd = NAME##_any_nan((const S *)j->values + j->occ[o].pos * j->rowlen,       \
                                     j->rowlen);                                             \
        if (!odd) return;                                                                    \
        size_t off = (size_t)r * (size_t)j->rowlen, bytes = (size_t)n * sizeof(S);          \
        memcpy((S *)j->theta + off, kt, bytes);                                              \
        memcpy((S *)j->m + off, km, bytes);                                                  \
        memcpy((S *)j->v + off, kv, bytes);                                                  \
        memset(j->nan_rows + r, 1, (size_t)count);                                           \
        atomic_fetch_add(&j->skipped, count);                                                \
    }                                                                                        \
    /* Dense-equivalent: rows [lo, hi) of the table, in one pass. */                          \
    static void sparse_##NAME##_rows(void *ctx, int slot, int64_t lo, int64_t hi) {          \
        sparse_job *j = (sparse_job *)ctx;                                                   \
        const double *k = j->coef;                                                           \
        int64_t n = j->rowlen;                                                               \
        S *theta = (S *)j->theta, *m = (S *)j->m, *v = (S *)j->v;                            \
        SLOT_SCRATCH(S, C)                                                                   \
        int64_t per_block = n <= NAN_BLOCK ? NAN_BLOCK / n : 1; /* rows */             \
        int64_t g = first_group_at_or_after(j, lo);                                          \
        int64_t r = lo;                                                                      \
        while (r < hi) {                                                                     \
            int64_t next = (g < j->ngroups) ? j->occ[j->start[g]].row : hi;                  \
            if (next > hi) next = hi;                                                        \
            if (next > r) {                                                                  \
                int64_t count = next - r < per_block ? next - r : per_block;                 \
                if (sparse_##NAME##_decay(theta + r * n, m + r * n, v + r * n, count * n, k, \
                                          kt, km, kv))                                       \
                    sparse_##NAME##_settle(j, r, count, kt, km, kv, -1);                     \
                r += count;                                                                  \
                continue;                                                                    \
            }                                                                                \
            sum_##NAME(j, g, acc);                                                           \
            if (sparse_##NAME##_touch(theta + r * n, m + r * n, v + r * n, acc, n, k,        \
                                      j->mode == 1, kt, km, kv))                             \
                sparse_##NAME##_settle(j, r, 1, kt, km, kv, g);                              \
            ++g;                                                                             \
            ++r;                                                                             \
        }                                                                                    \
    }                                                                                        \
    /* Lazy: groups [lo, hi) only (cost proportional to the touched rows). */                 \
    static void sparse_##NAME##_groups(void *ctx, int slot, int64_t lo, int64_t hi) {        \
        sparse_job *j = (sparse_job *)ctx;                                                   \
        const double *k = j->coef;                                                           \
        int64_t n = j->rowlen;                                                               \
        S *theta = (S *)j->theta, *m = (S *)j->m, *v = (S *)j->v;                            \
        SLOT_SCRATCH(S, C)                                                                   \
        /* Random rows of a large table: memory latency, not bandwidth, is the       \
         * cost; keep PREFETCH_AHEAD groups' rows in flight while one computes. */   \
        for (int64_t g = lo; g < lo + PREFETCH_AHEAD && g < hi; ++g)                         \
            prefetch_rows(j, g, sizeof(S));                                                  \
        for (int64_t g = lo; g < hi; ++g) {                                                  \
            if (g + PREFETCH_AHEAD < hi) prefetch_rows(j, g + PREFETCH_AHEAD, sizeof(S));    \
            int64_t r = j->occ[j->start[g]].row;                                             \
            sum_##NAME(j, g, acc);                                                           \
            if (sparse_##NAME##_touch(theta + r * n, m + r * n, v + r * n, acc, n, k, 0, kt, \
                                      km, kv))                                               \
                sparse_##NAME##_settle(j, r, 1, kt, km, kv, g);                              \
        }                                                                                    \
    }                                                                                        \
    int tfadam_sparse_##NAME(int64_t nrows, int64_t rowlen, void *theta, void *m, void *v,   \
                             int64_t k, const int64_t *indices, const void *values,          \
                             const double *coef, int mode, int nthreads, uint8_t *nan_rows) { \
        occurrence *occ;                                                                     \
        int status = sort_occurrences(indices, k, nrows, &occ);                              \
        if (status) return status;                                                           \
        int64_t *start = (int64_t *)malloc((size_t)(k + 1) * sizeof(int64_t));              \
        if (!start) {                                                                        \
            free(occ);                                                                       \
            return -1;                                                                       \
        }                                                                                    \
        int64_t groups = 0;                                                                  \
        for (int64_t o = 0; o < k; ++o)                                                      \
            if (o == 0 || occ[o].row != occ[o - 1].row) start[groups++] = o;                 \
        start[groups] = k;                                                                   \
        sparse_job j = {theta, m, v, values, nrows, rowlen, groups, occ, start, {0}, mode,   \
                        NULL, 0, 0, nan_rows, 0};                                            \
        memcpy(j.coef, coef, sizeof j.coef);                                                 \
        int lazy = mode == 2;                                                                \
        int64_t units = lazy ? groups : nrows;                                               \
        int64_t grain = rowlen > 0 ? DENSE_GRAIN / rowlen + 1 : 1;                           \
        int parts = parts_for(units, grain, nthreads);                                       \
        j.scratch_row_bytes = ((size_t)(rowlen > 0 ? rowlen : 1) * sizeof(C) + 63) / 64 * 64; \
        j.keep_elements = ((size_t)(rowlen > NAN_BLOCK ? rowlen : NAN_BLOCK) * sizeof(S) + 63) / 64 * 64 / sizeof(S); \
        j.scratch = (char *)malloc((j.scratch_row_bytes + 3 * j.keep_elements * sizeof(S)) * (size_t)parts); \
        if (!j.scratch) status = -1;                                                         \
        else if (rowlen > 0)                                                                 \
            parallel_for(lazy ? sparse_##NAME##_groups : sparse_##NAME##_rows, &j, units,    \
                         grain, lazy ? 1 : ALIGN / rowlen + 1, parts);                       \
        free(j.scratch);                                                                     \
        free(start);                                                                         \
        free(occ);                                                                           \
        return status ? status : (int)(atomic_load(&j.skipped) > 0);                         \
    }

#if TFADAM_PART != 2
DEFINE_SPARSE(f32, float, float)
DEFINE_SPARSE(f64, double, double)
#endif
#if TFADAM_PART != 1
DEFINE_SPARSE(f16, uint16_t, float)
#endif
#if TFADAM_PART != 2
DEFINE_SPARSE(bf16, uint16_t, float)
#endif

/* Self-checks the loader runs once: the ABI version, and the conversions. */
#if TFADAM_PART != 2
int tfadam_abi_version(void) { return 3; }
int tfadam_nan_block(void) { return NAN_BLOCK; }
#endif
#if TFADAM_PART != 1
uint16_t tfadam_f16_bits(float x) { return f16_bits(x); }
float tfadam_f16_load(uint16_t b) { return f16_load(b); }
uint16_t tfadam_bf16_bits(float x) { return bf16_bits(x); }
#endif
