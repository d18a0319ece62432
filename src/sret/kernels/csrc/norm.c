/*
 * The passes of a block that sit between its products: LayerNorm and, under bf16 autocast, the
 * residual of a bf16 branch and LayerNorm's backward from a bf16 gradient; fp32 in, AVX-512 or AVX2
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
 * bf16 (round to nearest even). Its backward takes the bf16 gradient as it comes (torch would widen
 * it first, another pass) and the kept row statistics: with xhat = (x - mean) * rstd and g = dy *
 * weight, dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), two passes over the row; the weight and
 * bias gradients sum dy * xhat and dy down the rows (per 64-row block in float, then in double).
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

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
            vec out = v_fmadd(norm, v_loadz(valid, weight + c), v_loadz(valid, bias + c));
            v_store_bf16(y + r * cols + c, valid, out);
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

#define BLOCK_ROWS 64

static void layer_norm_backward_rows(const unsigned short *dy, const float *x, const float *mean, const float *rstd,
                                     const float *weight, float *dx, float *dw, float *db, long r0, long r1,
                                     int cols) {
    for (long r = r0; r < r1; r++) {
        const float *row = x + r * cols;
        const unsigned short *grad = dy + r * cols;
        vec m = v_set1(mean[r]), s = v_set1(rstd[r]), sum_g = v_zero(), sum_gx = v_zero();
        for (int c = 0; c < cols; c += VL) {
            vmask valid = v_first(cols - c);
            vec d = v_load_bf16(grad + c, valid), xhat = v_mul(v_sub(v_loadz(valid, row + c), m), s);
            xhat = v_maskz(valid, xhat);
            vec g = v_mul(d, v_loadz(valid, weight + c));
            sum_g = v_add(sum_g, g);
            sum_gx = v_fmadd(g, xhat, sum_gx);
            v_storem(dw + c, valid, v_fmadd(d, xhat, v_loadz(valid, dw + c)));
            v_storem(db + c, valid, v_add(d, v_loadz(valid, db + c)));
        }
        vec a = v_set1(v_reduce_add(sum_g) / cols), b = v_set1(v_reduce_add(sum_gx) / cols);
        for (int c = 0; c < cols; c += VL) {
            vmask valid = v_first(cols - c);
            vec d = v_load_bf16(grad + c, valid), xhat = v_mul(v_sub(v_loadz(valid, row + c), m), s);
            vec g = v_mul(d, v_loadz(valid, weight + c));
            v_storem(dx + r * cols + c, valid, v_mul(s, v_sub(v_sub(g, a), v_mul(xhat, b))));
        }
    }
}

/* dy: rows x cols bf16; x: rows x cols fp32 with its rows' mean and rstd; weight: cols. Writes dx (rows x
 * cols fp32), dw and db (cols fp32, either may be NULL). 0 on success. */
int sret_layer_norm_backward_bf16(const unsigned short *dy, const float *x, const float *mean, const float *rstd,
                                  const float *weight, float *dx, float *dw, float *db, long rows, int cols,
                                  int threads) {
    if (threads < 1) threads = 1;
    double *totals = calloc((size_t)threads * 2 * cols, sizeof(double));
    if (!totals) return 1;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int t = omp_get_thread_num(), count = omp_get_num_threads();
        long first = rows * t / count, end = rows * (t + 1) / count;
        float *block = calloc((size_t)2 * cols + 2 * VL, sizeof(float));
        double *total = totals + (long)t * 2 * cols;
        if (!block) failed = 1;
        for (long r0 = first; r0 < end && block; r0 += BLOCK_ROWS) {
            long r1 = r0 + BLOCK_ROWS < end ? r0 + BLOCK_ROWS : end;
            layer_norm_backward_rows(dy, x, mean, rstd, weight, dx, block, block + cols + VL, r0, r1, cols);
            for (int c = 0; c < cols; c++) {
                total[c] += block[c], total[cols + c] += block[cols + VL + c];
                block[c] = block[cols + VL + c] = 0.f;
            }
        }
        free(block);
    }
    for (int c = 0; c < cols && !failed; c++) {
        double w = 0., b = 0.;
        for (int t = 0; t < threads; t++) w += totals[(long)t * 2 * cols + c], b += totals[(long)t * 2 * cols + cols + c];
        if (dw) dw[c] = (float)w;
        if (db) db[c] = (float)b;
    }
    free(totals);
    return failed;
}
