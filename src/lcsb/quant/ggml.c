/* Dequantization of ggml block types (GGUF weights) to float32, for lcsb.quant.ggml.
 *
 * Each row of the source is `row_bytes` bytes of consecutive blocks (type_size bytes decoding to
 * block_size values); row r of the [rows, cols] float32 output is its blocks decoded in order.
 * The rows are split over `threads` POSIX threads (the caller's thread takes the first share).
 *
 * The arithmetic is gguf-py's numpy dequantization (gguf/quants.py) operation for operation, in
 * float32: f16 scales are widened exactly, products and sums are rounded one at a time in the same
 * order (e.g. Q4_K: (d * sc) * q - dmin * m), and the library is built with -ffp-contract=off so no
 * multiply-add is fused. Results equal gguf-py's (and the torch code of ggml.py) bit for bit.
 * Nothing is checked here: the Python wrapper checks the type, shapes, dtypes and contiguity.
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

enum { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11,
       Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30 };

static inline float bits_to_float(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t float_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* IEEE half -> float, exactly, NaN payloads kept (as numpy's npy_halfbits_to_floatbits). Branch-free
 * so that loops over f16 values vectorize: exponent rebias, with Inf/NaN and subnormals fixed up
 * (a subnormal is rebuilt exactly by one float subtraction; nothing else touches float arithmetic). */
static inline float h2f_bits(uint32_t h) {
    const uint32_t shifted_exp = 0x7c00u << 13;
    uint32_t o = (h & 0x7fffu) << 13;
    const uint32_t exp = o & shifted_exp;
    o += (127u - 15u) << 23;
    o += exp == shifted_exp ? (128u - 16u) << 23 : 0;                           /* Inf / NaN */
    const float sub = bits_to_float(o + (1u << 23)) - bits_to_float(113u << 23);     /* zero / subnormal */
    const uint32_t mag = exp == 0 ? float_to_bits(sub) : o;
    return bits_to_float(mag | ((h & 0x8000u) << 16));
}

static inline float h2f(const uint8_t *p) {
    return h2f_bits((uint32_t)p[0] | ((uint32_t)p[1] << 8));
}

/* Each decoder turns one row's `nb` blocks at b into nb * block_size floats at y. Two things keep
 * gcc's vectorized loops fast (measured: Q4_0/Q4_1 3-4x): the decoders are not inlined into run_rows
 * (one call per row), and LOCAL copies the 16 code bytes of a 32-value block to the stack before the
 * loop over them. Copying whole blocks was slower (those stores do not forward to the loads). */
#define NOINLINE __attribute__((noinline))
#define LOCAL(name, src, n) uint8_t name[n]; memcpy(name, src, n)

NOINLINE static void row_f16(const uint8_t *restrict b, float *restrict y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = h2f(b + 2 * i);
}

NOINLINE static void row_bf16(const uint8_t *restrict b, float *restrict y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = bits_to_float(((uint32_t)b[2 * i] | ((uint32_t)b[2 * i + 1] << 8)) << 16);
}

NOINLINE static void row_q4_0(const uint8_t *restrict b, float *restrict y, int64_t nb) {       /* d f16, qs[16] */
    for (int64_t i = 0; i < nb; i++, b += 18, y += 32) {
        const float d = h2f(b);
        LOCAL(qs, b + 2, 16);
        for (int k = 0; k < 16; k++) {
            y[k] = d * (float)((int)(qs[k] & 15) - 8);
            y[k + 16] = d * (float)((int)(qs[k] >> 4) - 8);
        }
    }
}

NOINLINE static void row_q4_1(const uint8_t *restrict b, float *restrict y, int64_t nb) {       /* d, m f16, qs[16] */
    for (int64_t i = 0; i < nb; i++, b += 20, y += 32) {
        const float d = h2f(b), m = h2f(b + 2);
        LOCAL(qs, b + 4, 16);
        for (int k = 0; k < 16; k++) {
            y[k] = d * (float)(qs[k] & 15) + m;
            y[k + 16] = d * (float)(qs[k] >> 4) + m;
        }
    }
}

static inline uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

NOINLINE static void row_q5_0(const uint8_t *restrict b, float *restrict y, int64_t nb) {       /* d f16, qh u32, qs[16] */
    for (int64_t i = 0; i < nb; i++, b += 22, y += 32) {
        const float d = h2f(b);
        const uint32_t qh = le32(b + 2);
        LOCAL(qs, b + 6, 16);
        for (int k = 0; k < 16; k++) {
            const int lo = (qs[k] & 15) | (((qh >> k) & 1) << 4);
            const int hi = (qs[k] >> 4) | (((qh >> (k + 16)) & 1) << 4);
            y[k] = d * (float)(lo - 16);
            y[k + 16] = d * (float)(hi - 16);
        }
    }
}

