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
 * torch.set_num_threads and the wait policy apply). Needs AVX2 + FMA.
 *
 * Vector width: built with AVX-512 (F, BW, VL, DQ; the Python side passes those flags on
 * CPUs that have them) every accumulator is 16 lanes instead of 8 and a 32-weight block
 * dequantises into 2 vectors instead of 4, so the same products take about half the
 * instructions. The accumulation order is then k in steps of 16 (a K % 16 == 8 tail as one
 * masked step), the same for every row: a build is row-invariant whatever its width, and
 * the two widths differ from each other only in rounding, like any two fp32 summation
 * orders. dfl_vector_width() says which one was built. */
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

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define DFL_VL 16
typedef __m512 vf;
#define vzero() _mm512_setzero_ps()
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vloadx(p) _mm512_loadu_ps(p)
#define vstore(p, v) _mm512_storeu_ps(p, v)
/* a fixed reduction tree: 16 -> 8 lanes, then the same 8-lane sum as the AVX2 build */
static inline float vhsum(__m512 v) {
    return hsum8(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
}
/* the 32 weights of row r (0..3) of one tile record, dequantised exactly, into w[0..1] */
static inline __attribute__((always_inline)) void dequant(int fmt, const uint8_t *rec, int r, vf w[2]) {
    const __m512 vd = _mm512_set1_ps(((const float *)rec)[r]);
    if (fmt == 1) {
        const int8_t *qb = (const int8_t *)(rec + 16 + r * 32);
        for (int c = 0; c < 2; c++)
            w[c] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qb + c * 16)))), vd);
    } else {
        const __m512 vm = _mm512_set1_ps(((const float *)rec)[4 + r]);
        const __m128i low = _mm_set1_epi8(0x0F);
        __m128i bytes = _mm_loadu_si128((const __m128i *)(rec + 32 + r * 16));
        __m128i lo = _mm_and_si128(bytes, low), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
        w[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), vd, vm);
        w[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), vd, vm);
    }
}
/* 16 weights from row storage at k (fp32, or bf16 widened exactly); n = 16, or 8 for the
 * K % 16 tail (the other lanes zero, in x as well) */
static inline __attribute__((always_inline)) __m512 load_w_n(const void *w, long k, const int bf, const int n) {
    const __mmask16 m = n == 16 ? (__mmask16)0xFFFF : (__mmask16)0x00FF;
    if (bf)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)w + k)), 16));
    return _mm512_maskz_loadu_ps(m, (const float *)w + k);
}
static inline __attribute__((always_inline)) __m512 load_x_n(const float *x, long k, const int n) {
    return _mm512_maskz_loadu_ps(n == 16 ? (__mmask16)0xFFFF : (__mmask16)0x00FF, x + k);
}
#else
#define DFL_VL 8
typedef __m256 vf;
#define vzero() _mm256_setzero_ps()
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vloadx(p) _mm256_loadu_ps(p)
#define vstore(p, v) _mm256_storeu_ps(p, v)
#define vhsum(v) hsum8(v)
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
static inline __attribute__((always_inline)) __m256 load_w_n(const void *w, long k, const int bf, const int n) {
    (void)n;
    if (bf)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + k))), 16));
    return _mm256_loadu_ps((const float *)w + k);
}
static inline __attribute__((always_inline)) __m256 load_x_n(const float *x, long k, const int n) {
    (void)n;
    return _mm256_loadu_ps(x + k);
}
#endif
#define NV (32 / DFL_VL)   /* vectors per 32-weight block */

int dfl_vector_width(void) { return DFL_VL; }

/* quantised tile t, its rows r0 .. r0+R-1, MR input rows (R * MR accumulators: <= 8 in
 * the AVX2 build, <= 16 in the AVX-512 one): the weights dequantised in registers record
 * by record (no buffer), the same accumulation order per output as the tiles below.
 * Called with constant R, MR (unrolled). */
