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
    return follow(accepted.__getitem__, len(accepted))


def follow(length_at, n: int) -> list[int]:
    """The step lengths of a walk over anchors 0..n-1: at anchor a a step emits length_at(a)
    tokens (0: no target there, the walk ends) and the next anchor is a + that."""
    steps, a = [], 0
    while a < n and (s := length_at(a)) > 0:
        steps.append(s)
        a += s
    return steps


def _argmax_drafts(logits: torch.Tensor, ids) -> torch.Tensor:
    """The drafter's argmax token at every anchor and block position: logits [R, n, B, V']
    (V' the drafting vocabulary `ids`, or the target's) -> target token ids [R, n, B]."""
    pred = logits.argmax(-1)
    return pred if ids is None else ids.to(pred.device)[pred]


def _chain_lengths(pred: torch.Tensor, targets: torch.Tensor, b: int) -> torch.Tensor:
    """Tokens a verify of b (the anchor and b-1 argmax drafts) emits at every anchor:
    pred (`_argmax_drafts`) and targets [R, n, B] -> [R, n] (0 where no target)."""
    has = (targets != IGNORE) & (torch.arange(targets.shape[-1]) < b).to(targets.device)   # b-1 drafts seen
    return accepted_lengths(((pred == targets) & has).cpu(), has.cpu())


