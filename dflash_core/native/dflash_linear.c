/* y[M, N] = x[M, K] @ W[N, K]^T in fp32, with W stored as the model's own weights:
 *   fmt 0  F32   w[N, K] float, row-major
 *   fmt 1  Q8_0  w = d * q, q int8, one fp32 d per 32 weights of a row
 *   fmt 2  Q4_1  w = d * q + m, q in 0..15, one fp32 d and m per 32 weights of a row
 *   fmt 3  BF16  w[N, K] bfloat16, row-major (fp32 weights that are bf16 values, e.g. a
 *                drafter shipped in bf16: the upcast is exact, half the bytes of F32)
 * The quantised forms are exact: the caller checks, weight by weight, that d * q (+ m)
 * in fp32 gives back the fp32 weight bit for bit, so this is the same product as an fp32
 * linear over those weights, reading 1/4 (Q8_0) or 3/16 (Q4_1) of the bytes.
 *
 * Quantised layout: rows in tiles of 4 (N padded with zero rows to a multiple of 4); for
 * tile t and block b (32 weights of K) one record of TB bytes, records in (t, b) order,
 * so a thread reads its share as one sequential stream:
 *   Q4_1 (96 B): float d[4], float m[4], u8 q[4][16] (byte j: q[j] low nibble, q[j+16] high)
 *   Q8_0 (144 B): float d[4], i8 q[4][32]
 *
 * Row invariance: every output y[m, n] is one 8-lane accumulator over k in order
 * (acc = fma(w[k:k+8], x[k:k+8], acc)), then the same horizontal sum, whatever M, the
 * tile it falls in or the thread that computes it. So a row gives the same bits alone
 * (a decode step) as inside a verify block or a batch: greedy speculative output equals
 * the engine's own decoding exactly.
 *
 * Threads: OpenMP over row tiles (the process's libgomp, the one torch loaded, so
 * torch.set_num_threads and the wait policy apply). Needs AVX2 + FMA. */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#define DFL_MAX_K 16384

static inline long tile_bytes(int fmt) { return fmt == 2 ? 96 : 144; }

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* the 32 weights of row r (0..3) of one tile record, dequantised exactly, into w[0..3] */
static inline __attribute__((always_inline)) void dequant(int fmt, const uint8_t *rec, int r, __m256 w[4]) {
    const __m256 vd = _mm256_set1_ps(((const float *)rec)[r]);
    if (fmt == 1) {
        const int8_t *qb = (const int8_t *)(rec + 16 + r * 32);
        for (int c = 0; c < 4; c++)
            w[c] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qb + c * 8)))), vd);
    } else {
        const __m256 vm = _mm256_set1_ps(((const float *)rec)[4 + r]);
        const __m128i low = _mm_set1_epi8(0x0F);
        __m128i bytes = _mm_loadu_si128((const __m128i *)(rec + 32 + r * 16));
        __m128i lo = _mm_and_si128(bytes, low), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
        /* d * q is exact (q < 16), so the fused d * q + m rounds once, like the separate
         * multiply and add of the dequantisation it reproduces */
        w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), vd, vm);
        w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), vd, vm);
        w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), vd, vm);
        w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), vd, vm);
    }
}

/* quantised tile t, its rows r0 .. r0+R-1, MR input rows (R * MR <= 8 accumulators): the
 * weights dequantised in registers record by record (no buffer), the same accumulation
 * order per output as the tiles below. Called with constant R, MR (unrolled). */
static inline __attribute__((always_inline)) void fused(int fmt, const uint8_t *tile, const float *x, long K,
                                                        const int r0, const int R, const int MR, float out[4][4]) {
    __m256 acc[4][4];
    for (int i = 0; i < MR; i++)
        for (int r = 0; r < R; r++) acc[i][r] = _mm256_setzero_ps();
    const long B = K / 32, TB = tile_bytes(fmt);
    for (long b = 0; b < B; b++) {
        const uint8_t *rec = tile + b * TB;
        _mm_prefetch((const char *)(rec + 8 * TB), _MM_HINT_T0);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            __m256 w[4];
            dequant(fmt, rec, r0 + r, w);
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++)
#pragma GCC unroll 4
                for (int i = 0; i < MR; i++)
                    acc[i][r] = _mm256_fmadd_ps(w[c], _mm256_loadu_ps(x + i * K + b * 32 + c * 8), acc[i][r]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int r = 0; r < R; r++) out[i][r0 + r] = hsum8(acc[i][r]);
}

/* 8 weights from row storage: fp32, or bf16 widened exactly (bf16 = the top half of an fp32) */
static inline __attribute__((always_inline)) __m256 load_w(const void *w, long k, const int bf) {
    if (bf)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + k))), 16));
    return _mm256_loadu_ps((const float *)w + k);
}

