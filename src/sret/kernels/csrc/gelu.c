/*
 * The backward of an MLP's exact (erf) GELU in one pass, fp32, AVX-512 or AVX2 (vector_math.h). Loaded
 * by sret/native.py.
 *
 * Why: a training step that keeps only the pre-activation h (sret.model.HiddenRecomputed) needs,
 * from h and the gradient g of gelu(h), three things: gelu(h) again (for the next layer's weight
 * gradient), g * gelu'(h), and the column sums of the latter (the bias gradient). torch computes them
 * in three passes over these hidden-sized tensors, evaluating erf twice; here one pass evaluates erf
 * and exp once per element: gelu'(x) = cdf(x) + x * pdf(x), and the pdf's exp(-x^2/2) is the one
 * that erf's approximation needs anyway.
 *
 * erf follows Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), as torch's vectorised CPU
 * erf does.
 *
 * Under bf16 autocast h, the gradient and gelu(h) are bf16: each value is widened, computed in fp32
 * and rounded back (round to nearest even); the bias gradient sums the rounded gradient in fp32.
 */
#include <omp.h>
#include <stdlib.h>

#include "vector_math.h"

#define BLOCK_ROWS 64 /* rows summed in float before the sum moves to a double accumulator */

/* Element `at` onwards of an fp32 or (bf16 set) bf16 array, `valid` lanes. */
static inline __attribute__((always_inline)) vec load(const void *p, long at, vmask valid, int bf16) {
    return bf16 ? v_load_bf16((const unsigned short *)p + at, valid) : v_loadz(valid, (const float *)p + at);
}

/* Stores v there, and returns what was stored (v rounded to bf16 where the array is bf16). */
static inline __attribute__((always_inline)) vec store(void *p, long at, vmask valid, vec v, int bf16) {
    if (!bf16) {
        v_storem((float *)p + at, valid, v);
        return v;
    }
    v_store_bf16((unsigned short *)p + at, valid, v);
    return v_load_bf16((const unsigned short *)p + at, valid);
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

/* Rows [r0, r1): the gradient over grad, gelu into hidden (unless NULL), the gradient's column sums
 * added into block (unless NULL). Inlined with bf16 a constant, so each storage gets its own loop. */
static inline __attribute__((always_inline)) void gelu_backward_rows(const void *x, void *grad, void *hidden,
                                                                     float *block, long r0, long r1, int cols,
                                                                     int bf16) {
    for (long r = r0; r < r1; r++) {
        long at = r * cols;
        for (int c = 0; c < cols; c += VL) {
            vmask valid = v_first(cols - c);
            vec gelu, g = gelu_backward_ps(load(x, at + c, valid, bf16), load(grad, at + c, valid, bf16), &gelu);
            if (hidden) store(hidden, at + c, valid, gelu, bf16);
            g = store(grad, at + c, valid, g, bf16);
            if (block) v_store(block + c, v_add(v_load(block + c), g));
        }
    }
}

/* x, grad, hidden (may be NULL): rows x cols, contiguous, fp32 or (bf16 set) bf16; the result overwrites
 * grad. bias_grad (fp32, cols, may be NULL): column sums of the result. */
static int gelu_backward(const void *x, void *grad, void *hidden, float *bias_grad, long rows, int cols,
                         int threads, int bf16) {
    int failed = 0;
    double *totals = 0;
    if (threads < 1) threads = 1;
    if (bias_grad) {
        totals = calloc((size_t)threads * cols, sizeof(double));
        if (!totals) return 1;
    }
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int t = omp_get_thread_num(), count = omp_get_num_threads();
        long first = rows * t / count, end = rows * (t + 1) / count;
        float *block = 0;
        if (bias_grad && !(block = calloc((size_t)cols + VL, sizeof(float)))) failed = 1;
        double *total = totals ? totals + (long)t * cols : 0;
        for (long r0 = first; r0 < end && !failed; r0 += BLOCK_ROWS) {
            long r1 = r0 + BLOCK_ROWS < end ? r0 + BLOCK_ROWS : end;
            if (bf16)
                gelu_backward_rows(x, grad, hidden, block, r0, r1, cols, 1);
            else
                gelu_backward_rows(x, grad, hidden, block, r0, r1, cols, 0);
            if (block)
                for (int c = 0; c < cols; c++) {
                    total[c] += block[c];
                    block[c] = 0.f;
                }
        }
        free(block);
    }
    if (bias_grad && !failed)
        for (int c = 0; c < cols; c++) {
            double sum = 0.;
            for (int t = 0; t < threads; t++) sum += totals[(long)t * cols + c];
            bias_grad[c] = (float)sum;
        }
    free(totals);
    return failed;
}

int sret_gelu_backward(const float *x, float *grad, float *hidden, float *bias_grad, long rows, int cols,
                       int threads) {
    return gelu_backward(x, grad, hidden, bias_grad, rows, cols, threads, 0);
}

int sret_gelu_backward_bf16(const unsigned short *x, unsigned short *grad, unsigned short *hidden,
                            float *bias_grad, long rows, int cols, int threads) {
    return gelu_backward(x, grad, hidden, bias_grad, rows, cols, threads, 1);
}
