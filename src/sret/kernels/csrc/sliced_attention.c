/*
 * Softmax attention for SReT's short token groups and narrow heads, forward and backward, in fp32
 * with AVX-512 or AVX2 (vector_math.h). Loaded by sret/native.py, which compiles it on first use.
 *
 * Why: torch's CPU flash-attention kernel works through small query blocks with one library GEMM call
 * per block; with 32-wide heads and groups of 49-392 tokens those calls and the per-block softmax
 * bookkeeping cost more than the products. Here one (group, head) pair is attended at a time: its
 * scores for eight queries stay in registers while they are produced, a whole row of scores stays in
 * L1, and q, k, v are read straight from the qkv projection's output, and the result and gradients
 * written straight into the layouts the projections use (no head split or merge copies).
 *
 * Layout: qkv holds rows of 3*H*D floats (q, k, v of all heads of one token), BG*n rows (BG groups
 * of n tokens); out holds rows of H*D. Scores are computed in base 2 (the keys are packed scaled by
 * scale * log2(e)), so the softmax takes 2^x. lse holds, per (group, head) pair, each query's
 * base-2 log-sum-exp of those scores, which the backward uses to recompute the probabilities instead
 * of storing them. Head widths up to 48 (three AVX-512 vectors, six AVX2 ones).
 *
 * Both directions also read and write bf16 tensors (under autocast): each (group, head) pair is
 * widened into an fp32 scratch block, attended (or differentiated) in fp32 as above and rounded back,
 * so the products and the softmax are fp32 whatever the storage, and the result is the fp32 kernel's
 * on the widened values, rounded once.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "vector_math.h"

#define ROWS 8 /* queries (or keys) per block of scores */
#define MAX_VECTORS (48 / VL) /* a row of q, k or v: up to 48 floats */
#if VL == 16
#define WROWS 8 /* rows per register block of weighted_rows: WROWS x MAX_VECTORS accumulators */
#else
#define WROWS 2
#endif

/* out[r][j] = sum_d a[r][d] * bt[d][j] for r < rows, j < width (a multiple of VL). */
static inline __attribute__((always_inline)) void rows_times_packed(const float *a, long lda, int rows,
                                                                    const float *bt, int width, int depth,
                                                                    float *out) {
    for (int j0 = 0; j0 < width; j0 += VL) {
        vec acc[ROWS];
        for (int r = 0; r < ROWS; r++) acc[r] = v_zero();
        for (int d = 0; d < depth; d++) {
            vec b = v_load(bt + (long)d * width + j0);
            for (int r = 0; r < ROWS; r++)
                if (r < rows) acc[r] = v_fmadd(v_set1(a[r * lda + d]), b, acc[r]);
        }
        for (int r = 0; r < ROWS; r++)
            if (r < rows) v_store(out + (long)r * width + j0, acc[r]);
    }
}

/* out[r] = scale * f[r] * sum_j w(r, j) * v[j] for r < rows, where w(r, j) = w[r * w_row + j * w_col]
 * and the rows of v and out are `vectors` vectors wide, the last one masked by `last`. */
static inline __attribute__((always_inline)) void weighted_rows(int vectors, const float *w, long w_row,
                                                                long w_col, int m, int rows, const float *v,
                                                                long ldv, vmask last, float *out,
                                                                long ldo, const float *f, float scale) {
    vmask full = v_first(VL);
    for (int r0 = 0; r0 < rows; r0 += WROWS) {
        int block = rows - r0 < WROWS ? rows - r0 : WROWS;
        vec acc[WROWS][MAX_VECTORS];
        for (int r = 0; r < WROWS; r++)
            for (int t = 0; t < vectors; t++) acc[r][t] = v_zero();
        for (int j = 0; j < m; j++) {
            vec vj[MAX_VECTORS];
            for (int t = 0; t < vectors; t++)
                vj[t] = v_loadz(t == vectors - 1 ? last : full, v + (long)j * ldv + VL * t);
            for (int r = 0; r < WROWS; r++)
                if (r < block) {
                    vec wr = v_set1(w[(r0 + r) * w_row + (long)j * w_col]);
                    for (int t = 0; t < vectors; t++) acc[r][t] = v_fmadd(wr, vj[t], acc[r][t]);
                }
        }
        for (int r = 0; r < WROWS; r++)
            if (r < block) {
                vec s = v_set1(f ? f[r0 + r] * scale : scale);
                for (int t = 0; t < vectors; t++)
                    v_storem(out + (long)(r0 + r) * ldo + VL * t, t == vectors - 1 ? last : full,
                             v_mul(acc[r][t], s));
            }
    }
}

