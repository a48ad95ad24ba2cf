/* y[M, N] = x[M, K] @ W[N, K]^T on AMX tiles, for the model's own Q4_1 / Q8_0 weights,
 * with every product exact and fp32 sums (the same fp32 linear as dflash_linear.c, in
 * another summation order):
 *
 *   fmt 4  Q4_1X  w = d * q + m, q in 0..15 (the Q4_1 weights of fmt 2, tiled for AMX)
 *   fmt 5  Q8_0X  w = d * q, q in -127..127  (the Q8_0 weights of fmt 1, tiled for AMX)
 *   fmt 6  Q4_1X, fmt 7  Q8_0X with bf16 inputs: the same records, each input rounded to
 *          the nearest bf16 first (one part below instead of three): y = W @ bf16(x), the
 *          same bits as fmt 4 / 5 given bf16(x), a third of the tile products
 *   fmt 8  Q4_1X, fmt 9  Q8_0X with bf16 inputs and bf16 weights (prefill forwards):
 *          y = bf16(W) @ bf16(x), summed over the whole of K in the tile (below, linear_amxw)
 *
 * For a 32-weight block b of a row n: sum_k w[n,k] x[k] = d * sum_k q[n,k] x[k]
 * (+ m * sum_k x[k]). The codes q are small integers, exact in bf16; x is split exactly
 * into three bf16 parts, x = x1 + x2 + x3 (x1: x with its low 16 mantissa bits cleared,
 * x2 the same of x - x1, x3 the rest, at most 8 significant bits). Each code times a part
 * has at most 16 significant bits, exact in fp32; TDPBF16PS sums them in fp32. So a
 * block's C[m, n] = sum over the three parts and 32 k of q * x_part, then the fp32
 * accumulator takes acc = fma(C, d, acc) (and acc = fma(sum_k x, m, acc) for Q4_1),
 * block after block. (bf16 values below the normal range are flushed by AMX: only parts
 * of activations under ~1e-38, not a loss that matters, and the same for every row.)
 *
 * Row invariance: a tile row of C depends on that input row and the weights only, and
 * the fp32 epilogue is the same per output whatever M, the tile's row count or the
 * thread, so a token gets the same bits in a one-token step, a verify block or a batch.
 *
 * Why: a TDPBF16PS multiplies 16 rows x 32 k x 16 columns at once. On the AVX-512 FMA
 * path (dflash_linear.c) the weights are dequantised again for every 4 input rows: a
 * 16-token verify forward of the default target measured 3.2x a one-token one there, 2.1x
 * here, and a one-token one 12% faster here (docs/BENCHMARKS.md, "AMX linears").
 *
 * Layout (pack_amx in __init__.py): N padded to a multiple of 16 with zero rows; for
 * column tile j (16 weight rows) and block b one record, records in (j, b) order:
 *   Q4_1X (384 B): float d[16], float m[16], u8 codes[8][32]
 *   Q8_0X (576 B): float d[16], i8 codes[16][32]
 * where codes are in the VNNI order of a B tile: tile row r (0..15) holds, for column
 * c = p / 2 (p = 0..31), k = 2r + p % 2. Q4_1X: byte p of codes[i] holds tile row 2i
 * in its low nibble and tile row 2i + 1 in its high nibble.
 *
 * Needs AMX-TILE, AMX-BF16, AVX512-BF16/BW and the kernel's permission for tile data
 * (dfl_amx_init asks for it; 0: not usable, the caller keeps the FMA formats). */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <sys/syscall.h>
#include <unistd.h>

/* records ahead that are prefetched (every line of one). 8 left the weight stream short of
 * memory's pace: forwards of 1 and of 6 tokens ran 4-5% faster at 24-32, the LM head 6%
 * (docs/BENCHMARKS.md, "Prefetch distance") */
#define DFL_AMX_PF 32
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

int dfl_amx_init(void) { return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0; }

/* GCC's _tile_loadd is an asm statement without a memory clobber: the compiler may move
 * or drop the stores that fill the buffer it reads. A compiler barrier first. */
#define tile_load(t, p, stride)                         \
    do {                                                \
        __asm__ __volatile__("" ::: "memory");          \
        _tile_loadd(t, p, stride);                      \
    } while (0)

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tilecfg_t;

/* tiles 0, 1: C of two column tiles; 2: A (rows input rows x 32 k); 3, 4: B (16 k pairs);
 * 5, 6: C of the next block's two column tiles (amx_rows_reg) */
static void configure(int rows) {
    tilecfg_t c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 7; t++) {
        c.rows[t] = t == 3 || t == 4 ? 16 : (uint8_t)rows;
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

/* a record's codes -> a B tile of bf16 values (1 KB, row stride 64) */
static inline __attribute__((always_inline)) void expand(int q4, const uint8_t *codes, uint16_t *out) {
    if (q4) {
        /* bf16 bits of 0.0, 1.0, ..., 15.0 */
        const __m512i tbl = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                             0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100,
                                             0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000);
        const __m512i low = _mm512_set1_epi16(0x0F);
        for (int i = 0; i < 8; i++) {
            const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(codes + 32 * i)));
            _mm512_store_si512((__m512i *)(out + 64 * i), _mm512_permutexvar_epi16(_mm512_and_si512(v, low), tbl));
            _mm512_store_si512((__m512i *)(out + 64 * i + 32), _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), tbl));
        }
    } else {
        for (int r = 0; r < 16; r++) {
            const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(codes + 32 * r))));
            const __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(codes + 32 * r + 16))));
            /* integers of at most 8 bits: the conversion to bf16 is exact */
            _mm512_store_si512((__m512i *)(out + 32 * r), (__m512i)_mm512_cvtne2ps_pbh(b, a));
        }
    }
}

