/*
 * BatchNorm on batch statistics followed by ReLU, fp32, channels-last (rows x channels), forward and
 * backward: the conv stem in training. AVX-512 or AVX2 (vector_math.h). Loaded by sret/native.py.
 *
 * Why: torch runs this as BatchNorm (a statistics pass and a normalising pass), ReLU in place (a
 * third pass), and in backward ReLU's gradient (a pass writing a new tensor), then BatchNorm's (a
 * reduction pass and a pass writing another). The stem's activations are the largest tensors of the
 * model, so each pass is a trip to memory, and each new tensor that size is fresh pages for the
 * kernel to fault in. Here the forward reads x twice and writes y once; the backward reads the
 * gradient and x twice and writes the input gradient once, into one new tensor, with ReLU's mask
 * recomputed from x by the forward's own arithmetic (so it is the forward's mask, bit for bit).
 *
 * Statistics: per channel, sums of d = x - s and d * d, where s is the channel's value in the first
 * row (a shift that keeps the sums small where the mean is large against the spread; 0 if that value
 * is not finite), in float per block of 64 rows, then in double. mean = s + S1 / N and the biased
 * variance S2 / N - (S1 / N)^2, as BatchNorm normalises with. y = max(0, (x - mean) * a + bias),
 * a = weight * invstd, NaN kept NaN (as torch's ReLU keeps it); centring first keeps the result
 * accurate where the mean is large against the spread (x * a + (bias - mean * a) would cancel).
 * Backward: xc = x - mean; g = dy where y is not <= 0 (ReLU's gradient in torch, which lets a NaN
 * output through), else 0; dbias = sum g, dweight = invstd * sum g * xc, and
 * dx = a * (g - dbias / N - xc * invstd^2 * (sum g * xc) / N).
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "vector_math.h"

#define BLOCK_ROWS 64

/* Adds the per-block float sums (2 x channels) to the thread's double totals and clears them. */
static void flush(float *block, double *total, int channels) {
    for (int c = 0; c < 2 * channels; c++) total[c] += block[c], block[c] = 0.f;
}

/* Sums over all threads' totals (threads x 2 x channels) into the first. */
static void combine(double *totals, int threads, int channels) {
    for (int t = 1; t < threads; t++)
        for (int c = 0; c < 2 * channels; c++) totals[c] += totals[(long)t * 2 * channels + c];
}

/* a = weight * invstd per channel: one function, so that forward and backward compute it alike, and
 * with it the same ReLU mask. */
static void scale(const float *weight, const float *invstd, float *a, int channels) {
    for (int c = 0; c < channels; c++) a[c] = weight[c] * invstd[c];
}

static void shifted_sums(const float *x, const float *shift, float *block, long r0, long r1, int channels) {
    for (long r = r0; r < r1; r++) {
        const float *row = x + r * channels;
        for (int c = 0; c < channels; c += VL) {
            vmask valid = v_first(channels - c);
            vec d = v_maskz(valid, v_sub(v_loadz(valid, row + c), v_loadz(valid, shift + c)));
            v_storem(block + c, valid, v_add(v_loadz(valid, block + c), d));
            v_storem(block + channels + c, valid, v_fmadd(d, d, v_loadz(valid, block + channels + c)));
        }
    }
}

/* (x - mean) * a + bias: the normalised value before ReLU, as forward and backward compute it. */
static inline vec normalised(vec xc, const float *a, const float *bias, vmask valid) {
    return v_fmadd(xc, v_loadz(valid, a), v_loadz(valid, bias));
}

static void normalise_relu(const float *x, const float *mean, const float *a, const float *bias, float *y, long r0,
                           long r1, int channels) {
    for (long r = r0; r < r1; r++) {
        for (int c = 0; c < channels; c += VL) {
            vmask valid = v_first(channels - c);
            vec xc = v_sub(v_loadz(valid, x + r * channels + c), v_loadz(valid, mean + c));
            vec z = normalised(xc, a + c, bias + c, valid);
            v_storem(y + r * channels + c, valid, v_max(v_zero(), z));
        }
    }
}

/* g, the gradient through ReLU at (row r, channels c...), and xc = x - mean there (see the top): ReLU's
 * mask recomputed by the forward's arithmetic, one place for both backward passes. */
static inline vec relu_gradient(const float *dy, const float *x, const float *mean, const float *a,
                                const float *bias, long r, int c, int channels, vmask valid, vec *xc) {
    *xc = v_sub(v_loadz(valid, x + r * channels + c), v_loadz(valid, mean + c));
    vec z = normalised(*xc, a + c, bias + c, valid);
    return v_maskz(v_not_le(z, v_zero()), v_loadz(valid, dy + r * channels + c));
}

/* Per-channel sums of g and g * (x - mean), g the gradient through ReLU (see the top). */
static void gradient_sums(const float *dy, const float *x, const float *mean, const float *a, const float *bias,
                          float *block, long r0, long r1, int channels) {
    for (long r = r0; r < r1; r++) {
        for (int c = 0; c < channels; c += VL) {
            vmask valid = v_first(channels - c);
            vec xc, g = relu_gradient(dy, x, mean, a, bias, r, c, channels, valid, &xc);
            v_storem(block + c, valid, v_add(v_loadz(valid, block + c), g));
            v_storem(block + channels + c, valid, v_fmadd(g, xc, v_loadz(valid, block + channels + c)));
        }
    }
}