/* weighted_rows with the vector count a compile-time constant (1 to MAX_VECTORS), so its accumulators
 * are registers; counts above MAX_VECTORS never occur, and AT_MOST keeps them in bounds. */
#define AT_MOST(n) ((n) < MAX_VECTORS ? (n) : MAX_VECTORS)
#define WEIGHTED_ROWS(vectors, ...)                          \
    do {                                                     \
        switch (vectors) {                                   \
            case 1: weighted_rows(1, __VA_ARGS__); break;          \
            case 2: weighted_rows(AT_MOST(2), __VA_ARGS__); break; \
            case 3: weighted_rows(AT_MOST(3), __VA_ARGS__); break; \
            case 4: weighted_rows(AT_MOST(4), __VA_ARGS__); break; \
            case 5: weighted_rows(AT_MOST(5), __VA_ARGS__); break; \
            default: weighted_rows(MAX_VECTORS, __VA_ARGS__);      \
        }                                                    \
    } while (0)

/* xt[d][j] = scale * x[j][d], keys padded with zeros to `width`. */
static void pack_transposed(const float *x, long ldx, int n, int width, int depth, float scale, float *xt) {
    for (int d = 0; d < depth; d++) {
        float *row = xt + (long)d * width;
        for (int j = 0; j < n; j++) row[j] = x[(long)j * ldx + d] * scale;
        for (int j = n; j < width; j++) row[j] = 0.f;
    }
}

typedef struct {
    int n, width, depth, vectors;
    vmask last, tail; /* valid lanes of a row's last vector, of a score row's last vector */
} Shape;

static Shape shape_of(int n, int depth) {
    Shape s;
    s.n = n, s.width = (n + VL - 1) / VL * VL, s.depth = depth, s.vectors = (depth + VL - 1) / VL;
    s.last = v_first(depth - VL * (s.vectors - 1));
    s.tail = v_first(n % VL ? n % VL : VL);
    return s;
}

/* One (group, head) pair. kt: depth x width scratch; s: ROWS x width scratch. */
static void forward_pair(Shape sh, const float *q, const float *k, const float *v, long ld, float *o,
                         long ldo, float *lse, float scale, float *kt, float *s) {
    vmask full = v_first(VL);
    pack_transposed(k, ld, sh.n, sh.width, sh.depth, scale * LOG2E, kt);
    for (int i0 = 0; i0 < sh.n; i0 += ROWS) {
        int rows = sh.n - i0 < ROWS ? sh.n - i0 : ROWS;
        float inv[ROWS];
        rows_times_packed(q + (long)i0 * ld, ld, rows, kt, sh.width, sh.depth, s);
        for (int r = 0; r < rows; r++) {
            float *sr = s + (long)r * sh.width;
            vec m = v_set1(-INFINITY), sum = v_zero();
            for (int j = 0; j < sh.width; j += VL)
                m = v_select(j + VL > sh.n ? sh.tail : full, v_max(m, v_load(sr + j)), m);
            float mx = v_reduce_max(m);
            for (int j = 0; j < sh.width; j += VL) {
                vec e = exp2_ps(v_sub(v_load(sr + j), v_set1(mx)));
                e = v_maskz(j + VL > sh.n ? sh.tail : full, e);
                v_store(sr + j, e);
                sum = v_add(sum, e);
            }
            float total = v_reduce_add(sum);
            inv[r] = 1.f / total;
            if (lse) lse[i0 + r] = mx + log2f(total);
        }
        WEIGHTED_ROWS(sh.vectors, s, sh.width, 1, sh.n, rows, v, ld, sh.last, o + (long)i0 * ldo, ldo, inv,
                      1.f);
    }
}

