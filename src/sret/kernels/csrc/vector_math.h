/* AVX-512 helpers shared by SReT's C kernels. */
#ifndef SRET_VECTOR_MATH_H
#define SRET_VECTOR_MATH_H

#include <immintrin.h>

/* 2^x: 2^k * 2^r with k = round(x), r in [-1/2, 1/2], 2^r by its degree-6 Taylor polynomial
 * (relative error below 1e-7); scalef makes 2^k exact and underflows to 0 below the float range. */
static inline __m512 exp2_ps(__m512 x) {
    __m512 k = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_sub_ps(x, k);
    __m512 p = _mm512_set1_ps(1.5403530393381609e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.6181291076284772e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.5504108664821580e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.4022650695910071e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.9314718055994531e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, k);
}

#define LOG2E 1.44269504088896341f

/* bf16 <-> fp32 for `count` <= 16 values (the rest of the vector zero / untouched). A bf16 is the high
 * half of an fp32, so widening is exact; narrowing rounds to nearest even and keeps NaNs NaN, as
 * torch's conversion does. */
static inline __m512 load_bf16(const unsigned short *x, __mmask16 lanes) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, x));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

static inline void store_bf16(unsigned short *x, __mmask16 lanes, __m512 v) {
    __m512i bits = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(bits, _mm512_set1_epi32(0x400000)));
    _mm256_mask_storeu_epi16(x, lanes, _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}

#endif
