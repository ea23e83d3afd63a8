/* y = x @ W^T for a few rows of bf16 x and an int4 weight in ATen's CPU packing, without
 * unpacking W to memory (model/int4_rows.py). AVX-512 BF16 (vdpbf16ps).
 *
 * packed: [N/64 tiles][K][32] bytes, byte (t, k, j) = row t*64+j's code (low nibble) and row
 * t*64+j+32's (high nibble). sz: [K/32][N][2] bf16 (scale, zero): w = (q - 8) * scale + zero.
 * x: [M][K] bf16, row stride xs; y: [M][N] bf16, row stride ys.
 *
 * Per group of 32 inputs, the codes enter the product as the bf16 number 128 + q (bits
 * 0x4300 | q: exact, so no table lookup), and vdpbf16ps's products x * (128 + q) are exact in
 * float32 (8 + 8 significant bits). The group's sum D = sum x (128 + q) then gives
 *   sum x w = scale * (D - 128 X) + (zero - 8 scale) X = scale * D + (zero - 136 scale) X,
 * X = sum x over the group (float32), added to a float32 total rounded once to bf16 at the
 * end: the weight is never rounded (ATen's kernel also keeps it in float32), only the order of
 * the float32 sums differs from ATen's (tests/test_int4_rows.py).
 *
 * Work: tiles of 64 output rows split over OpenMP threads (torch's pool: model/native.py).
 * Per tile and group, the 16 input pairs' codes are unpacked once into 4 KB (L1) as
 * vdpbf16ps's operand layout, then used by every block of 6 rows of x (24 accumulators). */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define RB 6 /* rows of x per register block: 6 x 4 accumulators + a weight vector */
#define PF_DIST 2 /* groups of codes prefetched ahead (1 KB a group) */

/* The byte permutation of one 64-byte load (rows k and k+1 of a tile: 32 bytes each) so that
 * unpacklo/hi_epi8 with 0x43 give, per 32-bit lane, (code of (k, j), code of (k + 1, j)) as
 * bf16 128 + q: unpacklo -> j = 0..15, unpackhi -> j = 16..31 (the same for the high nibbles,
 * rows j + 32). unpack works within 128-bit lanes, hence the lane-wise order. */
static __m512i pair_index(void) {
    uint8_t idx[64];
    for (int lane = 0; lane < 4; lane++)
        for (int b = 0; b < 16; b++) {
            int i = b < 8 ? 8 * lane + b : 32 + 8 * lane + b - 8; /* position in (k, k+1) interleaved order */
            idx[16 * lane + b] = (uint8_t)((i & 1) ? 32 + i / 2 : i / 2);
        }
    return _mm512_loadu_si512(idx);
}

static inline __attribute__((always_inline)) void rows_block(const int R, const uint16_t *x, int64_t xs,
                                                             const __m512i *w, const float *xsum, int64_t groups,
                                                             int64_t g, __m512 scale[4], __m512 shift[4],
                                                             float *ybuf) {
    __m512 acc[RB][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    const uint16_t *xg = x + g * 32;
    for (int p = 0; p < 16; p++) {
        for (int c = 0; c < 4; c++) {
            __m512bh wv = (__m512bh)_mm512_load_si512(w + p * 4 + c);
            for (int r = 0; r < R; r++) {
                int32_t pair;
                memcpy(&pair, xg + r * xs + 2 * p, 4);
                acc[r][c] = _mm512_dpbf16_ps(acc[r][c], wv, (__m512bh)_mm512_set1_epi32(pair));
            }
        }
    }
    for (int r = 0; r < R; r++) {
        __m512 xr = _mm512_set1_ps(xsum[r * groups + g]);
        for (int c = 0; c < 4; c++) {
            float *yb = ybuf + r * 64 + c * 16;
            __m512 v = _mm512_fmadd_ps(acc[r][c], scale[c], _mm512_load_ps(yb));
            _mm512_store_ps(yb, _mm512_fmadd_ps(xr, shift[c], v));
        }
    }
}

/* 16 floats -> bf16, rounded to nearest even as torch (a NaN: 0x7fc0) */
static inline __m256i to_bf16(__m512 f) {
    __m512i u = _mm512_castps_si512(f);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    u = _mm512_mask_mov_epi32(u, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc00000));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
}

/* scratch: m * (k / 32) floats (the groups' sums of x), then per thread 4096 bytes (the
 * unpacked codes) and m * 64 floats (a tile's float32 totals); 64-byte aligned. */
