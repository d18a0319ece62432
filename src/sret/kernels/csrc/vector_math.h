/*
 * The vector operations SReT's C kernels are written in, for two instruction sets: AVX-512 (16 floats
 * a vector, mask registers) where the library is built with -mavx512f, else AVX2 with FMA (8 floats,
 * masks as vectors of all-ones lanes). Every mask the kernels use holds the first n lanes of a vector
 * (v_first), so that a row's tail is loaded with zeros and stored without touching what follows it.
 */
#ifndef SRET_VECTOR_MATH_H
#define SRET_VECTOR_MATH_H

#include <immintrin.h>

#ifdef __AVX512F__

#define VL 16
typedef __m512 vec;
typedef __mmask16 vmask;

static inline vmask v_first(int n) { return n >= VL ? (vmask)0xFFFF : (vmask)((1u << (n > 0 ? n : 0)) - 1); }
static inline vec v_zero(void) { return _mm512_setzero_ps(); }
static inline vec v_set1(float x) { return _mm512_set1_ps(x); }
static inline vec v_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void v_store(float *p, vec v) { _mm512_storeu_ps(p, v); }
static inline vec v_loadz(vmask m, const float *p) { return _mm512_maskz_loadu_ps(m, p); }
static inline void v_storem(float *p, vmask m, vec v) { _mm512_mask_storeu_ps(p, m, v); }
static inline vec v_add(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec v_sub(vec a, vec b) { return _mm512_sub_ps(a, b); }
static inline vec v_mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline vec v_fmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec v_fnmadd(vec a, vec b, vec c) { return _mm512_fnmadd_ps(a, b, c); }
static inline vec v_max(vec a, vec b) { return _mm512_max_ps(a, b); }
static inline vec v_min(vec a, vec b) { return _mm512_min_ps(a, b); }
static inline vec v_maskz(vmask m, vec v) { return _mm512_maskz_mov_ps(m, v); } /* v, 0 outside m */
static inline vmask v_not_le(vec a, vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_NLE_UQ); } /* !(a <= b): NaN too */
static inline vec v_select(vmask m, vec a, vec b) { return _mm512_mask_mov_ps(b, m, a); } /* m ? a : b */
static inline float v_reduce_max(vec v) { return _mm512_reduce_max_ps(v); }
static inline float v_reduce_add(vec v) { return _mm512_reduce_add_ps(v); }
static inline vec v_abs(vec v) { return _mm512_abs_ps(v); }
static inline vec v_rcp(vec v) { return _mm512_rcp14_ps(v); } /* 14 bits */
static inline vec v_round(vec v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* v with the sign bit of `sign` or-ed in: copysign for a non-negative v */
static inline vec v_or_sign(vec v, vec sign) {
    __m512i bit = _mm512_and_si512(_mm512_castps_si512(sign), _mm512_set1_epi32((int)0x80000000u));
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(v), bit));
}
/* p * 2^k for integral k: scalef is exact, and underflows to 0 below the float range */
static inline vec v_scale2(vec p, vec k) { return _mm512_scalef_ps(p, k); }

/* bf16 <-> fp32. A bf16 is the high half of an fp32, so widening is exact; narrowing rounds to nearest
 * even and keeps NaNs NaN, as torch's conversion does. */
static inline vec v_load_bf16(const unsigned short *x, vmask m) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, x));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

static inline void v_store_bf16(unsigned short *x, vmask m, vec v) {
    __m512i bits = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(bits, _mm512_set1_epi32(0x400000)));
    _mm256_mask_storeu_epi16(x, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}

#else /* AVX2 and FMA */

#define VL 8
typedef __m256 vec;
typedef __m256i vmask;

