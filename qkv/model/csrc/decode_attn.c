/* One query per sequence attending over its keys read in place from bf16 KV pages
 * (attention/decode_native.py): softmax(q K^T * scale) V in float32, out rounded to bf16.
 *
 * q: element (b, h, d) at q[b * q_sb + h * q_sh + d], bf16. kp, vp: the K and V planes,
 * [slots, KVH, D] bf16. pages: [B, L] slot of each key; mask: [B, L] bytes, 0 for a key the
 * query does not see (skipped: never read), or NULL. out: [B, H, D] bf16. Query head h reads
 * KV head h / (H / KVH). Scratch from the caller, per thread: H * (L + 2 * D) floats (scores,
 * the scaled q, the sums) and L int32. Sequences split over ``threads`` OpenMP threads: built
 * with -fopenmp, this library shares torch's libgomp.so.1 (loaded first), so its threads are
 * torch's own pool, not a second one competing for the cores.
 * A key's whole row (every KV head) is read at once and the rows a few keys ahead are
 * prefetched: pages are scattered blocks, so the loop waits on memory, not arithmetic.
 * Built with -ffast-math (vectorized expf from libmvec): no infinity is ever formed, masked
 * keys are skipped instead of given -inf. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

static inline float bf(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t to_bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#define AHEAD 6 /* keys prefetched ahead */

static inline void prefetch_row(const uint16_t *row, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch((const char *)row + o);
}

static void one(const uint16_t *q, int64_t q_sb, int64_t q_sh, const uint16_t *kp, const uint16_t *vp,
                const int64_t *pages, const uint8_t *mask, int64_t b, int64_t L, int64_t H, int64_t KVH, int64_t D,
                float scale, uint16_t *out, float *scores, float *qf, float *acc, int32_t *keep) {
    const int64_t g = H / KVH, row = KVH * D;
    {
        const int64_t *pg = pages + b * L;
        int64_t n = 0;
        for (int64_t l = 0; l < L; l++)
            if (!mask || mask[b * L + l]) keep[n++] = (int32_t)l;
        for (int64_t h = 0; h < H; h++)
            for (int64_t d = 0; d < D; d++) qf[h * D + d] = bf(q[b * q_sb + h * q_sh + d]) * scale;
        for (int64_t i = 0; i < n && i < AHEAD; i++) prefetch_row(kp + pg[keep[i]] * row, row * 2);
        for (int64_t i = 0; i < n; i++) {
            if (i + AHEAD < n) prefetch_row(kp + pg[keep[i + AHEAD]] * row, row * 2);
            const uint16_t *kr = kp + pg[keep[i]] * row;
            for (int64_t kh = 0; kh < KVH; kh++) {
                float kf[D];
                for (int64_t d = 0; d < D; d++) kf[d] = bf(kr[kh * D + d]);
                for (int64_t j = 0; j < g; j++) {
                    const float *qh = qf + (kh * g + j) * D;
                    float s = 0.0f;
                    for (int64_t d = 0; d < D; d++) s += qh[d] * kf[d];
                    scores[(kh * g + j) * L + i] = s;
                }
            }
        }
        for (int64_t i = 0; i < n && i < AHEAD; i++) prefetch_row(vp + pg[keep[i]] * row, row * 2);
        for (int64_t h = 0; h < H; h++) {
            float *s = scores + h * L, m = -3.0e38f, t = 0.0f;
            for (int64_t i = 0; i < n; i++) m = s[i] > m ? s[i] : m;
            for (int64_t i = 0; i < n; i++) {
                s[i] = expf(s[i] - m);
                t += s[i];
            }
            float r = 1.0f / t;
            for (int64_t i = 0; i < n; i++) s[i] *= r;
            for (int64_t d = 0; d < D; d++) acc[h * D + d] = 0.0f;
        }
        for (int64_t i = 0; i < n; i++) {
            if (i + AHEAD < n) prefetch_row(vp + pg[keep[i + AHEAD]] * row, row * 2);
            const uint16_t *vr = vp + pg[keep[i]] * row;
            for (int64_t kh = 0; kh < KVH; kh++) {
                float vf[D];
                for (int64_t d = 0; d < D; d++) vf[d] = bf(vr[kh * D + d]);
                for (int64_t j = 0; j < g; j++) {
                    float p = scores[(kh * g + j) * L + i], *a = acc + (kh * g + j) * D;
                    for (int64_t d = 0; d < D; d++) a[d] += p * vf[d];
                }
            }
        }
        for (int64_t h = 0; h < H; h++)
            for (int64_t d = 0; d < D; d++) out[(b * H + h) * D + d] = to_bf(acc[h * D + d]);
    }
}

void qkv_decode_attn(const uint16_t *q, int64_t q_sb, int64_t q_sh, const uint16_t *kp, const uint16_t *vp,
                     const int64_t *pages, const uint8_t *mask, int64_t B, int64_t L, int64_t H, int64_t KVH,
                     int64_t D, float scale, uint16_t *out, float *scratch, int32_t *keep, int threads) {
    const int64_t per = H * (L + 2 * D);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && B > 1)
    for (int64_t b = 0; b < B; b++) {
        int t = omp_get_thread_num();
        float *s = scratch + t * per;
        one(q, q_sb, q_sh, kp, vp, pages, mask, b, L, H, KVH, D, scale, out, s, s + H * L, s + H * (L + D),
            keep + t * L);
    }
}
