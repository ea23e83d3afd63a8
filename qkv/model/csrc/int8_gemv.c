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

/* Bytes ahead of the row being read that each iteration asks the cache for (two lines a
 * step). Without it one thread streamed ~6.5 GB/s (the lm_head 14-16 ms); 2,048-8,192 bytes
 * measured alike, 1,024 a little slower. Past the weight's end a prefetch does not fault. */
#ifndef PREFETCH
#define PREFETCH 4096
#endif

/* Dot products of the two planes with 4 consecutive weight rows: out[2 * j] hi, out[2 * j + 1] lo.
 * One row after the other, so the weight is read as one sequential stream (the planes stay in
 * L1): the four rows side by side (four streams 640 bytes apart, x loaded once for all) were
 * ~1.5 ms slower on Gemma 3's layers and again on its lm_head (2 threads, same process). */
static void dots4(const uint8_t *hi, const uint8_t *lo, const int8_t *q, int64_t k, int32_t out[8]) {
    for (int j = 0; j < 4; j++) {
        const int8_t *w = q + j * k;
        __m512i h = _mm512_setzero_si512(), l = h, h2 = h, l2 = h;
        int64_t i = 0;
        for (; i + 128 <= k; i += 128) {
            _mm_prefetch((const char *)w + PREFETCH + i, _MM_HINT_T0);
            _mm_prefetch((const char *)w + PREFETCH + i + 64, _MM_HINT_T0);
            __m512i w0 = _mm512_loadu_si512(w + i), w1 = _mm512_loadu_si512(w + i + 64);
            h = _mm512_dpbusd_epi32(h, _mm512_loadu_si512(hi + i), w0);
            l = _mm512_dpbusd_epi32(l, _mm512_loadu_si512(lo + i), w0);
            h2 = _mm512_dpbusd_epi32(h2, _mm512_loadu_si512(hi + i + 64), w1);
            l2 = _mm512_dpbusd_epi32(l2, _mm512_loadu_si512(lo + i + 64), w1);
        }
        for (; i < k; i += 64) {
            __mmask64 mk = k - i >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (k - i)) - 1);
            __m512i w0 = _mm512_maskz_loadu_epi8(mk, w + i);
            h = _mm512_dpbusd_epi32(h, _mm512_maskz_loadu_epi8(mk, hi + i), w0);
            l = _mm512_dpbusd_epi32(l, _mm512_maskz_loadu_epi8(mk, lo + i), w0);
        }
        out[2 * j] = _mm512_reduce_add_epi32(_mm512_add_epi32(h, h2));
        out[2 * j + 1] = _mm512_reduce_add_epi32(_mm512_add_epi32(l, l2));
    }
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
