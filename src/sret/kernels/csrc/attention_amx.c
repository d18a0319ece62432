/*
 * sliced_attention.c's kernels for bf16 tensors on CPUs with AMX tiles, forward and backward: every
 * product in the tiles, the softmax and its gradient in AVX-512 as there. Built only where
 * sret/native.py finds AMX (SRET_AMX).
 *
 * Why: with bf16 storage sliced_attention.c widens each (group, head) pair to fp32 and multiplies
 * in fp32 vector FMAs; an AMX tile product (TDPBF16PS) does 16 x 16 x 32 multiply-accumulates in one
 * instruction, many times the FMA rate. The tiles multiply bf16 values exactly and accumulate in
 * fp32; what is rounded to bf16 for them are the probabilities (and, backward, the score gradients),
 * as torch's and other fused bf16 attention kernels round them.
 *
 * Forward, per pair and block of 16 queries: the scores against every key, 16 x 16 at a time (the
 * head width in chunks of 32), stored to an fp32 row block; the softmax over those rows (base 2, with
 * sliced_attention.c's log-sum-exp, so either backward can follow either forward); the unnormalised
 * probabilities times the values in the tiles, the normalisation folded into the store.
 *
 * Backward, per pair and chunk of 32 keys (flash attention's order, transposed so that every operand
 * is a plain row block or a cheap repacking): S^T = K Q^T and dP^T = V dO^T against all queries, then
 * P^T and dS^T = P^T (dP^T - delta); the chunk's dV = P^T dO and dK = dS^T Q in the tiles; dQ^T += K^T
 * dS^T, accumulated in memory over the chunks and transposed at the end.
 *
 * Tile operands, per pair (zero-padded): left-hand ones as rows of 32 bf16; right-hand ones in the
 * tiles' pair-interleaved ("VNNI") layout, where row r holds, for each of 16 columns, the two
 * consecutive depth elements 2r and 2r + 1.
 */
#ifdef SRET_AMX
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "vector_math.h"

#if VL != 16
#error "the AMX kernel is built with AVX-512"
#endif

#define TILE 16  /* rows of every tile; fp32 columns of an accumulator tile */
#define DEPTH 32 /* bf16 values in a tile row: the depth of one tile product */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef unsigned short bf16;

typedef struct {
    unsigned char palette, start_row, reserved[14];
    unsigned short colsb[16];
    unsigned char rows[16];
} TileConfig;

/* Every tile 16 rows of 64 bytes: 16 x 32 bf16 operands, 16 x 16 fp32 accumulators. Per thread. */
static void configure_tiles(void) {
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) cfg.colsb[t] = 64, cfg.rows[t] = TILE;
    _tile_loadconfig(&cfg);
}

/* Asks Linux for the AMX register state (once per process; oneDNN asks for it as well). 0 if granted. */
int sret_amx_request(void) { return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); }

/* 16 floats as bf16, to nearest even (AVX512-BF16: one instruction; values below 2^-126, negligible
 * for probabilities and score gradients, become zero). The outputs go through v_store_bf16. */
static inline void store16_bf16(bf16 *x, vec v) { _mm256_storeu_si256((__m256i *)x, (__m256i)_mm512_cvtneps_pbh(v)); }

static int round_up(int x, int to) { return (x + to - 1) / to * to; }

typedef struct {
    int n, depth, nq, nk, nk2, dp, ct; /* tokens, head width, padded: queries, keys (16, 32), width; output tiles */
} Dims;

static Dims dims_of(int n, int depth) {
    Dims d = {n, depth, round_up(n, TILE), round_up(n, TILE), round_up(n, DEPTH), round_up(depth, DEPTH),
              (depth + TILE - 1) / TILE};
    return d;
}

/* A row of 32 bf16 values, zero from `count` on. */
static inline __m512i load_row32(const bf16 *x, int count) {
    return _mm512_maskz_loadu_epi16(count >= 32 ? ~0u : (count > 0 ? (1u << count) - 1 : 0u), x);
}

static inline __mmask16 first16(int n) { return n >= 16 ? 0xFFFF : (__mmask16)(n > 0 ? (1u << n) - 1 : 0); }

