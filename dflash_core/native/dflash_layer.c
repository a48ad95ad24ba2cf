/* One decoder layer of a Llama / Qwen-style target in fp32, every op in one call:
 *
 *   h = rms_norm(x) ; q, k, v = h @ Wqkv (+ b) ; [q_norm, k_norm] ; RoPE(q, k)
 *   cache[slot, g, pos] = k, v ; o = softmax(q k^T * scale) v over keys 0 .. pos
 *   x += o @ Wo (+ b) ; h = rms_norm(x) ; x += (silu(h Wg) * (h Wu)) @ Wd
 *
 * for M = R x T rows (R sequences of T new tokens each; row r's tokens sit at positions
 * starts[r] .. starts[r] + T - 1 of its cache slot). causal: token t reads keys up to its
 * own position (a target); else every token reads all keys up to starts[r] + T - 1 (a
 * DFlash drafter's block over its context; RoPE follows cos / sin, not the slot).
 * out_lo, out_n: the tokens of each row whose output is wanted (0, T: all); K/V are written
 * for all T, the rest of the layer runs for those only (a drafter's last layer: only the
 * drafted positions are read), and x keeps its input values in the other rows.
 *
 * The linears are dfl_linear (the model's own Q4_1 / Q8_0 / bf16 / fp32 weights,
 * dflash_linear.c); everything else here runs in a fixed order per token, so the layer
 * is row-invariant like the linears: a token gets the same bits in a one-token step, a
 * verify block or a batch of rows. In torch
 * the same layer is ~40 ops, each dispatched on its own; on a small model that dispatch
 * cost about as much as the matmuls.
 *
 * The cache is [S, Hkv, cap, D] per layer, fp32, or bf16 where kv_bf16 is set: each K / V
 * value is then stored rounded to the nearest bf16 (ties to even), and a token's attention
 * reads its row's keys and values widened back to fp32 (exact) into a per-thread scratch
 * first. Every token then reads the rounded K / V, its own block's included, in every mode
 * and batch: the layer stays row-invariant, and the cache reads half the bytes (at many
 * rows and long contexts a decode step is bound by reading the cache). D must be a
 * multiple of 8. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

int dfl_linear(int fmt, const float *x, long M, long K, long N, const void *w, float *y, int nthreads);
int dfl_write_context(const float *kv, long N, long stride, int kv_heads, int head_dim, const float *k_norm,
                      float eps, const float *cos_t, const float *sin_t, long P, const int64_t *slots,
                      const int64_t *pos, float *k_cache, float *v_cache, long S, long cap);
int dfl_topk_softmax(const float *x, long R, long N, int k, int64_t *idx, float *p);
int dfl_rms_norm(const float *x, const float *w, long M, long n, float eps, float *y);

#define TREE_MAX 64   /* block tokens of a tree verify (dfl_layer's `tree`) */

typedef struct {
    long hidden, inter;
    int heads, kv_heads, head_dim;
    float eps, scale;
    const float *in_norm, *post_norm;   /* [hidden] */
    const float *q_norm, *k_norm;       /* [head_dim], or NULL (no q/k norm) */
    int qkv_fmt, o_fmt, gu_fmt, down_fmt;
    const void *qkv_w, *o_w, *gu_w, *down_w;
    const float *qkv_b, *o_b;           /* or NULL */
    int kv_bf16;                        /* the caches hold bf16 (uint16) values, not fp32 */
    int bf16_weights;                   /* a prefill forward: the bf16-input AMX forms (fmt 6 / 7) take
                                         * their bf16-weight forms (8 / 9, dflash_amx.c) */
    int amx_att;                        /* attention products on AMX tiles (attn_amx: bf16 q, k, p, v,
                                         * fp32 sums) where the build has them and D % 32 == 0 */
} dfl_layer_t;

/* the format a linear of this layer runs in now (bf16_weights: fmt 6 / 7 -> 8 / 9) */
static inline int lin_fmt(const dfl_layer_t *P, int fmt) {
    return P->bf16_weights && (fmt == 6 || fmt == 7) ? fmt + 2 : fmt;
}

/* fp32 -> the nearest bf16 (ties to even; a NaN stays a quiet NaN), as torch rounds */
static inline uint16_t to_bf16(float f) {
    union { float f; uint32_t u; } c = {f};
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40);
    return (uint16_t)((c.u + 0x7fffu + ((c.u >> 16) & 1)) >> 16);
}

/* n rows of D bf16 values -> fp32 (exact: the 16 bits become the high half) */
static void widen_bf16(const uint16_t *src, long n, float *dst) {
    long i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256i lo = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + i))), 16);
        const __m256i hi = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + i + 8))), 16);
        _mm256_storeu_si256((__m256i *)(dst + i), lo);
        _mm256_storeu_si256((__m256i *)(dst + i + 8), hi);
    }
    for (; i < n; i++) {
        union { uint32_t u; float f; } c = {(uint32_t)src[i] << 16};
        dst[i] = c.f;
    }
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* e^x in 8 lanes: x = n ln2 + r, |r| <= ln2 / 2 (ln2 split in two for the reduction),
 * e^r by a degree-7 polynomial (the Cephes expf coefficients), times 2^n through the
 * exponent bits; ~1 ulp. Inputs are clamped to [-87.3, 88.4] (normal results only). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3365478515625f)), _mm256_set1_ps(88.3762626647949f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* y[0..n) = x * (1 / sqrt(mean(x^2) + eps)) * w ; n % 8 == 0 */
static void rms_norm(const float *x, const float *w, long n, float eps, float *y) {
    __m256 acc = _mm256_setzero_ps();
    for (long i = 0; i < n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    const float r = 1.0f / sqrtf(hsum8(acc) / (float)n + eps);
    const __m256 vr = _mm256_set1_ps(r);
    for (long i = 0; i < n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vr), _mm256_loadu_ps(w + i)));
}

/* rotate_half RoPE in place on one head: v[i] = v[i] cos[i] - v[i + D/2] sin[i],
 * v[i + D/2] = v[i + D/2] cos[i + D/2] + v[i] sin[i + D/2] */
static void rope(float *v, const float *cs, const float *sn, int D) {
    const int h = D / 2;
    for (int i = 0; i < h; i++) {
        const float a = v[i], b = v[i + h];
        v[i] = a * cs[i] - b * sn[i];
        v[i + h] = b * cs[i + h] + a * sn[i + h];
    }
}

/* Queries are kept in pairs (the attention's per-thread buffer): query i's dims d .. d + 7
 * sit at qp[(i / 2) * 2D + 2d + (i % 2) * 8], so one 16-float load holds the same 8 dims of
 * both queries of a pair (QP_AT: where query i's first 8 dims are; its next 8 are 16 on). */
#define QP_AT(qp, i, D) ((qp) + (long)((i) / 2) * 2 * (D) + ((i) % 2) * 8)

/* A query's score against a key, the reference every path below reproduces bit for bit: one
 * 8-lane FMA chain over d in order (q at QP_AT: its next 8 dims 16 on), then hsum8 */
static inline float dot_qp(const float *q, const float *k, int D) {
    __m256 acc = _mm256_setzero_ps();
    for (int d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + 2 * d), _mm256_loadu_ps(k + d), acc);
    return hsum8(acc);
}

/* one paired query (QP_AT) against 4 keys k0 .. k0 + 3D -> si[0 .. 3]: dot_qp()'s chain and hsum8 for each */
static inline __attribute__((always_inline)) void single_scores4(const float *qi, const float *k0, int D, float scale,
                                                                 float *si) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int d = 0; d < D; d += 8) {
        const __m256 vq = _mm256_loadu_ps(qi + 2 * d);
        a0 = _mm256_fmadd_ps(vq, _mm256_loadu_ps(k0 + d), a0);
        a1 = _mm256_fmadd_ps(vq, _mm256_loadu_ps(k0 + D + d), a1);
        a2 = _mm256_fmadd_ps(vq, _mm256_loadu_ps(k0 + 2 * D + d), a2);
        a3 = _mm256_fmadd_ps(vq, _mm256_loadu_ps(k0 + 3 * D + d), a3);
    }
    si[0] = hsum8(a0) * scale;
    si[1] = hsum8(a1) * scale;
    si[2] = hsum8(a2) * scale;
    si[3] = hsum8(a3) * scale;
}