/* x rows -> three bf16 parts [3][M][K] (x = x1 + x2 + x3 exactly), and for Q4_1 the block
 * sums sx[M][K/32] (fixed order: two 16-lane halves added, then one reduction) */
static void split_rows(const float *x, long m0, long m1, long M, long K, uint16_t *xs, float *sx) {
    const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
    for (long m = m0; m < m1; m++) {
        const float *xr = x + m * K;
        uint16_t *p0 = xs + m * K, *p1 = p0 + M * K, *p2 = p1 + M * K;
        for (long k = 0; k < K; k += 16) {
            const __m512 v = _mm512_loadu_ps(xr + k);
            const __m512 a = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), hi));
            const __m512 r = _mm512_sub_ps(v, a);
            const __m512 b = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(r), hi));
            const __m512 c = _mm512_sub_ps(r, b);
            _mm256_storeu_si256((__m256i *)(p0 + k), _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(a), 16)));
            _mm256_storeu_si256((__m256i *)(p1 + k), _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(b), 16)));
            _mm256_storeu_si256((__m256i *)(p2 + k), _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(c), 16)));
        }
        if (sx)
            for (long b = 0; b < K / 32; b++)
                sx[m * (K / 32) + b] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_loadu_ps(xr + 32 * b),
                                                                          _mm512_loadu_ps(xr + 32 * b + 16)));
    }
}

/* x rows -> one bf16 part [M][K], each input rounded to the nearest bf16 (ties to even),
 * and for Q4_1 the block sums sx of the rounded inputs, in split_rows' order (fmt 6 / 7) */
static void round_rows(const float *x, long m0, long m1, long K, uint16_t *xs, float *sx) {
    for (long m = m0; m < m1; m++) {
        const float *xr = x + m * K;
        uint16_t *p0 = xs + m * K;
        for (long k = 0; k < K; k += 16)
            _mm256_storeu_si256((__m256i *)(p0 + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(xr + k)));
        if (sx)
            for (long b = 0; b < K / 32; b++) {
                const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p0 + 32 * b))), 16));
                const __m512 up = _mm512_castsi512_ps(_mm512_slli_epi32(
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p0 + 32 * b + 16))), 16));
                sx[m * (K / 32) + b] = _mm512_reduce_add_ps(_mm512_add_ps(lo, up));
            }
    }
}

/* input rows [m0, m1) -> the bf16 parts the tiles read: three exact ones, or one rounded */
static void prepare_rows(int parts, const float *x, long m0, long m1, long M, long K, uint16_t *xs, float *sx) {
    if (parts == 1) round_rows(x, m0, m1, K, xs, sx);
    else split_rows(x, m0, m1, M, K, xs, sx);
}

static inline __attribute__((always_inline)) void epilogue(const float *cbuf, int rows, long m0, const uint8_t *rec,
                                                           int q4, const float *sx, long B, long b, float *acc) {
    const __m512 dv = _mm512_loadu_ps((const float *)rec);
    const __m512 mv = q4 ? _mm512_loadu_ps((const float *)rec + 16) : _mm512_setzero_ps();
    for (int i = 0; i < rows; i++) {
        __m512 a = _mm512_load_ps(acc + (m0 + i) * 16);
        a = _mm512_fmadd_ps(_mm512_load_ps(cbuf + 16 * i), dv, a);
        if (q4) a = _mm512_fmadd_ps(_mm512_set1_ps(sx[(m0 + i) * B + b]), mv, a);
        _mm512_store_ps(acc + (m0 + i) * 16, a);
    }
}

/* One 32-weight block of one or two column tiles (records rec0, rec1): their codes
 * expanded to bbuf[0] (and bbuf[1]), the records DFL_AMX_PF ahead prefetched */
static inline __attribute__((always_inline)) void expand_b(int q4, const uint8_t *rec0, const uint8_t *rec1, int two,
                                                           uint16_t bbuf[2][512]) {
    const long RB = q4 ? 384 : 576, CO = q4 ? 128 : 64;
    for (long l = 0; l < RB; l += 64) _mm_prefetch((const char *)(rec0 + DFL_AMX_PF * RB + l), _MM_HINT_T0);
    expand(q4, rec0 + CO, bbuf[0]);
    if (two) {
        for (long l = 0; l < RB; l += 64) _mm_prefetch((const char *)(rec1 + DFL_AMX_PF * RB + l), _MM_HINT_T0);
        expand(q4, rec1 + CO, bbuf[1]);
    }
}