static inline __attribute__((always_inline)) void fused(int fmt, const uint8_t *tile, const float *x, long K,
                                                        const int r0, const int R, const int MR, float out[4][4]) {
    vf acc[4][4];
    for (int i = 0; i < MR; i++)
        for (int r = 0; r < R; r++) acc[i][r] = vzero();
    const long B = K / 32, TB = tile_bytes(fmt);
    for (long b = 0; b < B; b++) {
        const uint8_t *rec = tile + b * TB;
        _mm_prefetch((const char *)(rec + 8 * TB), _MM_HINT_T0);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            vf w[NV];
            dequant(fmt, rec, r0 + r, w);
#pragma GCC unroll 4
            for (int c = 0; c < NV; c++)
#pragma GCC unroll 4
                for (int i = 0; i < MR; i++)
                    acc[i][r] = vfma(w[c], vloadx(x + i * K + b * 32 + c * DFL_VL), acc[i][r]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int r = 0; r < R; r++) out[i][r0 + r] = vhsum(acc[i][r]);
}

/* 4 weight rows x MR input rows (MR = 1..3, constant), weights in row storage (fp32, or
 * bf16 widened exactly: bf16 = the top half of an fp32): each output one accumulator over
 * k in order (steps of the vector width, a masked half step for a K % 16 == 8 tail) */
static inline __attribute__((always_inline)) void tile_4xm(const void *const w[4], const float *const xs[3], const int MR,
                                                           long K, float *y, const int bf) {
    vf a[3][4];
    for (int i = 0; i < MR; i++)
        for (int r = 0; r < 4; r++) a[i][r] = vzero();
    long k = 0;
    for (; k + DFL_VL <= K; k += DFL_VL) {
        vf v[3];
        for (int i = 0; i < MR; i++) v[i] = load_x_n(xs[i], k, DFL_VL);
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            const vf wr = load_w_n(w[r], k, bf, DFL_VL);
            for (int i = 0; i < MR; i++) a[i][r] = vfma(wr, v[i], a[i][r]);
        }
    }
#if DFL_VL == 16
    if (k < K) {
        vf v[3];
        for (int i = 0; i < MR; i++) v[i] = load_x_n(xs[i], k, 8);
        for (int r = 0; r < 4; r++) {
            const vf wr = load_w_n(w[r], k, bf, 8);
            for (int i = 0; i < MR; i++) a[i][r] = vfma(wr, v[i], a[i][r]);
        }
    }
#endif
    for (int i = 0; i < MR; i++)
        for (int r = 0; r < 4; r++) y[i * 4 + r] = vhsum(a[i][r]);
}

/* 1 weight row x 1 input row (the last rows of a row-stored weight when N % 4 != 0) */
static inline __attribute__((always_inline)) float tile_1x1(const void *w, const float *x0, long K, const int bf) {
    vf a = vzero();
    long k = 0;
    for (; k + DFL_VL <= K; k += DFL_VL) a = vfma(load_w_n(w, k, bf, DFL_VL), load_x_n(x0, k, DFL_VL), a);
#if DFL_VL == 16
    if (k < K) a = vfma(load_w_n(w, k, bf, 8), load_x_n(x0, k, 8), a);
#endif
    return vhsum(a);
}

/* every input row against 4 weight rows given as row pointers (fp32, or bf16 when bf);
 * rows >= R not stored */