/* Left-hand operand: `rows` rows of `width` (a multiple of 32), x's n x depth values, zeros around. */
static void pack_rows(const bf16 *x, long ld, int n, int depth, int rows, int width, bf16 *out) {
    for (int i = 0; i < rows; i++)
        for (int e = 0; e < width; e += DEPTH)
            _mm512_storeu_si512(out + (long)i * width + e,
                                i < n ? load_row32(x + i * ld + e, depth - e) : _mm512_setzero_si512());
}

/* Right-hand operand of x^T (depth x tokens): tiles (depth chunk of 32, block of 16 tokens); row r of
 * a tile holds, per token, the depth pair 2r, 2r + 1 (32-bit gathers down the tokens). */
static void pack_depth_pairs(const bf16 *x, long ld, int n, int depth, int dp, int blocks, bf16 *out) {
    const __m512i tokens = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32((int)(ld / 2)));
    for (int chunk = 0; chunk < dp / DEPTH; chunk++)
        for (int b = 0; b < blocks; b++) {
            __mmask16 m = first16(n - b * TILE);
            const int *base = (const int *)(x + (long)b * TILE * ld);
            for (int r = 0; r < TILE; r++) {
                int e = chunk * DEPTH + 2 * r;
                __m512i row = e < depth ? _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, tokens, base + e / 2, 4)
                                        : _mm512_setzero_si512();
                _mm512_storeu_si512(out + ((long)(chunk * blocks + b) * TILE + r) * DEPTH, row);
            }
        }
}

/* Right-hand operand of x (tokens x depth): tiles (chunk of 32 tokens, column tile of 16 channels);
 * row r of a tile interleaves tokens 2r and 2r + 1. */
static void pack_token_pairs(const bf16 *x, long ld, int n, int depth, int chunks, int ct, bf16 *out) {
    static const short interleave[DEPTH] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                            8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    const __m512i low = _mm512_loadu_si512(interleave), high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
    for (int chunk = 0; chunk < chunks; chunk++)
        for (int r = 0; r < TILE; r++) {
            int j = chunk * DEPTH + 2 * r;
            for (int e = 0; e < ct * TILE; e += DEPTH) {
                __m512i a = j < n ? load_row32(x + j * ld + e, depth - e) : _mm512_setzero_si512();
                __m512i b = j + 1 < n ? load_row32(x + (j + 1) * ld + e, depth - e) : _mm512_setzero_si512();
                bf16 *tile = out + ((long)(chunk * ct + e / TILE) * TILE + r) * DEPTH;
                _mm512_storeu_si512(tile, _mm512_permutex2var_epi16(a, low, b));
                if (e + TILE < ct * TILE) _mm512_storeu_si512(tile + TILE * DEPTH, _mm512_permutex2var_epi16(a, high, b));
            }
        }
}

/* Left-hand operand of x^T: `rows` rows (channels) of `width` tokens (a multiple of 32), zeros around:
 * 32-bit gathers of channel pairs down 32 tokens, split into the even and odd channel's rows. */
static void pack_transposed(const bf16 *x, long ld, int n, int depth, int rows, int width, bf16 *out) {
    static const short even[DEPTH] = {0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                                      32, 34, 36, 38, 40, 42, 44, 46, 48, 50, 52, 54, 56, 58, 60, 62};
    static const short odd[DEPTH] = {1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31,
                                     33, 35, 37, 39, 41, 43, 45, 47, 49, 51, 53, 55, 57, 59, 61, 63};
    const __m512i ev = _mm512_loadu_si512(even), od = _mm512_loadu_si512(odd);
    const __m512i tokens = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32((int)(ld / 2)));
    for (int e = 0; e < rows; e += 2)
        for (int j = 0; j < width; j += DEPTH) {
            __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
            if (e < depth) {
                const int *base = (const int *)(x + (long)j * ld + e);
                lo = _mm512_mask_i32gather_epi32(lo, first16(n - j), tokens, base, 4);
                hi = _mm512_mask_i32gather_epi32(hi, first16(n - j - TILE), tokens, base + TILE * ld / 2, 4);
            }
            _mm512_storeu_si512(out + (long)e * width + j, _mm512_permutex2var_epi16(lo, ev, hi));
            _mm512_storeu_si512(out + (long)(e + 1) * width + j, _mm512_permutex2var_epi16(lo, od, hi));
        }
}

