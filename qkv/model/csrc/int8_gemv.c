/* y = x @ (q * scale)^T for a few rows of x and an int8 weight with one scale per output row
 * (model/int8_gemv.py): the CPU decode step's int8 products, whose weights are read once a token.
 *
 * x: [m][k] float32, q: [n][k] int8 row-major (quant.py's quantize_int8), scale: [n] float32,
 * rowsum: [n] int32 (each weight row's sum), y: [m][n] float32.
 *
 * Each row of x is split into three int8 planes, x ~= s * (p0 + p1 / 254 + p2 / 254^2) with
 * s = max|x| / 127 (each plane the rounded remainder of the ones before), and each plane's dot
 * product with a weight row is exact integer arithmetic: with AVX-512 VNNI, vpdpbusd
 * multiplies 64 unsigned bytes by 64 signed ones per instruction, so the planes go in offset
 * by 128 (as uint8) and 128 * rowsum is taken off after. Three planes, not quant.py's two: the
 * planes' error is a fraction of the row's largest element (two: 1 / 64,516 of it), and
 * Gemma 3's hidden states have channels hundreds of times their median, so with two the
 * typical elements are held to fewer bits than bf16 gives them (tests/test_int8_gemv.py: three
 * within 2e-6 of the exact product, ten times closer than two; ~0.6 ms more a Gemma step). Widening the weight to float32 instead was compute-bound on this project's AMD
 * EPYC (one thread 5.5 GB/s, where memory gives 25). Without VNNI the same integers are summed
 * in plain C: the two paths give the same bits. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define PLANES 3

/* One row of x -> its planes as uint8 (value + 128), plane j at p + j * k, and its s. */
static float planes(const float *x, int64_t k, uint8_t *p) {
    float amax = 0.0f;
    for (int64_t i = 0; i < k; i++) amax = fmaxf(amax, fabsf(x[i]));
    float s = fmaxf(amax, 1e-30f) / 127.0f;
    for (int64_t i = 0; i < k; i++) {
        float r = x[i] / s;  /* in [-127, 127]; each step keeps the remainder, scaled by 254 */
        for (int j = 0; j < PLANES; j++) {
            float v = fminf(fmaxf(nearbyintf(r), -127.0f), 127.0f);
            p[j * k + i] = (uint8_t)(int)(v + 128.0f);
            r = (r - v) * 254.0f;
        }
    }
    return s;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>

/* Bytes ahead of the row being read that each iteration asks the cache for (two lines a
 * step). Without it one thread streamed ~6.5 GB/s (the lm_head 14-16 ms); 2,048-8,192 bytes
 * measured alike, 1,024 a little slower. Past the weight's end a prefetch does not fault. */
#ifndef PREFETCH
#define PREFETCH 4096
#endif

/* Dot products of the planes (p, PLANES rows of k) with 4 consecutive weight rows:
 * out[PLANES * j + plane]. One row after the other, so the weight is read as one sequential
 * stream (the planes stay in L1): the four rows side by side (four streams 640 bytes apart, x
 * loaded once for all) were ~1.5 ms slower on Gemma 3's layers and again on its lm_head (2
 * threads, same process). */
static void dots4(const uint8_t *p, const int8_t *q, int64_t k, int32_t out[4 * PLANES]) {
    const uint8_t *p0 = p, *p1 = p + k, *p2 = p + 2 * k;
    for (int j = 0; j < 4; j++) {
        const int8_t *w = q + j * k;
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, b0 = a0, b1 = a0, b2 = a0;
        int64_t i = 0;
        for (; i + 128 <= k; i += 128) {
            _mm_prefetch((const char *)w + PREFETCH + i, _MM_HINT_T0);
            _mm_prefetch((const char *)w + PREFETCH + i + 64, _MM_HINT_T0);
            __m512i w0 = _mm512_loadu_si512(w + i), w1 = _mm512_loadu_si512(w + i + 64);
            a0 = _mm512_dpbusd_epi32(a0, _mm512_loadu_si512(p0 + i), w0);
            a1 = _mm512_dpbusd_epi32(a1, _mm512_loadu_si512(p1 + i), w0);
            a2 = _mm512_dpbusd_epi32(a2, _mm512_loadu_si512(p2 + i), w0);
            b0 = _mm512_dpbusd_epi32(b0, _mm512_loadu_si512(p0 + i + 64), w1);
            b1 = _mm512_dpbusd_epi32(b1, _mm512_loadu_si512(p1 + i + 64), w1);
            b2 = _mm512_dpbusd_epi32(b2, _mm512_loadu_si512(p2 + i + 64), w1);
        }
        for (; i < k; i += 64) {
            __mmask64 mk = k - i >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (k - i)) - 1);
            __m512i w0 = _mm512_maskz_loadu_epi8(mk, w + i);
            a0 = _mm512_dpbusd_epi32(a0, _mm512_maskz_loadu_epi8(mk, p0 + i), w0);
            a1 = _mm512_dpbusd_epi32(a1, _mm512_maskz_loadu_epi8(mk, p1 + i), w0);
            a2 = _mm512_dpbusd_epi32(a2, _mm512_maskz_loadu_epi8(mk, p2 + i), w0);
        }
        out[PLANES * j] = _mm512_reduce_add_epi32(_mm512_add_epi32(a0, b0));
        out[PLANES * j + 1] = _mm512_reduce_add_epi32(_mm512_add_epi32(a1, b1));
        out[PLANES * j + 2] = _mm512_reduce_add_epi32(_mm512_add_epi32(a2, b2));
    }
}
#else
static void dots4(const uint8_t *p, const int8_t *q, int64_t k, int32_t out[4 * PLANES]) {
    for (int j = 0; j < 4; j++)
        for (int pl = 0; pl < PLANES; pl++) {
            int32_t a = 0;
            for (int64_t i = 0; i < k; i++) a += (int32_t)p[pl * k + i] * q[j * k + i];
            out[PLANES * j + pl] = a;
        }
}
#endif

/* Output rows split over ``threads`` OpenMP threads (torch's pool: model/native.py); each
 * thread reads its rows of the weight once for all m rows of x. n must be a multiple of 4 and
 * m at most 64. Returns nonzero (nothing written) for more rows or when the planes' scratch
 * could not be had. */
int qkv_int8_gemv(const float *x, int64_t m, const int8_t *q, const float *scale, const int32_t *rowsum,
                  float *y, int64_t n, int64_t k, int threads) {
    if (m > 64) return 2;
    uint8_t *buf = malloc((size_t)(PLANES * m * k + 64));
    if (!buf) return 1;
    float s[64];
    for (int64_t r = 0; r < m; r++) s[r] = planes(x + r * k, k, buf + PLANES * r * k);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t o = 0; o < n; o += 4) {
        for (int64_t r = 0; r < m; r++) {
            int32_t d[4 * PLANES];
            dots4(buf + PLANES * r * k, q + o * k, k, d);
            for (int j = 0; j < 4; j++) {
                int32_t off = 128 * rowsum[o + j];
                const int32_t *e = d + PLANES * j;
                float v = ((float)(e[2] - off) / 254.0f + (float)(e[1] - off)) / 254.0f + (float)(e[0] - off);
                y[r * n + o + j] = v * s[r] * scale[o + j];
            }
        }
    }
    free(buf);
    return 0;
}
