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
 * The cache is [S, Hkv, cap, D] fp32 per layer. D must be a multiple of 8. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

int dfl_linear(int fmt, const float *x, long M, long K, long N, const void *w, float *y, int nthreads);

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
} dfl_layer_t;

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

static inline float dot(const float *a, const float *b, int D) {
    __m256 acc = _mm256_setzero_ps();
    for (int d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
    return hsum8(acc);
}

/* the scores of `rep` query heads (q: rep x D, one after the other) that share a kv head,
 * over its keys 0 .. n-1: scores[i * stride + j]. Keys are read 4 at a time for every head
 * before the next 4 (a kv head's keys cross the cache once, not once per query head); each
 * (head, key) is one 8-lane FMA chain over d in order, then hsum8: the same bits whatever
 * the grouping. */
static void group_scores(const float *q, int rep, const float *kb, long n, long stride, int D, float scale,
                         float *scores) {
    long j0 = 0;
    for (; j0 + 4 <= n; j0 += 4) {
        const float *k0 = kb + j0 * D;
        for (int i = 0; i < rep; i++) {
            const float *qi = q + i * D;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int d = 0; d < D; d += 8) {
                const __m256 vq = _mm256_loadu_ps(qi + d);
                a0 = _mm256_fmadd_ps(vq, _mm256_loadu_ps(k0 + d), a0);
                a1 = _mm256_fmadd_ps(vq, _mm256_loadu_ps(k0 + D + d), a1);
                a2 = _mm256_fmadd_ps(vq, _mm256_loadu_ps(k0 + 2 * D + d), a2);
                a3 = _mm256_fmadd_ps(vq, _mm256_loadu_ps(k0 + 3 * D + d), a3);
            }
            float *si = scores + i * stride + j0;
            si[0] = hsum8(a0) * scale;
            si[1] = hsum8(a1) * scale;
            si[2] = hsum8(a2) * scale;
            si[3] = hsum8(a3) * scale;
        }
    }
    for (; j0 < n; j0++)
        for (int i = 0; i < rep; i++) scores[i * stride + j0] = dot(q + i * D, kb + j0 * D, D) * scale;
}

/* one head: softmax of its n scores (overwritten) and the weighted sum of the values: out[D].
 * Key j's value is vb[j] for j < n0, else vb2[j - n0] (a tree verify's ancestors, gathered):
 * the same operations in the same order as one segment of n keys, so the same bits. */
static void softmax_values(float *scores, const float *vb, long n0, const float *vb2, long n, int D, float *out) {
    float mx = -INFINITY;
    for (long j = 0; j < n; j++)
        if (scores[j] > mx) mx = scores[j];
    /* e^(s - max) 8 keys at a time (the tail padded), summed in 8 lanes: a fixed order for a
     * given number of keys, which depends only on the token's position */
    const __m256 vmx = _mm256_set1_ps(mx);
    __m256 vs = _mm256_setzero_ps();
    long j = 0;
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
    __m256 acc[16];   /* D <= 128 */
    const int C = D / 8;
    for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_ps();
    for (long j = 0; j < n; j++) {
        const __m256 p = _mm256_set1_ps(scores[j] * inv);
        const float *v = j < n0 ? vb + j * D : vb2 + (j - n0) * D;
        for (int c = 0; c < C; c++) acc[c] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + c * 8), acc[c]);
    }
    for (int c = 0; c < C; c++) _mm256_storeu_ps(out + c * 8, acc[c]);
}

/* floats of work dfl_layer needs for M rows, a cache of cap positions and nthreads */
long dfl_layer_work(const dfl_layer_t *P, long M, long cap, int nthreads) {
    const long D = P->head_dim, nqkv = (P->heads + 2L * P->kv_heads) * D;
    return M * (P->hidden + nqkv + P->heads * D + 3 * P->inter)
        + (long)(nthreads < 1 ? 1 : nthreads) * cap * (P->heads / (P->kv_heads > 0 ? P->kv_heads : 1));
}

