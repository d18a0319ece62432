/*
 * The two passes of a bf16-autocast block that sit between its products, fp32 in, AVX-512 or AVX2
 * (vector_math.h). Loaded by sret/native.py.
 *
 * Why: under bf16 autocast the residual stream stays fp32 and every product takes bf16. torch then
 * runs LayerNorm in fp32, writes an fp32 result and casts it to bf16 for the next product (three
 * passes over the tokens), and adds a bf16 branch to the fp32 stream through a dtype-promoting
 * elementwise kernel several times slower than an fp32 one. Here LayerNorm reads each fp32 row once
 * and writes the bf16 row the product takes (per-row mean and reciprocal standard deviation kept for
 * the backward), and the residual `skip * x + branch` is one pass that widens the branch as it reads.
 *
 * LayerNorm: mean, then the variance as the mean of squared deviations (two passes over a row that
 * stays in L1, as stable as torch's), y = (x - mean) * rstd * weight + bias in fp32, rounded once to
 * bf16 (round to nearest even).
 */
#include <math.h>
#include <omp.h>

#include "vector_math.h"

static void layer_norm_rows(const float *x, const float *weight, const float *bias, unsigned short *y,
                            float *mean, float *rstd, long r0, long r1, int cols, float eps) {
    for (long r = r0; r < r1; r++) {
        const float *row = x + r * cols;
        vec sum = v_zero();
        for (int c = 0; c < cols; c += VL) sum = v_add(sum, v_loadz(v_first(cols - c), row + c));
        float mu = v_reduce_add(sum) / cols;
        vec m = v_set1(mu), squares = v_zero();
        for (int c = 0; c < cols; c += VL) {
            vmask valid = v_first(cols - c);
            vec d = v_maskz(valid, v_sub(v_loadz(valid, row + c), m));
            squares = v_fmadd(d, d, squares);
        }
        float inv = 1.f / sqrtf(v_reduce_add(squares) / cols + eps);
        vec s = v_set1(inv);
        for (int c = 0; c < cols; c += VL) {
            vmask valid = v_first(cols - c);
            vec norm = v_mul(v_sub(v_loadz(valid, row + c), m), s);
            v_store_bf16(y + r * cols + c, valid,
                         v_fmadd(norm, v_loadz(valid, weight + c), v_loadz(valid, bias + c)));
        }
        if (mean) mean[r] = mu, rstd[r] = inv;
    }
}

/* x: rows x cols fp32; y: rows x cols bf16; mean, rstd: rows floats, or both NULL. 0 on success. */
int sret_layer_norm_bf16(const float *x, const float *weight, const float *bias, unsigned short *y, float *mean,
                         float *rstd, long rows, int cols, float eps, int threads) {
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), count = omp_get_num_threads();
        layer_norm_rows(x, weight, bias, y, mean, rstd, rows * t / count, rows * (t + 1) / count, cols, eps);
    }
    return 0;
}

/* out = skip * x + branch over n elements: x and out fp32, branch bf16. 0 on success. */
int sret_scaled_residual_bf16(const float *x, const unsigned short *branch, float skip, float *out, long n,
                              int threads) {
    if (threads < 1) threads = 1;
    vec a = v_set1(skip);
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), count = omp_get_num_threads();
        long first = n * t / count / VL * VL, end = t == count - 1 ? n : n * (t + 1) / count / VL * VL;
        for (long i = first; i < end; i += VL) {
            vmask valid = v_first(end - i < VL ? (int)(end - i) : VL);
            v_storem(out + i, valid, v_fmadd(a, v_loadz(valid, x + i), v_load_bf16(branch + i, valid)));
        }
    }
    return 0;
}
