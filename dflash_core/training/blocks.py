"""Training blocks for a DFlash drafter: anchors, block inputs, the block attention mask,
and the position-weighted loss. Pure tensor code, no model.

One training row is one sequence `tokens[0:L]` (prompt + the target's own response,
response starting at `resp_start`) and N blocks. Block j has an anchor position a_j in
the response and covers absolute positions a_j .. a_j+B-1:

    block tokens     [tokens[a_j], MASK, ..., MASK]          (B tokens)
    block positions  [a_j, a_j+1, ..., a_j+B-1]              (RoPE positions)
    targets          position k (k >= 1) predicts tokens[a_j + k]; k = 0 has no loss
    sees             context features at positions c < a_j (the target's layer outputs
                     for the committed tokens before the anchor) and all B tokens of
                     its own block (bidirectional), never another block.

This matches inference: the anchor is the last committed (bonus) token, whose target
features do not exist yet; the drafter cache holds features of tokens before it.
All N blocks of a row share one forward: block queries are laid out as T = N*B tokens
and the mask keeps the blocks independent.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


def default_gamma(block_size: int) -> float:
    """Loss decay gamma: 7 for B = 16, 4 for B = 8 (the paper's values); for other
    block sizes interpolate linearly in B between those two points (gamma = 1 + 3B/8)."""
    return {16: 7.0, 8: 4.0}.get(block_size, 1.0 + 3.0 * block_size / 8.0)


def loss_weights(block_size: int, gamma: float | None = None) -> torch.Tensor:
    """w[k] for block positions k = 0..B-1: w[0] = 0 (the anchor is given),
    w[k] = exp(-(k-1)/gamma) for k >= 1 (earlier positions matter more: a draft is only
    accepted up to its first error)."""
    gamma = default_gamma(block_size) if gamma is None else gamma
    k = torch.arange(block_size, dtype=torch.float64)
    w = torch.exp(-(k - 1) / gamma)
    w[0] = 0.0
    return w.float()


def sample_anchors(
    seq_lens: list[int],
    resp_starts: list[int],
    num_blocks: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, `num_blocks` distinct anchors drawn uniformly from the response,
    a in [resp_start, L-2] (so that position 1 of the block has a target, tokens[a+1]).
    Rows with fewer candidates take all of them; the rest are padding.
    -> anchors [R, N] int64 (padding anchors = 0), valid [R, N] bool. Anchors are sorted
    within a row (order does not change the math; it makes masks easier to read)."""
    R = len(seq_lens)
    if R == 0:
        return torch.zeros(0, num_blocks, dtype=torch.int64), torch.zeros(0, num_blocks, dtype=torch.bool)
    L = torch.tensor(seq_lens, dtype=torch.int64)
    lo = torch.tensor(resp_starts, dtype=torch.int64)
    C = max(int(L.max()), 1)
    pos = torch.arange(C)
    legal = (pos[None, :] >= lo[:, None]) & (pos[None, :] <= (L - 2)[:, None])     # [R, C]
    # a uniform random subset of the legal positions: the num_blocks smallest of i.i.d.
    # uniform keys (illegal positions get key 2 and are never taken while legal ones remain)
    keys = torch.rand(R, C, generator=generator)
    keys = torch.where(legal, keys, torch.full_like(keys, 2.0))
    n = min(num_blocks, C)
    vals, idx = keys.topk(n, dim=1, largest=False)
    ok = vals < 2.0
    idx = torch.where(ok, idx, torch.full_like(idx, C)).sort(dim=1).values       # taken ones first, ascending
    ok = idx < C
    anchors = torch.zeros(R, num_blocks, dtype=torch.int64)
    valid = torch.zeros(R, num_blocks, dtype=torch.bool)
    anchors[:, :n] = torch.where(ok, idx, torch.zeros_like(idx))
    valid[:, :n] = ok
    return anchors, valid


@dataclass
class BlockBatch:
    block_ids: torch.Tensor    # [R, T] int64, T = N*B: [anchor, MASK...] per block
    block_pos: torch.Tensor    # [R, T] int64, absolute positions a_j + k
    targets: torch.Tensor      # [R, T] int64, tokens[a_j + k] or IGNORE
    block_k: torch.Tensor      # [T] int64, position k inside its block (0..B-1)
    ctx_pos: torch.Tensor      # [R, C] int64, context positions 0..C-1
    attn_mask: torch.Tensor    # [R, T, C+T] bool, True = query may read key


def build_block_batch(
    tokens: torch.Tensor,      # [R, C] int64, right-padded sequences (C = max L)
    seq_lens: torch.Tensor,    # [R] int64
    anchors: torch.Tensor,     # [R, N] int64
    valid: torch.Tensor,       # [R, N] bool
    block_size: int,
    mask_token_id: int,
) -> BlockBatch:
    R, C = tokens.shape
    N = anchors.shape[1]
    B = block_size
    T = N * B
    dev = tokens.device                                       # built where the inputs live (a GPU's)
    seq_lens, anchors, valid = seq_lens.to(dev), anchors.to(dev), valid.to(dev)
    k = torch.arange(B, device=dev)                           # [B]
    pos = anchors[:, :, None] + k                             # [R, N, B]
    # 1) inputs: the anchor token, then B-1 mask tokens
    anchor_tok = tokens.gather(1, anchors)                    # [R, N]
    ids = torch.full((R, N, B), mask_token_id, dtype=torch.int64, device=dev)
    ids[:, :, 0] = anchor_tok
    # 2) targets: tokens[a+k] for k >= 1 while a+k < L; padding blocks get none
    in_seq = (pos < seq_lens[:, None, None]) & valid[:, :, None] & (k >= 1)
    tgt = tokens.gather(1, pos.clamp(max=C - 1).reshape(R, T)).view(R, N, B)
    tgt = torch.where(in_seq, tgt, torch.full_like(tgt, IGNORE))
    # 3) mask. Context key c is visible to block j iff c < a_j (c < a_j <= L-2 also
    # keeps right padding out). Block key (j', k') is visible iff j' == j.
    ctx_pos = torch.arange(C, device=dev)
    ctx_ok = ctx_pos[None, None, :] < anchors[:, :, None]     # [R, N, C]
    ctx_ok = ctx_ok[:, :, None, :].expand(R, N, B, C).reshape(R, T, C)
    blk = torch.arange(T, device=dev) // B                                # block index of each query/key
    blk_ok = (blk[:, None] == blk[None, :])[None].expand(R, T, T)
    mask = torch.cat([ctx_ok, blk_ok], dim=2)                 # [R, T, C+T]
    return BlockBatch(
        block_ids=ids.view(R, T),
        block_pos=pos.view(R, T).clamp(min=0),
        targets=tgt.view(R, T),
        block_k=k.repeat(N),
        ctx_pos=ctx_pos[None].expand(R, C).contiguous(),
        attn_mask=mask.contiguous(),
    )


def weighted_block_loss(
    logits: torch.Tensor,      # [M, V] at the M positions with a target
    targets: torch.Tensor,     # [M] int64
    weights: torch.Tensor,     # [M] float, w[k] of each position
    teacher_logits: torch.Tensor | None = None,   # [M, V]: the target's own logits for each position
    distill: float = 0.0,
) -> torch.Tensor:
    """L = sum_i w_i * l_i / sum_i w_i (in fp32), l_i = CE_i, or with teacher logits and
    0 < distill <= 1: l_i = (1 - distill) CE_i + distill KL(softmax(teacher_i) || softmax(logits_i))."""
    logits = logits.float()
    per = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    if teacher_logits is not None and distill > 0:
        logp = torch.log_softmax(logits, -1)
        logq = torch.log_softmax(teacher_logits.float(), -1)
        kl = (logq.exp() * (logq - logp)).sum(-1)
        per = (1 - distill) * per + distill * kl
    return (weights * per).sum() / weights.sum().clamp(min=1e-12)


def accepted_lengths(correct: torch.Tensor, has_target: torch.Tensor) -> torch.Tensor:
    """Teacher-forced acceptance length per block: 1 (the bonus) + the number of leading
    correct draft positions k = 1, 2, ... (a draft is accepted up to its first error).
    correct, has_target: [R, N, B] bool -> [R, N] int64 (0 for blocks with no target)."""
    ok = (correct | ~has_target)[:, :, 1:]                     # positions 1..B-1
    run = ok.long().cumprod(dim=-1) * has_target[:, :, 1:].long()
    n = run.sum(-1)
    return torch.where(has_target[:, :, 1:].any(-1), n + 1, torch.zeros_like(n))


def walk_landings(anchors: torch.Tensor, valid: torch.Tensor, accepted: torch.Tensor) -> torch.Tensor:
    """Which blocks start where a speculative walk lands: block j of a row is marked when
    some valid block j' of the same row, verified, would hand over exactly at its anchor
    (anchors[j'] + accepted[j'] == anchors[j]: j' accepted its leading drafts, and the
    target's own token at anchors[j] becomes the next anchor). Those are the anchors the
    engine drafts from, mostly right after a rejected draft, and harder than a uniform
    anchor (walk.py: ~2.0 teacher-forced against ~1.6 walked).
    anchors, valid, accepted: [R, N] (accepted_lengths; 0 = no target) -> [R, N] bool."""
    land = anchors + accepted                                                  # [R, N]
    from_ok = valid & (accepted > 0)
    hit = (anchors[:, :, None] == land[:, None, :]) & from_ok[:, None, :]     # [R, N (to), N (from)]
    return hit.any(-1) & valid


def collate(recs: list[dict]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """-> tokens [R, C] right-padded with 0, seq_lens [R], resp_starts."""
    seqs = [list(r["prompt_ids"]) + list(r["response_ids"]) for r in recs]
    C = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), C, dtype=torch.int64)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(s)
    return tokens, torch.tensor([len(s) for s in seqs]), [len(r["prompt_ids"]) for r in recs]
