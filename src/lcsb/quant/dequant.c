/* Dequantization kernels for lcsb.quant.formats: one pass from the packed weight to float32.
 *
 * Each function writes rows [0, rows) of a row-major [rows, cols] float32 matrix and splits the
 * rows over `threads` POSIX threads (the caller's thread takes the first share). The arithmetic is
 * the torch reference's, operation for operation (q * scale, then + bias), and the library is built
 * with -ffp-contract=off so no multiply-add is fused: results equal the torch path bit for bit.
 */
#include <pthread.h>
#include <stdint.h>

typedef struct {
    int kind;                 /* 0 int4, 1 nf4, 2 int8 */
    const uint8_t *q;         /* int4/nf4: [rows, cols/2] nibbles, low first; int8: [rows, cols] */
    const float *s;           /* int4 scales, nf4 absmax: [rows, cols/group]; int8: [rows] */
    const float *b;           /* int4 biases [rows, cols/group]; nf4: the 16-entry code book */
    float *out;
    int64_t r0, r1, cols, group;
} job_t;

static void run_rows(const job_t *j) {
    const int64_t cols = j->cols, group = j->group;
    for (int64_t r = j->r0; r < j->r1; r++) {
        float *o = j->out + r * cols;
        if (j->kind == 2) {
            const int8_t *q = (const int8_t *)j->q + r * cols;
            const float sc = j->s[r];
            for (int64_t c = 0; c < cols; c++) o[c] = (float)q[c] * sc;
            continue;
        }
        const int64_t ng = cols / group, half = group / 2;
        const uint8_t *q = j->q + r * (cols / 2);
        const float *s = j->s + r * ng;
        for (int64_t g = 0; g < ng; g++) {
            const uint8_t *qg = q + g * half;
            float *og = o + g * group;
            if (j->kind == 0) {
                const float sc = s[g], bi = j->b[r * ng + g];
                for (int64_t k = 0; k < half; k++) {
                    const uint8_t v = qg[k];
                    og[2 * k] = (float)(v & 15) * sc + bi;
                    og[2 * k + 1] = (float)(v >> 4) * sc + bi;
                }
            } else {
                float t[16];
                for (int k = 0; k < 16; k++) t[k] = j->b[k] * s[g];
                for (int64_t k = 0; k < half; k++) {
                    const uint8_t v = qg[k];
                    og[2 * k] = t[v & 15];
                    og[2 * k + 1] = t[v >> 4];
                }
            }
        }
    }
}

static void *thread_main(void *arg) {
    run_rows((const job_t *)arg);
    return 0;
}

#define MAX_THREADS 64

/* Returns 0, or -1 when a thread could not be started (the rows are then all done here). */
int lcsb_dequant(int kind, const uint8_t *q, const float *s, const float *b, float *out,
                 int64_t rows, int64_t cols, int64_t group, int threads) {
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (rows * cols < (1 << 16)) threads = 1;          /* not worth a thread */
    job_t jobs[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    int started = 0, failed = 0;
    for (int i = 0; i < threads; i++) {
        jobs[i] = (job_t){kind, q, s, b, out, rows * i / threads, rows * (i + 1) / threads, cols, group};
    }
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