/* the same, then loaded to B tiles 3 (and 4) */
static inline __attribute__((always_inline)) void load_b(int q4, const uint8_t *rec0, const uint8_t *rec1, int two,
                                                         uint16_t bbuf[2][512]) {
    expand_b(q4, rec0, rec1, two, bbuf);
    tile_load(3, bbuf[0], 64);
    if (two) tile_load(4, bbuf[1], 64);
}

/* The loaded B tiles (load_b) times the input rows' `parts` bf16 parts (three, or one for
 * bf16 inputs; a: the rows at the block, parts ps apart), C tiles -> cbuf[0] / cbuf[1]
 * (rows x 16 fp32, row stride 64 bytes) */
static inline __attribute__((always_inline)) void c_products(int parts, int two, const uint16_t *a, long ps, long K,
                                                             float cbuf[2][256]) {
    _tile_zero(0);
    if (two) _tile_zero(1);
    for (int p = 0; p < parts; p++) {   /* the input's bf16 parts */
        tile_load(2, a + p * ps, K * 2);
        _tile_dpbf16ps(0, 2, 3);
        if (two) _tile_dpbf16ps(1, 2, 4);
    }
    _tile_stored(0, cbuf[0], 64);
    if (two) _tile_stored(1, cbuf[1], 64);
    __asm__ __volatile__("" ::: "memory");   /* the tile stores fill cbuf before it is read */
}

/* thread t of nt's column tiles [*j0, *j1) of J: pairs of tiles split evenly over the threads */
static inline void thread_cols(long J, int t, int nt, long *j0, long *j1) {
    const long pairs = (J + 1) / 2, e = 2 * (pairs * (t + 1) / nt);
    *j0 = 2 * (pairs * t / nt);
    *j1 = e < J ? e : J;
}

/* the lanes of column tile n .. n + 15 that are columns of an N-column output */
static inline __mmask16 col_mask(long n, long N) {
    return N - n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n)) - 1);
}

/* rows x 16 fp32 (row stride 16) -> y rows m0.., columns n .. n + 15 (masked past N) */
static inline __attribute__((always_inline)) void store_rows(const float *src, int rows, long m0, long n, long N,
                                                             float *y) {
    const __mmask16 mask = col_mask(n, N);
    for (int i = 0; i < rows; i++) _mm512_mask_storeu_ps(y + (m0 + i) * N + n, mask, _mm512_load_ps(src + 16 * i));
}

/* Greedy choices without the logits (dfl_argmax_amx): per row and lane, the best column
 * seen so far among that lane's columns (visited in ascending order), by torch's argmax
 * rule: the larger value, a NaN above any number, the first of equal values (or NaNs). */
typedef struct {
    float v[16][16] __attribute__((aligned(64)));
    int32_t i[16][16] __attribute__((aligned(64)));   /* -1: no column yet */
} argmax_state;

static void argmax_init(argmax_state *am) {
    for (int r = 0; r < 16; r++)
        for (int l = 0; l < 16; l++) {
            am->v[r][l] = -INFINITY;
            am->i[r][l] = -1;
        }
}

/* row r's values at columns n .. n + 15 (the lanes in mask) */
static inline __attribute__((always_inline)) void argmax_update(argmax_state *am, int r, __m512 v, long n,
                                                                __mmask16 mask) {
    const __m512 cur = _mm512_load_ps(am->v[r]);
    const __m512i ci = _mm512_load_si512((const __m512i *)am->i[r]);
    const __mmask16 gt = _mm512_cmp_ps_mask(v, cur, _CMP_GT_OQ);
    const __mmask16 vnan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), cnan = _mm512_cmp_ps_mask(cur, cur, _CMP_UNORD_Q);
    const __mmask16 unset = _mm512_cmplt_epi32_mask(ci, _mm512_setzero_si512());
    const __mmask16 take = mask & (gt | (vnan & ~cnan) | unset);
    const __m512i cols = _mm512_add_epi32(_mm512_set1_epi32((int)n),
                                          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    _mm512_store_ps(am->v[r], _mm512_mask_mov_ps(cur, take, v));
    _mm512_store_si512((__m512i *)am->i[r], _mm512_mask_mov_epi32(ci, take, cols));
}

/* candidate (v, i) before (bv, bi) by the rule above; i < 0: no candidate */
static inline int argmax_better(float v, long i, float bv, long bi) {
    if (i < 0) return 0;
    if (bi < 0) return 1;
    const int an = v != v, bn = bv != bv;
    if (an != bn) return an;
    if (!an && v != bv) return v > bv;
    return i < bi;
}

/* row r's best over its 16 lanes */
static void argmax_reduce(const argmax_state *am, int r, float *bv, long *bi) {
    *bv = -INFINITY;
    *bi = -1;
    for (int l = 0; l < 16; l++)
        if (argmax_better(am->v[r][l], am->i[r][l], *bv, *bi)) {
            *bv = am->v[r][l];
            *bi = am->i[r][l];
        }
}

/* One block's tile products for amx_rows_reg into C tiles C0 (and C1): the input rows'
 * parts (A, tile 2) times B tiles 3 (and 4), as c_products computes them */
#define REG_PRODUCTS(C0, C1)                                     \
    do {                                                         \
        _tile_zero(C0);                                          \
        if (two) _tile_zero(C1);                                 \
        for (int p = 0; p < parts; p++) {                        \
            tile_load(2, xa + p * ps + b * 32, K * 2);           \
            _tile_dpbf16ps(C0, 2, 3);                            \
            if (two) _tile_dpbf16ps(C1, 2, 4);                   \
        }                                                        \
    } while (0)
