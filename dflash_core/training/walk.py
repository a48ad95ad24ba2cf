"""Held-out tau in one forward: the engine's greedy acceptance, replayed from a prefill.

For a greedy response (the target's own), speculative decoding is a walk over the
response: at anchor a (the last emitted token; its target features do not exist yet) the
drafter proposes positions a+1 .. a+b-1 from the context features of the tokens before a;
the target accepts the leading run of correct proposals and emits one token of its own,
and the next anchor is a + accepted + 1. The target's continuation is fixed, so every
block's outcome follows from one target prefill of prompt + response and one drafter pass
over blocks at every anchor (training's `forward_blocks`, the block layout of blocks.py);
the walk then follows the accepted lengths. Every step but the last equals the engine's
(tests/test_training.py); the last is cut by the response's end (the walk knows no token
past it, the engine verified drafts there before cutting its output at the token limit).
On the default model the walks were identical
step for step to the engine's speculative decoding (docs/BENCHMARKS.md); a walk can only
differ where the prefill's features differ from those of the engine's verify forwards in
the last bits and that flips a draft argmax.

Why: it costs one target forward per prompt instead of one per step, and no engine, so a
training run can measure held-out tau as it goes (`dflash train --eval-data`), also on a
GPU where the engine's own kernels have not run yet.

Uniformly sampled anchors (training's teacher-forced `tau_tf`) overestimate this tau: a
walk lands on the anchors that follow a rejection, the hard ones, more often than their
share (measured: 2.03 teacher-forced on unseen train-split records against ~1.6 walked).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .blocks import IGNORE, accepted_lengths, build_block_batch, collate
from .features import target_features


def walk(accepted: list[int]) -> list[int]:
    """accepted[j] = tokens one verify emits at anchor j (1 + leading correct drafts), for
    every anchor j = 0..n-1 of a response -> the lengths of the steps the engine takes
    from anchor 0 on."""
    steps, a = [], 0
    while a < len(accepted) and accepted[a] > 0:
        steps.append(accepted[a])
        a += accepted[a]
    return steps


@torch.no_grad()
def walk_tau(target, drafter, records: list[dict], block_size: int | None = None, rows: int = 4) -> dict:
    """Greedy tau of `drafter` verified in blocks of `block_size` (<= the drafter's; default
    it) on records {prompt_ids, response_ids} whose responses are the target's greedy ones.
    -> {tau, steps, tokens, per_position_acceptance [block_size - 1], walks [per record]}."""
    B = drafter.config.block_size
    b = B if block_size is None else int(block_size)
    if not 2 <= b <= B:
        raise ValueError(f"block size {b} must be between 2 and the drafter's {B}")
    dev = next(drafter.parameters()).device
    vocab = drafter.config.draft_vocab
    w = target.embed_tokens.weight if target.lm_head is None else target.lm_head.weight
    ids = None if not vocab else torch.tensor(vocab, dtype=torch.int64, device=w.device)
    head_w = (w if ids is None else w[ids]).to(dev)
    walks: list[list[int]] = []
    for i in range(0, len(records), rows):
        chunk = records[i:i + rows]
        keep = [j for j, r in enumerate(chunk) if len(r["response_ids"]) >= 2]
        out: list[list[int]] = [[] for _ in chunk]
        if keep:
            batch = [chunk[j] for j in keep]
            tokens, seq_lens, starts = collate(batch)
            R = len(batch)
            spans = [int(L) - 1 - s for L, s in zip(seq_lens.tolist(), starts)]
            n = max(spans)
            anchors = torch.zeros(R, n, dtype=torch.int64)
            valid = torch.zeros(R, n, dtype=torch.bool)
            for r, (m, s) in enumerate(zip(spans, starts)):
                anchors[r, :m] = torch.arange(s, s + m)           # every response position with a successor
                valid[r, :m] = True
            bb = build_block_batch(tokens.to(dev), seq_lens, anchors, valid, B, drafter.config.mask_token_id)
            chunk = None
            if target.device.type == "cpu":   # the native kernel's row-invariant range (features.py)
                from .. import native
                chunk = max(1, native.row_limit() // R)
            feats = target_features(target, tokens, drafter.config.target_layer_ids, chunk=chunk).to(dev)
            dtype = drafter.fc.weight.dtype
            h = drafter.forward_blocks(target.embed(bb.block_ids.to(target.device)).to(dev, dtype),
                                       bb.block_pos, feats.to(dtype), bb.ctx_pos, bb.attn_mask)
            pred = F.linear(h, head_w.to(h.dtype)).argmax(-1)
            if ids is not None:
                pred = ids.to(dev)[pred]
            has = (bb.targets != IGNORE) & (bb.block_k < b)[None]   # a verify of b tokens sees b-1 drafts
            correct = (pred == bb.targets) & has
            acc = accepted_lengths(correct.view(R, n, B).cpu(), has.view(R, n, B).cpu())
            for r, j in enumerate(keep):
                out[j] = walk(acc[r, :spans[r]].tolist())
        walks += out
    steps = sum(len(x) for x in walks)
    tokens_out = sum(sum(x) for x in walks)
    per_pos = [sum(1 for x in walks for s in x if s - 1 >= k) / max(steps, 1) for k in range(1, b)]
    return {"tau": tokens_out / max(steps, 1), "steps": steps, "tokens": tokens_out,
            "per_position_acceptance": per_pos, "walks": walks}
