/*
 * The forward of sliced_attention.c for bf16 tensors on CPUs with AMX tiles: both products in the
 * tiles, the softmax in AVX-512 as there. Built only where sret/native.py finds AMX (SRET_AMX).
 *
 * Why: with bf16 storage sliced_attention.c widens each (group, head) pair to fp32 and multiplies
 * in fp32 vector FMAs; an AMX tile product (TDPBF16PS) does 16 x 16 x 32 multiply-accumulates in one
 * instruction, many times the FMA rate. Per pair and block of 16 queries: the scores against every
 * key, 16 x 16 at a time (the head width in chunks of 32), are stored to an fp32 row block; the
 * softmax runs over those rows (base 2, as sliced_attention.c, with the same log-sum-exp); the
 * unnormalised probabilities are rounded to bf16 (as torch's and other fused bf16 attention kernels
 * do) and multiplied by the values in the tiles; the normalisation is folded into the store.
 *
 * Layouts, per pair (zero-padded): q as rows of the head width rounded up to 32; k and v in the
 * tiles' pair-interleaved ("VNNI") layout, where row r of a right-hand tile holds, for each of 16
 * columns, the two consecutive depth elements 2r and 2r + 1.
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

static int round_up(int x, int to) { return (x + to - 1) / to * to; }

typedef struct {
    int n, depth, nq, nk, nk2, dp, ct; /* tokens, head width, padded: queries, keys (16, 32), width; output tiles */
} Dims;

static Dims dims_of(int n, int depth) {
    Dims d = {n, depth, round_up(n, TILE), round_up(n, TILE), round_up(n, DEPTH), round_up(depth, DEPTH),
              (depth + TILE - 1) / TILE};
    return d;
}

/* Rows (32 bf16, zero beyond `count`) of a row of bf16 values. */
static inline __m512i load_row32(const bf16 *x, int count) {
    return _mm512_maskz_loadu_epi16(count >= 32 ? ~0u : (count > 0 ? (1u << count) - 1 : 0u), x);
}

/* q into rows of dp; k and v into VNNI tiles (see the top). Zero outside n x depth; depth even. */
static void pack_pair(Dims d, const bf16 *q, const bf16 *k, const bf16 *v, long ld, bf16 *qp, bf16 *kp,
                      bf16 *vp) {
    for (int i = 0; i < d.nq; i++)
        for (int e = 0; e < d.dp; e += DEPTH)
            _mm512_storeu_si512(qp + (long)i * d.dp + e, i < d.n ? load_row32(q + i * ld + e, d.depth - e)
                                                                 : _mm512_setzero_si512());
    /* k: row r of tile (chunk, block) holds the depth pair 2r of 16 keys: 32-bit gathers down the keys */
    const __m512i keys = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32((int)(ld / 2)));
    int blocks = d.nk / TILE;
    for (int chunk = 0; chunk < d.dp / DEPTH; chunk++)
        for (int b = 0; b < blocks; b++) {
            int valid = d.n - b * TILE;
            __mmask16 m = valid >= TILE ? 0xFFFF : (__mmask16)((1u << valid) - 1);
            const int *base = (const int *)(k + (long)b * TILE * ld);
            for (int r = 0; r < TILE; r++) {
                int e = chunk * DEPTH + 2 * r;
                __m512i row = e < d.depth ? _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, keys,
                                                                        base + e / 2, 4)
                                          : _mm512_setzero_si512();
                _mm512_storeu_si512(kp + ((long)(chunk * blocks + b) * TILE + r) * DEPTH, row);
            }
        }
    /* v: row r of tile (chunk, column tile) interleaves keys 2r and 2r + 1, 16 channels each */
    static const short interleave[DEPTH] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                            8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    const __m512i low = _mm512_loadu_si512(interleave), high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
    for (int chunk = 0; chunk < d.nk2 / DEPTH; chunk++)
        for (int r = 0; r < TILE; r++) {
            int j = chunk * DEPTH + 2 * r;
            for (int e = 0; e < d.ct * TILE; e += DEPTH) {
                __m512i a = j < d.n ? load_row32(v + j * ld + e, d.depth - e) : _mm512_setzero_si512();
                __m512i b = j + 1 < d.n ? load_row32(v + (j + 1) * ld + e, d.depth - e) : _mm512_setzero_si512();
                bf16 *tile = vp + ((long)(chunk * d.ct + e / TILE) * TILE + r) * DEPTH;
                _mm512_storeu_si512(tile, _mm512_permutex2var_epi16(a, low, b));
                if (e + TILE < d.ct * TILE) _mm512_storeu_si512(tile + TILE * DEPTH, _mm512_permutex2var_epi16(a, high, b));
            }
        }
}