static inline vmask v_first(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline vec v_zero(void) { return _mm256_setzero_ps(); }
static inline vec v_set1(float x) { return _mm256_set1_ps(x); }
static inline vec v_load(const float *p) { return _mm256_loadu_ps(p); }
static inline void v_store(float *p, vec v) { _mm256_storeu_ps(p, v); }
/* Masked moves take the plain instruction where the mask is full: AVX2's masked store is microcoded on
 * some CPUs (many times a plain store's cost on the AMD EPYCs measured), and nearly every mask the
 * kernels pass is full. */
static inline int v_full(vmask m) { return _mm256_movemask_ps(_mm256_castsi256_ps(m)) == 0xFF; }
static inline vec v_loadz(vmask m, const float *p) { return v_full(m) ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, m); }
static inline void v_storem(float *p, vmask m, vec v) {
    if (v_full(m))
        _mm256_storeu_ps(p, v);
    else
        _mm256_maskstore_ps(p, m, v);
}
static inline vec v_add(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec v_sub(vec a, vec b) { return _mm256_sub_ps(a, b); }
static inline vec v_mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline vec v_fmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec v_fnmadd(vec a, vec b, vec c) { return _mm256_fnmadd_ps(a, b, c); }
static inline vec v_max(vec a, vec b) { return _mm256_max_ps(a, b); }
static inline vec v_min(vec a, vec b) { return _mm256_min_ps(a, b); }
static inline vec v_maskz(vmask m, vec v) { return _mm256_and_ps(_mm256_castsi256_ps(m), v); }
static inline vmask v_not_le(vec a, vec b) { return _mm256_castps_si256(_mm256_cmp_ps(a, b, _CMP_NLE_UQ)); }
static inline vec v_select(vmask m, vec a, vec b) { return _mm256_blendv_ps(b, a, _mm256_castsi256_ps(m)); }
static inline float v_reduce_max(vec v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}
static inline float v_reduce_add(vec v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}
static inline vec v_abs(vec v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), v); }
static inline vec v_rcp(vec v) { return _mm256_rcp_ps(v); } /* 12 bits */
static inline vec v_round(vec v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vec v_or_sign(vec v, vec sign) { return _mm256_or_ps(v, _mm256_and_ps(sign, _mm256_set1_ps(-0.f))); }
/* p * 2^k for integral k, built in the exponent field: 0 below 2^-126 (no subnormals), k clamped
 * above at 2^127; a NaN k gives NaN. */
static inline vec v_scale2(vec p, vec k) {
    __m256 clamped = _mm256_min_ps(_mm256_max_ps(k, _mm256_set1_ps(-127.f)), _mm256_set1_ps(127.f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(clamped), _mm256_set1_epi32(127)), 23);
    __m256 scaled = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_blendv_ps(scaled, k, _mm256_cmp_ps(k, k, _CMP_UNORD_Q));
}

/* The lanes a prefix mask holds. */
static inline int v_count(vmask m) { return __builtin_popcount(_mm256_movemask_ps(_mm256_castsi256_ps(m))); }

static inline vec v_load_bf16(const unsigned short *x, vmask m) {
    int n = v_count(m);
    unsigned short tail[VL] = {0};
    if (n < VL) {
        for (int i = 0; i < n; i++) tail[i] = x[i];
        x = tail;
    }
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)x));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

static inline void v_store_bf16(unsigned short *x, vmask m, vec v) {
    __m256i bits = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
    __m256i quiet = _mm256_or_si256(bits, _mm256_set1_epi32(0x400000));
    rounded = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(quiet),
                                                   _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    __m256i high = _mm256_srli_epi32(rounded, 16); /* 8 values < 2^16: pack them to 16 bits in order */
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1));
    int n = v_count(m);
    if (n == VL) {
        _mm_storeu_si128((__m128i *)x, packed);
        return;
    }
    unsigned short tail[VL];
    _mm_storeu_si128((__m128i *)tail, packed);
    for (int i = 0; i < n; i++) x[i] = tail[i];
}

#endif

/* 2^x: 2^k * 2^r with k = round(x), r in [-1/2, 1/2], 2^r by its degree-6 Taylor polynomial
 * (relative error below 1e-7). */
static inline vec exp2_ps(vec x) {
    vec k = v_round(x);
    vec r = v_sub(x, k);
    vec p = v_set1(1.5403530393381609e-4f);
    p = v_fmadd(p, r, v_set1(1.3333558146428443e-3f));
    p = v_fmadd(p, r, v_set1(9.6181291076284772e-3f));
    p = v_fmadd(p, r, v_set1(5.5504108664821580e-2f));
    p = v_fmadd(p, r, v_set1(2.4022650695910071e-1f));
    p = v_fmadd(p, r, v_set1(6.9314718055994531e-1f));
    p = v_fmadd(p, r, v_set1(1.f));
    return v_scale2(p, k);
}

#define LOG2E 1.44269504088896341f

#endif