#define REG_STORE(C0, C1)                                        \
    do {                                                         \
        _tile_stored(C0, cbuf[0], 64);                           \
        if (two) _tile_stored(C1, cbuf[1], 64);                  \
        __asm__ __volatile__("" ::: "memory");                   \
    } while (0)

/* Input rows [m0, m0 + R) (R <= 16, the tiles configured for R rows) against column tiles
 * [j0, j1), each row's accumulators in registers across the blocks (R a constant at each
 * call below, so the loops unroll). Per 32-weight block b and column tile: C = the tile
 * products of the rows' parts with the block's codes, then per row acc = fma(C, d, acc) and
 * (Q4_1) acc = fma(sum_k x, m, acc), block after block: the same bits for a row whatever R
 * (amx_groups keeps this order too). Up to 8 rows take column tiles in pairs (two
 * accumulators a row, one A tile load for both); 9-16 rows one column tile at a time (16
 * accumulators fit the registers, 32 would not): earlier, 9-16 rows kept pairs with their
 * accumulators in memory, loaded and stored every block, and all 120 layer linears of the
 * default target ran ~10% slower at 9-16 rows (docs/BENCHMARKS.md).
 *
 * Software-pipelined: block b's products run in C tiles 0 / 1 or 5 / 6 (by b's parity)
 * while the next block's codes are expanded (into the other half of bb) and block b - 1's
 * epilogue reads its C tiles, so neither waits for the tile products to finish; the
 * epilogues still run block after block. Forwards of 1 and of 6 tokens ran 5-12% faster
 * than when each block's products were stored and summed before the next block's codes
 * were expanded (docs/BENCHMARKS.md, "Prefetch distance and pipelined AMX blocks"). */
static inline __attribute__((always_inline)) void amx_rows_reg(int q4, int parts, const uint16_t *xs, const float *sx, long m0,
                                                               const int R, long M, long K, long N, const uint8_t *w,
                                                               float *y, long j0, long j1, argmax_state *am, const int pair) {
    const long B = K / 32, RB = q4 ? 384 : 576, ps = M * K;
    uint16_t bb[2][2][512] __attribute__((aligned(64)));
    float cbuf[2][256] __attribute__((aligned(64)));
    const float *sxr = sx ? sx + m0 * B : NULL;
    const uint16_t *xa = xs + m0 * K;
    for (long j = j0; j < j1; j += 1 + pair) {
        const int two = pair && j + 1 < j1;
        __m512 c0[16], c1[16];
        for (int i = 0; i < R; i++) {
            c0[i] = _mm512_setzero_ps();
            if (pair) c1[i] = _mm512_setzero_ps();
        }
        const uint8_t *r0 = w + j * B * RB, *r1 = r0 + B * RB;
        expand_b(q4, r0, r1, two, bb[0]);
        for (long b = 0; b <= B; b++) {
            if (b < B) {
                tile_load(3, bb[b & 1][0], 64);
                if (two) tile_load(4, bb[b & 1][1], 64);
                if (b & 1) REG_PRODUCTS(5, 6);
                else REG_PRODUCTS(0, 1);
                if (b + 1 < B) expand_b(q4, r0 + (b + 1) * RB, r1 + (b + 1) * RB, two, bb[(b + 1) & 1]);
            }
            if (b == 0) continue;
            const long pb = b - 1;   /* the previous block's epilogue */
            if (pb & 1) REG_STORE(5, 6);
            else REG_STORE(0, 1);
            const uint8_t *rec0 = r0 + pb * RB, *rec1 = r1 + pb * RB;
            const __m512 d0 = _mm512_loadu_ps((const float *)rec0);
            const __m512 n0 = q4 ? _mm512_loadu_ps((const float *)rec0 + 16) : _mm512_setzero_ps();
            for (int i = 0; i < R; i++) {
                c0[i] = _mm512_fmadd_ps(_mm512_load_ps(cbuf[0] + 16 * i), d0, c0[i]);
                if (q4) c0[i] = _mm512_fmadd_ps(_mm512_set1_ps(sxr[i * B + pb]), n0, c0[i]);
            }
            if (two) {
                const __m512 d1 = _mm512_loadu_ps((const float *)rec1);
                const __m512 n1 = q4 ? _mm512_loadu_ps((const float *)rec1 + 16) : _mm512_setzero_ps();
                for (int i = 0; i < R; i++) {
                    c1[i] = _mm512_fmadd_ps(_mm512_load_ps(cbuf[1] + 16 * i), d1, c1[i]);
                    if (q4) c1[i] = _mm512_fmadd_ps(_mm512_set1_ps(sxr[i * B + pb]), n1, c1[i]);
                }
            }
        }
        for (int t = 0; t < 1 + two; t++) {
            const long n = (j + t) * 16;
            const __mmask16 mask = col_mask(n, N);
            if (am)
                for (int i = 0; i < R; i++) argmax_update(am, i, t ? c1[i] : c0[i], n, mask);
            else
                for (int i = 0; i < R; i++) _mm512_mask_storeu_ps(y + (m0 + i) * N + n, mask, t ? c1[i] : c0[i]);
        }
    }
}
#undef REG_PRODUCTS
#undef REG_STORE