def _drafter_logits(target, drafter, records: list[dict], rows: int):
    """For each chunk of `rows` records: (indices in the chunk of the records with a response
    of >= 2 tokens, their response spans, the drafter's logits at every anchor and block
    position [R, n, B, V'] over its drafting vocabulary, the targets [R, n, B] (IGNORE where
    none), the drafting vocabulary's ids or None)."""
    B = drafter.config.block_size
    dev = next(drafter.parameters()).device
    vocab = drafter.config.draft_vocab
    w = target.embed_tokens.weight if target.lm_head is None else target.lm_head.weight
    ids = None if not vocab else torch.tensor(vocab, dtype=torch.int64, device=w.device)
    head_w = (w if ids is None else w[ids]).to(dev)
    for i in range(0, len(records), rows):
        chunk = records[i:i + rows]
        keep = [j for j, r in enumerate(chunk) if len(r["response_ids"]) >= 2]
        if not keep:
            yield chunk, keep, [], None, None, ids
            continue
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
        chunk_rows = None
        if target.device.type == "cpu":   # the native kernel's row-invariant range (features.py)
            from .. import native
            chunk_rows = max(1, native.row_limit() // R)
        feats = target_features(target, tokens, drafter.config.target_layer_ids, chunk=chunk_rows,
                                prefill_lens=starts).to(dev)   # the prompts as the engine prefills them
        dtype = drafter.fc.weight.dtype
        h = drafter.forward_blocks(target.embed(bb.block_ids.to(target.device)).to(dev, dtype),
                                   bb.block_pos, feats.to(dtype), bb.ctx_pos, bb.attn_mask)
        logits = F.linear(h, head_w.to(h.dtype)).view(R, n, B, -1)
        yield chunk, keep, spans, logits, bb.targets.view(R, n, B), ids


@torch.no_grad()
def walk_tau(target, drafter, records: list[dict], block_size: int | None = None, rows: int = 4) -> dict:
    """Greedy tau of `drafter` verified in blocks of `block_size` (<= the drafter's; default
    it) on records {prompt_ids, response_ids} whose responses are the target's greedy ones.
    -> {tau, steps, tokens, per_position_acceptance [block_size - 1], walks [per record]}."""
    B = drafter.config.block_size
    b = B if block_size is None else int(block_size)
    if not 2 <= b <= B:
        raise ValueError(f"block size {b} must be between 2 and the drafter's {B}")
    walks: list[list[int]] = []
    for chunk, keep, spans, logits, targets, ids in _drafter_logits(target, drafter, records, rows):
        out: list[list[int]] = [[] for _ in chunk]
        if keep:
            acc = _chain_lengths(_argmax_drafts(logits, ids), targets, b)
            for r, j in enumerate(keep):
                out[j] = walk(acc[r, :spans[r]].tolist())
        walks += out
    steps = sum(len(x) for x in walks)
    tokens_out = sum(sum(x) for x in walks)
    per_pos = [sum(1 for x in walks for s in x if s - 1 >= k) / max(steps, 1) for k in range(1, b)]
    return {"tau": tokens_out / max(steps, 1), "steps": steps, "tokens": tokens_out,
            "per_position_acceptance": per_pos, "walks": walks}


@torch.no_grad()
def tree_walk_tau(target, drafter, records: list[dict], block_sizes: list[int], rows: int = 4,
                  lookup: bool = False, corpus=None) -> dict:
    """Greedy tau of tree verification (dflash_core/tree.py) at each verified block size b
    (b - 1 nodes, picked best-first from the drafter's top TOPK per position, depth <= the
    drafter's block - 1), replayed from one prefill per record like walk_tau: a node is
    accepted when its path's tokens are the response's, so the accepted length at an
    anchor is the deepest node on the response's own path. -> {"tau": {b: tau}, "walks":
    {b: [the engine's step lengths, per record]}, "chain_tau": {b: the chain's tau at the
    same b, from the same pass (b <= the drafter's block)}}; with `lookup`, from the same
    pass also "lookup_tau" / "lookup_walks": the trees merged with the lookup branch as the
    engine's EngineConfig.draft_lookup builds them (tree.merged_nodes); with `lookup` and
    a `corpus` (corpus.CorpusIndex) those trees are scored with it as the engine's
    draft_corpus plans them (tree.scored_nodes)."""
    from .. import corpus as cp
    from .. import lookup as lk
    from .. import tree
    B = drafter.config.block_size
    if any(not 2 <= b <= 64 for b in block_sizes):
        raise ValueError(f"tree block sizes must be between 2 and 64, got {block_sizes}")
    walks: dict[int, list[list[int]]] = {b: [] for b in block_sizes}
    lwalks: dict[int, list[list[int]]] = {b: [] for b in block_sizes} if lookup else {}
    chains: dict[int, list[list[int]]] = {b: [] for b in block_sizes if b <= B}
    for chunk, keep, spans, logits, targets, ids in _drafter_logits(target, drafter, records, rows):
        got = {b: [[] for _ in chunk] for b in block_sizes}
        got_l = {b: [[] for _ in chunk] for b in lwalks}
        if keep:
            top_p, top_i = torch.softmax(logits[:, :, 1:].float(), -1).topk(tree.TOPK, dim=-1)   # [R, n, B-1, K]
            if ids is not None:
                top_i = ids.to(top_i.device)[top_i]
            top_p, top_i, tg = top_p.tolist(), top_i.tolist(), targets[:, :, 1:].tolist()

            def tree_step(r: int, a: int, b: int) -> int:   # walk the response's path down the picked nodes
                depth, at = 0, 0
                for i, (parent, d, k) in enumerate(tree.best_first(top_p[r][a], b - 1)):
                    if parent == at and d == depth and tg[r][a][d] != IGNORE and top_i[r][a][d][k] == tg[r][a][d]:
                        depth, at = depth + 1, i + 1
                return depth + 1

            def lookup_step(r: int, a: int, b: int, seq: list[int], s0: int, index) -> int:
                top_tok = [[top_i[r][a][d][k] for k in range(tree.TOPK)] for d in range(len(tg[r][a]))]
                # the engine's tree at anchor a: its context is the record up to the anchor
                if corpus is not None:
                    parents, toks, _ = tree.scored_nodes(cp.row_chains(corpus, index, seq[:s0 + a + 1], b - 1),
                                                         top_p[r][a], top_tok, b - 1)
                else:
                    first = (top_i[r][a][0][0], top_p[r][a][0][0])   # the drafter's first choice, as the engine reads it
                    parents, toks = tree.merged_nodes(lk.propose(index, seq[:s0 + a + 1], b - 1, first),
                                                      top_p[r][a], top_tok, b - 1)
                children = tree._children(parents, toks)
                depth, at = 0, 0
                while depth < len(tg[r][a]) and tg[r][a][depth] != IGNORE and tg[r][a][depth] in children.get(at, {}):
                    at = children[at][tg[r][a][depth]]
                    depth += 1
                return depth + 1
            for r, j in enumerate(keep):
                rec = chunk[j]
                seq = [int(t) for t in rec["prompt_ids"]] + [int(t) for t in rec["response_ids"]]
                for b in block_sizes:
                    got[b][j] = follow(lambda a: tree_step(r, a, b), spans[r])
                    if lookup:   # a walk's own index: its anchors only move forward
                        index = lk.NgramIndex()
                        got_l[b][j] = follow(lambda a: lookup_step(r, a, b, seq, len(rec["prompt_ids"]), index),
                                             spans[r])
        for b in block_sizes:
            walks[b] += got[b]
        for b in lwalks:
            lwalks[b] += got_l[b]
        pred = _argmax_drafts(logits, ids) if keep and chains else None
        for b in chains:   # the chain at the same b, from the same pass
            acc = _chain_lengths(pred, targets, b).tolist() if keep else []
            chains[b] += [walk(acc[r][:spans[r]]) for r in range(len(keep))]
    return {"tau": {b: _tau(w) for b, w in walks.items()}, "walks": walks,
            "chain_tau": {b: _tau(c) for b, c in chains.items()},
            **({"lookup_tau": {b: _tau(w) for b, w in lwalks.items()}, "lookup_walks": lwalks} if lookup else {})}


def _tau(walks: list[list[int]]) -> float:
    """Tokens per step over walks."""
    return sum(map(sum, walks)) / max(sum(map(len, walks)), 1)
