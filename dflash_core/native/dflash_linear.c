/* y[M, N] = x[M, K] @ W[N, K]^T in fp32, with W stored as the model's own weights:
 *   fmt 0  F32   w[N, K] float
 *   fmt 1  Q8_0  q[N, K] int8,  d[N, K/32] float          w = d * q
 *   fmt 2  Q4_1  q[N, K/2] u8,  d, m[N, K/32] float       w = d * q + m, q in 0..15
 *          (block of 32: byte j holds q[j] in its low nibble, q[j + 16] in its high one)
 * The quantised forms are exact: the caller checks, weight by weight, that d * q (+ m)
 * in fp32 gives back the fp32 weight bit for bit, so this is the same product as an fp32
 * linear over those weights, reading 1/4 (Q8_0) or ~1/5 (Q4_1) of the bytes.
 *
 * Row invariance: every output y[m, n] is one 8-lane accumulator over k in order
 * (acc = fma(w[k:k+8], x[k:k+8], acc)), then the same horizontal sum, whatever M, the
 * tile it falls in or the thread that computes it. So a row gives the same bits alone
 * (a decode step) as inside a verify block or a batch: greedy speculative output equals
 * the engine's own decoding exactly.
 *
 * Threads: OpenMP over tiles of 4 weight rows (the process's libgomp, the one torch
 * loaded, so torch.set_num_threads and the wait policy apply). Needs AVX2 + FMA. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#define DFL_MAX_K 16384

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* dequantise weight row n (exact) into out[K] */
static void dequant_row(int fmt, const void *q, const float *d, const float *m, long K, long n, float *out) {
    const long B = K / 32;
    if (fmt == 1) {
        const int8_t *qr = (const int8_t *)q + n * K;
        const float *dr = d + n * B;
        for (long b = 0; b < B; b++) {
            const __m256 vd = _mm256_set1_ps(dr[b]);
            for (int c = 0; c < 4; c++) {
                __m128i q8 = _mm_loadl_epi64((const __m128i *)(qr + b * 32 + c * 8));
                __m256 qf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8));
                _mm256_storeu_ps(out + b * 32 + c * 8, _mm256_mul_ps(qf, vd));
            }
        }
    } else {
        const uint8_t *qr = (const uint8_t *)q + n * (K / 2);
        const float *dr = d + n * B, *mr = m + n * B;
        const __m128i low = _mm_set1_epi8(0x0F);
        for (long b = 0; b < B; b++) {
            const __m256 vd = _mm256_set1_ps(dr[b]), vm = _mm256_set1_ps(mr[b]);
            __m128i bytes = _mm_loadu_si128((const __m128i *)(qr + b * 16));
            __m128i lo = _mm_and_si128(bytes, low);
            __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
            float *o = out + b * 32;
            /* d * q + m: d * q is exact (q < 16), so the fused form rounds exactly once,
             * like the separate multiply and add it replaces */
            _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), vd, vm));
            _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), vd, vm));
            _mm256_storeu_ps(o + 16, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), vd, vm));
            _mm256_storeu_ps(o + 24, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), vd, vm));
        }
    }
}

/* the 32 weights of block b of row n, dequantised exactly, into w[0..3] */
static inline __attribute__((always_inline)) void dequant_block(int fmt, const void *q, const float *d,
                                                                const float *m, long K, long n, long b, __m256 w[4]) {
    const long B = K / 32;
    const __m256 vd = _mm256_set1_ps(d[n * B + b]);
    if (fmt == 1) {
        const int8_t *qb = (const int8_t *)q + n * K + b * 32;
        for (int c = 0; c < 4; c++)
            w[c] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qb + c * 8)))), vd);
    } else {
        const __m256 vm = _mm256_set1_ps(m[n * B + b]);
        const __m128i low = _mm_set1_epi8(0x0F);
        __m128i bytes = _mm_loadu_si128((const __m128i *)((const uint8_t *)q + n * (K / 2) + b * 16));
        __m128i lo = _mm_and_si128(bytes, low), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
        w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), vd, vm);
        w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), vd, vm);
        w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), vd, vm);
        w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), vd, vm);
    }
}

/* quantised weights, R rows from n, MR input rows (R * MR <= 8 accumulators): the
 * weights dequantised in registers block by block (no buffer), the same accumulation
 * order per output as the tiles below. Called with constant R, MR (unrolled). */
static inline __attribute__((always_inline)) void fused(int fmt, const void *q, const float *d, const float *m,
                                                        const float *x, long K, long n, const int R, const int MR,
                                                        float out[4][4]) {
    __m256 acc[4][4];
    for (int i = 0; i < MR; i++)
        for (int r = 0; r < R; r++) acc[i][r] = _mm256_setzero_ps();
    const long B = K / 32;
    for (long b = 0; b < B; b++) {
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            __m256 w[4];
            dequant_block(fmt, q, d, m, K, n + r, b, w);
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++)
#pragma GCC unroll 4
                for (int i = 0; i < MR; i++)
                    acc[i][r] = _mm256_fmadd_ps(w[c], _mm256_loadu_ps(x + i * K + b * 32 + c * 8), acc[i][r]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int r = 0; r < R; r++) out[i][r] = hsum8(acc[i][r]);
}

