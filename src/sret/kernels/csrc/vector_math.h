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

#endif