/* More than 16 input rows: row groups of 16 (the tiles configured for 16; the rows past M
 * of the last group are zero padding, xs holding Mp rows per part, parts ps = Mp * K apart)
 * g0 .. g0 + G - 1 against column tiles [j0, j1), each block's codes expanded to B tiles
 * once for all G groups (amx_rows_reg would expand them again for every 16 rows). Every real
 * row gets the tile products and the fp32 epilogue of amx_rows_reg, in the same order: the same
 * bits. acc: G x 2 x 16 x 16 floats. */
#define AMX_GROUPS 8   /* row groups sharing one expansion of the weights (acc: 16 KB) */
static void amx_groups(int q4, int parts, const uint16_t *xs, const float *sx, long g0, int G, long M, long Mp,
                       long K, long N, const uint8_t *w, float *y, long j0, long j1, float *acc) {
    const long B = K / 32, RB = q4 ? 384 : 576, ps = Mp * K;
    uint16_t bbuf[2][512] __attribute__((aligned(64)));
    float cbuf[2][256] __attribute__((aligned(64)));
    for (long j = j0; j < j1; j += 2) {
        const int two = j + 1 < j1;
        memset(acc, 0, sizeof(float) * G * 2 * 256);
        const uint8_t *r0 = w + j * B * RB, *r1 = r0 + B * RB;
        for (long b = 0; b < B; b++) {
            const uint8_t *rec0 = r0 + b * RB, *rec1 = r1 + b * RB;
            load_b(q4, rec0, rec1, two, bbuf);
            for (int g = 0; g < G; g++) {
                const long m0 = (g0 + g) * 16;
                const int rows = M - m0 < 16 ? (int)(M - m0) : 16;
                float *ag = acc + (long)g * 512;
                c_products(parts, two, xs + m0 * K + b * 32, ps, K, cbuf);
                epilogue(cbuf[0], rows, 0, rec0, q4, sx + m0 * B, B, b, ag);
                if (two) epilogue(cbuf[1], rows, 0, rec1, q4, sx + m0 * B, B, b, ag + 256);
            }
        }
        for (int g = 0; g < G; g++) {
            const long m0 = (g0 + g) * 16;
            const int rows = M - m0 < 16 ? (int)(M - m0) : 16;
            for (int t = 0; t < 1 + two; t++) store_rows(acc + g * 512 + t * 256, rows, m0, (j + t) * 16, N, y);
        }
    }
}

#define AMX_ROWS_REG(R)                                                                                  \
    static void amx_rows_reg##R(int q4, int parts, const uint16_t *xs, const float *sx, long m0, long M, long K, \
                                long N, const uint8_t *w, float *y, long j0, long j1, argmax_state *am) {  \
        amx_rows_reg(q4, parts, xs, sx, m0, R, M, K, N, w, y, j0, j1, am, R <= 8);                       \
    }
AMX_ROWS_REG(1)
AMX_ROWS_REG(2)
AMX_ROWS_REG(3)
AMX_ROWS_REG(4)
AMX_ROWS_REG(5)
AMX_ROWS_REG(6)
AMX_ROWS_REG(7)
AMX_ROWS_REG(8)
AMX_ROWS_REG(9)
AMX_ROWS_REG(10)
AMX_ROWS_REG(11)
AMX_ROWS_REG(12)
AMX_ROWS_REG(13)
AMX_ROWS_REG(14)
AMX_ROWS_REG(15)
AMX_ROWS_REG(16)

typedef void (*amx_rows_fn)(int, int, const uint16_t *, const float *, long, long, long, long, const uint8_t *, float *,
                            long, long, argmax_state *);
static const amx_rows_fn AMX_ROWS_BY_COUNT[17] = {NULL, amx_rows_reg1, amx_rows_reg2, amx_rows_reg3, amx_rows_reg4,
                                                 amx_rows_reg5, amx_rows_reg6, amx_rows_reg7, amx_rows_reg8,
                                                 amx_rows_reg9, amx_rows_reg10, amx_rows_reg11, amx_rows_reg12,
                                                 amx_rows_reg13, amx_rows_reg14, amx_rows_reg15, amx_rows_reg16};

/* 1 <= M <= 16 input rows in one tile against column tiles [j0, j1) (amx_rows_reg); outputs
 * to y, or (am) each row's best column so far instead */
static void one_tile(int q4, int parts, const uint16_t *xs, const float *sx, long M, long K, long N, const uint8_t *w,
                     float *y, long j0, long j1, argmax_state *am) {
    configure((int)M);
    AMX_ROWS_BY_COUNT[M](q4, parts, xs, sx, 0, M, K, N, w, y, j0, j1, am);
}