/* q into rows of dp; k (as k^T) and v into right-hand tiles. */
static void pack_pair(Dims d, const bf16 *q, const bf16 *k, const bf16 *v, long ld, bf16 *qp, bf16 *kp,
                      bf16 *vp) {
    pack_rows(q, ld, d.n, d.depth, d.nq, d.dp, qp);
    pack_depth_pairs(k, ld, d.n, d.depth, d.dp, d.nk / TILE, kp);
    pack_token_pairs(v, ld, d.n, d.depth, d.nk2 / DEPTH, d.ct, vp);
}

/* Accumulator tile T = q (tiles 4, and 5 for a second depth chunk) times k's block B, loaded into tile L. */
#define SCORES(T, B, L)                                                                    \
    do {                                                                                   \
        _tile_zero(T);                                                                     \
        _tile_loadd(L, kp + (long)(B) * TILE * DEPTH, DEPTH * (int)sizeof(bf16));           \
        _tile_dpbf16ps(T, 4, L);                                                           \
        if (chunks > 1) {                                                                  \
            _tile_loadd(L, kp + (long)(blocks + (B)) * TILE * DEPTH, DEPTH * (int)sizeof(bf16)); \
            _tile_dpbf16ps(T, 5, L);                                                       \
        }                                                                                  \
    } while (0)

/* One (group, head) pair. s: 16 x nk fp32; p: 16 x nk2 bf16; o: 2 x 16 x 16 ct fp32. */
static void forward_pair(Dims d, const bf16 *qp, const bf16 *kp, const bf16 *vp, bf16 *out, long ldo,
                         float *lse, float scale, float *s, bf16 *p, float *o) {
    const float c = scale * LOG2E;
    int blocks = d.nk / TILE, chunks = d.dp / DEPTH;
    vmask full = v_first(VL), tail = v_first(d.n % VL ? d.n % VL : VL);
    for (int i0 = 0; i0 < d.n; i0 += TILE) {
        int rows = d.n - i0 < TILE ? d.n - i0 : TILE;
        float inv[TILE];
        /* scores, 16 keys at a time into four accumulators (0-3) in flight; q's chunks stay in 4, 5 */
        _tile_loadd(4, qp + (long)i0 * d.dp, d.dp * (int)sizeof(bf16));
        if (chunks > 1) _tile_loadd(5, qp + (long)i0 * d.dp + DEPTH, d.dp * (int)sizeof(bf16));
        for (int b = 0; b < blocks; b += 4) {
            int count = blocks - b < 4 ? blocks - b : 4;
            SCORES(0, b, 6);
            if (count > 1) SCORES(1, b + 1, 7);
            if (count > 2) SCORES(2, b + 2, 6);
            if (count > 3) SCORES(3, b + 3, 7);
            _tile_stored(0, s + b * TILE, d.nk * (int)sizeof(float));
            if (count > 1) _tile_stored(1, s + (b + 1) * TILE, d.nk * (int)sizeof(float));
            if (count > 2) _tile_stored(2, s + (b + 2) * TILE, d.nk * (int)sizeof(float));
            if (count > 3) _tile_stored(3, s + (b + 3) * TILE, d.nk * (int)sizeof(float));
        }
        for (int r = 0; r < TILE; r++) { /* softmax in base 2; padding rows and keys give zeros */
            bf16 *pr = p + (long)r * d.nk2;
            if (r >= rows) {
                memset(pr, 0, sizeof(bf16) * d.nk2);
                continue;
            }
            const float *sr = s + (long)r * d.nk;
            vec m = v_set1(-INFINITY), sum = v_zero();
            for (int j = 0; j < d.nk; j += VL) m = v_select(j + VL > d.n ? tail : full, v_max(m, v_load(sr + j)), m);
            float mx = v_reduce_max(m) * c;
            for (int j = 0; j < d.nk2; j += VL) {
                vmask valid = j + VL > d.n ? (j >= d.n ? v_first(0) : tail) : full;
                vec e = v_maskz(valid, exp2_ps(v_fmadd(v_loadz(valid, sr + j), v_set1(c), v_set1(-mx))));
                sum = v_add(sum, e);
                store16_bf16(pr + j, e);
            }
            float total = v_reduce_add(sum);
            inv[r] = 1.f / total;
            if (lse) lse[i0 + r] = mx + log2f(total);
        }
        /* probabilities x values, 32 keys at a time: accumulators 0-2 (one per column tile), and for
         * heads up to 32 wide a second pair, 2-3, for every other chunk, so two chains are in flight */
        int ldt = d.ct * TILE * (int)sizeof(float), ldp = d.nk2 * (int)sizeof(bf16), step = d.ct * TILE * DEPTH;
        int split = d.ct <= 2 && d.nk2 > DEPTH;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int k = 0; k < d.nk2 / DEPTH; k++) {
            const bf16 *vb = vp + (long)k * step;
            if (split && k % 2) {
                _tile_loadd(5, p + k * DEPTH, ldp);
                _tile_loadd(7, vb, DEPTH * (int)sizeof(bf16));
                _tile_dpbf16ps(2, 5, 7);
                if (d.ct > 1) {
                    _tile_loadd(6, vb + TILE * DEPTH, DEPTH * (int)sizeof(bf16));
                    _tile_dpbf16ps(3, 5, 6);
                }
                continue;
            }
            _tile_loadd(4, p + k * DEPTH, ldp);
            _tile_loadd(6, vb, DEPTH * (int)sizeof(bf16));
            _tile_dpbf16ps(0, 4, 6);
            if (d.ct > 1) {
                _tile_loadd(7, vb + TILE * DEPTH, DEPTH * (int)sizeof(bf16));
                _tile_dpbf16ps(1, 4, 7);
            }
            if (d.ct > 2) {
                _tile_loadd(5, vb + 2 * TILE * DEPTH, DEPTH * (int)sizeof(bf16));
                _tile_dpbf16ps(2, 4, 5);
            }
        }
        _tile_stored(0, o, ldt);
        if (d.ct > 1) _tile_stored(1, o + TILE, ldt);
        if (d.ct > 2) _tile_stored(2, o + 2 * TILE, ldt);
        if (split) { /* add the second chain */
            float *o2 = o + TILE * ldt / (int)sizeof(float);
            _tile_stored(2, o2, ldt);
            if (d.ct > 1) _tile_stored(3, o2 + TILE, ldt);
            for (int i = 0; i < TILE * d.ct * TILE; i += VL) v_store(o + i, v_add(v_load(o + i), v_load(o2 + i)));
        }
        for (int r = 0; r < rows; r++)
            for (int e = 0; e < d.depth; e += VL) {
                vmask valid = v_first(d.depth - e);
                vec x = v_mul(v_loadz(valid, o + (long)r * d.ct * TILE + e), v_set1(inv[r]));
                v_store_bf16(out + (long)(i0 + r) * ldo + e, valid, x);
            }
    }
}

