/* int4 -> bf16 unpack of ATen's CPU int4 packing in one pass (model/int4_native.py).
 *
 * packed: [N/64 tiles][K][32] bytes, byte (t, k, j) = row t*64+j's code (low nibble) and row
 * t*64+j+32's (high nibble). sz: [K/32][N][2] bf16 (scale, zero). out: [K][N] bf16, the
 * weight transposed: (q - 8) * scale + zero computed as q * scale + (zero - 8 * scale) in
 * float32 and rounded to nearest even, as int4.unpack does (q * scale is exact in float32: a
 * 4-bit code times a bf16 scale, so a fused multiply-add rounds the same). Plain C the
 * compiler vectorizes. */
#include <omp.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0x7fc0; /* NaN, as c10::BFloat16 */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Groups of 32 rows of the output split over ``threads`` OpenMP threads (torch's own pool:
 * model/native.py); scratch: 2 * n floats per thread (a group's scale and zero - 8 * scale). */
void qkv_int4_unpack(const uint8_t *packed, const uint16_t *sz, uint16_t *out, int64_t k, int64_t n,
                     float *scratch, int threads) {
    const int64_t tiles = n / 64;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t g = 0; g < k / 32; g++) {
        float *scale = scratch + (int64_t)omp_get_thread_num() * 2 * n, *shifted = scale + n;
        const uint16_t *row = sz + g * n * 2;
        for (int64_t i = 0; i < n; i++) {
            float s = bf16_to_f32(row[2 * i]);
            scale[i] = s;
            shifted[i] = bf16_to_f32(row[2 * i + 1]) - 8.0f * s;
        }
        for (int64_t kk = g * 32; kk < g * 32 + 32; kk++) {
            uint16_t *o = out + kk * n;
            for (int64_t t = 0; t < tiles; t++) {
                const uint8_t *p = packed + (t * k + kk) * 32;
                const float *s = scale + t * 64, *z = shifted + t * 64;
                uint16_t *ot = o + t * 64;
                for (int j = 0; j < 32; j++) {
                    ot[j] = f32_to_bf16(z[j] + (float)(p[j] & 15) * s[j]);
                    ot[j + 32] = f32_to_bf16(z[j + 32] + (float)(p[j] >> 4) * s[j + 32]);
                }
            }
        }
    }
}