NOINLINE static void row_q5_1(const uint8_t *restrict b, float *restrict y, int64_t nb) {       /* d, m f16, qh u32, qs[16] */
    for (int64_t i = 0; i < nb; i++, b += 24, y += 32) {
        const float d = h2f(b), m = h2f(b + 2);
        const uint32_t qh = le32(b + 4);
        LOCAL(qs, b + 8, 16);
        for (int k = 0; k < 16; k++) {
            const int lo = (qs[k] & 15) | (((qh >> k) & 1) << 4);
            const int hi = (qs[k] >> 4) | (((qh >> (k + 16)) & 1) << 4);
            y[k] = d * (float)lo + m;
            y[k + 16] = d * (float)hi + m;
        }
    }
}

NOINLINE static void row_q8_0(const uint8_t *restrict b, float *restrict y, int64_t nb) {       /* d f16, qs[32] int8 */
    for (int64_t i = 0; i < nb; i++, b += 34, y += 32) {
        const float d = h2f(b);
        const int8_t *qs = (const int8_t *)(b + 2);
        for (int k = 0; k < 32; k++) y[k] = (float)qs[k] * d;
    }
}

/* Q2_K: scales[16] (low nibble scale, high nibble min), qs[64] 2-bit, d f16, dmin f16.
 * Value e = 128h + 32s + k is bits 2s of qs[32h + k]; its sub-block of 16 is e / 16. */
NOINLINE static void row_q2_k(const uint8_t *restrict b, float *restrict y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 84, y += 256) {
        const uint8_t *sc = b, *qs = b + 16;
        const float d = h2f(b + 80), dmin = h2f(b + 82);
        for (int h = 0; h < 2; h++)
            for (int s = 0; s < 4; s++)
                for (int half = 0; half < 2; half++) {
                    const int g = 8 * h + 2 * s + half;
                    const float dl = d * (float)(sc[g] & 15), ml = dmin * (float)(sc[g] >> 4);
                    const uint8_t *q = qs + 32 * h + 16 * half;
                    float *o = y + 128 * h + 32 * s + 16 * half;
                    for (int k = 0; k < 16; k++) o[k] = dl * (float)((q[k] >> (2 * s)) & 3) - ml;
                }
    }
}

/* Q3_K: hmask[32], qs[64] 2-bit, scales[12] (16 six-bit values), d f16. Value e = 128h + 32s + k:
 * low bits 2s of qs[32h + k], minus 4 unless bit e / 32 of hmask[k] is set. */
NOINLINE static void row_q3_k(const uint8_t *restrict b, float *restrict y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 110, y += 256) {
        const uint8_t *hm = b, *qs = b + 32, *sc = b + 96;
        const float d = h2f(b + 108);
        float dl[16];
        for (int j = 0; j < 16; j++) {
            const int lo = j < 8 ? sc[j] & 15 : sc[j - 8] >> 4;
            const int hi = (sc[8 + j % 4] >> (2 * (j / 4))) & 3;
            dl[j] = d * (float)((lo | (hi << 4)) - 32);
        }
        for (int h = 0; h < 2; h++)
            for (int s = 0; s < 4; s++)
                for (int half = 0; half < 2; half++) {
                    const int bit = 4 * h + s;
                    const float dh = dl[8 * h + 2 * s + half];
                    const uint8_t *q = qs + 32 * h + 16 * half, *m = hm + 16 * half;
                    float *o = y + 128 * h + 32 * s + 16 * half;
                    for (int k = 0; k < 16; k++) {
                        const int v = ((q[k] >> (2 * s)) & 3) - ((((m[k] >> bit) & 1) ^ 1) << 2);
                        o[k] = dh * (float)v;
                    }
                }
    }
}

/* The 8 six-bit scales and mins of Q4_K / Q5_K, packed in 12 bytes (gguf-py's Q4_K.get_scale_min). */
static void scale_min_k4(const uint8_t *s, uint8_t sc[8], uint8_t mn[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 15) | ((s[j] >> 2) & 0x30);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30);
    }
}

/* Q4_K: d, dmin f16, scales[12], qs[128]. Sub-block j = 2c + t (32 values) is nibble t of qs[32c + k]. */
NOINLINE static void row_q4_k(const uint8_t *restrict b, float *restrict y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 144, y += 256) {
        const float d = h2f(b), dmin = h2f(b + 2);
        const uint8_t *qs = b + 16;
        uint8_t sc[8], mn[8];
        scale_min_k4(b + 4, sc, mn);
        for (int j = 0; j < 8; j++) {
            const float dl = d * (float)sc[j], ml = dmin * (float)mn[j];
            const uint8_t *q = qs + 32 * (j / 2);
            const int shift = 4 * (j % 2);
            float *o = y + 32 * j;
            for (int k = 0; k < 32; k++) o[k] = dl * (float)((q[k] >> shift) & 15) - ml;
        }
    }
}