/* One (group, head) pair. s: 16 x nk fp32; p: 16 x nk2 bf16; o: 16 x 16 ct fp32. */
static void forward_pair(Dims d, const bf16 *qp, const bf16 *kp, const bf16 *vp, bf16 *out, long ldo,
                         float *lse, float scale, float *s, bf16 *p, float *o) {
    const float c = scale * LOG2E;
    int blocks = d.nk / TILE, chunks = d.dp / DEPTH;
    vmask full = v_first(VL), tail = v_first(d.n % VL ? d.n % VL : VL);
    for (int i0 = 0; i0 < d.n; i0 += TILE) {
        int rows = d.n - i0 < TILE ? d.n - i0 : TILE;
        float inv[TILE];
        for (int b = 0; b < blocks; b++) { /* scores, 16 keys at a time */
            _tile_zero(0);
            _tile_loadd(1, qp + (long)i0 * d.dp, d.dp * (int)sizeof(bf16));
            _tile_loadd(2, kp + (long)b * TILE * DEPTH, DEPTH * (int)sizeof(bf16));
            _tile_dpbf16ps(0, 1, 2);
            if (chunks > 1) {
                _tile_loadd(1, qp + (long)i0 * d.dp + DEPTH, d.dp * (int)sizeof(bf16));
                _tile_loadd(2, kp + (long)(blocks + b) * TILE * DEPTH, DEPTH * (int)sizeof(bf16));
                _tile_dpbf16ps(0, 1, 2);
            }
            _tile_stored(0, s + b * TILE, d.nk * (int)sizeof(float));
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
                v_store_bf16(pr + j, full, e);
            }
            float total = v_reduce_add(sum);
            inv[r] = 1.f / total;
            if (lse) lse[i0 + r] = mx + log2f(total);
        }
        _tile_zero(4);
        _tile_zero(5);
        _tile_zero(6);
        for (int k0 = 0; k0 < d.nk2; k0 += DEPTH) { /* probabilities x values, 32 keys at a time */
            const bf16 *vb = vp + (long)(k0 / DEPTH) * d.ct * TILE * DEPTH;
            _tile_loadd(1, p + k0, d.nk2 * (int)sizeof(bf16));
            _tile_loadd(2, vb, DEPTH * (int)sizeof(bf16));
            _tile_dpbf16ps(4, 1, 2);
            if (d.ct > 1) {
                _tile_loadd(3, vb + TILE * DEPTH, DEPTH * (int)sizeof(bf16));
                _tile_dpbf16ps(5, 1, 3);
            }
            if (d.ct > 2) {
                _tile_loadd(2, vb + 2 * TILE * DEPTH, DEPTH * (int)sizeof(bf16));
                _tile_dpbf16ps(6, 1, 2);
            }
        }
        int ldt = d.ct * TILE * (int)sizeof(float);
        _tile_stored(4, o, ldt);
        if (d.ct > 1) _tile_stored(5, o + TILE, ldt);
        if (d.ct > 2) _tile_stored(6, o + 2 * TILE, ldt);
        for (int r = 0; r < rows; r++)
            for (int e = 0; e < d.depth; e += VL) {
                vmask valid = v_first(d.depth - e);
                vec x = v_mul(v_loadz(valid, o + (long)r * d.ct * TILE + e), v_set1(inv[r]));
                v_store_bf16(out + (long)(i0 + r) * ldo + e, valid, x);
            }
    }
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
        size_t bytes = round_up((int)bytes16, 64) + sizeof(float) * ((size_t)TILE * d.nk + TILE * d.ct * TILE);
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
