"""Triton write_context_kv: fused per-head RMSNorm + RoPE + scatter into the slot caches.

Contract: identical to `reference.write_context_kv`:
    k_cache[slots[n], h, positions[n]] = rope(rms_norm(k[n, h]))   (norm skipped if no weight)
    v_cache[slots[n], h, positions[n]] = v[n, h]

Shapes
    k, v           [N, Hkv, D]   projected context keys / values (before k_norm and RoPE)
    k_norm_weight  [D] or None   per-head RMSNorm weight (Qwen3 k_norm)
    cos, sin       [N, D]        RoPE table at each token's absolute position
    k_cache/v_cache [S, Hkv, L, D]  written in place
    slots, positions [N] int

One program per token n handles all its heads as a [BLOCK_H, BLOCK_D] tile.
Math, per head vector x (D values), in fp32:
    RMSNorm:  x_hat = x / sqrt(mean(x^2) + eps) * w, then rounded to k's dtype (the
              reference returns the norm in the input dtype before RoPE)
    RoPE (HF rotate_half): y[d] = x_hat[d] * cos[d] + rot[d] * sin[d], where
              rot[d] = -x_hat[d + D/2] for d < D/2  and  x_hat[d - D/2] for d >= D/2;
              the partner element x_hat[(d + D/2) mod D] is loaded directly (and normed
              with the same per-head scale) instead of shuffling registers.
Duplicate (slot, position) pairs in one call leave one of the writes, unspecified which.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_util import check_launchable, next_pow2


@triton.jit
def _write_context_kv_kernel(
    K, V, W, COS, SIN, KC, VC, SLOTS, POS,
    sk_n, sk_h, sk_d,
    sv_n, sv_h, sv_d,
    sc_n, sc_d,
    ss_n, ss_d,
    skc_s, skc_h, skc_l, skc_d,
    svc_s, svc_h, svc_l, svc_d,
    Hkv, D, eps,
    HAS_W: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0)
    slot = tl.load(SLOTS + n).to(tl.int64)
    p = tl.load(POS + n).to(tl.int64)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = offs_h < Hkv
    d_ok = offs_d < D
    mask = h_ok[:, None] & d_ok[None, :]
    half = D // 2
    partner = tl.where(offs_d < half, offs_d + half, offs_d - half)  # (d + D/2) mod D
    sign = tl.where(offs_d < half, -1.0, 1.0)                        # rotate_half's minus

    k_row = K + n * sk_n + offs_h[:, None] * sk_h
    x_raw = tl.load(k_row + offs_d[None, :] * sk_d, mask=mask, other=0.0)
    x = x_raw.to(tl.float32)
    xp = tl.load(k_row + partner[None, :] * sk_d, mask=mask, other=0.0).to(tl.float32)
    if HAS_W:
        # rms = 1 / sqrt(mean_d x^2 + eps), one per head (padding columns are 0)
        rms = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)
        w = tl.load(W + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        wp = tl.load(W + partner, mask=d_ok, other=0.0).to(tl.float32)
        # round to k's dtype like reference.rms_norm does, then continue in fp32
        x = (x * rms[:, None] * w[None, :]).to(x_raw.dtype).to(tl.float32)
        xp = (xp * rms[:, None] * wp[None, :]).to(x_raw.dtype).to(tl.float32)
    c = tl.load(COS + n * sc_n + offs_d * sc_d, mask=d_ok, other=0.0).to(tl.float32)
    s = tl.load(SIN + n * ss_n + offs_d * ss_d, mask=d_ok, other=0.0).to(tl.float32)
    y = x * c[None, :] + sign[None, :] * xp * s[None, :]

    kc_ptrs = KC + slot * skc_s + offs_h[:, None] * skc_h + p * skc_l + offs_d[None, :] * skc_d
    tl.store(kc_ptrs, y.to(KC.dtype.element_ty), mask=mask)

    v = tl.load(V + n * sv_n + offs_h[:, None] * sv_h + offs_d[None, :] * sv_d, mask=mask, other=0.0)
    vc_ptrs = VC + slot * svc_s + offs_h[:, None] * svc_h + p * svc_l + offs_d[None, :] * svc_d
    tl.store(vc_ptrs, v.to(VC.dtype.element_ty), mask=mask)


def write_context_kv(k, v, k_norm_weight, eps, cos, sin, k_cache, v_cache, slots, positions) -> None:
    """Triton version of `reference.write_context_kv` (same arguments, writes in place)."""
    check_launchable(k, v, k_cache, v_cache)
    N, Hkv, D = k.shape
    assert D % 2 == 0, "RoPE needs an even head dim"
    assert v.shape == k.shape and k_cache.shape[1] == Hkv and k_cache.shape[3] == D
    assert v_cache.shape == k_cache.shape
    assert cos.shape == (N, D) and sin.shape == (N, D), "cos/sin must be [N, D]"
    assert slots.shape == (N,) and positions.shape == (N,)
    if N == 0:
        return
    has_w = k_norm_weight is not None
    w = k_norm_weight.contiguous() if has_w else k  # placeholder pointer when unused
    _write_context_kv_kernel[(N,)](
        k, v, w, cos, sin, k_cache, v_cache, slots.contiguous(), positions.contiguous(),
        *k.stride(), *v.stride(), *cos.stride(), *sin.stride(),
        *k_cache.stride(), *v_cache.stride(),
        Hkv, D, float(eps),
        HAS_W=has_w, BLOCK_H=next_pow2(Hkv), BLOCK_D=next_pow2(D),
    )


__all__ = ["write_context_kv"]