/* Accumulator tiles 0-2 += the left-hand tile at a (rows lda bf16 apart) times the right-hand tiles at
 * b, b + 512, b + 1024 (one per output column tile, ct of them), over `chunks` depth chunks: the left
 * chunks 32 values apart, the right ones `b_step` values apart. */
static inline void times_tiles(const bf16 *a, int lda, const bf16 *b, long b_step, int chunks, int ct) {
    for (int k = 0; k < chunks; k++) {
        _tile_loadd(3, a + k * DEPTH, lda * (int)sizeof(bf16));
        const bf16 *bk = b + k * b_step;
        _tile_loadd(4, bk, DEPTH * (int)sizeof(bf16));
        _tile_dpbf16ps(0, 3, 4);
        if (ct > 1) {
            _tile_loadd(5, bk + TILE * DEPTH, DEPTH * (int)sizeof(bf16));
            _tile_dpbf16ps(1, 3, 5);
        }
        if (ct > 2) {
            _tile_loadd(4, bk + 2 * TILE * DEPTH, DEPTH * (int)sizeof(bf16));
            _tile_dpbf16ps(2, 3, 4);
        }
    }
}

/* Stores accumulator tiles 0..ct-1 into o (16 x 16 ct fp32), then rows [0, rows) times `scale` as bf16
 * into out (rows ldo apart, `depth` channels). */