/* ---- fmt 8 / 9: the same records with bf16 weights (prefill forwards) ----------------
 * Each weight rounded to the nearest bf16 as its B tile is expanded, w' = bf16(d * q + m)
 * (Q4_1X) or bf16(d * q) (Q8_0X), and each input rounded to bf16 (as fmt 6 / 7): with the
 * scales in the tile, a column tile's products sum over the whole of K in the C tile
 * (TDPBF16PS, fp32) with no fp32 epilogue per 32-weight block, one store per 16 rows x 16
 * columns at the end, and a tile of weights serves up to 32 rows. A row's C depends on
 * that input row and the weights only, by the same tile products in the same order
 * whatever M, the group it sits in or the thread: row-invariant. A different rounding of
 * the model than fmt 6 / 7 (the weights too), which the engine's prefills use. */

/* a record -> a B tile of its bf16-rounded weights (lane p of tile row r: column p / 2) */
static inline __attribute__((always_inline)) void expand_w(int q4, const uint8_t *rec, uint16_t *out) {
    const __m512 dv = _mm512_loadu_ps((const float *)rec);
    const __m512i lo_i = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i hi_i = _mm512_set_epi32(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8);
    const __m512 dlo = _mm512_permutexvar_ps(lo_i, dv), dhi = _mm512_permutexvar_ps(hi_i, dv);
    if (q4) {
        const __m512 mv = _mm512_loadu_ps((const float *)rec + 16);
        const __m512 mlo = _mm512_permutexvar_ps(lo_i, mv), mhi = _mm512_permutexvar_ps(hi_i, mv);
        const uint8_t *codes = rec + 128;
        const __m512i low = _mm512_set1_epi32(0x0F);
        for (int i = 0; i < 8; i++) {   /* codes[i]: tile row 2i in the low nibbles, 2i + 1 in the high */
            const __m512i a = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + 32 * i)));
            const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + 32 * i + 16)));
            const __m512 a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(a, low)), dlo, mlo);
            const __m512 b0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b, low)), dhi, mhi);
            const __m512 a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(a, 4)), dlo, mlo);
            const __m512 b1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), dhi, mhi);
            _mm512_store_si512((__m512i *)(out + 64 * i), (__m512i)_mm512_cvtne2ps_pbh(b0, a0));
            _mm512_store_si512((__m512i *)(out + 64 * i + 32), (__m512i)_mm512_cvtne2ps_pbh(b1, a1));
        }
    } else {
        const uint8_t *codes = rec + 64;
        for (int r = 0; r < 16; r++) {
            const __m512 a = _mm512_mul_ps(
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(codes + 32 * r)))), dlo);
            const __m512 b = _mm512_mul_ps(
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(codes + 32 * r + 16)))), dhi);
            _mm512_store_si512((__m512i *)(out + 32 * r), (__m512i)_mm512_cvtne2ps_pbh(b, a));
        }
    }
}

/* tiles 0, 1: C of two column tiles for rows0 rows, 2: their A; 3, 4: B; 5, 6: C of the
 * next rows1 rows, 7: their A */