/* returns 0; -1 unsupported shape; -3 a position outside the cache; else dfl_linear's code */
int dfl_layer(const dfl_layer_t *P, float *x, long R, long T, const int64_t *slots, const int64_t *starts,
              const float *cos, const float *sin, float *kc, float *vc, long S, long cap,
              float *work, int nthreads, int causal, long out_lo, long out_n, const int32_t *tree) {
    const long M = R * T, Hd = P->hidden, I = P->inter;
    const int H = P->heads, Hkv = P->kv_heads, D = P->head_dim;
    if (D % 8 || D > 128 || Hd % 8 || Hkv <= 0 || H % Hkv) return -1;
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

    /* per-row work is split over threads only for several rows (a row is always computed
     * whole by one thread, in the same order: the numbers do not depend on the split) */
    const int par = M >= 4 && nthreads > 1;
#pragma omp parallel for num_threads(nthreads) if (par) schedule(static)
    for (long m = 0; m < M; m++) rms_norm(x + m * Hd, P->in_norm, Hd, P->eps, h + m * Hd);
    if ((rc = dfl_linear(P->qkv_fmt, h, M, Hd, nqkv, P->qkv_w, qkv, nthreads))) return rc;
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
            for (int d = 0; d < D; d++) { kc[off + d] = k[d]; vc[off + d] = v[d]; }
        }
    }
    /* from here on only tokens out_lo .. out_lo + out_n - 1 of each row (all K/V are
     * written above): Mo output rows, output row o = token out_lo + o % out_n of row o / out_n,
     * each computed as it would be among all M (row-invariant), the other rows of x untouched */
    const long Mo = R * out_n;
#define XROW(o) ((o) / out_n * T + out_lo + (o) % out_n)
    const long tasks = Mo * Hkv;   /* (token, kv head): its rep query heads together */
    const int nt = tasks < nthreads ? (int)tasks : nthreads;
#pragma omp parallel num_threads(nt)
    {
        const int tid = omp_get_thread_num(), n_t = omp_get_num_threads();
        float *sc = scores + (long)tid * cap * rep;
        float kg[TREE_MAX * 128], vg[TREE_MAX * 128];   /* a tree token's block keys / values */
        for (long task = tasks * tid / n_t; task < tasks * (tid + 1) / n_t; task++) {
            const long o = task / Hkv, m = XROW(o), r = m / T, t = m % T;
            const int g = (int)(task % Hkv);
            const long base = (slots[r] * Hkv + g) * cap * D;
            const float *q = qkv + m * nqkv + (long)g * rep * D;
            float *out = att + o * H * D + (long)g * rep * D;
            if (!tree) {
                const long n = starts[r] + (causal ? t + 1 : T);
                group_scores(q, rep, kc + base, n, n, D, P->scale, sc);
                for (int i = 0; i < rep; i++) softmax_values(sc + i * n, vc + base, n, NULL, n, D, out + i * D);
            } else {   /* the cached context, then the listed block keys gathered in order */
                const int32_t *tr = tree + m * (T + 1);
                const long n0 = starts[r], na = tr[0], n = n0 + na;
                for (long a = 0; a < na; a++)
                    for (int d = 0; d < D; d++) {
                        kg[a * D + d] = kc[base + (n0 + tr[1 + a]) * D + d];
                        vg[a * D + d] = vc[base + (n0 + tr[1 + a]) * D + d];
                    }
                group_scores(q, rep, kc + base, n0, n, D, P->scale, sc);
                group_scores(q, rep, kg, na, n, D, P->scale, sc + n0);
                for (int i = 0; i < rep; i++) softmax_values(sc + i * n, vc + base, n0, vg, n, D, out + i * D);
            }
        }
    }
    if ((rc = dfl_linear(P->o_fmt, att, Mo, (long)H * D, Hd, P->o_w, h, nthreads))) return rc;
#pragma omp parallel for num_threads(nthreads) if (par) schedule(static)
    for (long o = 0; o < Mo; o++) {
        float *xr = x + XROW(o) * Hd;
        for (long i = 0; i < Hd; i++) xr[i] += P->o_b ? h[o * Hd + i] + P->o_b[i] : h[o * Hd + i];
        rms_norm(xr, P->post_norm, Hd, P->eps, h + o * Hd);
    }
    if ((rc = dfl_linear(P->gu_fmt, h, Mo, Hd, 2 * I, P->gu_w, gu, nthreads))) return rc;
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
    if ((rc = dfl_linear(P->down_fmt, act, Mo, I, Hd, P->down_w, h, nthreads))) return rc;
    for (long o = 0; o < Mo; o++) {
        float *xr = x + XROW(o) * Hd;
        for (long i = 0; i < Hd; i++) xr[i] += h[o * Hd + i];
    }
#undef XROW
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