/* One (group, head) pair. scratch: 2 * depth * width + 2 * n * width + n floats. */
static void backward_pair(Shape sh, const float *q, const float *k, const float *v, long ld, const float *o,
                          const float *dout, long ldo, const float *lse, float *dq, float *dk, float *dv,
                          float scale, float *scratch) {
    int n = sh.n, width = sh.width;
    float *kt = scratch, *vt = kt + (long)sh.depth * width, *p = vt + (long)sh.depth * width;
    float *ds = p + (long)n * width, *delta = ds + (long)n * width;
    vmask full = v_first(VL);
    pack_transposed(k, ld, n, width, sh.depth, scale * LOG2E, kt);
    pack_transposed(v, ld, n, width, sh.depth, 1.f, vt);
    for (int i = 0; i < n; i++) { /* delta_i = dout_i . o_i = sum_j p_ij dp_ij */
        float acc = 0.f;
        for (int d = 0; d < sh.depth; d++) acc += dout[(long)i * ldo + d] * o[(long)i * ldo + d];
        delta[i] = acc;
    }
    for (int i0 = 0; i0 < n; i0 += ROWS) {
        int rows = n - i0 < ROWS ? n - i0 : ROWS;
        float *pb = p + (long)i0 * width, *dsb = ds + (long)i0 * width;
        rows_times_packed(q + (long)i0 * ld, ld, rows, kt, width, sh.depth, pb);       /* scores */
        rows_times_packed(dout + (long)i0 * ldo, ldo, rows, vt, width, sh.depth, dsb); /* dp = dout v^T */
        for (int r = 0; r < rows; r++) {
            vec l = v_set1(lse[i0 + r]), dl = v_set1(delta[i0 + r]);
            for (int j = 0; j < width; j += VL) {
                vec pj = exp2_ps(v_sub(v_load(pb + (long)r * width + j), l));
                pj = v_maskz(j + VL > n ? sh.tail : full, pj);
                v_store(pb + (long)r * width + j, pj);
                vec g = v_sub(v_load(dsb + (long)r * width + j), dl);
                v_store(dsb + (long)r * width + j, v_mul(pj, g)); /* d(scores) */
            }
        }
        WEIGHTED_ROWS(sh.vectors, dsb, width, 1, n, rows, k, ld, sh.last, dq + (long)i0 * ld, ld, 0, scale);
    }
    for (int j0 = 0; j0 < n; j0 += ROWS) { /* per key: transposed reads of p and d(scores) */
        int rows = n - j0 < ROWS ? n - j0 : ROWS;
        WEIGHTED_ROWS(sh.vectors, p + j0, 1, width, n, rows, dout, ldo, sh.last, dv + (long)j0 * ld, ld, 0,
                      1.f);
        WEIGHTED_ROWS(sh.vectors, ds + j0, 1, width, n, rows, q, ld, sh.last, dk + (long)j0 * ld, ld, 0,
                      scale);
    }
}

typedef struct {
    const float *qkv, *out, *dout, *lse_in;
    float *result, *lse_out;
    int groups, heads, n, depth, first, end, failed;
    float scale;
    const unsigned short *qkv16, *out16, *dout16; /* bf16: these and result16 instead of the fp32 ones */
    unsigned short *result16;
} Work;

/* rows x (parts * depth) floats from `parts` bf16 blocks of `depth` per row (blocks `part_ld` apart,
 * rows `ld` apart), and back. */
static void widen_rows(const unsigned short *x, long ld, long part_ld, int parts, int rows, int depth,
                       float *out) {
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < parts; t++)
            for (int d = 0; d < depth; d += VL) {
                vmask lanes = v_first(depth - d);
                vec v = v_load_bf16(x + r * ld + t * part_ld + d, lanes);
                v_storem(out + ((long)r * parts + t) * depth + d, lanes, v);
            }
}

static void narrow_rows(const float *x, int rows, int parts, int depth, unsigned short *out, long ld,
                        long part_ld) {
    for (int r = 0; r < rows; r++)
        for (int t = 0; t < parts; t++)
            for (int d = 0; d < depth; d += VL) {
                vmask lanes = v_first(depth - d);
                vec v = v_loadz(lanes, x + ((long)r * parts + t) * depth + d);
                v_store_bf16(out + r * ld + t * part_ld + d, lanes, v);
            }
}

/* The pairs [first, end): straight from qkv into result, or (bf16) each pair widened into scratch,
 * attended there and rounded into result16. */
static void forward_range(Work *w) {
    Shape sh = shape_of(w->n, w->depth);
    long c = (long)w->heads * w->depth, ld = 3 * c, dd = sh.depth;
    long packed = (long)(sh.depth + ROWS) * sh.width; /* packed keys and a block of scores */
    int bf16 = w->qkv16 != 0;
    float *kt = aligned_alloc(64, sizeof(float) * (size_t)(packed + (bf16 ? 4L * sh.n * dd : 0)));
    if (!kt) {
        w->failed = 1;
        return;
    }
    float *pair_qkv = kt + packed, *pair_out = pair_qkv + 3L * sh.n * dd; /* bf16 only */
    for (int pair = w->first; pair < w->end; pair++) {
        long row = (long)(pair / w->heads) * w->n, col = (long)(pair % w->heads) * w->depth;
        const float *base;
        float *out;
        long part, ldq, ldo;
        if (bf16) {
            widen_rows(w->qkv16 + row * ld + col, ld, c, 3, sh.n, sh.depth, pair_qkv);
            base = pair_qkv, part = dd, ldq = 3 * dd, out = pair_out, ldo = dd;
        } else {
            base = w->qkv + row * ld + col, part = c, ldq = ld, out = w->result + row * c + col, ldo = c;
        }
        forward_pair(sh, base, base + part, base + 2 * part, ldq, out, ldo,
                     w->lse_out ? w->lse_out + (long)pair * w->n : 0, w->scale, kt,
                     kt + (long)sh.depth * sh.width);
        if (bf16) narrow_rows(pair_out, sh.n, 1, sh.depth, w->result16 + row * c + col, c, 0);
    }
    free(kt);
}