static void configure_w(int rows0, int rows1) {
    tilecfg_t c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.rows[t] = (uint8_t)(t == 3 || t == 4 ? 16 : t >= 5 ? rows1 : rows0);
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

/* C tile t (0, 1, 5 or 6: rows x 16 fp32) -> y rows m0.., columns n.. (masked past N) */
static inline __attribute__((always_inline)) void store_c(int t, int rows, long m0, long n, long N, float *y,
                                                          float *cbuf) {
    switch (t) {
        case 0: _tile_stored(0, cbuf, 64); break;
        case 1: _tile_stored(1, cbuf, 64); break;
        case 5: _tile_stored(5, cbuf, 64); break;
        default: _tile_stored(6, cbuf, 64); break;
    }
    __asm__ __volatile__("" ::: "memory");
    store_rows(cbuf, rows, m0, n, N, y);
}

/* the C tiles of a pass: 0 (and 1: two column tiles) for rows0 rows, 5 (and 6) for the
 * next rows when `more` */
static inline __attribute__((always_inline)) void zero_c(int two, int more) {
    _tile_zero(0);
    if (two) _tile_zero(1);
    if (more) {
        _tile_zero(5);
        if (two) _tile_zero(6);
    }
}

/* block b's products: the B tiles (3, 4) loaded, the A tiles of x0's rows (2) and x1's (7) */
static inline __attribute__((always_inline)) void products_w(int two, int more, const uint16_t *x0,
                                                             const uint16_t *x1, long b, long K) {
    tile_load(2, x0 + b * 32, K * 2);
    _tile_dpbf16ps(0, 2, 3);
    if (two) _tile_dpbf16ps(1, 2, 4);
    if (more) {
        tile_load(7, x1 + b * 32, K * 2);
        _tile_dpbf16ps(5, 7, 3);
        if (two) _tile_dpbf16ps(6, 7, 4);
    }
}

/* a pass's C tiles -> y: rows m0 .. (and the 16 after, when `more`), column tiles j (, j + 1) */
static inline __attribute__((always_inline)) void store_pass(int two, int more, long m0, long M, long j, long N,
                                                             float *y, float *cbuf) {
    const int rows0 = M - m0 < 16 ? (int)(M - m0) : 16;
    store_c(0, rows0, m0, j * 16, N, y, cbuf);
    if (two) store_c(1, rows0, m0, (j + 1) * 16, N, y, cbuf);
    if (more) {
        const long m1 = m0 + 16;
        const int rows1 = M - m1 < 16 ? (int)(M - m1) : 16;
        store_c(5, rows1, m1, j * 16, N, y, cbuf);
        if (two) store_c(6, rows1, m1, (j + 1) * 16, N, y, cbuf);
    }
}

/* row groups of 16 (xs holding Mp rows, the rows past M zero) against column tiles
 * [j0, j1): up to two groups read each block's tiles as they are expanded; more read each
 * column pair's weights expanded once into `strip` (its B tiles for every block, 2 KB a
 * block), two groups at a time. Every row: the same tile products in the same order. */
static void amxw_cols(int q4, const uint16_t *xs, long M, long Mp, long K, long N, const uint8_t *w, float *y,
                      long j0, long j1, uint16_t *strip) {
    const long B = K / 32, RB = q4 ? 384 : 576, G = Mp / 16;
    float cbuf[256] __attribute__((aligned(64)));
    for (long j = j0; j < j1; j += 2) {
        const int two = j + 1 < j1;
        const uint8_t *r0 = w + j * B * RB, *r1 = r0 + B * RB;
        if (G <= 2) {   /* one pass of the groups: each block's tiles expanded and used at once (in L1) */
            const int more = G == 2;
            zero_c(two, more);
            for (long b = 0; b < B; b++) {
                const uint8_t *rec0 = r0 + b * RB, *rec1 = r1 + b * RB;
                for (long l = 0; l < RB; l += 64) _mm_prefetch((const char *)(rec0 + DFL_AMX_PF * RB + l), _MM_HINT_T0);
                expand_w(q4, rec0, strip);
                tile_load(3, strip, 64);
                if (two) {
                    for (long l = 0; l < RB; l += 64) _mm_prefetch((const char *)(rec1 + DFL_AMX_PF * RB + l), _MM_HINT_T0);
                    expand_w(q4, rec1, strip + 512);
                    tile_load(4, strip + 512, 64);
                }
                products_w(two, more, xs, xs + 16 * K, b, K);
            }
            store_pass(two, more, 0, M, j, N, y, cbuf);
            continue;
        }
        for (long b = 0; b < B; b++) {
            expand_w(q4, r0 + b * RB, strip + 1024 * b);
            if (two) expand_w(q4, r1 + b * RB, strip + 1024 * b + 512);
        }
        for (long g = 0; g < G; g += 2) {
            const int more = g + 1 < G;
            const uint16_t *x0 = xs + g * 16 * K;
            zero_c(two, more);
            for (long b = 0; b < B; b++) {
                tile_load(3, strip + 1024 * b, 64);
                if (two) tile_load(4, strip + 1024 * b + 512, 64);
                products_w(two, more, x0, x0 + 16 * K, b, K);
            }
            store_pass(two, more, g * 16, M, j, N, y, cbuf);
        }
    }
}

static int linear_amxw(int q4, const float *x, long M, long K, long N, const void *w, float *y, int nthreads) {
    const long J = (N + 15) / 16, Mp = (M + 15) / 16 * 16;
    uint16_t *xs = (uint16_t *)aligned_alloc(64, ((sizeof(uint16_t) * Mp * K) + 63) / 64 * 64);
    if (!xs) return -2;
    if (nthreads < 1) nthreads = 1;
    const long pairs = (J + 1) / 2;
    if (nthreads > pairs) nthreads = (int)pairs;
    if (M <= 64 || nthreads == 1) {
        round_rows(x, 0, M, K, xs, NULL);
    } else {
#pragma omp parallel num_threads(nthreads)
        {
            const int t = omp_get_thread_num(), nt = omp_get_num_threads();
            round_rows(x, M * t / nt, M * (t + 1) / nt, K, xs, NULL);
        }
    }
    if (Mp > M) memset(xs + M * K, 0, sizeof(uint16_t) * (Mp - M) * K);
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        long j0, j1;
        thread_cols(J, t, nt, &j0, &j1);
        uint16_t *strip = (uint16_t *)aligned_alloc(64, sizeof(uint16_t) * 1024 * (K / 32));
        if (!strip) failed = 1;
        else if (j0 < j1) {
            configure_w(16, 16);
            amxw_cols(q4, xs, M, Mp, K, N, (const uint8_t *)w, y, j0, j1, strip);
        }
        free(strip);
    }
    free(xs);
    return failed ? -2 : 0;
}

