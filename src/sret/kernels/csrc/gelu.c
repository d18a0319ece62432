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
 *
 * Under bf16 autocast h, the gradient and gelu(h) are bf16: each value is widened, computed in fp32
 * and rounded back (round to nearest even).
 */
#include <omp.h>

#include "vector_math.h"

/* Element `at` onwards of an fp32 or (bf16 set) bf16 array, `valid` lanes. */
static inline __attribute__((always_inline)) vec load(const void *p, long at, vmask valid, int bf16) {
    return bf16 ? v_load_bf16((const unsigned short *)p + at, valid) : v_loadz(valid, (const float *)p + at);
}

/* Stores v there (rounded to bf16 where the array is bf16). */
static inline __attribute__((always_inline)) void store(void *p, long at, vmask valid, vec v, int bf16) {
    if (bf16)
        v_store_bf16((unsigned short *)p + at, valid, v);
    else
        v_storem((float *)p + at, valid, v);
}

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

/* n elements of x (h) and grad, contiguous, fp32 or (bf16 set) bf16: gelu(x) into hidden, the gradient
 * over grad. Inlined with bf16 a constant, so each storage gets its own loop. */
static inline __attribute__((always_inline)) void gelu_backward_range(const void *x, void *grad, void *hidden,
                                                                      long first, long end, int bf16) {
    for (long i = first; i < end; i += VL) {
        vmask valid = v_first(end - i < VL ? (int)(end - i) : VL);
        vec gelu, g = gelu_backward_ps(load(x, i, valid, bf16), load(grad, i, valid, bf16), &gelu);
        store(hidden, i, valid, gelu, bf16);
        store(grad, i, valid, g, bf16);
    }
}

/* Splits the n elements over `threads` threads, each part a whole number of vectors. 0 on success. */
static int gelu_backward(const void *x, void *grad, void *hidden, long n, int threads, int bf16) {
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), count = omp_get_num_threads();
        long first = n * t / count / VL * VL, end = t == count - 1 ? n : n * (t + 1) / count / VL * VL;
        if (bf16)
            gelu_backward_range(x, grad, hidden, first, end, 1);
        else
            gelu_backward_range(x, grad, hidden, first, end, 0);
    }
    return 0;
}

int sret_gelu_backward(const float *x, float *grad, float *hidden, long n, int threads) {
    return gelu_backward(x, grad, hidden, n, threads, 0);
}

int sret_gelu_backward_bf16(const unsigned short *x, unsigned short *grad, unsigned short *hidden, long n,
                            int threads) {
    return gelu_backward(x, grad, hidden, n, threads, 1);
}
