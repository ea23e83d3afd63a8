/* y = x @ (q * scale)^T for a few rows of x and an int8 weight with one scale per output row
 * (model/int8_gemv.py): the CPU decode step's int8 lm_head, whose weight is read once per token.
 *
 * x: [m][k] float32, q: [n][k] int8 row-major (quant.py's quantize_int8), scale: [n] float32,
 * rowsum: [n] int32 (each weight row's sum), y: [m][n] float32.
 *
 * Each row of x is split into two int8 planes as quant.py's int8_planes does,
 * x ~= s * (hi + lo / 254), s = max|x| / 127, and each plane's dot product with a weight row is
 * exact integer arithmetic: with AVX-512 VNNI, vpdpbusd multiplies 64 unsigned bytes by 64
 * signed ones per instruction, so the planes go in offset by 128 (as uint8) and 128 * rowsum
 * is taken off after. Widening the weight to float32 instead was compute-bound on this
 * project's AMD EPYC (one thread 5.5 GB/s, where memory gives 25). Without VNNI the same
 * integers are summed in plain C: the two paths give the same bits. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* One row of x -> its planes as uint8 (value + 128) and its s. */
static float planes(const float *x, int64_t k, uint8_t *hi, uint8_t *lo) {
    float amax = 0.0f;
    for (int64_t i = 0; i < k; i++) amax = fmaxf(amax, fabsf(x[i]));
    float s = fmaxf(amax, 1e-30f) / 127.0f;
    for (int64_t i = 0; i < k; i++) {
        float h = nearbyintf(x[i] / s);
        float r = x[i] - h * s;
        float l = nearbyintf(r * 254.0f / s);
        hi[i] = (uint8_t)(int)(h + 128.0f);
        lo[i] = (uint8_t)(int)(fminf(fmaxf(l, -127.0f), 127.0f) + 128.0f);
    }
    return s;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>

/* Bytes ahead of the four rows being read that each iteration asks the cache for (4 lines per
 * 64 columns: the next blocks' bytes, in step). Without it one thread streamed ~6.5 GB/s (the
 * lm_head 14-16 ms); 2,048-8,192 gave the same (Gemma 3's layers ~6.5 ms, lm_head ~7 ms, 2
 * threads), 1,024 less, 0 the slowest. Past the weight's end it only asks for nothing useful:
 * a prefetch does not fault. */
#ifndef PREFETCH
#define PREFETCH 4096
#endif

/* Dot products of the two planes with 4 consecutive weight rows: out[2 * j] hi, out[2 * j + 1] lo. */
static void dots4(const uint8_t *hi, const uint8_t *lo, const int8_t *q, int64_t k, int32_t out[8]) {
    __m512i h0 = _mm512_setzero_si512(), h1 = h0, h2 = h0, h3 = h0, l0 = h0, l1 = h0, l2 = h0, l3 = h0;
    for (int64_t i = 0; i < k; i += 64) {
        const char *pf = (const char *)q + PREFETCH + 4 * i;
        _mm_prefetch(pf, _MM_HINT_T0);
        _mm_prefetch(pf + 64, _MM_HINT_T0);
        _mm_prefetch(pf + 128, _MM_HINT_T0);
        _mm_prefetch(pf + 192, _MM_HINT_T0);
        __mmask64 mk = k - i >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (k - i)) - 1);
        __m512i xh = _mm512_maskz_loadu_epi8(mk, hi + i), xl = _mm512_maskz_loadu_epi8(mk, lo + i);
        __m512i w0 = _mm512_maskz_loadu_epi8(mk, q + i), w1 = _mm512_maskz_loadu_epi8(mk, q + k + i);
        __m512i w2 = _mm512_maskz_loadu_epi8(mk, q + 2 * k + i), w3 = _mm512_maskz_loadu_epi8(mk, q + 3 * k + i);
        h0 = _mm512_dpbusd_epi32(h0, xh, w0);
        l0 = _mm512_dpbusd_epi32(l0, xl, w0);
        h1 = _mm512_dpbusd_epi32(h1, xh, w1);
        l1 = _mm512_dpbusd_epi32(l1, xl, w1);
        h2 = _mm512_dpbusd_epi32(h2, xh, w2);
        l2 = _mm512_dpbusd_epi32(l2, xl, w2);
        h3 = _mm512_dpbusd_epi32(h3, xh, w3);
        l3 = _mm512_dpbusd_epi32(l3, xl, w3);
    }
    out[0] = _mm512_reduce_add_epi32(h0);
    out[1] = _mm512_reduce_add_epi32(l0);
    out[2] = _mm512_reduce_add_epi32(h1);
    out[3] = _mm512_reduce_add_epi32(l1);
    out[4] = _mm512_reduce_add_epi32(h2);
    out[5] = _mm512_reduce_add_epi32(l2);
    out[6] = _mm512_reduce_add_epi32(h3);
    out[7] = _mm512_reduce_add_epi32(l3);
}
#else
static void dots4(const uint8_t *hi, const uint8_t *lo, const int8_t *q, int64_t k, int32_t out[8]) {
    for (int j = 0; j < 4; j++) {
        int32_t a = 0, b = 0;
        for (int64_t i = 0; i < k; i++) {
            a += (int32_t)hi[i] * q[j * k + i];
            b += (int32_t)lo[i] * q[j * k + i];
        }
        out[2 * j] = a;
        out[2 * j + 1] = b;
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
    uint8_t *buf = malloc((size_t)(2 * m * k + 64));
    if (!buf) return 1;
    float s[64];
    for (int64_t r = 0; r < m; r++) s[r] = planes(x + r * k, k, buf + 2 * r * k, buf + 2 * r * k + k);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t o = 0; o < n; o += 4) {
        for (int64_t r = 0; r < m; r++) {
            int32_t d[8];
            dots4(buf + 2 * r * k, buf + 2 * r * k + k, q + o * k, k, d);
            for (int j = 0; j < 4; j++) {
                int32_t off = 128 * rowsum[o + j];
                float v = (float)(d[2 * j + 1] - off) / 254.0f + (float)(d[2 * j] - off);
                y[r * n + o + j] = v * s[r] * scale[o + j];
            }
        }
    }
    free(buf);
    return 0;
}