/* returns 0; -1 unsupported shape or format; -2 out of memory */
int dfl_linear_amx(int fmt, const float *x, long M, long K, long N, const void *w, float *y, int nthreads) {
    if (fmt < 4 || fmt > 9 || K % 32) return -1;
    if (M <= 0 || N <= 0) return 0;
    if (fmt >= 8) return linear_amxw(fmt == 8, x, M, K, N, w, y, nthreads);
    const int q4 = fmt == 4 || fmt == 6, parts = fmt >= 6 ? 1 : 3;
    const long B = K / 32, J = (N + 15) / 16;
    /* more than 16 rows: row groups of 16 (amx_groups), the parts padded to Mp rows */
    const int grouped = M > 16;
    const long Mp = grouped ? (M + 15) / 16 * 16 : M;
    uint16_t *xs = (uint16_t *)aligned_alloc(64, ((sizeof(uint16_t) * parts * Mp * K) + 63) / 64 * 64);
    float *sx = q4 ? (float *)malloc(sizeof(float) * M * B) : NULL;
    if (!xs || (q4 && !sx)) {
        free(xs);
        free(sx);
        return -2;
    }
    if (nthreads < 1) nthreads = 1;
    const long pairs = (J + 1) / 2;
    if (nthreads > pairs) nthreads = (int)pairs;
    /* the input split: in this thread for a few rows (a barrier between the two phases
     * costs more than the split under a passive wait policy), else over the threads */
    if (M <= 64 || nthreads == 1) {
        prepare_rows(parts, x, 0, M, Mp, K, xs, sx);
    } else {
#pragma omp parallel num_threads(nthreads)
        {
            const int t = omp_get_thread_num(), nt = omp_get_num_threads();
            prepare_rows(parts, x, M * t / nt, M * (t + 1) / nt, Mp, K, xs, sx);
        }
    }
    for (int p = 0; p < parts && Mp > M; p++) memset(xs + p * Mp * K + M * K, 0, sizeof(uint16_t) * (Mp - M) * K);
#pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        /* column tiles in pairs, split evenly over threads */
        long j0, j1;
        thread_cols(J, t, nt, &j0, &j1);
        if (j0 < j1 && grouped) {
            float acc[AMX_GROUPS * 2 * 256] __attribute__((aligned(64)));
            const long G = Mp / 16;
            configure(16);
            for (long g = 0; g < G; g += AMX_GROUPS)
                amx_groups(q4, parts, xs, sx, g, (int)(G - g < AMX_GROUPS ? G - g : AMX_GROUPS), M, Mp, K, N,
                           (const uint8_t *)w, y, j0, j1, acc);
        } else if (j0 < j1)
            one_tile(q4, parts, xs, sx, M, K, N, (const uint8_t *)w, y, j0, j1, NULL);
    }
    free(xs);
    free(sx);
    return 0;
}

/* idx[m] = argmax over n of y[m, n] for y = x W^T as dfl_linear_amx computes it (the same
 * products and epilogue, so the same values), by torch's rule (the first of equal values; a
 * NaN above any number, the first NaN), without writing y: an LM head's greedy choices.
 * fmt 4-7 and 1 <= M <= 16 rows (one tile); returns 0, -1 (not taken: the caller
 * computes the logits) or -2 (out of memory). */
int dfl_argmax_amx(int fmt, const float *x, long M, long K, long N, const void *w, int64_t *idx, int nthreads) {
    if (fmt < 4 || fmt > 7 || K % 32 || M < 1 || M > 16 || N < 1) return -1;
    const int q4 = fmt == 4 || fmt == 6, parts = fmt >= 6 ? 1 : 3;
    const long B = K / 32, J = (N + 15) / 16;
    if (nthreads < 1) nthreads = 1;
    const long pairs = (J + 1) / 2;
    if (nthreads > pairs) nthreads = (int)pairs;
    uint16_t *xs = (uint16_t *)aligned_alloc(64, ((sizeof(uint16_t) * parts * M * K) + 63) / 64 * 64);
    float *sx = q4 ? (float *)malloc(sizeof(float) * M * B) : NULL;
    float *best_v = (float *)malloc(sizeof(float) * nthreads * 16);
    long *best_i = (long *)malloc(sizeof(long) * nthreads * 16);
    if (!xs || (q4 && !sx) || !best_v || !best_i) {
        free(xs);
        free(sx);
        free(best_v);
        free(best_i);
        return -2;
    }
    prepare_rows(parts, x, 0, M, M, K, xs, sx);
#pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        long j0, j1;
        thread_cols(J, t, nt, &j0, &j1);
        argmax_state am;
        argmax_init(&am);
        if (j0 < j1) one_tile(q4, parts, xs, sx, M, K, N, (const uint8_t *)w, NULL, j0, j1, &am);
        for (long m = 0; m < M; m++) argmax_reduce(&am, (int)m, best_v + t * 16 + m, best_i + t * 16 + m);
    }
    /* the threads' column ranges ascend with the thread: combined by the same rule */
    for (long m = 0; m < M; m++) {
        float bv = -INFINITY;
        long bi = -1;
        for (int t = 0; t < nthreads; t++)
            if (argmax_better(best_v[t * 16 + m], best_i[t * 16 + m], bv, bi)) {
                bv = best_v[t * 16 + m];
                bi = best_i[t * 16 + m];
            }
        idx[m] = bi;
    }
    free(xs);
    free(sx);
    free(best_v);
    free(best_i);
    return 0;
}
#else
int dfl_amx_init(void) { return 0; }
int dfl_linear_amx(int fmt, const float *x, long M, long K, long N, const void *w, float *y, int nthreads) {
    (void)fmt; (void)x; (void)M; (void)K; (void)N; (void)w; (void)y; (void)nthreads;
    return -1;
}
int dfl_argmax_amx(int fmt, const float *x, long M, long K, long N, const void *w, int64_t *idx, int nthreads) {
    (void)fmt; (void)x; (void)M; (void)K; (void)N; (void)w; (void)idx; (void)nthreads;
    return -1;
}
#endif
