"""Triton block attention: a block of T queries attends to its row's cached context and
to the block's own keys, in one pass with an online softmax (flash-attention style).

Contract: identical to `reference.block_attention` (see there), i.e. for row r, query
head h (kv head g = h // (H // Hkv)) and block position i:

    keys   = [k_cache[slots[r], g, 0:ctx_lens[r]] ; k_block[r, g, 0:T]]
    values = [v_cache[slots[r], g, 0:ctx_lens[r]] ; v_block[r, g, 0:T]]
    block key j is visible to query i iff not causal or j <= i
    out[r, h, i] = softmax(scale * q[r, h, i] . keys^T) @ values

Shapes
    q        [R, H, T, D]     RoPE applied        out  [R, H, T, D]  (q's dtype)
    k_cache  [S, Hkv, L, D]   v_cache likewise    slots, ctx_lens [R] int
    k_block  [R, Hkv, T, D]   v_block likewise
T is 1..16 in practice (any T works); D any size (padded to a power of two).

Work split. One program owns one row r, one kv head g and a chunk of BLOCK_M "query
rows", where the G = H // Hkv query heads that share kv head g and the T block
positions are flattened into M = G*T rows (m -> head g*G + m // T, position m % T), so
each K/V tile is loaded once for the whole GQA group. tl.dot needs >= 16 rows, so M is
padded to a power of two >= 16 and the padding is masked. The context is walked in
tiles of BLOCK_N keys, then the T block keys (padded to BLOCK_T >= 16) are one more
tile. For few programs (small batch, long context) the context is also split over
NUM_SPLITS programs (flash-decoding) whose partial results are merged by a second
kernel; the number of splits depends only on shapes and the cache capacity L, never
on ctx_lens values, so there is no host synchronisation.

Online softmax (per query row), with scores in base 2: s = scale * log2(e) * q.k, so
exp(scale * q.k - c) == exp2(s - c / ln 2):
    m' = max(m, max_j s_j);  alpha = 2^(m - m');  p_j = 2^(s_j - m')
    l' = alpha * l + sum_j p_j;  acc' = alpha * acc + sum_j p_j v_j
    out = acc / l
Every processed tile has at least one visible key for every row (the context mask
does not depend on the query, and block key 0 is visible to every query), so m is
finite after the first tile and no 0/0 or inf-inf appears.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_util import cdiv, check_launchable, dot_in_fp32, interpret_mode, next_pow2

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * log2(e))


@triton.jit
def _dot(a, b, FP32: tl.constexpr):
    # a @ b with an fp32 accumulator. FP32: upcast both and use IEEE fp32 (no TF32,
    # and the interpreter's bf16 dot is broken); else native fp16/bf16 tensor cores.
    if FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, out_dtype=tl.float32)


@triton.jit
def _block_attn_kernel(
    Q, KC, VC, SLOTS, CTX, KB, VB, O, PM, PL, PACC,
    sq_r, sq_h, sq_t, sq_d,
    skc_s, skc_h, skc_l, skc_d,
    svc_s, svc_h, svc_l, svc_d,
    skb_r, skb_h, skb_t, skb_d,
    svb_r, svb_h, svb_t, svb_d,
    so_r, so_h, so_t, so_d,
    qk_scale,            # scale * log2(e)
    H, G, T, D,          # heads, GQA group size H // Hkv, block length, head dim
    CTX_PER_SPLIT,       # context positions per split (multiple of BLOCK_N)
    N_CHUNKS,            # cdiv(G*T, BLOCK_M)
    NUM_SPLITS: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
):
    r = tl.program_id(0)
    g = tl.program_id(1) // N_CHUNKS        # kv head
    chunk = tl.program_id(1) % N_CHUNKS     # which BLOCK_M slice of the G*T query rows
    split = tl.program_id(2)

    slot = tl.load(SLOTS + r).to(tl.int64)
    ctx_len = tl.load(CTX + r).to(tl.int32)

    offs_m = chunk * BLOCK_M + tl.arange(0, BLOCK_M)   # flattened (head-in-group, pos)
    m_ok = offs_m < G * T
    head = g * G + offs_m // T                          # query head of each row
    pos = offs_m % T                                    # block position i of each row
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    # q tile [BLOCK_M, BLOCK_D], padding rows/cols are 0
    q_ptrs = Q + r * sq_r + head[:, None] * sq_h + pos[:, None] * sq_t + offs_d[None, :] * sq_d
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    in_dtype = q.dtype

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (base-2 scores)
    l_i = tl.zeros([BLOCK_M], tl.float32)                # running sum of 2^(s - m)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)       # running sum of 2^(s - m) v

    # ---- cached context: positions [lo, hi) of this split, BLOCK_N at a time
    lo = split * CTX_PER_SPLIT
    hi = tl.minimum(lo + CTX_PER_SPLIT, ctx_len)
    kc_base = KC + slot * skc_s + g * skc_h
    vc_base = VC + slot * svc_s + g * svc_h
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        # K^T tile [BLOCK_D, BLOCK_N] and V tile [BLOCK_N, BLOCK_D]
        kt = tl.load(kc_base + offs_n[None, :] * skc_l + offs_d[:, None] * skc_d,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0).to(in_dtype)
        v = tl.load(vc_base + offs_n[:, None] * svc_l + offs_d[None, :] * svc_d,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(in_dtype)
        s = _dot(q, kt, DOT_FP32) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)                     # rescales the old partial sums
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(in_dtype), v, DOT_FP32)
        m_i = m_new

    # ---- the block's own keys (one tile), done by split 0 only
    if split == 0:
        offs_t = tl.arange(0, BLOCK_T)
        t_ok = offs_t < T
        kbt = tl.load(KB + r * skb_r + g * skb_h + offs_t[None, :] * skb_t + offs_d[:, None] * skb_d,
                      mask=t_ok[None, :] & d_ok[:, None], other=0.0).to(in_dtype)
        vb = tl.load(VB + r * svb_r + g * svb_h + offs_t[:, None] * svb_t + offs_d[None, :] * svb_d,
                     mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(in_dtype)
        s = _dot(q, kbt, DOT_FP32) * qk_scale
        visible = t_ok[None, :]
        if CAUSAL:
            visible = visible & (offs_t[None, :] <= pos[:, None])  # key j visible iff j <= i
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(in_dtype), vb, DOT_FP32)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]   # l_i >= 1: the row max contributes 2^0
        o_ptrs = O + r * so_r + head[:, None] * so_h + pos[:, None] * so_t + offs_d[None, :] * so_d
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    else:
        # partials, contiguous fp32: PM/PL [R, H, T, NUM_SPLITS], PACC [R, H, T, NUM_SPLITS, BLOCK_D]
        # A split with no context keys (and split != 0) stores m = -inf, l = 0, acc = 0.
        row = ((r * H + head) * T + pos) * NUM_SPLITS + split
        tl.store(PM + row, m_i, mask=m_ok)
        tl.store(PL + row, l_i, mask=m_ok)
        tl.store(PACC + row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=m_ok[:, None])


@triton.jit
def _merge_splits_kernel(
    PM, PL, PACC, O,
    so_r, so_h, so_t, so_d,
    H, T, D,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program per (r, h, i): merge the NUM_SPLITS partial softmaxes
    #   M = max_s m_s;  w_s = 2^(m_s - M);  out = sum_s w_s acc_s / sum_s w_s l_s
    # split 0 always saw block key 0, so M is finite and sum_s w_s l_s >= 1.
    pid = tl.program_id(0)
    r = pid // (H * T)
    h = (pid // T) % H
    i = pid % T
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < NUM_SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    m = tl.load(PM + pid * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))
    l = tl.load(PL + pid * NUM_SPLITS + offs_s, mask=s_ok, other=0.0)
    acc = tl.load(PACC + (pid * NUM_SPLITS + offs_s[:, None]) * BLOCK_D + offs_d[None, :],
                  mask=s_ok[:, None], other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - m_max)   # empty splits: 2^(-inf) = 0
    denom = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0) / denom
    tl.store(O + r * so_r + h * so_h + i * so_t + offs_d * so_d, out.to(O.dtype.element_ty),
             mask=offs_d < D)


def _default_num_splits(q: torch.Tensor, programs: int, cache_len: int, block_n: int) -> int:
    """Flash-decoding split count: only when the (row, kv head, chunk) grid cannot fill
    the GPU; aims at ~2 programs per SM with >= 4 context tiles per split. Depends on
    shapes only (cache capacity, not ctx_lens), so it needs no device->host copy."""
    if q.device.type != "cuda" or interpret_mode():
        return 1
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    if programs >= sms:
        return 1
    want = cdiv(2 * sms, programs)
    most = max(1, cache_len // (4 * block_n))
    return max(1, min(want, most, 64))


def block_attention(q, k_cache, v_cache, slots, ctx_lens, k_block, v_block, causal, scale,
                    *, block_n: int | None = None, block_m: int | None = None,
                    num_splits: int | None = None) -> torch.Tensor:
    """Triton version of `reference.block_attention` (same arguments and result).
    block_n / block_m / num_splits override the tiling (tests use them)."""
    check_launchable(q, k_cache, v_cache, k_block, v_block)
    R, H, T, D = q.shape
    S, Hkv, L, Dk = k_cache.shape
    assert Dk == D and v_cache.shape == k_cache.shape, "cache shape mismatch"
    assert k_block.shape == (R, Hkv, T, D) and v_block.shape == (R, Hkv, T, D), "block K/V shape"
    assert H % Hkv == 0, "H must be a multiple of Hkv"
    assert slots.shape == (R,) and ctx_lens.shape == (R,)
    out = torch.empty_like(q)
    if R == 0 or T == 0:
        return out
    G = H // Hkv
    on_gpu = q.device.type == "cuda" and not interpret_mode()
    block_d = next_pow2(D)
    # rows per program: the G*T flattened rows, >= 16 for tl.dot, <= 64 (register budget)
    block_m = block_m or max(16, min(64, next_pow2(G * T)))
    block_t = max(16, next_pow2(T))
    block_n = block_n or (64 if on_gpu and block_d <= 128 else 32 if on_gpu else 16)
    n_chunks = cdiv(G * T, block_m)
    programs = R * Hkv * n_chunks
    if num_splits is None:
        num_splits = _default_num_splits(q, programs, L, block_n)
    num_splits = max(1, int(num_splits))
    # context positions per split, rounded up to whole tiles; splits cover [0, L)
    ctx_per_split = cdiv(cdiv(max(L, 1), num_splits), block_n) * block_n

    slots = slots.contiguous()
    ctx_lens = ctx_lens.contiguous()
    if num_splits > 1:
        pm = torch.empty((R, H, T, num_splits), device=q.device, dtype=torch.float32)
        pl = torch.empty_like(pm)
        pacc = torch.empty((R, H, T, num_splits, block_d), device=q.device, dtype=torch.float32)
    else:
        pm = pl = pacc = out  # unused placeholders
    kw = {}
    if on_gpu:
        kw = dict(num_warps=4 if block_m * block_d <= 64 * 64 else 8, num_stages=2)
    grid = (R, Hkv * n_chunks, num_splits)
    _block_attn_kernel[grid](
        q, k_cache, v_cache, slots, ctx_lens, k_block, v_block, out, pm, pl, pacc,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        *k_block.stride(), *v_block.stride(), *out.stride(),
        float(scale) * LOG2E,
        H, G, T, D, ctx_per_split, n_chunks,
        NUM_SPLITS=num_splits, CAUSAL=bool(causal),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_T=block_t, BLOCK_D=block_d,
        DOT_FP32=dot_in_fp32(q), **kw,
    )
    if num_splits > 1:
        _merge_splits_kernel[(R * H * T,)](
            pm, pl, pacc, out, *out.stride(), H, T, D,
            NUM_SPLITS=num_splits, BLOCK_S=next_pow2(num_splits), BLOCK_D=block_d,
        )
    return out


__all__ = ["block_attention"]