void qkv_int4_rows(const uint16_t *x, int64_t m, int64_t xs, const uint8_t *packed, const uint16_t *sz,
                   int64_t k, int64_t n, uint16_t *y, int64_t ys, float *scratch, int threads) {
    const int64_t groups = k / 32, tiles = n / 64;
    float *xsum = scratch;
    for (int64_t r = 0; r < m; r++) /* vectorized: a scalar chain of 32 adds a group was ~2 ms a step */
        for (int64_t g = 0; g < groups; g++) {
            __m512i h = _mm512_loadu_si512(x + r * xs + g * 32);
            __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
            __m512 hi = _mm512_castsi512_ps(_mm512_and_si512(h, _mm512_set1_epi32((int)0xffff0000u)));
            xsum[r * groups + g] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
        }
    const int64_t per = 1024 + m * 64, base = (m * groups + 15) / 16 * 16;
    const __m512i idx = pair_index(), low = _mm512_set1_epi8(15), hi43 = _mm512_set1_epi8(0x43);
    const __m512i scale_mask = _mm512_set1_epi32((int)0xffff0000u);
/* one tile at a time: a thread that wakes late (torch's pool sleeps between ops) takes fewer */
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
    for (int64_t t = 0; t < tiles; t++) {
        float *mine = scratch + base + (int64_t)omp_get_thread_num() * per;
        __m512i *w = (__m512i *)mine;
        float *ybuf = mine + 1024;
        memset(ybuf, 0, m * 64 * sizeof(float));
        for (int64_t g = 0; g < groups; g++) {
            /* the codes PF_DIST groups ahead (the next tile's first at the end): the weights are
             * cold (a step reads every layer once); one thread's 16-row step ~10% faster */
            const int64_t ahead = g + PF_DIST < groups ? t * k + (g + PF_DIST) * 32 : (t + 1) * k + (g + PF_DIST - groups) * 32;
            if (ahead < tiles * k)
                for (int i = 0; i < 16; i++) _mm_prefetch((const char *)(packed + ahead * 32 + 64 * i), _MM_HINT_T0);
            for (int p = 0; p < 16; p++) {
                __m512i v = _mm512_permutexvar_epi8(idx, _mm512_loadu_si512(packed + (t * k + g * 32 + 2 * p) * 32));
                __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                _mm512_store_si512(w + p * 4 + 0, _mm512_unpacklo_epi8(lo, hi43));
                _mm512_store_si512(w + p * 4 + 1, _mm512_unpackhi_epi8(lo, hi43));
                _mm512_store_si512(w + p * 4 + 2, _mm512_unpacklo_epi8(hi, hi43));
                _mm512_store_si512(w + p * 4 + 3, _mm512_unpackhi_epi8(hi, hi43));
            }
            __m512 scale[4], shift[4];
            for (int c = 0; c < 4; c++) { /* 16 rows' (scale, zero) pairs: bf16 -> float32 is a shift */
                __m512i s = _mm512_loadu_si512(sz + (g * n + t * 64 + c * 16) * 2);
                scale[c] = _mm512_castsi512_ps(_mm512_slli_epi32(s, 16));
                __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(s, scale_mask));
                shift[c] = _mm512_fnmadd_ps(_mm512_set1_ps(136.0f), scale[c], zero);
            }
            int64_t r0 = 0;
            for (; r0 + RB <= m; r0 += RB)
                rows_block(RB, x + r0 * xs, xs, w, xsum + r0 * groups, groups, g, scale, shift, ybuf + r0 * 64);
            switch (m - r0) {
            case 5: rows_block(5, x + r0 * xs, xs, w, xsum + r0 * groups, groups, g, scale, shift, ybuf + r0 * 64); break;
            case 4: rows_block(4, x + r0 * xs, xs, w, xsum + r0 * groups, groups, g, scale, shift, ybuf + r0 * 64); break;
            case 3: rows_block(3, x + r0 * xs, xs, w, xsum + r0 * groups, groups, g, scale, shift, ybuf + r0 * 64); break;
            case 2: rows_block(2, x + r0 * xs, xs, w, xsum + r0 * groups, groups, g, scale, shift, ybuf + r0 * 64); break;
            case 1: rows_block(1, x + r0 * xs, xs, w, xsum + r0 * groups, groups, g, scale, shift, ybuf + r0 * 64); break;
            default: break;
            }
        }
        for (int64_t r = 0; r < m; r++)
            for (int c = 0; c < 4; c++)
                _mm256_storeu_si256((__m256i *)(y + r * ys + t * 64 + c * 16), to_bf16(_mm512_load_ps(ybuf + r * 64 + c * 16)));
    }
}
