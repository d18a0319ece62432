/*
 * The backward of an MLP's exact (erf) GELU in one pass, fp32, AVX-512 or AVX2 (vector_math.h). Loaded
 * by sret/native.py.
 *
 * Why: a training step that keeps only the pre-activation h (sret.kernels.autograd.MLP) needs, from h
 * and the gradient g of gelu(h), gelu(h) again (for the next layer's weight gradient) and g * gelu'(h).
 * torch computes them in two passes over these hidden-sized tensors, evaluating erf twice; here one
 * pass evaluates erf and exp once per element: gelu'(x) = cdf(x) + x * pdf(x), and the pdf's
 * exp(-x^2/2) is the one that erf's approximation needs anyway.
 *
 * erf follows Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), as torch's vectorised CPU
 * erf does.
 */
#include <omp.h>

#include "vector_math.h"

/* grad * gelu'(x); also gelu(x) into *hidden. */
static inline __attribute__((always_inline)) vec gelu_backward_ps(vec x, vec grad, vec *hidden) {
    const vec one = v_set1(1.f), half = v_set1(0.5f);
    vec z = v_abs(v_mul(x, v_set1(0.70710678118654752f)));
    vec den = v_fmadd(v_set1(0.3275911f), z, one);
    vec t = v_rcp(den);
    t = v_mul(t, v_fnmadd(den, t, v_set1(2.f))); /* one Newton step */
    vec poly = v_set1(1.061405429f);
    poly = v_fmadd(poly, t, v_set1(-1.453152027f));
    poly = v_fmadd(poly, t, v_set1(1.421413741f));
    poly = v_fmadd(poly, t, v_set1(-0.284496736f));
    poly = v_fmadd(poly, t, v_set1(0.254829592f));
    poly = v_mul(poly, t);
    /* e^(-x^2/2), shared by erf's approximation and the Gaussian density */
    /* x^2 capped at 160 keeps e^(-x^2/2) a normal float (denormal arithmetic is many times slower); past
     * |x| = 12.6 every term it feeds is below fp32 resolution next to the rest. */
    vec gauss = exp2_ps(v_mul(v_min(v_mul(x, x), v_set1(160.f)), v_set1(-0.5f * LOG2E)));
    /* erf(x / sqrt 2): the sign of x onto erf(|x| / sqrt 2) */
    vec erf = v_or_sign(v_fnmadd(poly, gauss, one), x);
    vec cdf = v_mul(half, v_add(one, erf));
    *hidden = v_mul(x, cdf);
    vec pdf = v_mul(gauss, v_set1(0.39894228040143268f)); /* 1/sqrt(2 pi) */
    return v_mul(grad, v_fmadd(x, pdf, cdf));
}

/* x (h), grad, hidden: n floats each, contiguous; gelu(x) into hidden, the gradient over grad, the
 * elements split over `threads` threads in whole vectors. */
void sret_gelu_backward(const float *x, float *grad, float *hidden, long n, int threads) {
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), count = omp_get_num_threads();
        long first = n * t / count / VL * VL, end = t == count - 1 ? n : n * (t + 1) / count / VL * VL;
        for (long i = first; i < end; i += VL) {
            vmask valid = v_first(end - i < VL ? (int)(end - i) : VL);
            vec gelu, g = gelu_backward_ps(v_loadz(valid, x + i), v_loadz(valid, grad + i), &gelu);
            v_storem(hidden + i, valid, gelu);
            v_storem(grad + i, valid, g);
        }
    }
}