/* Q5_K: Q4_K plus qh[32] (before qs): bit j of qh[k] is the fifth bit of value k of sub-block j. */
NOINLINE static void row_q5_k(const uint8_t *restrict b, float *restrict y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 176, y += 256) {
        const float d = h2f(b), dmin = h2f(b + 2);
        const uint8_t *qh = b + 16, *qs = b + 48;
        uint8_t sc[8], mn[8];
        scale_min_k4(b + 4, sc, mn);
        for (int j = 0; j < 8; j++) {
            const float dl = d * (float)sc[j], ml = dmin * (float)mn[j];
            const uint8_t *q = qs + 32 * (j / 2);
            const int shift = 4 * (j % 2);
            float *o = y + 32 * j;
            for (int k = 0; k < 32; k++) o[k] = dl * (float)(((q[k] >> shift) & 15) | (((qh[k] >> j) & 1) << 4)) - ml;
        }
    }
}

/* Q6_K: ql[128] low nibbles, qh[64] 2-bit highs, scales[16] int8, d f16. Value e = 128h + 32r + k:
 * nibble r / 2 of ql[64h + 32(r % 2) + k], bits 2r of qh[32h + k]; minus 32; sub-block e / 16. */
NOINLINE static void row_q6_k(const uint8_t *restrict b, float *restrict y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, b += 210, y += 256) {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        const float d = h2f(b + 208);
        for (int h = 0; h < 2; h++)
            for (int r = 0; r < 4; r++)
                for (int half = 0; half < 2; half++) {
                    const float dl = d * (float)sc[8 * h + 2 * r + half];
                    const uint8_t *l = ql + 64 * h + 32 * (r % 2) + 16 * half, *hb = qh + 32 * h + 16 * half;
                    const int shift = 4 * (r / 2);
                    float *o = y + 128 * h + 32 * r + 16 * half;
                    for (int k = 0; k < 16; k++) {
                        const int q = (((l[k] >> shift) & 15) | (((hb[k] >> (2 * r)) & 3) << 4)) - 32;
                        o[k] = dl * (float)q;
                    }
                }
    }
}

typedef struct {
    int type;
    const uint8_t *src;       /* [rows, row_bytes] */
    float *out;               /* [rows, cols] */
    int64_t r0, r1, cols, row_bytes;
} job_t;

static void run_rows(const job_t *j) {
    const int64_t cols = j->cols;
    for (int64_t r = j->r0; r < j->r1; r++) {
        const uint8_t *b = j->src + r * j->row_bytes;
        float *y = j->out + r * cols;
        switch (j->type) {
            case F32: memcpy(y, b, (size_t)cols * 4); break;
            case F16: row_f16(b, y, cols); break;
            case BF16: row_bf16(b, y, cols); break;
            case Q4_0: row_q4_0(b, y, cols / 32); break;
            case Q4_1: row_q4_1(b, y, cols / 32); break;
            case Q5_0: row_q5_0(b, y, cols / 32); break;
            case Q5_1: row_q5_1(b, y, cols / 32); break;
            case Q8_0: row_q8_0(b, y, cols / 32); break;
            case Q2_K: row_q2_k(b, y, cols / 256); break;
            case Q3_K: row_q3_k(b, y, cols / 256); break;
            case Q4_K: row_q4_k(b, y, cols / 256); break;
            case Q5_K: row_q5_k(b, y, cols / 256); break;
            case Q6_K: row_q6_k(b, y, cols / 256); break;
            default: return;
        }
    }
}

static void *thread_main(void *arg) {
    run_rows((const job_t *)arg);
    return 0;
}

#define MAX_THREADS 64

/* Returns 0, or -1 when a thread could not be started (the rows are then all done here). */
int lcsb_ggml_dequant(int type, const uint8_t *src, float *out, int64_t rows, int64_t cols, int64_t row_bytes,
                      int threads) {
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (rows * cols < (1 << 16)) threads = 1;          /* not worth a thread */
    job_t jobs[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    int started = 0, failed = 0;
    for (int i = 0; i < threads; i++)
        jobs[i] = (job_t){type, src, out, rows * i / threads, rows * (i + 1) / threads, cols, row_bytes};
    for (int i = 1; i < threads; i++) {
        if (pthread_create(&tid[i], 0, thread_main, &jobs[i]) != 0) { failed = 1; break; }
        started = i;
    }
    run_rows(&jobs[0]);
    for (int i = 1; i <= started; i++) pthread_join(tid[i], 0);
    if (failed) {
        for (int i = started + 1; i < threads; i++) run_rows(&jobs[i]);
        return -1;
    }
    return 0;
}