#if defined(__AVX512F__)
/* The four accumulators of a pair of queries against 4 keys (a_k: lanes 0-7 the pair's
 * first query's 8-lane chain against key k, 8-15 the second's) -> the 8 scores, out[0 .. 3]
 * and out[stride .. stride + 3]. The four sums per half are reduced together in hsum8's own
 * order ((v_i + v_{i+4}), then lanes 0 + 2 and 1 + 3, then those two): the same bits as dot_qp(). */
static inline __attribute__((always_inline)) void pair_reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3,
                                                               float scale, float *out, long stride) {
    /* 128-bit lanes of a_k: [qa 0-3, qa 4-7, qb 0-3, qb 4-7]; s01 = [a0:qa, a0:qb, a1:qa, a1:qb] of v_i + v_{i+4} */
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(a0, a1, _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(a2, a3, _MM_SHUFFLE(3, 1, 3, 1)));
    /* per 128-bit lane: [s0 + s2, s1 + s3] of s01's, then of s23's */
    const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(3, 2, 3, 2)));
    /* lanes 4l, 4l + 1: the sums of 128-bit lane l of s01 and of s23 */
    const __m512 f = _mm512_mul_ps(_mm512_add_ps(_mm512_shuffle_ps(z, z, _MM_SHUFFLE(2, 0, 2, 0)),
                                                 _mm512_shuffle_ps(z, z, _MM_SHUFFLE(3, 1, 3, 1))),
                                   _mm512_set1_ps(scale));
    float r[16] __attribute__((aligned(64)));
    _mm512_store_ps(r, f);
    /* lane l of s01 / s23: 0 = (key 0 | 2, qa), 1 = (0 | 2, qb), 2 = (1 | 3, qa), 3 = (1 | 3, qb) */
    out[0] = r[0];
    out[2] = r[1];
    out[stride] = r[4];
    out[stride + 2] = r[5];
    out[1] = r[8];
    out[3] = r[9];
    out[stride + 1] = r[12];
    out[stride + 3] = r[13];
}

/* The scores of NP (1 or 2) pairs of queries (pair p at qp + p * 2D, paired as QP_AT lays
 * them) against 4 keys k0 .. k0 + 3D: one 16-float load per pair and 8 dims, each key's 8
 * dims broadcast to both halves once for all the pairs, one FMA per (pair, key); pair p's
 * scores at out + 2p * stride. Each half is exactly dot_qp()'s chain, reduced as pair_reduce4. */
static inline __attribute__((always_inline)) void pairs_scores4(const int NP, const float *qp, const float *k0, int D,
                                                                float scale, float *out, long stride) {
    __m512 a[2][4];
    for (int p = 0; p < NP; p++)
        for (int c = 0; c < 4; c++) a[p][c] = _mm512_setzero_ps();
    for (int d = 0; d < D; d += 8) {
        const __m512 kb0 = _mm512_broadcast_f32x8(_mm256_loadu_ps(k0 + d));
        const __m512 kb1 = _mm512_broadcast_f32x8(_mm256_loadu_ps(k0 + D + d));
        const __m512 kb2 = _mm512_broadcast_f32x8(_mm256_loadu_ps(k0 + 2 * D + d));
        const __m512 kb3 = _mm512_broadcast_f32x8(_mm256_loadu_ps(k0 + 3 * D + d));
        for (int p = 0; p < NP; p++) {
            const __m512 q = _mm512_loadu_ps(qp + (long)p * 2 * D + 2 * d);
            a[p][0] = _mm512_fmadd_ps(q, kb0, a[p][0]);
            a[p][1] = _mm512_fmadd_ps(q, kb1, a[p][1]);
            a[p][2] = _mm512_fmadd_ps(q, kb2, a[p][2]);
            a[p][3] = _mm512_fmadd_ps(q, kb3, a[p][3]);
        }
    }
    for (int p = 0; p < NP; p++) pair_reduce4(a[p][0], a[p][1], a[p][2], a[p][3], scale, out + 2 * p * stride, stride);
}
#endif

/* keys (and values) read this many positions ahead are prefetched: a decode step's
 * attention waited on the cache's rows (AMX attention, a forward on 2048 cached tokens 8.45
 * -> 7.47 ms at 1 token, 10.63 -> 9.52 ms at 6; the fp32 path 10.29 -> 9.55 and 17.75 ->
 * 15.13 ms; 1-2% on 256; 32-128 read alike; docs/BENCHMARKS.md) */
#define ATT_PF 64

/* rows [row, row + n) of row_bytes each from base, prefetched (every cache line) */
static inline __attribute__((always_inline)) void prefetch_rows(const void *base, long row, long n, long row_bytes) {
    const char *p = (const char *)base + row * row_bytes;
    for (long l = 0; l < n * row_bytes; l += 64) _mm_prefetch(p + l, _MM_HINT_T0);
}

/* The scores of Q queries q0 .. q0 + Q - 1 of the paired buffer qp (QP_AT) over keys
 * 0 .. nq[i] - 1 of kb (nq non-decreasing: the queries of consecutive tokens of one row):
 * query q0 + i's at scores[i * stride + j]. Each block of 4 keys is read once for every
 * query that reads all four (from L1 after the first), two pairs of queries at a time,
 * instead of once per token; a query's last keys past a block of 4 are single dots.
 * Every (query, key) is the same 8-lane FMA chain over d in order and hsum8 as dot_qp(),
 * whichever way it is reached (4 keys at a time, in a pair, two pairs, or alone): the same bits. */
static void multi_scores(const float *qp, int q0, int Q, const long *nq, const float *kb, long stride, int D,
                         float scale, float *scores) {
    const long nmax = nq[Q - 1];
    int i0 = 0;   /* queries before i0 are done */
    long j0 = 0;
    for (; j0 + 4 <= nmax; j0 += 4) {
        for (; i0 < Q && nq[i0] < j0 + 4; i0++)
            for (long j = j0; j < nq[i0]; j++) scores[i0 * stride + j] = dot_qp(QP_AT(qp, q0 + i0, D), kb + j * D, D) * scale;
        const float *k0 = kb + j0 * D;
        if (j0 + ATT_PF + 4 <= nmax) prefetch_rows(kb, j0 + ATT_PF, 4, D * 4);   /* the keys ATT_PF ahead */
        int i = i0;
#if defined(__AVX512F__)
        if ((q0 + i) % 2 && i + 1 < Q) {   /* a query whose pair partner is done: alone, then whole pairs */
            single_scores4(QP_AT(qp, q0 + i, D), k0, D, scale, scores + i * stride + j0);
            i++;
        }
        for (; i + 4 <= Q; i += 4)
            pairs_scores4(2, QP_AT(qp, q0 + i, D), k0, D, scale, scores + i * stride + j0, stride);
        for (; i + 2 <= Q; i += 2)
            pairs_scores4(1, QP_AT(qp, q0 + i, D), k0, D, scale, scores + i * stride + j0, stride);
#endif
        for (; i < Q; i++) single_scores4(QP_AT(qp, q0 + i, D), k0, D, scale, scores + i * stride + j0);
    }
    for (; i0 < Q; i0++)
        for (long j = j0; j < nq[i0]; j++) scores[i0 * stride + j] = dot_qp(QP_AT(qp, q0 + i0, D), kb + j * D, D) * scale;
}