static void store_rows(int ct, int rows, int depth, float scale, float *o, bf16 *out, long ldo) {
    int ldt = ct * TILE * (int)sizeof(float);
    _tile_stored(0, o, ldt);
    if (ct > 1) _tile_stored(1, o + TILE, ldt);
    if (ct > 2) _tile_stored(2, o + 2 * TILE, ldt);
    for (int r = 0; r < rows; r++)
        for (int e = 0; e < depth; e += VL)
            v_store_bf16(out + r * ldo + e, v_first(depth - e), v_mul(v_loadz(v_first(depth - e), o + (long)r * ct * TILE + e), v_set1(scale)));
}

typedef struct {
    bf16 *kr, *vr, *qg, *dog, *doq, *qq, *kt, *pt, *dst, *bt;
    float *st, *dpt, *dqt, *o, *lse, *delta;
} Backward;

/* One (group, head) pair, by chunks of 32 keys: the transposed scores S^T = K Q^T and dP^T = V dO^T
 * of those keys against all queries, P^T and dS^T = P^T (dP^T - delta) from them; then the keys' dV =
 * P^T dO and dK = dS^T Q (accumulated in tiles over the queries), and dQ^T += K^T dS^T, accumulated in
 * memory over the key chunks. Every product in the tiles; P^T and dS^T rounded to bf16 for them. */
