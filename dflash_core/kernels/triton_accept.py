"""Triton acceptance kernels: one launch over the batch, no host round trip.

Contracts: identical to `reference.greedy_accept` and `reference.rejection_accept`.

greedy_accept (one program per row r, Bm1 = B-1 drafts):
    accept_len[r] = first k with draft[r, k] != target[r, k]   (Bm1 if none)
    next_token[r] = target[r, accept_len[r]]

rejection_accept (one program per row r):
    p_k = target_probs[r, k, draft[r, k]],  q_k = draft_probs[r, k, draft[r, k]]
    draft k passes iff u_accept[r, k] * q_k < p_k           (probability min(1, p/q))
    accept_len[r] = first k that fails (Bm1 if none)
    dist = max(p_a - q_a, 0) if a < Bm1 and that residual has mass, else p_a   (a = accept_len)
    next_token[r] = smallest i with cumsum(dist)[i] > u_sample[r] * sum(dist)  (inverse CDF)
The vocabulary is walked in BLOCK_V chunks twice: once for the total mass, once with a
running prefix sum to find the chunk, then the index, where the CDF crosses the target.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_util import check_launchable, next_pow2


@triton.jit
def _greedy_kernel(draft_ptr, target_ptr, acc_ptr, next_ptr, Bm1, BP: tl.constexpr):
    r = tl.program_id(0)
    k = tl.arange(0, BP)
    d = tl.load(draft_ptr + r * Bm1 + k, mask=k < Bm1, other=0)
    t = tl.load(target_ptr + r * (Bm1 + 1) + k, mask=k < Bm1, other=0)
    bad = (d != t) & (k < Bm1)
    first = tl.min(tl.where(bad, k, Bm1), axis=0)
    tl.store(acc_ptr + r, first.to(tl.int64))
    tl.store(next_ptr + r, tl.load(target_ptr + r * (Bm1 + 1) + first))


@triton.jit
def _rejection_kernel(draft_ptr, tp_ptr, dp_ptr, ua_ptr, us_ptr, acc_ptr, next_ptr, Bm1, V,
                      BP: tl.constexpr, BLOCK_V: tl.constexpr):
    r = tl.program_id(0)
    k = tl.arange(0, BP)
    valid = k < Bm1
    d = tl.load(draft_ptr + r * Bm1 + k, mask=valid, other=0)
    # 1) acceptance test per draft position
    p_d = tl.load(tp_ptr + (r * (Bm1 + 1) + k) * V + d, mask=valid, other=1.0).to(tl.float32)
    q_d = tl.load(dp_ptr + (r * Bm1 + k) * V + d, mask=valid, other=0.0).to(tl.float32)
    u = tl.load(ua_ptr + r * Bm1 + k, mask=valid, other=0.0).to(tl.float32)
    fail = (u * q_d >= p_d) & valid
    a = tl.min(tl.where(fail, k, Bm1), axis=0)
    rejected = a < Bm1
    rej_i = rejected.to(tl.int32)
    qa = tl.minimum(a, tl.maximum(Bm1 - 1, 0))
    p_row = tp_ptr + (r * (Bm1 + 1) + a) * V
    q_row = dp_ptr + (r * Bm1 + qa) * V
    offs = tl.arange(0, BLOCK_V)
    # 2) residual mass: is there any? (decides residual vs p, as the reference)
    res_total = tl.zeros((), tl.float32)
    p_total = tl.zeros((), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        m = (v0 + offs) < V
        p = tl.load(p_row + v0 + offs, mask=m, other=0.0).to(tl.float32)
        q = tl.load(q_row + v0 + offs, mask=m & ((offs * 0 + rej_i) > 0), other=0.0).to(tl.float32)
        res_total += tl.sum(tl.maximum(p - q, 0.0), axis=0)
        p_total += tl.sum(p, axis=0)
    use_res = rejected & (res_total > 0)
    use_i = use_res.to(tl.int32)
    total = tl.where(use_i > 0, res_total, p_total)
    goal = tl.load(us_ptr + r).to(tl.float32) * total
    # 3) inverse CDF: smallest i with cumsum(dist)[i] > goal
    run = tl.zeros((), tl.float32)
    found = tl.full((), V - 1, tl.int64)
    done = tl.zeros((), tl.int1)
    for v0 in range(0, V, BLOCK_V):
        m = (v0 + offs) < V
        p = tl.load(p_row + v0 + offs, mask=m, other=0.0).to(tl.float32)
        q = tl.load(q_row + v0 + offs, mask=m & ((offs * 0 + use_i) > 0), other=0.0).to(tl.float32)
        dist = tl.where(use_i > 0, tl.maximum(p - q, 0.0), p)
        cdf = run + tl.cumsum(dist, axis=0)
        hit = (cdf > goal) & m
        idx = tl.min(tl.where(hit, v0 + offs, V), axis=0).to(tl.int64)
        take = (idx < V) & (done == 0)
        found = tl.where(take, idx, found)
        done = done | take
        run = run + tl.sum(dist, axis=0)
    tl.store(acc_ptr + r, a.to(tl.int64))
    tl.store(next_ptr + r, found)


def greedy_accept(draft_tokens: torch.Tensor, target_tokens: torch.Tensor):
    check_launchable(draft_tokens, target_tokens)
    R, Bm1 = draft_tokens.shape
    acc = torch.empty(R, dtype=torch.int64, device=draft_tokens.device)
    nxt = torch.empty(R, dtype=torch.int64, device=draft_tokens.device)
    if R:
        _greedy_kernel[(R,)](draft_tokens.contiguous(), target_tokens.to(torch.int64).contiguous(), acc, nxt,
                             Bm1, BP=max(next_pow2(Bm1), 2))
    return acc, nxt


def rejection_accept(draft_tokens, target_probs, draft_probs, u_accept, u_sample, block_v: int = 1024):
    check_launchable(draft_tokens, target_probs)
    R, Bm1 = draft_tokens.shape
    V = target_probs.shape[-1]
    acc = torch.empty(R, dtype=torch.int64, device=draft_tokens.device)
    nxt = torch.empty(R, dtype=torch.int64, device=draft_tokens.device)
    if R:
        dp = draft_probs.contiguous() if Bm1 else torch.zeros(R, 1, V, device=target_probs.device)
        _rejection_kernel[(R,)](draft_tokens.contiguous(), target_probs.contiguous(), dp,
                                u_accept.float().contiguous(), u_sample.float().contiguous(), acc, nxt, Bm1, V,
                                BP=max(next_pow2(Bm1), 2), BLOCK_V=min(block_v, next_pow2(V)))
    return acc, nxt