/* one head's n scores -> its softmax weights p_j = e^(s_j - max) / sum (in place) */
static void softmax_weights(float *scores, long n) {
    /* the max 8 lanes at a time: the maximum is exact whatever the order (a +0 / -0 tie
     * gives the same e^(s - max)) */
    __m256 vm = _mm256_set1_ps(-INFINITY);
    long j = 0;
    for (; j + 8 <= n; j += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(scores + j));
    float lanes[8];
    _mm256_storeu_ps(lanes, vm);
    float mx = -INFINITY;
    for (int l = 0; l < 8; l++)
        if (lanes[l] > mx) mx = lanes[l];
    for (long t = j; t < n; t++)
        if (scores[t] > mx) mx = scores[t];
    /* e^(s - max) 8 keys at a time (the tail padded), summed in 8 lanes: a fixed order for a
     * given number of keys, which depends only on the token's position */
    const __m256 vmx = _mm256_set1_ps(mx);
    __m256 vs = _mm256_setzero_ps();
    j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), vmx));
        _mm256_storeu_ps(scores + j, e);
        vs = _mm256_add_ps(vs, e);
    }
    if (j < n) {
        float tail[8] = {0};
        for (long t = j; t < n; t++) tail[t - j] = scores[t];
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(tail), vmx));
        e = _mm256_and_ps(e, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - j)),
                                                                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))));
        _mm256_storeu_ps(tail, e);
        for (long t = j; t < n; t++) scores[t] = tail[t - j];
        vs = _mm256_add_ps(vs, e);
    }
    const float inv = 1.0f / hsum8(vs);
    const __m256 vinv = _mm256_set1_ps(inv);
    j = 0;
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(scores + j, _mm256_mul_ps(_mm256_loadu_ps(scores + j), vinv));
    for (; j < n; j++) scores[j] *= inv;
}

/* The weighted sums of the values for up to PV_Q heads of one token that share a kv head:
 * out_i[d] = sum over keys j in order of p_i[j] v_j[d], key j's value vb[j] for j < n0, else
 * vb2[j - n0] (a tree verify's ancestors, gathered). Each value row is loaded once for all
 * the heads. Every output is one FMA chain over j per d, elementwise, so the vector width
 * (16 lanes in the AVX-512 build) and the grouping do not change a bit. */
#if defined(__AVX512F__)
typedef __m512 pv_vec;
#define PV_W 16
#define pv_load _mm512_loadu_ps
#define pv_store _mm512_storeu_ps
#define pv_set1 _mm512_set1_ps
#define pv_fma _mm512_fmadd_ps
#define pv_zero _mm512_setzero_ps
#else
typedef __m256 pv_vec;
#define PV_W 8
#define pv_load _mm256_loadu_ps
#define pv_store _mm256_storeu_ps
#define pv_set1 _mm256_set1_ps
#define pv_fma _mm256_fmadd_ps
#define pv_zero _mm256_setzero_ps
#endif
#define PV_C 4   /* vectors of dims per pass */
#define PV_Q 3   /* heads per pass */

static inline __attribute__((always_inline)) void pv_seg(int nh, float *const *p, long off, const float *vb, long n,
                                                         int D, int c0, pv_vec acc[PV_Q][PV_C]) {
    for (long j = 0; j < n; j++) {
        const float *v = vb + j * D + c0;
        if (c0 == 0 && (j & 3) == 0 && j + ATT_PF + 4 <= n)   /* the values ATT_PF ahead, 4 rows at a time */
            prefetch_rows(vb, j + ATT_PF, 4, D * 4);
        pv_vec vv[PV_C];
        for (int k = 0; k < PV_C; k++) vv[k] = pv_load(v + k * PV_W);
        for (int i = 0; i < PV_Q; i++)
            if (i < nh) {
                const pv_vec pb = pv_set1(p[i][off + j]);
                for (int k = 0; k < PV_C; k++) acc[i][k] = pv_fma(pb, vv[k], acc[i][k]);
            }
    }
}