/* As forward_range: the qkv gradient of the pairs [first, end), straight or through fp32 scratch. */
static void backward_range(Work *w) {
    Shape sh = shape_of(w->n, w->depth);
    long c = (long)w->heads * w->depth, ld = 3 * c, dd = sh.depth;
    long kernel = 2L * (sh.depth + sh.n) * sh.width + sh.width; /* backward_pair's scratch */
    int bf16 = w->qkv16 != 0;
    float *scratch = aligned_alloc(64, sizeof(float) * (size_t)(kernel + (bf16 ? 8L * sh.n * dd : 0)));
    if (!scratch) {
        w->failed = 1;
        return;
    }
    float *pair_qkv = scratch + kernel, *pair_out = pair_qkv + 3L * sh.n * dd; /* bf16 only */
    float *pair_dout = pair_out + sh.n * dd, *pair_grad = pair_dout + sh.n * dd;
    for (int pair = w->first; pair < w->end; pair++) {
        long row = (long)(pair / w->heads) * w->n, col = (long)(pair % w->heads) * w->depth;
        const float *base, *out, *dout;
        float *grad;
        long part, ldq, ldo;
        if (bf16) {
            widen_rows(w->qkv16 + row * ld + col, ld, c, 3, sh.n, sh.depth, pair_qkv);
            widen_rows(w->out16 + row * c + col, c, 0, 1, sh.n, sh.depth, pair_out);
            widen_rows(w->dout16 + row * c + col, c, 0, 1, sh.n, sh.depth, pair_dout);
            base = pair_qkv, out = pair_out, dout = pair_dout, grad = pair_grad, part = dd, ldq = 3 * dd, ldo = dd;
        } else {
            base = w->qkv + row * ld + col, out = w->out + row * c + col, dout = w->dout + row * c + col;
            grad = w->result + row * ld + col, part = c, ldq = ld, ldo = c;
        }
        backward_pair(sh, base, base + part, base + 2 * part, ldq, out, dout, ldo, w->lse_in + (long)pair * w->n,
                      grad, grad + part, grad + 2 * part, w->scale, scratch);
        if (bf16) narrow_rows(pair_grad, sh.n, 3, sh.depth, w->result16 + row * ld + col, ld, c);
    }
    free(scratch);
}

/* Split the (group, head) pairs over `threads` threads of the OpenMP pool that torch itself uses (the
 * library links the libgomp torch has loaded), so no second set of threads competes for the cores
 * while torch's workers wait for their next parallel region. 0 on success. */
static int run(void (*body)(Work *), Work base, int threads) {
    int pairs = base.groups * base.heads, failed = 0;
    if (threads > pairs) threads = pairs;
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        Work w = base;
        int t = omp_get_thread_num(), count = omp_get_num_threads();
        w.first = (int)((long)pairs * t / count);
        w.end = (int)((long)pairs * (t + 1) / count);
        body(&w);
        failed |= w.failed;
    }
    return failed;
}

int sret_attention_forward(const float *qkv, float *out, float *lse, int groups, int heads, int n, int depth,
                           float scale, int threads) {
    Work w = {qkv, 0, 0, 0, out, lse, groups, heads, n, depth, 0, 0, 0, scale, 0, 0, 0, 0};
    return run(forward_range, w, threads);
}

int sret_attention_forward_bf16(const unsigned short *qkv, unsigned short *out, float *lse, int groups,
                                int heads, int n, int depth, float scale, int threads) {
    Work w = {0, 0, 0, 0, 0, lse, groups, heads, n, depth, 0, 0, 0, scale, qkv, 0, 0, out};
    return run(forward_range, w, threads);
}

int sret_attention_backward(const float *qkv, const float *out, const float *dout, const float *lse,
                            float *dqkv, int groups, int heads, int n, int depth, float scale, int threads) {
    Work w = {qkv, out, dout, lse, dqkv, 0, groups, heads, n, depth, 0, 0, 0, scale, 0, 0, 0, 0};
    return run(backward_range, w, threads);
}

int sret_attention_backward_bf16(const unsigned short *qkv, const unsigned short *out, const unsigned short *dout,
                                 const float *lse, unsigned short *dqkv, int groups, int heads, int n, int depth,
                                 float scale, int threads) {
    Work w = {0, 0, 0, lse, 0, 0, groups, heads, n, depth, 0, 0, 0, scale, qkv, out, dout, dqkv};
    return run(backward_range, w, threads);
}