static inline __attribute__((always_inline)) void rows_times_x_(const void *const w[4], int R, const float *x, long M,
                                                                long K, long N, long n, float *y, const int bf) {
    float tmp[12];
    long i = 0;
    for (; i + 3 <= M; i += 3) {
        const float *xs[3] = {x + i * K, x + (i + 1) * K, x + (i + 2) * K};
        tile_4xm(w, xs, 3, K, tmp, bf);
        for (int j = 0; j < 3; j++)
            for (int r = 0; r < R; r++) y[(i + j) * N + n + r] = tmp[j * 4 + r];
    }
    for (; i + 2 <= M; i += 2) {
        const float *xs[3] = {x + i * K, x + (i + 1) * K, x};
        tile_4xm(w, xs, 2, K, tmp, bf);
        for (int j = 0; j < 2; j++)
            for (int r = 0; r < R; r++) y[(i + j) * N + n + r] = tmp[j * 4 + r];
    }
    if (i < M) {
        const float *xs[3] = {x + i * K, x, x};
        tile_4xm(w, xs, 1, K, tmp, bf);
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
#if DFL_VL == 8
        if (M > 4) {
            /* AVX2, more rows: dequantise the tile once into buf, then fp32 tiles over the
             * inputs (the same accumulation order per output as the fused groups) */
            for (long b = 0; b < B; b++) {
                const uint8_t *rec = tile + b * TB;
                for (int r = 0; r < 4; r++) {
                    vf w[NV];
                    dequant(fmt, rec, r, w);
                    for (int c = 0; c < NV; c++) vstore(buf + r * K + b * 32 + c * DFL_VL, w[c]);
                }
            }
            const void *w[4] = {buf, buf + K, buf + 2 * K, buf + 3 * K};
            rows_times_x(w, R, x, M, K, N, n, y, 0);
            continue;
        }
#endif
        /* input rows in groups of up to 4, each group against all 4 weight rows with the
         * weights dequantised in registers (the tile's records stay in L1 between groups):
         * 1-2 rows at once; 3-4 as 2 + 2 weight rows (<= 8 accumulators), or all 4 at once
         * in the AVX-512 build. Each output is the same one accumulator whatever the group.
         * (In the AVX-512 build this beat a dequantised buffer ~2x at 5-16 rows; in the
         * AVX2 build the buffer above measured as fast or faster from 8 rows.) */
        for (long i0 = 0; i0 < M; i0 += 4) {
            const long mm = M - i0 < 4 ? M - i0 : 4;
            const float *xg = x + i0 * K;
            float o[4][4];
            switch (mm) {
                case 1: fused(fmt, tile, xg, K, 0, 4, 1, o); break;
                case 2: fused(fmt, tile, xg, K, 0, 4, 2, o); break;
#if DFL_VL == 16   /* 32 vector registers */
                case 3: fused(fmt, tile, xg, K, 0, 4, 3, o); break;
                default: fused(fmt, tile, xg, K, 0, 4, 4, o); break;
#else
                case 3: fused(fmt, tile, xg, K, 0, 2, 3, o); fused(fmt, tile, xg, K, 2, 2, 3, o); break;
                default: fused(fmt, tile, xg, K, 0, 2, 4, o); fused(fmt, tile, xg, K, 2, 2, 4, o); break;
#endif
            }
            for (long i = 0; i < mm; i++)
                for (int r = 0; r < R; r++) y[(i0 + i) * N + n + r] = o[i][r];
        }
    }
}

/* returns 0; -1 when the shape is not supported (K % 8, K % 32 for the quantised forms,
 * K > DFL_MAX_K, an unknown format); -2 when a work buffer (AVX2 build, quantised weights,
 * more than 4 rows) could not be allocated (y is then incomplete: the caller computes it
 * another way) */
int dfl_linear_amx(int fmt, const float *x, long M, long K, long N, const void *w, float *y, int nthreads);

int dfl_linear(int fmt, const float *x, long M, long K, long N, const void *w, float *y, int nthreads) {
    if (fmt >= 4 && fmt <= 9) return dfl_linear_amx(fmt, x, M, K, N, w, y, nthreads);   /* dflash_amx.c */
    if (K % 8 || K > DFL_MAX_K || ((fmt == 1 || fmt == 2) && K % 32) || fmt < 0 || fmt > 3) return -1;
    if (M <= 0 || N <= 0) return 0;
    const long tiles = (N + 3) / 4;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > tiles) nthreads = (int)tiles;
    const int need_buf = DFL_VL == 8 && (fmt == 1 || fmt == 2) && M > 4;
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