static void weighted_values(int nh, float *const *p, const float *vb, long n0, const float *vb2, long n, int D,
                            float *const *out) {
    if (D % (PV_C * PV_W) == 0) {
        for (int c0 = 0; c0 < D; c0 += PV_C * PV_W) {
            pv_vec acc[PV_Q][PV_C];
            for (int i = 0; i < PV_Q; i++)
                for (int k = 0; k < PV_C; k++) acc[i][k] = pv_zero();
            if (nh == PV_Q) {
                pv_seg(PV_Q, p, 0, vb, n0, D, c0, acc);
                pv_seg(PV_Q, p, n0, vb2, n - n0, D, c0, acc);
            } else {
                pv_seg(nh, p, 0, vb, n0, D, c0, acc);
                pv_seg(nh, p, n0, vb2, n - n0, D, c0, acc);
            }
            for (int i = 0; i < nh; i++)
                for (int k = 0; k < PV_C; k++) pv_store(out[i] + c0 + k * PV_W, acc[i][k]);
        }
        return;
    }
    for (int i = 0; i < nh; i++) {   /* other head sizes: 8 lanes, head by head */
        __m256 acc[16];   /* D <= 128 */
        const int C = D / 8;
        for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();
        for (long j = 0; j < n; j++) {
            const __m256 pb = _mm256_set1_ps(p[i][j]);
            const float *v = j < n0 ? vb + j * D : vb2 + (j - n0) * D;
            for (int c = 0; c < C; c++) acc[c] = _mm256_fmadd_ps(pb, _mm256_loadu_ps(v + c * 8), acc[c]);
        }
        for (int c = 0; c < C; c++) _mm256_storeu_ps(out[i] + c * 8, acc[c]);
    }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
/* ---- attention on AMX tiles (P->amx_att) --------------------------------------------------
 * The same task as the fp32 path below (some queries of one row and kv head against its keys
 * and values), with each q, k, p and v rounded to bf16 and the products summed in fp32 by
 * TDPBF16PS: a score s = sum over 32-dim halves, in order, of the tile's fp32 sum; a softmax
 * over each query's scores as the fp32 path's (softmax_weights); an output sum over 32-key
 * chunks, in key order, of the tile's fp32 sums. A C element depends on its A row (one query)
 * and B column (one key, or one output dim) only, and a query's keys sit at the same indices
 * (context, then a tree token's ancestors, then zeros) whatever the other queries of its
 * tile: the same bits for a token alone, in a verify block, a tree or a batch (row-invariant). */
#define ATT_AMX 1

#define att_tile_load(t, p, stride)                     \
    do {                                                \
        __asm__ __volatile__("" ::: "memory");          \
        _tile_loadd(t, p, stride);                      \
    } while (0)

/* tiles 0-3: C (rows x 16 fp32), 4: A (rows x 32 bf16), 5: B (16 pairs x 16 columns) */
static void att_configure(int rows) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 6; t++) {
        c.rows[t] = (uint8_t)(t == 5 ? 16 : rows);
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

/* r[i] <- column i of the 16 x 16 dword matrix whose rows were r[0 .. 15] */
static inline __attribute__((always_inline)) void transpose16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_i32x4(u[i], u[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(u[i], u[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_i32x4(u[i + 8], u[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(u[i + 8], u[i + 12], 0xdd);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
        r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
    }
}

/* 16 keys (cache rows idx[j] of kb, -1: zero) -> the B tile of dims 32h .. 32h + 31 (row p:
 * each key's dims 2p, 2p + 1); kb holds fp32 rows (rounded here) or bf16 rows (kv_bf16: the
 * same bits, rounded when stored) of D values */
static inline __attribute__((always_inline)) void keys_tile(const void *kb, int bf16, long D, const long *idx, int h,
                                                            uint16_t *out) {
    __m512i m[16];
    for (int j = 0; j < 16; j++) {
        if (idx[j] < 0)
            m[j] = _mm512_setzero_si512();
        else if (bf16)
            m[j] = _mm512_loadu_si512((const uint16_t *)kb + idx[j] * D + 32 * h);
        else {
            const float *k = (const float *)kb + idx[j] * D + 32 * h;
            m[j] = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(k + 16), _mm512_loadu_ps(k));
        }
    }
    transpose16(m);
    for (int p = 0; p < 16; p++) _mm512_store_si512((__m512i *)(out + 32 * p), m[p]);
}

/* 32 keys' values (rows idx[j] of vb, -1: zero; fp32 or bf16 as keys_tile) -> the B tile of
 * output dims d0 .. d0 + 15 (row p: keys 2p, 2p + 1 of each dim) */
static inline __attribute__((always_inline)) void values_tile(const void *vb, int bf16, long D, const long *idx,
                                                              long d0, uint16_t *out) {
    const __m512i il = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                        23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int p = 0; p < 16; p++) {
        const long a = idx[2 * p], b = idx[2 * p + 1];
        __m512i ab;   /* elements 0-15: key 2p's 16 values, 16-31: key 2p + 1's */
        if (bf16) {
            const __m256i va = a < 0 ? _mm256_setzero_si256()
                                     : _mm256_loadu_si256((const __m256i *)((const uint16_t *)vb + a * D + d0));
            const __m256i vb2 = b < 0 ? _mm256_setzero_si256()
                                      : _mm256_loadu_si256((const __m256i *)((const uint16_t *)vb + b * D + d0));
            ab = _mm512_inserti64x4(_mm512_castsi256_si512(va), vb2, 1);
        } else {
            const __m512 fa = a < 0 ? _mm512_setzero_ps() : _mm512_loadu_ps((const float *)vb + a * D + d0);
            const __m512 fb = b < 0 ? _mm512_setzero_ps() : _mm512_loadu_ps((const float *)vb + b * D + d0);
            ab = (__m512i)_mm512_cvtne2ps_pbh(fb, fa);
        }
        _mm512_store_si512((__m512i *)(out + 32 * p), _mm512_permutexvar_epi16(il, ab));
    }
}

/* key j of query i: its cache row, a context row (j < nc[i]) or its token's ancestor j - nc[i]
 * (tree row tr[i]); -1 past its keys */
static inline long key_index(const long *nc, const long *na, const int32_t *const *tr, int i, long j) {
    if (j < nc[i]) return j;
    if (j < nc[i] + na[i]) return nc[i] + tr[i][1 + j - nc[i]];
    return -1;
}

/* where a block of keys lies past the context every query shares (own: a tree's), the
 * queries from i0 on that read the same keys there (one tree token's) -> the end of that
 * run; else all the queries */
static inline int run_end(int own, const int32_t *const *tr, int i0, int Qn) {
    if (!own) return Qn;
    int i1 = i0 + 1;
    while (i1 < Qn && tr[i1] == tr[i0]) i1++;
    return i1;
}

/* the cache rows of keys j0 .. j0 + n - 1 for the run of queries from i0 -> idx (-1: none):
 * by index up to nmax where the keys are shared, else query i0's own (key_index) */
static inline void run_keys(int own, const long *nc, const long *na, const int32_t *const *tr, int i0, long j0,
                            int n, long nmax, long *idx) {
    for (int j = 0; j < n; j++) idx[j] = own ? key_index(nc, na, tr, i0, j0 + j) : (j0 + j < nmax ? j0 + j : -1);
}

/* Qn (<= 16) queries: query i's vector q[i] (D floats), its keys: nc[i] context keys (rows of
 * kb / vb: fp32, or bf16 where bf16) then na[i] ancestors (tree: tr[i][1 ..] block indices
 * after the context; the same pointer for the queries of one token); its scores in
 * sc + i * cap, output at out[i]. */
static void attn_amx(int Qn, const float *const *q, const long *nc, const long *na, const int32_t *const *tr,
                     const void *kb, const void *vb, int bf16, int D, float scale, float *sc, long cap,
                     float *const *out) {
    uint16_t qa[16 * 128] __attribute__((aligned(64)));   /* the queries, bf16, row i: D dims */
    uint16_t pa[16 * 32] __attribute__((aligned(64)));    /* a chunk of probabilities, bf16 */
    uint16_t bt[16 * 32] __attribute__((aligned(64)));    /* a B tile */
    float cbuf[16 * 16] __attribute__((aligned(64)));
    long idx[32];
    long nt[16], nmax = 0, shared = -1;   /* shared: keys every query reads by index (context) */
    int tree = 0;
    for (int i = 0; i < Qn; i++) {
        nt[i] = nc[i] + na[i];
        if (nt[i] > nmax) nmax = nt[i];
        if (shared < 0 || nc[i] < shared) shared = nc[i];
        if (na[i]) tree = 1;
        for (int d = 0; d < D; d += 32)
            _mm512_storeu_si512((__m512i *)(qa + i * D + d),
                                (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(q[i] + d + 16), _mm512_loadu_ps(q[i] + d)));
    }
    att_configure(Qn);
    /* scores, 16 keys at a time: one tile of keys for all queries while every one reads those
     * keys by index (no tree: always; keys past a query's own end are never read), else one
     * per token (the queries of one tree token: the same ancestors) */
    const __m512 vs = _mm512_set1_ps(scale);
    for (long j0 = 0; j0 < nmax; j0 += 16) {
        const int own = tree && j0 + 16 > shared;
        if (j0 + ATT_PF + 16 <= shared)   /* the context keys ATT_PF ahead */
            prefetch_rows(kb, j0 + ATT_PF, 16, D * (bf16 ? 2 : 4));
        for (int i0 = 0; i0 < Qn;) {
            const int i1 = run_end(own, tr, i0, Qn);
            run_keys(own, nc, na, tr, i0, j0, 16, nmax, idx);
            _tile_zero(0);
            for (int h = 0; h < D / 32; h++) {
                keys_tile(kb, bf16, D, idx, h, bt);
                att_tile_load(4, qa + 32 * h, D * 2);
                att_tile_load(5, bt, 64);
                _tile_dpbf16ps(0, 4, 5);
            }
            _tile_stored(0, cbuf, 64);
            __asm__ __volatile__("" ::: "memory");
            for (int i = i0; i < i1; i++) {
                const long n = nt[i] - j0 < 16 ? nt[i] - j0 : 16;
                if (n > 0)
                    _mm512_mask_storeu_ps(sc + i * cap + j0, (__mmask16)((1u << n) - 1),
                                          _mm512_mul_ps(_mm512_load_ps(cbuf + 16 * i), vs));
            }
            i0 = i1;
        }
    }
    for (int i = 0; i < Qn; i++) softmax_weights(sc + i * cap, nt[i]);
    /* outputs, 64 dims at a time (C tiles 0-3), 32 keys at a time in key order */
    for (int d0 = 0; d0 < D; d0 += 64) {
        const int nd = (D - d0) / 16 < 4 ? (D - d0) / 16 : 4;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (long j0 = 0; j0 < nmax; j0 += 32) {
            const int own = tree && j0 + 32 > shared;
            if (d0 == 0 && j0 + ATT_PF + 32 <= shared)   /* the context values ATT_PF ahead */
                prefetch_rows(vb, j0 + ATT_PF, 32, D * (bf16 ? 2 : 4));
            for (int i0 = 0; i0 < Qn;) {
                const int i1 = run_end(own, tr, i0, Qn);
                /* A: the probabilities of queries i0 .. i1 - 1 at these keys (0 past a query's
                 * end), the other rows 0 */
                for (int i = 0; i < Qn; i++) {
                    const long left = nt[i] - j0, n = i < i0 || i >= i1 || left <= 0 ? 0 : left < 32 ? left : 32;
                    const float *pr = sc + i * cap + j0;
                    const __m512 lo = _mm512_maskz_loadu_ps((__mmask16)(n >= 16 ? 0xFFFF : (1u << n) - 1), pr);
                    const __m512 hi = _mm512_maskz_loadu_ps(
                        (__mmask16)(n >= 32 ? 0xFFFF : n > 16 ? (1u << (n - 16)) - 1 : 0), pr + 16);
                    _mm512_store_si512((__m512i *)(pa + 32 * i), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
                }
                run_keys(own, nc, na, tr, i0, j0, 32, nmax, idx);
                att_tile_load(4, pa, 64);
                for (int db = 0; db < nd; db++) {
                    values_tile(vb, bf16, D, idx, d0 + 16 * db, bt);
                    att_tile_load(5, bt, 64);
                    switch (db) {
                        case 0: _tile_dpbf16ps(0, 4, 5); break;
                        case 1: _tile_dpbf16ps(1, 4, 5); break;
                        case 2: _tile_dpbf16ps(2, 4, 5); break;
                        default: _tile_dpbf16ps(3, 4, 5); break;
                    }
                }
                i0 = i1;
            }
        }
        for (int db = 0; db < nd; db++) {
            switch (db) {
                case 0: _tile_stored(0, cbuf, 64); break;
                case 1: _tile_stored(1, cbuf, 64); break;
                case 2: _tile_stored(2, cbuf, 64); break;
                default: _tile_stored(3, cbuf, 64); break;
            }
            __asm__ __volatile__("" ::: "memory");
            for (int i = 0; i < Qn; i++) _mm512_storeu_ps(out[i] + d0 + 16 * db, _mm512_load_ps(cbuf + 16 * i));
        }
    }
}
#endif

/* tokens of one row in one attention task at most (the scores buffer holds ATT_TOKENS x rep
 * rows of cap floats per thread) */
#define ATT_TOKENS 16

/* floats of work dfl_layer needs for M rows, a cache of cap positions and nthreads */
long dfl_layer_work(const dfl_layer_t *P, long M, long cap, int nthreads) {
    const long D = P->head_dim, nqkv = (P->heads + 2L * P->kv_heads) * D;
    /* per thread: the scores of a run of tokens, and (bf16 caches) one kv head's keys and
     * values of a row widened to fp32 */
    return M * (P->hidden + nqkv + P->heads * D + 3 * P->inter)
        + (long)(nthreads < 1 ? 1 : nthreads) * (ATT_TOKENS * (P->heads / (P->kv_heads > 0 ? P->kv_heads : 1))
                                                   * (cap + D) + (P->kv_bf16 ? 2 * cap * D : 0));
}

/* returns 0; -1 unsupported shape; -3 a position outside the cache; else dfl_linear's code */
int dfl_layer(const dfl_layer_t *P, float *x, long R, long T, const int64_t *slots, const int64_t *starts,
              const float *cos, const float *sin, float *kc, float *vc, long S, long cap,
              float *work, int nthreads, int causal, long out_lo, long out_n, const int32_t *tree) {
    const long M = R * T, Hd = P->hidden, I = P->inter;
    const int H = P->heads, Hkv = P->kv_heads, D = P->head_dim;
    if (D % 8 || D > 128 || Hd % 8 || Hkv <= 0 || H % Hkv || H / Hkv > 128) return -1;
    if (out_lo < 0 || out_n < 1 || out_lo + out_n > T) return -1;
    if (nthreads < 1) nthreads = 1;
    const int rep = H / Hkv;
    const long nqkv = (H + 2L * Hkv) * D;
    for (long r = 0; r < R; r++)
        if (slots[r] < 0 || slots[r] >= S || starts[r] < 0 || starts[r] + T > cap) return -3;
    if (tree) {   /* each token's keys: 1 .. min(T, TREE_MAX) block indices, in [0, T) */
        if (T > TREE_MAX) return -1;
        for (long m = 0; m < R * T; m++) {
            const int32_t *tr = tree + m * (T + 1);
            if (tr[0] < 1 || tr[0] > T) return -1;
            for (int a = 1; a <= tr[0]; a++)
                if (tr[a] < 0 || tr[a] >= T) return -1;
        }
    }
    float *h = work, *qkv = h + M * Hd, *att = qkv + M * nqkv, *gu = att + M * H * D, *act = gu + M * 2 * I;
    float *scores = act + M * I;
    int rc;

    /* per-row work is split over threads only for 16 rows or more (a row is always computed
     * whole by one thread, in the same order: the numbers do not depend on the split); below,
     * four parallel regions a layer cost more than the few rows' norms and SiLU they split
     * (a 6-token verify forward ~1-2% faster on 2 threads than with the split from 4 rows) */
    const int par = M >= 16 && nthreads > 1;
#pragma omp parallel for num_threads(nthreads) if (par) schedule(static)
    for (long m = 0; m < M; m++) rms_norm(x + m * Hd, P->in_norm, Hd, P->eps, h + m * Hd);
    if ((rc = dfl_linear(lin_fmt(P, P->qkv_fmt), h, M, Hd, nqkv, P->qkv_w, qkv, nthreads))) return rc;
#pragma omp parallel for num_threads(nthreads) if (par) schedule(static)
    for (long m = 0; m < M; m++) {
        float *row = qkv + m * nqkv;
        if (P->qkv_b)
            for (long i = 0; i < nqkv; i++) row[i] += P->qkv_b[i];
        const long r = m / T, t = m % T, pos = starts[r] + t;
        const float *cs = cos + m * D, *sn = sin + m * D;
        for (int hh = 0; hh < H + Hkv; hh++) {
            float *v = row + hh * D;
            if (P->q_norm) rms_norm(v, hh < H ? P->q_norm : P->k_norm, D, P->eps, v);
            rope(v, cs, sn, D);
        }
        for (int g = 0; g < Hkv; g++) {
            const long off = ((slots[r] * Hkv + g) * cap + pos) * D;
            const float *k = row + (H + g) * D, *v = row + (H + Hkv + g) * D;
            if (P->kv_bf16)
                for (int d = 0; d < D; d++) {
                    ((uint16_t *)kc)[off + d] = to_bf16(k[d]);
                    ((uint16_t *)vc)[off + d] = to_bf16(v[d]);
                }
            else
                for (int d = 0; d < D; d++) { kc[off + d] = k[d]; vc[off + d] = v[d]; }
        }
    }
    /* from here on only tokens out_lo .. out_lo + out_n - 1 of each row (all K/V are
     * written above): Mo output rows, output row o = token out_lo + o % out_n of row o / out_n,
     * each computed as it would be among all M (row-invariant), the other rows of x untouched */
    const long Mo = R * out_n;
#define XROW(o) ((o) / out_n * T + out_lo + (o) % out_n)
    /* attention tasks: (row, kv head, a run of at most ATT_TOKENS of the row's output tokens),
     * the runs as many as make the tasks split evenly over the threads where the tokens allow,
     * else enough to give every thread a task where the tokens allow */
    const long runs0 = (out_n + ATT_TOKENS - 1) / ATT_TOKENS;
    long runs = -1;
    for (long c = runs0; c <= out_n && runs < 0; c++)
        if ((R * Hkv * c) % nthreads == 0) runs = c;
    if (runs < 0) {
        const long want = (nthreads + R * Hkv - 1) / (R * Hkv);
        runs = want > runs0 ? (want < out_n ? want : out_n) : runs0;
    }
    const long tasks = R * Hkv * runs;
    const int nt = tasks < nthreads ? (int)tasks : nthreads;
#pragma omp parallel num_threads(nt)
    {
        const int tid = omp_get_thread_num(), n_t = omp_get_num_threads();
        float *qb = scores + (long)tid * (ATT_TOKENS * rep * (cap + D) + (P->kv_bf16 ? 2 * cap * D : 0)),
              *sc = qb + (long)ATT_TOKENS * rep * D;
        float *kw = sc + (long)ATT_TOKENS * rep * cap, *vw = kw + cap * D;   /* bf16 caches: widened K / V */
        float kg[TREE_MAX * 128], vg[TREE_MAX * 128];   /* a tree token's block keys / values */
        long nq[ATT_TOKENS * 128];
        for (long task = tasks * tid / n_t; task < tasks * (tid + 1) / n_t; task++) {
            const long r = task / (Hkv * runs), g = task / runs % Hkv, run = task % runs;
            const long t0 = out_lo + out_n * run / runs, t1 = out_lo + out_n * (run + 1) / runs;
            const long base = (slots[r] * Hkv + g) * cap * D;
            const int Q = (int)((t1 - t0) * rep);
            /* this row's keys and values of kv head g: the cache's, or (bf16) widened here,
             * every position a token of the run reads (the context and the block) */
            const float *kb = kc + base, *vb = vc + base;
#ifdef ATT_AMX
            if (P->amx_att && D % 32 == 0 && D <= 128) {   /* on AMX tiles, 16 queries at a time (attn_amx) */
                const float *qv[ATT_TOKENS * 128];
                float *ov[ATT_TOKENS * 128];
                long nc[ATT_TOKENS * 128], na[ATT_TOKENS * 128];
                const int32_t *tv[ATT_TOKENS * 128];
                for (long t = t0; t < t1; t++) {
                    const long m = r * T + t, o = r * out_n + (t - out_lo);
                    for (int i = 0; i < rep; i++) {
                        const long qi = (t - t0) * rep + i;
                        qv[qi] = qkv + m * nqkv + (g * rep + i) * D;
                        ov[qi] = att + o * H * D + (g * rep + i) * D;
                        nc[qi] = starts[r] + (tree ? 0 : causal ? t + 1 : T);
                        na[qi] = tree ? tree[m * (T + 1)] : 0;
                        tv[qi] = tree ? tree + m * (T + 1) : NULL;
                    }
                }
                /* the row's keys and values as the cache holds them (bf16: read as they are) */
                const void *ka = P->kv_bf16 ? (const void *)((const uint16_t *)kc + base) : (const void *)kb;
                const void *va = P->kv_bf16 ? (const void *)((const uint16_t *)vc + base) : (const void *)vb;
                for (int q0 = 0; q0 < Q; q0 += 16)
                    attn_amx(Q - q0 < 16 ? Q - q0 : 16, qv + q0, nc + q0, na + q0, tv + q0, ka, va, P->kv_bf16, D,
                             P->scale, sc, cap, ov + q0);
                continue;
            }
#endif
            if (P->kv_bf16) {
                const long nread = starts[r] + T;
                widen_bf16((const uint16_t *)kc + base, nread * D, kw);
                widen_bf16((const uint16_t *)vc + base, nread * D, vw);
                kb = kw;
                vb = vw;
            }
            /* the run's queries, token by token, and the cached keys each reads: all of the
             * context (tree: the context only, its block keys below) */
            for (long t = t0; t < t1; t++) {
                const float *q = qkv + (r * T + t) * nqkv + g * rep * D;
                for (int i = 0; i < rep; i++) {
                    const long qi = (t - t0) * rep + i;
                    float *dst = (float *)QP_AT(qb, qi, D);   /* paired (multi_scores) */
                    for (int d = 0; d < D; d += 8)
                        for (int l = 0; l < 8; l++) dst[2 * d + l] = q[i * D + d + l];
                    nq[qi] = starts[r] + (tree ? 0 : causal ? t + 1 : T);
                }
            }
            multi_scores(qb, 0, Q, nq, kb, cap, D, P->scale, sc);
            for (long t = t0; t < t1; t++) {
                const long m = r * T + t, o = r * out_n + (t - out_lo);
                float *p[128], *out[128];
                for (int i = 0; i < rep; i++) {
                    p[i] = sc + ((t - t0) * rep + i) * cap;
                    out[i] = att + o * H * D + (g * rep + i) * D;
                }
                long n0 = nq[(t - t0) * rep], n = n0;
                if (tree) {   /* the listed block keys, gathered in order after the context */
                    const int32_t *tr = tree + m * (T + 1);
                    const long na = tr[0];
                    for (long a = 0; a < na; a++)
                        for (int d = 0; d < D; d++) {
                            kg[a * D + d] = kb[(n0 + tr[1 + a]) * D + d];
                            vg[a * D + d] = vb[(n0 + tr[1 + a]) * D + d];
                        }
                    long nb[128];   /* each head reads all na gathered keys */
                    for (int i = 0; i < rep; i++) nb[i] = na;
                    multi_scores(qb, (int)((t - t0) * rep), rep, nb, kg, cap, D, P->scale, p[0] + n0);
                    n = n0 + na;
                }
                for (int i = 0; i < rep; i++) softmax_weights(p[i], n);
                for (int i = 0; i < rep; i += PV_Q) {
                    const int nh = rep - i < PV_Q ? rep - i : PV_Q;
                    if (tree)
                        weighted_values(nh, p + i, vb, n0, vg, n, D, out + i);
                    else
                        weighted_values(nh, p + i, vb, n, NULL, n, D, out + i);
                }
            }
        }
    }
    if ((rc = dfl_linear(lin_fmt(P, P->o_fmt), att, Mo, (long)H * D, Hd, P->o_w, h, nthreads))) return rc;
#pragma omp parallel for num_threads(nthreads) if (par) schedule(static)
    for (long o = 0; o < Mo; o++) {
        float *xr = x + XROW(o) * Hd;
        for (long i = 0; i < Hd; i++) xr[i] += P->o_b ? h[o * Hd + i] + P->o_b[i] : h[o * Hd + i];
        rms_norm(xr, P->post_norm, Hd, P->eps, h + o * Hd);
    }
    if ((rc = dfl_linear(lin_fmt(P, P->gu_fmt), h, Mo, Hd, 2 * I, P->gu_w, gu, nthreads))) return rc;
#pragma omp parallel for num_threads(nthreads) if (par) schedule(static)
    for (long m = 0; m < Mo; m++) {
        const float *g = gu + m * 2 * I, *u = g + I;
        float *a = act + m * I;
        long i = 0;
        for (; i + 8 <= I; i += 8) {   /* silu(g) * u = g / (1 + e^-g) * u */
            const __m256 vg = _mm256_loadu_ps(g + i);
            const __m256 sg = _mm256_div_ps(vg, _mm256_add_ps(_mm256_set1_ps(1.0f),
                                                              exp8(_mm256_sub_ps(_mm256_setzero_ps(), vg))));
            _mm256_storeu_ps(a + i, _mm256_mul_ps(sg, _mm256_loadu_ps(u + i)));
        }
        for (; i < I; i++) a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
    if ((rc = dfl_linear(lin_fmt(P, P->down_fmt), act, Mo, I, Hd, P->down_w, h, nthreads))) return rc;
    for (long o = 0; o < Mo; o++) {
        float *xr = x + XROW(o) * Hd;
        for (long i = 0; i < Hd; i++) xr[i] += h[o * Hd + i];
    }
#undef XROW
    return 0;
}

/* Layers 0 .. n - 1 of a stack in one call (no return to the caller between layers):
 * dfl_layer for each with its struct P[i] and caches kc[i] / vc[i], the last one with
 * out_lo / out_n (the others all T tokens); after layer i, where keep[i] is not NULL, a
 * copy of x (R x T x hidden floats) goes there. Returns 0, or the first failing layer's
 * code with its index in *failed (the layers after it not run). */
int dfl_layers(const dfl_layer_t *const *P, int n, float *x, long R, long T, const int64_t *slots,
               const int64_t *starts, const float *cos, const float *sin, float *const *kc, float *const *vc,
               long S, long cap, float *work, int nthreads, int causal, long out_lo, long out_n,
               const int32_t *tree, float *const *keep, int *failed) {
    for (int i = 0; i < n; i++) {
        const int last = i == n - 1;
        const int rc = dfl_layer(P[i], x, R, T, slots, starts, cos, sin, kc[i], vc[i], S, cap, work, nthreads,
                                 causal, last ? out_lo : 0, last ? out_n : T, tree);
        if (rc) {
            *failed = i;
            return rc;
        }
        if (keep && keep[i]) memcpy(keep[i], x, sizeof(float) * R * T * P[i]->hidden);
    }
    return 0;
}

/* A DFlash drafter's step in one call (dfl_draft): its layers (their structs, as
 * dfl_layers runs them) and what the step reads besides them. */
typedef struct {
    int n_layers;
    const dfl_layer_t *const *layers;
    long feat;                          /* context feature width: K target layers x hidden */
    int fc_fmt;                         /* fc: feat -> hidden, a dfl_linear format */
    const void *fc_w;
    const float *hidden_norm, *final_norm;   /* [hidden] */
    float hn_eps, fn_eps;
    const int *ctx_fmt;                 /* per layer: its [k_proj; v_proj] rows, hidden -> 2 Hkv D */
    const void *const *ctx_w;
    const float *embed;                 /* the target's input embedding [vocab, hidden], fp32 */
    long vocab, mask_id;
    int head_fmt;                       /* the drafting vocabulary's head: hidden -> head_n */
    const void *head_w;
    long head_n;
} dfl_drafter_t;

/* floats of work dfl_draft needs for N context tokens, R rows of B block tokens (n of each
 * drafted), a cache of cap positions and nthreads */
long dfl_draft_work(const dfl_drafter_t *Dr, long N, long R, long B, long n, long cap, int nthreads) {
    const dfl_layer_t *P = Dr->layers[0];
    const long Hd = P->hidden, D = P->head_dim, kvw = 2L * P->kv_heads * D;
    return 2 * N * Hd + N * kvw + R * B * (Hd + 2 * D) + R * n * (Hd + Dr->head_n)
        + dfl_layer_work(P, R * B, cap, nthreads);
}

/* One draft step of a DFlash drafter, what the engine otherwise runs as ~15 calls:
 *   1. the context: N committed tokens' target features feats [N, feat] ->
 *      hidden_norm(fc(feats)) -> each layer's k / v projections -> k_norm, RoPE, into the
 *      layer's cache at (ctx_slots[i], ctx_pos[i]) (dfl_write_context); lens[slot] grows to
 *      cover them;
 *   2. the block of each row r: [anchors[r], mask x (B - 1)] embedded (rows of the target's
 *      table), at RoPE positions bpos[r] .. bpos[r] + B - 1, its K/V past the row's context
 *      in the cache (position lens[slots[r]]), every block token reading all of it
 *      (dfl_layers, not causal); block tokens lo .. lo + n - 1 of the last layer only;
 *   3. final_norm, the head over the drafting vocabulary (its logits [R, n, head_n] to
 *      logits_out where that is not NULL), and with k > 0 each drafted position's k largest
 *      logits with their softmax probabilities (dfl_topk_softmax): top_idx / top_p
 *      [R, n, k] (indices into the drafting vocabulary).
 * The same kernels in the same order as those calls, so the same bits. cos_t / sin_t: the
 * RoPE tables [P, D]. Returns 0; -5 (nothing written) for shapes it does not take, an index
 * out of range, or a row whose context and block would not fit its cache; else the failing
 * kernel's code. */
int dfl_draft(const dfl_drafter_t *Dr, const float *feats, long N, const int64_t *ctx_slots,
              const int64_t *ctx_pos, const float *cos_t, const float *sin_t, long P, float *const *kc,
              float *const *vc, long S, long cap, int64_t *lens, long R, long B, const int64_t *slots,
              const int64_t *anchors, const int64_t *bpos, long lo, long n, int k, int64_t *top_idx,
              float *top_p, float *logits_out, float *work, int nthreads) {
    if (Dr->n_layers < 1 || R < 1 || B < 1 || lo < 0 || n < 1 || lo + n > B || k < 0 || k > 16 || k > Dr->head_n
        || (k == 0 && !logits_out))
        return -5;
    const dfl_layer_t *L0 = Dr->layers[0];
    const long Hd = L0->hidden;
    const int Hkv = L0->kv_heads, D = L0->head_dim;
    const long kvw = 2L * Hkv * D;
    if (Hd % 8 || D % 8 || D > 128) return -5;
    for (int i = 1; i < Dr->n_layers; i++)
        if (Dr->layers[i]->hidden != Hd || Dr->layers[i]->kv_heads != Hkv || Dr->layers[i]->head_dim != D) return -5;
    /* every index first: nothing is written unless all of it fits */
    for (long i = 0; i < N; i++)
        if (ctx_slots[i] < 0 || ctx_slots[i] >= S || ctx_pos[i] < 0 || ctx_pos[i] >= cap || ctx_pos[i] >= P)
            return -5;
    int64_t *start = (int64_t *)malloc(sizeof(int64_t) * R);
    if (!start) return -5;
    for (long r = 0; r < R; r++) {
        if (slots[r] < 0 || slots[r] >= S || anchors[r] < 0 || anchors[r] >= Dr->vocab || bpos[r] < 0
            || bpos[r] + B > P) {
            free(start);
            return -5;
        }
        int64_t len = lens[slots[r]];
        for (long i = 0; i < N; i++)
            if (ctx_slots[i] == slots[r] && ctx_pos[i] + 1 > len) len = ctx_pos[i] + 1;
        if (len + B > cap) {
            free(start);
            return -5;
        }
        start[r] = len;
    }
    float *a = work, *b = a + N * Hd, *kv = b + N * Hd, *x = kv + N * kvw, *cs = x + R * B * Hd,
          *sn = cs + R * B * D, *h = sn + R * B * D, *logits = h + R * n * Hd, *lw = logits + R * n * Dr->head_n;
    int rc = 0;
    if (N > 0) {   /* 1. the context */
        if ((rc = dfl_linear(Dr->fc_fmt, feats, N, Dr->feat, Hd, Dr->fc_w, a, nthreads))) goto done;
        dfl_rms_norm(a, Dr->hidden_norm, N, Hd, Dr->hn_eps, b);   /* (Hd % 8 == 0: checked above) */
        for (int l = 0; l < Dr->n_layers; l++) {
            const dfl_layer_t *Pl = Dr->layers[l];
            if ((rc = dfl_linear(Dr->ctx_fmt[l], b, N, Hd, kvw, Dr->ctx_w[l], kv, nthreads))) goto done;
            if ((rc = dfl_write_context(kv, N, kvw, Hkv, D, Pl->k_norm, Pl->eps, cos_t, sin_t, P, ctx_slots, ctx_pos,
                                        kc[l], vc[l], S, cap))) goto done;
        }
        for (long i = 0; i < N; i++)
            if (ctx_pos[i] + 1 > lens[ctx_slots[i]]) lens[ctx_slots[i]] = ctx_pos[i] + 1;
    }
    /* 2. the blocks */
    for (long r = 0; r < R; r++)
        for (long t = 0; t < B; t++) {
            const long m = r * B + t, tok = t ? Dr->mask_id : anchors[r], pos = bpos[r] + t;
            memcpy(x + m * Hd, Dr->embed + tok * Hd, sizeof(float) * Hd);
            memcpy(cs + m * D, cos_t + pos * D, sizeof(float) * D);
            memcpy(sn + m * D, sin_t + pos * D, sizeof(float) * D);
        }
    int failed = -1;
    if ((rc = dfl_layers(Dr->layers, Dr->n_layers, x, R, B, slots, start, cs, sn, kc, vc, S, cap, lw, nthreads, 0,
                         lo, n, NULL, NULL, &failed))) goto done;
    /* 3. the drafted positions' norm, head and top k */
    for (long o = 0; o < R * n; o++)
        rms_norm(x + (o / n * B + lo + o % n) * Hd, Dr->final_norm, Hd, Dr->fn_eps, h + o * Hd);
    if (logits_out) logits = logits_out;
    if ((rc = dfl_linear(Dr->head_fmt, h, R * n, Hd, Dr->head_n, Dr->head_w, logits, nthreads))) goto done;
    if (k) rc = dfl_topk_softmax(logits, R * n, Dr->head_n, k, top_idx, top_p);
done:
    free(start);
    return rc;
}

/* y[m] = rms_norm(x[m]) * w for M rows of n values (n % 8 == 0): the layers' own norm,
 * one call for a few rows where torch runs five ops. Returns 0; -1 when n % 8. */
int dfl_rms_norm(const float *x, const float *w, long M, long n, float eps, float *y) {
    if (n % 8) return -1;
    for (long m = 0; m < M; m++) rms_norm(x + m * n, w, n, eps, y + m * n);
    return 0;
}

/* A DFlash drafter layer's context K/V, N committed tokens at once: kv holds each token's
 * k and v projections ([2, Hkv, D] per token, rows `stride` floats apart);
 *   k_cache[slots[n], g, pos[n]] = RoPE(k_norm(k[n, g]))   (k_norm when given)
 *   v_cache[slots[n], g, pos[n]] = v[n, g]
 * with cos / sin read from tables [P, D] at row pos[n]. The same norm and RoPE as the
 * layer above applies to a block's own keys. Returns 0; -1 (nothing written) when a slot
 * is outside [0, S), a position outside [0, min(cap, P)) or D is not a multiple of 8 / > 256. */
int dfl_write_context(const float *kv, long N, long stride, int kv_heads, int head_dim, const float *k_norm,
                      float eps, const float *cos_t, const float *sin_t, long P, const int64_t *slots,
                      const int64_t *pos, float *k_cache, float *v_cache, long S, long cap) {
    const int D = head_dim;
    if (D % 8 || D > 256 || D <= 0) return -1;
    for (long n = 0; n < N; n++)
        if (slots[n] < 0 || slots[n] >= S || pos[n] < 0 || pos[n] >= cap || pos[n] >= P) return -1;
    float tmp[256];
    for (long n = 0; n < N; n++) {
        const float *cs = cos_t + pos[n] * D, *sn = sin_t + pos[n] * D;
        for (int g = 0; g < kv_heads; g++) {
            const float *k = kv + n * stride + (long)g * D, *v = kv + n * stride + (long)(kv_heads + g) * D;
            const long off = ((slots[n] * kv_heads + g) * cap + pos[n]) * D;
            if (k_norm) rms_norm(k, k_norm, D, eps, tmp);
            else for (int d = 0; d < D; d++) tmp[d] = k[d];
            rope(tmp, cs, sn, D);
            for (int d = 0; d < D; d++) { k_cache[off + d] = tmp[d]; v_cache[off + d] = v[d]; }
        }
    }
    return 0;
}

/* A corpus index's chain of guesses (dflash_core/corpus.py CorpusIndex.chain): keys [E]
 * ascending (32-bit context hashes), tokens / buckets [E] their entries; ctx: a row's last
 * n_ctx tokens. Each guess is the entry of the longest context of at most max_n tokens
 * ending the tail whose key the index holds (the key of n tokens: h = seed, then for each
 * token t from the last back, h = (h ^ (t + 1)) * mul mod 2^64, keeping h >> 32), appended
 * to the tail before the next. Returns the number of guesses (<= k) in out_tok /
 * out_bucket; -1 for max_n outside [1, 8]. */
long dfl_corpus_chain(const uint32_t *keys, long E, const int64_t *tokens, const uint8_t *buckets,
                      const int64_t *ctx, long n_ctx, int max_n, int k, uint64_t seed, uint64_t mul,
                      int64_t *out_tok, uint8_t *out_bucket) {
    if (max_n < 1 || max_n > 8) return -1;
    int64_t tail[8];
    int n = n_ctx < max_n ? (int)n_ctx : max_n;
    for (int i = 0; i < n; i++) tail[i] = ctx[n_ctx - n + i];
    long got = 0;
    while (got < k && n > 0 && E > 0) {
        uint32_t key[8];
        uint64_t h = seed;
        for (int j = 0; j < n; j++) {
            h = (h ^ (uint64_t)(tail[n - 1 - j] + 1)) * mul;
            key[j] = (uint32_t)(h >> 32);
        }
        long hit = -1;
        for (int j = n - 1; j >= 0 && hit < 0; j--) {   /* the longest context first */
            long lo = 0, hi = E;
            while (lo < hi) {
                const long mid = lo + (hi - lo) / 2;
                if (keys[mid] < key[j]) lo = mid + 1; else hi = mid;
            }
            if (lo < E && keys[lo] == key[j]) hit = lo;
        }
        if (hit < 0) break;
        out_tok[got] = tokens[hit];
        out_bucket[got] = buckets[hit];
        got++;
        if (n < max_n) tail[n++] = tokens[hit];
        else {
            for (int i = 0; i + 1 < n; i++) tail[i] = tail[i + 1];
            tail[n - 1] = tokens[hit];
        }
    }
    return got;
}

/* Each of R rows of N logits -> its k largest, descending (equal values: the lower index
 * first, as a first-maximum argmax), in idx [R, k], and their softmax probabilities
 * e^(x - max) / sum_j e^(x_j - max) in p [R, k] (the sum over 8 lanes in a fixed order): what
 * a draft tree picks its nodes from, one pass over the row for the k, one for the sum,
 * instead of a softmax, a top-k and an argmax over the whole row. A NaN is never picked.
 * Returns 0; -1 for k outside [1, min(N, 16)]. */
int dfl_topk_softmax(const float *x, long R, long N, int k, int64_t *idx, float *p) {
    if (k < 1 || k > 16 || k > N) return -1;
    for (long r = 0; r < R; r++) {
        const float *row = x + r * N;
        float val[16];
        long at[16];
        int n = 0;   /* kept so far, val descending */
        float floor = -INFINITY;   /* the k-th value once k are kept: a value must beat it */
        long j = 0;
        for (; j < N; j++) {
            if (n == k) {   /* skip 8 at a time while none beats the k-th value */
                const __m256 vf = _mm256_set1_ps(floor);
                while (j + 8 <= N && !_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + j), vf, _CMP_GT_OQ)))
                    j += 8;
                if (j >= N) break;
            }
            const float v = row[j];
            if (!(v > floor) && n == k) continue;
            if (v != v) continue;   /* NaN */
            int pos = n < k ? n : k - 1;   /* insert after every kept value >= v */
            while (pos > 0 && val[pos - 1] < v) {
                if (pos < k) { val[pos] = val[pos - 1]; at[pos] = at[pos - 1]; }
                pos--;
            }
            if (pos < k) { val[pos] = v; at[pos] = j; }
            if (n < k) n++;
            if (n == k) floor = val[k - 1];
        }
        for (int i = n; i < k; i++) { val[i] = -INFINITY; at[i] = 0; }   /* (an all-NaN row) */
        const float mx = val[0];
        const __m256 vmx = _mm256_set1_ps(mx);
        __m256 vs = _mm256_setzero_ps();
        j = 0;
        for (; j + 8 <= N; j += 8) vs = _mm256_add_ps(vs, exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), vmx)));
        float s = hsum8(vs);
        for (; j < N; j++) s += expf(row[j] - mx);
        for (int i = 0; i < k; i++) {
            idx[r * k + i] = at[i];
            p[r * k + i] = expf(val[i] - mx) / s;
        }
    }
    return 0;
}