/* 4 weight rows x 2 input rows */
static inline __attribute__((always_inline)) void tile_4x2(const void *const w[4], const float *x0, const float *x1,
                                                           long K, float *y0, float *y1, const int bf) {
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
    __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    for (long k = 0; k < K; k += 8) {
        __m256 w0 = load_w(w[0], k, bf), w1 = load_w(w[1], k, bf);
        __m256 w2 = load_w(w[2], k, bf), w3 = load_w(w[3], k, bf);
        __m256 v0 = _mm256_loadu_ps(x0 + k), v1 = _mm256_loadu_ps(x1 + k);
        a00 = _mm256_fmadd_ps(w0, v0, a00); a01 = _mm256_fmadd_ps(w1, v0, a01);
        a02 = _mm256_fmadd_ps(w2, v0, a02); a03 = _mm256_fmadd_ps(w3, v0, a03);
        a10 = _mm256_fmadd_ps(w0, v1, a10); a11 = _mm256_fmadd_ps(w1, v1, a11);
        a12 = _mm256_fmadd_ps(w2, v1, a12); a13 = _mm256_fmadd_ps(w3, v1, a13);
    }
    y0[0] = hsum8(a00); y0[1] = hsum8(a01); y0[2] = hsum8(a02); y0[3] = hsum8(a03);
    y1[0] = hsum8(a10); y1[1] = hsum8(a11); y1[2] = hsum8(a12); y1[3] = hsum8(a13);
}

/* 4 weight rows x 3 input rows (12 accumulators: more independent FMA chains than 4 x 2;
 * each output still one accumulator over k in order, so the same bits as 4 x 2 / 4 x 1) */
static inline __attribute__((always_inline)) void tile_4x3(const void *const w[4], const float *x0, const float *x1,
                                                           const float *x2, long K, float *y, const int bf) {
    __m256 a[3][4];
    for (int i = 0; i < 3; i++)
        for (int r = 0; r < 4; r++) a[i][r] = _mm256_setzero_ps();
    for (long k = 0; k < K; k += 8) {
        const __m256 v0 = _mm256_loadu_ps(x0 + k), v1 = _mm256_loadu_ps(x1 + k), v2 = _mm256_loadu_ps(x2 + k);
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            const __m256 wr = load_w(w[r], k, bf);
            a[0][r] = _mm256_fmadd_ps(wr, v0, a[0][r]);
            a[1][r] = _mm256_fmadd_ps(wr, v1, a[1][r]);
            a[2][r] = _mm256_fmadd_ps(wr, v2, a[2][r]);
        }
    }
    for (int i = 0; i < 3; i++)
        for (int r = 0; r < 4; r++) y[i * 4 + r] = hsum8(a[i][r]);
}

/* 4 weight rows x 1 input row */
static inline __attribute__((always_inline)) void tile_4x1(const void *const w[4], const float *x0, long K, float *y0,
                                                           const int bf) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (long k = 0; k < K; k += 8) {
        __m256 v0 = _mm256_loadu_ps(x0 + k);
        a0 = _mm256_fmadd_ps(load_w(w[0], k, bf), v0, a0);
        a1 = _mm256_fmadd_ps(load_w(w[1], k, bf), v0, a1);
        a2 = _mm256_fmadd_ps(load_w(w[2], k, bf), v0, a2);
        a3 = _mm256_fmadd_ps(load_w(w[3], k, bf), v0, a3);
    }
    y0[0] = hsum8(a0); y0[1] = hsum8(a1); y0[2] = hsum8(a2); y0[3] = hsum8(a3);
}

/* 1 weight row x 1 input row (the last rows of a row-stored weight when N % 4 != 0) */
static inline __attribute__((always_inline)) float tile_1x1(const void *w, const float *x0, long K, const int bf) {
    __m256 a = _mm256_setzero_ps();
    for (long k = 0; k < K; k += 8)
        a = _mm256_fmadd_ps(load_w(w, k, bf), _mm256_loadu_ps(x0 + k), a);
    return hsum8(a);
}

/* every input row against 4 weight rows given as row pointers (fp32, or bf16 when bf);
 * rows >= R not stored */
static inline __attribute__((always_inline)) void rows_times_x_(const void *const w[4], int R, const float *x, long M,
                                                                long K, long N, long n, float *y, const int bf) {
    float tmp[12];
    long i = 0;
    for (; i + 3 <= M; i += 3) {
        tile_4x3(w, x + i * K, x + (i + 1) * K, x + (i + 2) * K, K, tmp, bf);
        for (int j = 0; j < 3; j++)
            for (int r = 0; r < R; r++) y[(i + j) * N + n + r] = tmp[j * 4 + r];
    }
    for (; i + 2 <= M; i += 2) {
        tile_4x2(w, x + i * K, x + (i + 1) * K, K, tmp, tmp + 4, bf);
        for (int r = 0; r < R; r++) { y[i * N + n + r] = tmp[r]; y[(i + 1) * N + n + r] = tmp[4 + r]; }
    }
    if (i < M) {
        tile_4x1(w, x + i * K, K, tmp, bf);
        for (int r = 0; r < R; r++) y[i * N + n + r] = tmp[r];
    }
}