/* The two per-channel sums each direction needs, over all rows, split over `threads` (float per block
 * of BLOCK_ROWS rows, then double): of x - shift and its square where `dy` is NULL (the forward;
 * `center` is the shift), else of g and g * (x - mean) (the backward; `center` is the mean). Returns
 * the 2 x channels totals (the caller frees them), or NULL if a buffer could not be allocated. */
static double *channel_sums(const float *dy, const float *x, const float *center, const float *a,
                            const float *bias, long rows, int channels, int threads) {
    double *totals = calloc((size_t)threads * 2 * channels, sizeof(double));
    if (!totals) return 0;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int t = omp_get_thread_num(), count = omp_get_num_threads();
        long first = rows * t / count, end = rows * (t + 1) / count;
        float *block = calloc((size_t)2 * channels, sizeof(float));
        if (!block) failed = 1;
        for (long r0 = first; r0 < end && block; r0 += BLOCK_ROWS) {
            long r1 = r0 + BLOCK_ROWS < end ? r0 + BLOCK_ROWS : end;
            if (dy)
                gradient_sums(dy, x, center, a, bias, block, r0, r1, channels);
            else
                shifted_sums(x, center, block, r0, r1, channels);
            flush(block, totals + (long)t * 2 * channels, channels);
        }
        free(block);
    }
    if (failed) return free(totals), (double *)0;
    combine(totals, threads, channels);
    return totals;
}

/* x, y: rows x channels; weight, bias: channels; writes mean, var (biased) and invstd (channels each).
 * 0 on success, 1 if a buffer could not be allocated. */
int sret_batch_norm_relu(const float *x, const float *weight, const float *bias, float *y, float *mean,
                         float *var, float *invstd, long rows, int channels, float eps, int threads) {
    if (threads < 1) threads = 1;
    float *shift = malloc((size_t)2 * channels * sizeof(float));
    if (!shift) return 1;
    float *a = shift + channels;
    for (int c = 0; c < channels; c++) shift[c] = isfinite(x[c]) ? x[c] : 0.f;
    double *totals = channel_sums(0, x, shift, 0, 0, rows, channels, threads);
    if (totals) {
        for (int c = 0; c < channels; c++) {
            double m1 = totals[c] / rows, v = totals[channels + c] / rows - m1 * m1;
            mean[c] = (float)(shift[c] + m1), var[c] = (float)(v < 0. ? 0. : v); /* NaN stays NaN */
            invstd[c] = (float)(1. / sqrt((double)var[c] + eps));
        }
        scale(weight, invstd, a, channels);
#pragma omp parallel num_threads(threads)
        {
            int t = omp_get_thread_num(), count = omp_get_num_threads();
            normalise_relu(x, mean, a, bias, y, rows * t / count, rows * (t + 1) / count, channels);
        }
    }
    int failed = !totals;
    free(totals), free(shift);
    return failed;
}

/* dx = g * a + xc * k + m, with k and m per channel (see the top). */
static void input_gradient(const float *dy, const float *x, const float *mean, const float *a, const float *bias,
                           const float *k, const float *m, float *dx, long r0, long r1, int channels) {
    for (long r = r0; r < r1; r++) {
        for (int c = 0; c < channels; c += VL) {
            vmask valid = v_first(channels - c);
            vec xc, g = relu_gradient(dy, x, mean, a, bias, r, c, channels, valid, &xc);
            vec out = v_fmadd(g, v_loadz(valid, a + c), v_fmadd(xc, v_loadz(valid, k + c), v_loadz(valid, m + c)));
            v_storem(dx + r * channels + c, valid, out);
        }
    }
}

/* dy, x, dx: rows x channels (dx may be dy: each element is read before it is written); weight, bias,
 * mean, invstd: channels, as the forward used and wrote them. Writes dx, dweight and dbias (channels).
 * 0 on success, 1 if a buffer could not be allocated. */
int sret_batch_norm_relu_backward(const float *dy, const float *x, const float *weight, const float *bias,
                                  const float *mean, const float *invstd, float *dx, float *dweight,
                                  float *dbias, long rows, int channels, int threads) {
    if (threads < 1) threads = 1;
    float *a = malloc((size_t)3 * channels * sizeof(float));
    if (!a) return 1;
    float *k = a + channels, *m = k + channels;
    scale(weight, invstd, a, channels);
    double *totals = channel_sums(dy, x, mean, a, bias, rows, channels, threads);
    if (totals) {
        for (int c = 0; c < channels; c++) {
            double sum = totals[c], dot = totals[channels + c], s = invstd[c];
            dbias[c] = (float)sum, dweight[c] = (float)(dot * s);
            k[c] = (float)(-a[c] * s * s * dot / rows), m[c] = (float)(-a[c] * sum / rows);
        }
#pragma omp parallel num_threads(threads)
        {
            int t = omp_get_thread_num(), count = omp_get_num_threads();
            input_gradient(dy, x, mean, a, bias, k, m, dx, rows * t / count, rows * (t + 1) / count, channels);
        }
    }
    int failed = !totals;
    free(totals), free(a);
    return failed;
}