static void backward_pair(Dims d, Backward w, const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *o,
                          const bf16 *dout, long ld, long ldo, const float *lse, bf16 *dq, bf16 *dk, bf16 *dv,
                          float scale) {
    const float c = scale * LOG2E;
    int nq = d.nq, nq2 = d.nk2, chunks = d.dp / DEPTH, qblocks = nq / TILE;
    pack_rows(k, ld, d.n, d.depth, d.nk2, d.dp, w.kr);
    pack_rows(v, ld, d.n, d.depth, d.nk2, d.dp, w.vr);
    pack_depth_pairs(q, ld, d.n, d.depth, d.dp, qblocks, w.qg);
    pack_depth_pairs(dout, ldo, d.n, d.depth, d.dp, qblocks, w.dog);
    pack_token_pairs(dout, ldo, d.n, d.depth, nq2 / DEPTH, d.ct, w.doq);
    pack_token_pairs(q, ld, d.n, d.depth, nq2 / DEPTH, d.ct, w.qq);
    pack_transposed(k, ld, d.n, d.depth, d.ct * TILE, d.nk2, w.kt);
    for (int i = 0; i < nq2; i++) { /* delta_i = dout_i . o_i; padding queries: 0 */
        float acc = 0.f;
        if (i < d.n)
            for (int e = 0; e < d.depth; e++) {
                unsigned a = (unsigned)dout[i * ldo + e] << 16, b = (unsigned)o[i * ldo + e] << 16;
                float fa, fb;
                memcpy(&fa, &a, 4), memcpy(&fb, &b, 4);
                acc += fa * fb;
            }
        w.delta[i] = acc;
        w.lse[i] = i < d.n ? lse[i] : 0.f;
    }
    memset(w.dqt, 0, sizeof(float) * (size_t)d.ct * TILE * nq);
    static const short pairs[DEPTH] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i interleave = _mm512_loadu_si512(pairs);
    for (int j0 = 0; j0 < d.n; j0 += DEPTH) {
        for (int h = 0; h < 2; h++) /* S^T and dP^T of 16 keys at a time against 16 queries at a time */
            for (int b = 0; b < qblocks; b++) {
                _tile_zero(0);
                _tile_zero(1);
                for (int k = 0; k < chunks; k++) {
                    _tile_loadd(3, w.kr + (long)(j0 + h * TILE) * d.dp + k * DEPTH, d.dp * (int)sizeof(bf16));
                    _tile_loadd(4, w.qg + (long)(k * qblocks + b) * TILE * DEPTH, DEPTH * (int)sizeof(bf16));
                    _tile_dpbf16ps(0, 3, 4);
                    _tile_loadd(5, w.vr + (long)(j0 + h * TILE) * d.dp + k * DEPTH, d.dp * (int)sizeof(bf16));
                    _tile_loadd(6, w.dog + (long)(k * qblocks + b) * TILE * DEPTH, DEPTH * (int)sizeof(bf16));
                    _tile_dpbf16ps(1, 5, 6);
                }
                _tile_stored(0, w.st + (long)h * TILE * nq + b * TILE, nq * (int)sizeof(float));
                _tile_stored(1, w.dpt + (long)h * TILE * nq + b * TILE, nq * (int)sizeof(float));
            }
        for (int r = 0; r < DEPTH; r++) { /* P^T and dS^T rows; padding keys and queries give zeros */
            bf16 *pr = w.pt + (long)r * nq2, *dr = w.dst + (long)r * nq2;
            const float *sr = w.st + (long)r * nq, *gr = w.dpt + (long)r * nq;
            int key = j0 + r;
            for (int i = 0; i < nq2; i += VL) {
                vmask valid = key < d.n ? v_first(d.n - i) : v_first(0);
                vec x = v_sub(v_mul(v_loadz(valid, sr + i), v_set1(c)), v_loadz(valid, w.lse + i));
                vec p = v_maskz(valid, exp2_ps(x));
                vec ds = v_mul(p, v_sub(v_loadz(valid, gr + i), v_loadz(valid, w.delta + i)));
                store16_bf16(pr + i, p);
                store16_bf16(dr + i, ds);
            }
        }
        for (int h = 0; h < 2 && j0 + h * TILE < d.n; h++) { /* dV and dK of the chunk's keys */
            int rows = d.n - j0 - h * TILE < TILE ? d.n - j0 - h * TILE : TILE;
            long b_step = (long)d.ct * TILE * DEPTH;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            times_tiles(w.pt + (long)h * TILE * nq2, nq2, w.doq, b_step, nq2 / DEPTH, d.ct);
            store_rows(d.ct, rows, d.depth, 1.f, w.o, dv + (long)(j0 + h * TILE) * ld, ld);
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            times_tiles(w.dst + (long)h * TILE * nq2, nq2, w.qq, b_step, nq2 / DEPTH, d.ct);
            store_rows(d.ct, rows, d.depth, scale, w.o, dk + (long)(j0 + h * TILE) * ld, ld);
        }
        for (int b = 0; b < qblocks; b++) { /* dQ^T += K^T dS^T: dS^T's key pairs interleaved per query */
            for (int r = 0; r < TILE; r++) {
                __m512i two = _mm512_inserti64x4(
                    _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(w.dst + (long)(2 * r) * nq2 + b * TILE))),
                    _mm256_loadu_si256((const __m256i *)(w.dst + (long)(2 * r + 1) * nq2 + b * TILE)), 1);
                _mm512_storeu_si512(w.bt + r * DEPTH, _mm512_permutexvar_epi16(interleave, two));
            }
            _tile_loadd(4, w.bt, DEPTH * (int)sizeof(bf16));
            for (int t = 0; t < d.ct; t++) {
                float *acc = w.dqt + (long)t * TILE * nq + b * TILE;
                _tile_loadd(0, acc, nq * (int)sizeof(float));
                _tile_loadd(3, w.kt + (long)t * TILE * d.nk2 + j0, d.nk2 * (int)sizeof(bf16));
                _tile_dpbf16ps(0, 3, 4);
                _tile_stored(0, acc, nq * (int)sizeof(float));
            }
        }
    }
    for (int i = 0; i < d.n; i++) { /* dQ = scale (dQ^T)^T */
        for (int e = 0; e < d.depth; e++) w.o[e] = w.dqt[(long)e * nq + i];
        for (int e = 0; e < d.depth; e += VL)
            v_store_bf16(dq + i * ld + e, v_first(d.depth - e), v_mul(v_loadz(v_first(d.depth - e), w.o + e), v_set1(scale)));
    }
}