static void rows_times_x(const void *const w[4], int R, const float *x, long M, long K, long N, long n, float *y,
                         int bf) {
    if (bf) rows_times_x_(w, R, x, M, K, N, n, y, 1);
    else rows_times_x_(w, R, x, M, K, N, n, y, 0);
}

/* one thread's share: row tiles [t0, t1) */
static void tiles_range(int fmt, const float *x, long M, long K, long N, const void *wp, float *y,
                        long t0, long t1, float *buf) {
    const int rowwise = fmt == 0 || fmt == 3, bf = fmt == 3;
    const long B = K / 32, TB = rowwise ? 0 : tile_bytes(fmt), rb = bf ? 2 : 4;
    for (long t = t0; t < t1; t++) {
        const long n = t * 4;
        const int R = (N - n) < 4 ? (int)(N - n) : 4;
        if (rowwise) {
            const void *w[4];
            for (int r = 0; r < 4; r++) w[r] = (const uint8_t *)wp + (n + (r < R ? r : 0)) * K * rb;
            if (R == 4) {
                rows_times_x(w, 4, x, M, K, N, n, y, bf);
            } else {
                for (long i = 0; i < M; i++)
                    for (int r = 0; r < R; r++)
                        y[i * N + n + r] = bf ? tile_1x1(w[r], x + i * K, K, 1) : tile_1x1(w[r], x + i * K, K, 0);
            }
            continue;
        }
        const uint8_t *tile = (const uint8_t *)wp + t * B * TB;
        if (M <= 4) {
            /* 1-2 input rows: all 4 weight rows at once; 3-4: 2 and 2 (<= 8 accumulators) */
            float o[4][4];
            switch (M) {
                case 1: fused(fmt, tile, x, K, 0, 4, 1, o); break;
                case 2: fused(fmt, tile, x, K, 0, 4, 2, o); break;
                case 3: fused(fmt, tile, x, K, 0, 2, 3, o); fused(fmt, tile, x, K, 2, 2, 3, o); break;
                default: fused(fmt, tile, x, K, 0, 2, 4, o); fused(fmt, tile, x, K, 2, 2, 4, o); break;
            }
            for (long i = 0; i < M; i++)
                for (int r = 0; r < R; r++) y[i * N + n + r] = o[i][r];
            continue;
        }
        /* more rows: dequantise the tile once into buf, then fp32 tiles over the inputs */
        for (long b = 0; b < B; b++) {
            const uint8_t *rec = tile + b * TB;
            for (int r = 0; r < 4; r++) {
                __m256 w[4];
                dequant(fmt, rec, r, w);
                for (int c = 0; c < 4; c++) _mm256_storeu_ps(buf + r * K + b * 32 + c * 8, w[c]);
            }
        }
        const void *w[4] = {buf, buf + K, buf + 2 * K, buf + 3 * K};
        rows_times_x(w, R, x, M, K, N, n, y, 0);
    }
}

/* returns 0; -1 when the shape is not supported (K % 8, K % 32 for the quantised forms,
 * K > DFL_MAX_K, an unknown format); -2 when a work buffer could not be allocated (y is
 * then incomplete: the caller computes it another way) */
int dfl_linear(int fmt, const float *x, long M, long K, long N, const void *w, float *y, int nthreads) {
    if (K % 8 || K > DFL_MAX_K || ((fmt == 1 || fmt == 2) && K % 32) || fmt < 0 || fmt > 3) return -1;
    if (M <= 0 || N <= 0) return 0;
    const long tiles = (N + 3) / 4;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > tiles) nthreads = (int)tiles;
    const int need_buf = (fmt == 1 || fmt == 2) && M > 4;
    int failed = 0;
    if (nthreads == 1) {
        float *buf = need_buf ? (float *)malloc(sizeof(float) * 4 * K) : NULL;
        if (need_buf && !buf) return -2;
        tiles_range(fmt, x, M, K, N, w, y, 0, tiles, buf);
        free(buf);
        return 0;
    }
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const long t0 = tiles * t / nt, t1 = tiles * (t + 1) / nt;
        float *buf = need_buf ? (float *)malloc(sizeof(float) * 4 * K) : NULL;
        if (need_buf && !buf) failed = 1;
        else if (t0 < t1) tiles_range(fmt, x, M, K, N, w, y, t0, t1, buf);
        free(buf);
    }
    return failed ? -2 : 0;
}