/* 4 weight rows x 2 input rows */
static inline void tile_4x2(const float *const w[4], const float *x0, const float *x1, long K,
                            float *y0, float *y1) {
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
    __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    for (long k = 0; k < K; k += 8) {
        __m256 w0 = _mm256_loadu_ps(w[0] + k), w1 = _mm256_loadu_ps(w[1] + k);
        __m256 w2 = _mm256_loadu_ps(w[2] + k), w3 = _mm256_loadu_ps(w[3] + k);
        __m256 v0 = _mm256_loadu_ps(x0 + k), v1 = _mm256_loadu_ps(x1 + k);
        a00 = _mm256_fmadd_ps(w0, v0, a00); a01 = _mm256_fmadd_ps(w1, v0, a01);
        a02 = _mm256_fmadd_ps(w2, v0, a02); a03 = _mm256_fmadd_ps(w3, v0, a03);
        a10 = _mm256_fmadd_ps(w0, v1, a10); a11 = _mm256_fmadd_ps(w1, v1, a11);
        a12 = _mm256_fmadd_ps(w2, v1, a12); a13 = _mm256_fmadd_ps(w3, v1, a13);
    }
    y0[0] = hsum8(a00); y0[1] = hsum8(a01); y0[2] = hsum8(a02); y0[3] = hsum8(a03);
    y1[0] = hsum8(a10); y1[1] = hsum8(a11); y1[2] = hsum8(a12); y1[3] = hsum8(a13);
}

/* 4 weight rows x 1 input row */
static inline void tile_4x1(const float *const w[4], const float *x0, long K, float *y0) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (long k = 0; k < K; k += 8) {
        __m256 v0 = _mm256_loadu_ps(x0 + k);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w[0] + k), v0, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w[1] + k), v0, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w[2] + k), v0, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w[3] + k), v0, a3);
    }
    y0[0] = hsum8(a0); y0[1] = hsum8(a1); y0[2] = hsum8(a2); y0[3] = hsum8(a3);
}

/* 1 weight row x 1 input row (the last rows of N when N % 4 != 0) */
static inline float tile_1x1(const float *w, const float *x0, long K) {
    __m256 a = _mm256_setzero_ps();
    for (long k = 0; k < K; k += 8)
        a = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x0 + k), a);
    return hsum8(a);
}

/* one thread's share: weight rows [n0, n1), n0 a multiple of 4 */
static void rows_range(int fmt, const float *x, long M, long K, long N, const void *q, const float *d,
                       const float *m, float *y, long n0, long n1, float *buf) {
    float tmp[8];
    for (long n = n0; n < n1; n += 4) {
        const int R = (n1 - n) < 4 ? (int)(n1 - n) : 4;
        if (fmt != 0 && M <= 4 && R == 4) {
            /* 1-2 input rows: one tile of 4 weight rows; 3-4: two tiles of 2 (at most 8
             * accumulators either way) */
            float lo[4][4], hi[4][4];
            switch (M) {
                case 1: fused(fmt, q, d, m, x, K, n, 4, 1, lo); break;
                case 2: fused(fmt, q, d, m, x, K, n, 4, 2, lo); break;
                case 3: fused(fmt, q, d, m, x, K, n, 2, 3, lo); fused(fmt, q, d, m, x, K, n + 2, 2, 3, hi); break;
                default: fused(fmt, q, d, m, x, K, n, 2, 4, lo); fused(fmt, q, d, m, x, K, n + 2, 2, 4, hi); break;
            }
            for (long i = 0; i < M; i++)
                for (int r = 0; r < 4; r++)
                    y[i * N + n + r] = (M <= 2 || r < 2) ? lo[i][r] : hi[i][r - 2];
            continue;
        }
        const float *w[4];
        for (int r = 0; r < R; r++) {
            if (fmt == 0) {
                w[r] = (const float *)q + (n + r) * K;
            } else {
                dequant_row(fmt, q, d, m, K, n + r, buf + r * K);
                w[r] = buf + r * K;
            }
        }
        if (R == 4) {
            long i = 0;
            for (; i + 2 <= M; i += 2) {
                tile_4x2(w, x + i * K, x + (i + 1) * K, K, tmp, tmp + 4);
                for (int r = 0; r < 4; r++) { y[i * N + n + r] = tmp[r]; y[(i + 1) * N + n + r] = tmp[4 + r]; }
            }
            if (i < M) {
                tile_4x1(w, x + i * K, K, tmp);
                for (int r = 0; r < 4; r++) y[i * N + n + r] = tmp[r];
            }
        } else {
            for (long i = 0; i < M; i++)
                for (int r = 0; r < R; r++) y[i * N + n + r] = tile_1x1(w[r], x + i * K, K);
        }
    }
}

/* returns 0, or -1 when K is not supported (K % 32 for quantised forms, K % 8, K > DFL_MAX_K) */
int dfl_linear(int fmt, const float *x, long M, long K, long N, const void *q, const float *d,
               const float *m, float *y, int nthreads) {
    if (K % 8 || K > DFL_MAX_K || (fmt != 0 && K % 32) || fmt < 0 || fmt > 2) return -1;
    const long tiles = (N + 3) / 4;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > tiles) nthreads = (int)tiles;
    if (nthreads == 1) {
        float *buf = fmt ? (float *)malloc(sizeof(float) * 4 * K) : NULL;
        rows_range(fmt, x, M, K, N, q, d, m, y, 0, N, buf);
        free(buf);
        return 0;
    }
#pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const long t0 = tiles * t / nt, t1 = tiles * (t + 1) / nt;
        const long n0 = t0 * 4, n1 = (t1 * 4 < N) ? t1 * 4 : N;
        float *buf = fmt ? (float *)malloc(sizeof(float) * 4 * K) : NULL;
        if (n0 < n1) rows_range(fmt, x, M, K, N, q, d, m, y, n0, n1, buf);
        free(buf);
    }
    return 0;
}