/* As sret_attention_backward_bf16 (sliced_attention.c), for an output the AMX forward gave. 0 on success. */
int sret_attention_backward_amx(const bf16 *qkv, const bf16 *out, const bf16 *dout, const float *lse, bf16 *dqkv,
                                int groups, int heads, int n, int depth, float scale, int threads) {
    int pairs = groups * heads, failed = 0;
    if (threads > pairs) threads = pairs;
    if (threads < 1) threads = 1;
    Dims d = dims_of(n, depth);
    long c = (long)heads * depth, ld = 3 * c;
    int nq = d.nq, nq2 = d.nk2, rows16 = d.ct * TILE;
    size_t counts16[] = {(size_t)d.nk2 * d.dp, (size_t)d.nk2 * d.dp, (size_t)d.dp * nq, (size_t)d.dp * nq,
                         (size_t)nq2 * rows16, (size_t)nq2 * rows16, (size_t)rows16 * d.nk2, (size_t)DEPTH * nq2,
                         (size_t)DEPTH * nq2, (size_t)TILE * DEPTH};
    size_t counts32[] = {(size_t)DEPTH * nq, (size_t)DEPTH * nq, (size_t)rows16 * nq, (size_t)TILE * rows16,
                         (size_t)nq2, (size_t)nq2};
    size_t bytes = 0;
    for (int i = 0; i < 10; i++) bytes += (counts16[i] * sizeof(bf16) + 63) / 64 * 64;
    for (int i = 0; i < 6; i++) bytes += (counts32[i] * sizeof(float) + 63) / 64 * 64;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int t = omp_get_thread_num(), count = omp_get_num_threads();
        int first = (int)((long)pairs * t / count), end = (int)((long)pairs * (t + 1) / count);
        char *scratch = aligned_alloc(64, bytes), *at = scratch;
        if (!scratch) {
            failed = 1;
        } else {
            Backward w;
            bf16 **p16[] = {&w.kr, &w.vr, &w.qg, &w.dog, &w.doq, &w.qq, &w.kt, &w.pt, &w.dst, &w.bt};
            float **p32[] = {&w.st, &w.dpt, &w.dqt, &w.o, &w.lse, &w.delta};
            for (int i = 0; i < 10; i++) *p16[i] = (bf16 *)at, at += (counts16[i] * sizeof(bf16) + 63) / 64 * 64;
            for (int i = 0; i < 6; i++) *p32[i] = (float *)at, at += (counts32[i] * sizeof(float) + 63) / 64 * 64;
            configure_tiles();
            for (int pair = first; pair < end; pair++) {
                long row = (long)(pair / heads) * n, col = (long)(pair % heads) * depth;
                const bf16 *q = qkv + row * ld + col;
                bf16 *g = dqkv + row * ld + col;
                backward_pair(d, w, q, q + c, q + 2 * c, out + row * c + col, dout + row * c + col, ld, c,
                              lse + (long)pair * n, g, g + c, g + 2 * c, scale);
            }
            _tile_release();
            free(scratch);
        }
    }
    return failed;
}

/* As sret_attention_forward_bf16 (sliced_attention.c); head widths up to 48. 0 on success. */
int sret_attention_forward_amx(const bf16 *qkv, bf16 *out, float *lse, int groups, int heads, int n, int depth,
                               float scale, int threads) {
    int pairs = groups * heads, failed = 0;
    if (threads > pairs) threads = pairs;
    if (threads < 1) threads = 1;
    Dims d = dims_of(n, depth);
    long c = (long)heads * depth, ld = 3 * c;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int t = omp_get_thread_num(), count = omp_get_num_threads();
        int first = (int)((long)pairs * t / count), end = (int)((long)pairs * (t + 1) / count);
        size_t qn = (size_t)d.nq * d.dp, kn = (size_t)d.dp * d.nk, vn = (size_t)d.nk2 * d.ct * TILE;
        size_t pn = (size_t)TILE * d.nk2, bytes16 = sizeof(bf16) * (qn + kn + vn + pn);
        size_t bytes = round_up((int)bytes16, 64) + sizeof(float) * ((size_t)TILE * d.nk + 2 * TILE * d.ct * TILE);
        char *scratch = aligned_alloc(64, round_up((int)bytes, 64));
        if (!scratch) {
            failed = 1;
        } else {
            bf16 *qp = (bf16 *)scratch, *kp = qp + qn, *vp = kp + kn, *p = vp + vn;
            float *s = (float *)(scratch + round_up((int)bytes16, 64)), *o = s + (long)TILE * d.nk;
            configure_tiles();
            for (int pair = first; pair < end; pair++) {
                long row = (long)(pair / heads) * n, col = (long)(pair % heads) * depth;
                const bf16 *q = qkv + row * ld + col;
                pack_pair(d, q, q + c, q + 2 * c, ld, qp, kp, vp);
                forward_pair(d, qp, kp, vp, out + row * c + col, c, lse ? lse + (long)pair * n : 0, scale, s, p, o);
            }
            _tile_release();
            free(scratch);
        }
    }
    return failed;
}
#endif
