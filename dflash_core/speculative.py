"""DFlash speculative decoding as plain functions: draft, verify, accept.

    drafts = draft(ctx, target, rows, ...)           one drafter forward over all rows
    hidden, feats = verify(target, cache, ...)       one target forward of [anchor, d_1..d_{b-1}]
    accept_len, next_tok = accept(target, rows, ...) how many drafts each row keeps, and the
                                                     target's own token after them

Acceptance (Leviathan et al. 2023, Thm. 1):
- greedy rows keep the longest prefix with d_k == argmax p_k and then emit argmax at the
  first mismatch (or the bonus token after the last draft): exactly the target's greedy
  output;
- p_k is the target's distribution after the row's penalties and logit bias
  (`sampling.apply_penalties`), the counts taken at each block position over the
  generated tokens and the drafts before it: what autoregressive decoding applies there;
- sampling rows accept d_k with probability min(1, p_k(d_k) / q_k(d_k)); at the first
  rejection they emit x ~ max(p_k - q_k, 0) / sum(max(p_k - q_k, 0)); if all b-1 drafts
  pass they emit the bonus x ~ p_b. Each emitted token is then distributed exactly as the
  target's p given the prefix, whatever the drafter's q is.
Every random draw is a uniform from the row's own generator (`uniforms`), so a request's
output depends on its seed only, not on what shares the batch.

Device-resident: drafts, target tokens, probabilities and acceptance stay on the
model's device (the Triton acceptance kernels run there on CUDA); sampling rows are
warped and accepted in one batched call each, so a step's host round trips do not grow
with the number of rows (the engine reads one packed result per block-size group).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels, native
from .models.decoder import Decoder
from .sampling import RowParams, apply_penalties, warp_probs_rows
from .sequence import Sequence, TokenLogprob


@dataclass
class DraftContext:
    """What drafting needs besides the target: the backend (local or remote drafter), its
    mask token, the target layers it reads, its block, and the drafting vocabulary (the
    LM-head rows drafts are chosen from; None = all)."""
    backend: object
    mask_token_id: int
    target_layer_ids: list[int]
    block_size: int
    draft_vocab: torch.Tensor | None = None
    draft_head: torch.Tensor | None = None     # [N, hidden] LM-head rows of draft_vocab
    draft_head_fn: object = None               # prepacked linear of draft_head (CPU), or None
    native_draft: tuple | None = None          # (what it was built from, native.NativeDraft or None): _one_call
    draft_vocab_list: list[int] | None = None  # draft_vocab as a host list (draft_top maps indices with it)

    @classmethod
    def of(cls, backend, target: Decoder) -> "DraftContext":
        dc = backend.config
        ctx = cls(backend, dc.mask_token_id, list(dc.target_layer_ids), dc.block_size)
        vocab = getattr(dc, "draft_vocab", None)
        if vocab:
            ids = sorted(set(int(t) for t in vocab))
            if ids[-1] >= target.config.vocab_size or ids[0] < 0:
                raise ValueError("draft_vocab has ids outside the target vocabulary")
            ctx.draft_vocab = torch.tensor(ids, dtype=torch.int64, device=target.device)
            ctx.draft_vocab_list = ids
            w = target.embed_tokens.weight if target.lm_head is None else target.lm_head.weight
            ctx.draft_head = w.detach()[ctx.draft_vocab].contiguous()
            from .models.layers import prepack_linear
            ctx.draft_head_fn = prepack_linear(ctx.draft_head)
        return ctx

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the drafting vocabulary [..., N]."""
        if self.draft_head_fn is not None:
            return self.draft_head_fn(h).float()
        return torch.nn.functional.linear(h, self.draft_head).float()


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1): the same index (the first maximum; a NaN counts as the maximum), by
    the max reduction, which on CPU is ~2-3x faster over a vocabulary-sized last dimension
    (49152 fp32 logits, one thread: ~30 vs ~70 us per row). The drafter's greedy drafts and
    penalized greedy rows go through it; the target's other greedy choices go through
    `Decoder.greedy` (the same rule, from the native head without the logits where it can)."""
    return x.max(dim=-1).indices


def uniforms(rows: list[Sequence], n: int, device="cpu") -> torch.Tensor:
    """[R, n] uniforms, each row from its own generator (batch-independent), drawn on
    the host and moved to `device` in one copy."""
    u = torch.stack([torch.rand(n, generator=s.gen) for s in rows]) if n else torch.zeros(len(rows), 0)
    return u.to(device)


def _sampling_rows(rows: list[Sequence]) -> list[int]:
    return [r for r, s in enumerate(rows) if not s.params.greedy]


def penalize(rows: list[Sequence], logits: torch.Tensor, drafts: torch.Tensor | None = None) -> torch.Tensor:
    """logits [R, P, V] of these rows at the block positions -> the same with each
    penalised row's penalties applied (`apply_penalties`); unchanged when no row has any."""
    pen = [r for r, s in enumerate(rows) if s.params.penalized]
    if not pen:
        return logits
    out = logits.float().clone()
    idx = torch.tensor(pen, device=logits.device)
    out[idx] = apply_penalties(out[idx], [rows[r] for r in pen], None if drafts is None else drafts[idx])
    return out


def sample_rows(rows: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
    """logits [R, V] -> one token per row, on the logits' device: argmax for greedy rows,
    else an inverse-CDF sample of the row's warped distribution with its own uniform
    (penalties applied first, for rows that have them)."""
    logits = penalize(rows, logits[:, None])[:, 0]
    out = argmax(logits)
    samp = _sampling_rows(rows)
    if samp:
        idx = torch.tensor(samp, device=logits.device)
        srows = [rows[r] for r in samp]
        probs = warp_probs_rows(logits[idx], RowParams.of([s.params for s in srows], logits.device))
        out[idx] = kernels.sample_from_probs(probs, uniforms(srows, 1, logits.device)[:, 0])
    return out


def take_pending_context(rows: list[Sequence], feature_dim: int, dtype, device):
    """The target features of committed tokens the drafter has not seen yet, for all rows:
    (slots [N], positions [N], features [N, F]); the rows' pending lists are emptied."""
    ctx_slots, ctx_pos, ctx_feats = [], [], []
    for s in rows:
        if s.pending_feats:
            ctx_feats.extend(f[r, :n, :feature_dim] for f, r, n in s.pending_feats)
            for p in s.pending_pos:
                ctx_pos.extend(p)
                ctx_slots.extend([s.slot] * len(p))
            s.pending_feats, s.pending_pos = [], []
    if not ctx_feats:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty, torch.zeros(0, feature_dim, dtype=dtype, device=device)
    return (torch.tensor(ctx_slots, dtype=torch.int64), torch.tensor(ctx_pos, dtype=torch.int64),
            ctx_feats[0] if len(ctx_feats) == 1 else torch.cat(ctx_feats))


def draft(ctx: DraftContext, target: Decoder, rows: list[Sequence], slots: torch.Tensor, anchors: torch.Tensor,
          start: torch.Tensor, b: int, confidence: bool = False, topk: int = 0, context=None
          ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, tuple | None]:
    """One drafter forward over the rows, block [anchor, MASK x (B-1)] at positions
    start .. start+B-1 -> draft tokens [R, b-1] on the target's device (argmax, or
    sampled from the drafter's warped distribution q for sampling rows); when some
    row samples, q [Rs, b-1, V] of the sampling rows (in row order), else None; with
    `confidence`, each draft's probability under the drafter [R, b-1] (the top
    probability of its softmax for greedy rows, q(draft) for sampling rows: what
    `drafts_to_verify` reads), else None; with `topk`, the drafter's top-k tokens and
    their probabilities at each drafted position, (tokens [R, b-1, k], probs [R, b-1, k])
    in descending order (what a tree verify picks its nodes from: tree.py), else None.
    context: the rows' pending context as take_pending_context returned it, where the
    caller has taken it already (draft_top), else None (taken here)."""
    B, R, dev = ctx.block_size, len(rows), target.device
    F = target.config.hidden_size * len(ctx.target_layer_ids)
    ctx_slots, ctx_pos, ctx_feats = context or take_pending_context(rows, F, target.dtype, dev)
    samp = _sampling_rows(rows)
    greedy_top = bool(topk) and not confidence and not samp
    # the whole step in one native call where it runs: greedy rows' top k (what topk_softmax
    # below takes), else the head's logits
    k = _call_k(ctx, topk) if greedy_top else 0
    got = _one_call(ctx, target, ctx_slots, ctx_pos, ctx_feats, slots, anchors, start, b, k)
    if got is not None and k:
        ti, tp = ctx.draft_vocab[got[0].to(dev)], got[1].to(dev)
        return ti[..., 0].clone(), None, None, (ti, tp)
    if got is not None:
        logits = got.to(dev)                                                     # [R, b-1, N]
    else:
        ids = torch.full((R, B), ctx.mask_token_id, dtype=torch.int64)
        ids[:, 0] = anchors
        block_emb = target.embed(ids.to(dev))                                    # [R, B, hidden]
        block_pos = start[:, None] + torch.arange(B)[None]                       # [R, B]
        if getattr(ctx.backend, "takes_positions", False):   # only the drafted positions computed
            h = ctx.backend.draft(ctx_slots, ctx_pos, ctx_feats, slots, block_emb, block_pos, positions=(1, b - 1))
        else:
            h = ctx.backend.draft(ctx_slots, ctx_pos, ctx_feats, slots, block_emb, block_pos)[:, 1:b]
        h = h.to(dev, target.dtype)
        logits = target.logits(h) if ctx.draft_vocab is None else ctx.head(h)   # [R, b-1, V or N]
    if greedy_top:
        # greedy rows: the top-k, its probabilities and the argmax (its first) in one native pass
        got = native.topk_softmax(logits, min(topk, logits.shape[-1]))
        if got is not None:
            ti, tp = got[0].to(dev), got[1].to(dev)
            if ctx.draft_vocab is not None:
                ti = ctx.draft_vocab[ti]
            return ti[..., 0].clone(), None, None, (ti, tp)
    if len(samp) < R:   # greedy rows' drafts (sampling rows draw theirs below)
        tokens = argmax(logits) if ctx.draft_vocab is None else ctx.draft_vocab[argmax(logits)]
    else:
        tokens = torch.empty(R, b - 1, dtype=torch.int64, device=dev)
    conf = top = None
    # the top k without confidences: one native pass, as the one-call step's greedy rows
    # get theirs (what a mixed batch's greedy trees and the sampling trees' extra children read)
    got = native.topk_softmax(logits, min(topk, logits.shape[-1])) if topk and not confidence else None
    if got is not None:
        ti, tp = got[0].to(dev), got[1].to(dev)
        top = (ti if ctx.draft_vocab is None else ctx.draft_vocab[ti], tp)
    elif confidence or topk:
        probs = torch.softmax(logits.float(), -1)
        conf = probs.amax(-1) if confidence else None                            # [R, b-1]
        if topk:
            tp, ti = probs.topk(min(topk, probs.shape[-1]), dim=-1)              # [R, b-1, k]
            top = (ti if ctx.draft_vocab is None else ctx.draft_vocab[ti], tp)
    if not samp:
        return tokens, None, conf, top
    V = target.config.vocab_size
    idx = torch.tensor(samp, device=dev)
    srows = [rows[r] for r in samp]
    q = warp_probs_rows(logits[idx], RowParams.of([s.params for s in srows], dev))   # [Rs, b-1, V or N]
    u = uniforms(srows, b - 1, dev)                                              # [Rs, b-1]
    # drawn over the drafting vocabulary: q's zeros outside it add nothing to the running
    # sums the draw searches, so the same token as a draw over the whole vocabulary
    drawn = kernels.sample_from_probs(q.reshape(-1, q.shape[-1]), u.reshape(-1)).view(len(samp), b - 1)
    if ctx.draft_vocab is not None:   # q is 0 outside the drafting vocabulary
        drawn = ctx.draft_vocab[drawn]
        q = torch.zeros(len(samp), b - 1, V, device=dev).index_copy_(2, ctx.draft_vocab, q)
    tokens[idx] = drawn
    if conf is not None:
        conf[idx] = q.gather(2, tokens[idx][..., None]).squeeze(-1).float()
    return tokens, q, conf, top


def draft_top(ctx: DraftContext, target: Decoder, rows: list[Sequence], slots: torch.Tensor, anchors: torch.Tensor,
              start: torch.Tensor, b: int, topk: int) -> tuple[list, list]:
    """`draft`'s top k for rows that are all greedy (no penalties), read to the host: (the
    drafter's top-k target token ids, their probabilities) at each drafted position, nested
    lists [R][b-1][k], descending: what the engine's greedy tree steps plan their trees
    with. The same numbers as `draft(..., topk=topk)`'s `top`; where the one native call
    runs, its indices are mapped to token ids on the host instead of by tensor ops."""
    F = target.config.hidden_size * len(ctx.target_layer_ids)
    context = take_pending_context(rows, F, target.dtype, target.device)
    k = _call_k(ctx, topk)
    got = _one_call(ctx, target, *context, slots, anchors, start, b, k) if k else None
    if got is not None:
        vocab = ctx.draft_vocab_list
        return [[[vocab[i] for i in pos] for pos in row] for row in got[0].tolist()], got[1].tolist()
    _, _, _, (ti, tp) = draft(ctx, target, rows, slots, anchors, start, b, topk=topk, context=context)
    return ti.tolist(), tp.tolist()


def _call_k(ctx: DraftContext, topk: int) -> int:
    """The top k the one native draft call returns for greedy rows asking `topk` (at most
    the drafting vocabulary, TOPK_MAX), or 0 where it would not take them (no drafting head)."""
    k = min(topk, ctx.draft_head_fn.out_features) if topk and ctx.draft_head_fn is not None else 0
    return k if k <= native.TOPK_MAX else 0


def _one_call(ctx: DraftContext, target: Decoder, ctx_slots, ctx_pos, ctx_feats, slots, anchors, start, b: int,
              k: int):
    """`draft`'s drafter step as one native call (native.NativeDraft: the same kernels in
    the same order as `draft`'s own path, so the same numbers, ~0.4 ms a step less on 2
    cores) -> with k > 0 (the top k's indices into the drafting vocabulary [R, b-1, k],
    their probabilities [R, b-1, k]), with k = 0 the head's logits [R, b-1, N]; or None
    where it does not run: a backend that is not this process's drafter, no drafting
    vocabulary, a drafter or target not all native fp32 on the CPU, or shapes the call
    does not take (nothing is written then; `draft` goes on its own path)."""
    backend, head_fn = ctx.backend, ctx.draft_head_fn
    drafter, cache = getattr(backend, "drafter", None), getattr(backend, "cache", None)
    if head_fn is None or drafter is None or cache is None or not native.draft_call_on() \
            or type(target.embed_tokens) is not torch.nn.Embedding:
        return None
    embed = target.embed_tokens.weight
    key = (drafter, embed, head_fn, drafter._native_layers, native.enabled())
    built = ctx.native_draft   # rebuilt when what it was built from changed (benchmarks swap parts)
    if built is None or len(built[0]) != len(key) or any(x is not y for x, y in zip(built[0], key)):
        built = ctx.native_draft = (key, native.NativeDraft.of(drafter, embed, head_fn))
    nd = built[1]
    if nd is None or not nd.current(embed, head_fn):
        return None
    return nd.run(cache, ctx_slots, ctx_pos, ctx_feats, slots, anchors, start, ctx.block_size, (1, b - 1), k)


def drafts_to_verify(conf: torch.Tensor, threshold: float) -> torch.Tensor:
    """conf [R, b-1] (draft's probability under the drafter) -> drafts each row verifies [R]:
    the longest prefix whose running product of confidences stays >= threshold, i.e. the
    drafts the drafter itself expects to survive with at least that probability.

    A verified draft costs a row of the target forward whether or not it is accepted; the
    drafter's confidence is calibrated (shipped drafter, 100 ShareGPT holdout prompts: a
    first draft of confidence 0.2-0.3 was accepted 22% of the time, 0.9-1.0 94%), so a
    draft below the break-even probability (extra row's cost / one-token step's cost) is
    cheaper not to verify. The choice reads the drafter only, never the target: every
    acceptance rule stays the same on a shorter block, so the output is unchanged
    (greedy: token for token; sampling: in distribution)."""
    return (conf.cumprod(dim=1) >= threshold).to(torch.int64).cumprod(dim=1).sum(dim=1)


def verify(target: Decoder, cache, slots: torch.Tensor, anchors: torch.Tensor, draft_tokens: torch.Tensor,
           start: torch.Tensor, capture_layers=(), tree: torch.Tensor | None = None):
    """One target forward of [anchor, d_1 .. d_{b-1}] at positions start .. start+b-1,
    causally on each row's cache -> (hidden [R, b, hidden], captured features or None).
    tree: the rows' tree layouts (tree.layout; a chain row's is causal), or None."""
    block = torch.cat([anchors[:, None].to(draft_tokens.device), draft_tokens], 1)
    return target(block, cache, slots, start, capture_layers, tree=tree)


# LM-head rows computed in one call at little more than the cost of one row: the first
# chunk of greedy_targets covers this many (rows x positions), at least one position.
# fp32 on CPU, the default target's 576x49152 head, 2 threads: 5.6 / 6.5 / 6.6 / 6.1 ms
# for 1 / 2 / 3 / 4 rows (4+ rows prepacked), so a block of 2 or 3 pays ~1.17 rows in one
# call where chunks of 1, 2, .. paid 1 + P(first draft kept) ~1.37 (tau 1.5); bf16 (AMX,
# packed): 16 rows ~1.1x one. A/B end to end: within the noise of 4 prompts (BENCHMARKS).
VERIFY_HEAD_FIRST_ROWS = 3


def greedy_targets(target: Decoder, hidden: torch.Tensor, draft_tokens: torch.Tensor) -> torch.Tensor:
    """Target argmax tokens [R, b] at the block positions, computing the LM head (the
    V x hidden matmul, a large share of a CPU verify whose cost grows with the number of
    positions) in chunks of c, 2c, 4c, ... positions (c = VERIFY_HEAD_FIRST_ROWS // R, at
    least 1) and only for rows whose drafts so far all matched, so a row pays for at most
    about 2 x (accepted + c) positions. Positions after a row's first mismatch may be
    left -1: greedy_accept never reads them. Stays on the device; picking the rows that
    go on costs one sync per chunk (<= log2(b) per step, whatever the number of rows)."""
    R, b, _ = hidden.shape
    dev = hidden.device
    out = torch.full((R, b), -1, dtype=torch.int64, device=dev)
    rows = torch.arange(R, device=dev)
    lo, chunk = 0, max(1, VERIFY_HEAD_FIRST_ROWS // max(R, 1))
    while lo < b and rows.numel():
        hi = min(b, lo + chunk)
        chunk *= 2
        out[rows, lo:hi] = target.greedy(hidden[rows, lo:hi])                 # [r, hi-lo]
        if hi >= b:
            break
        ok = (draft_tokens[rows, :hi] == out[rows, :hi]).all(dim=1)   # all drafts so far matched
        rows, lo = rows[ok], hi
    return out


def accept(target: Decoder, rows: list[Sequence], hidden: torch.Tensor, draft_tokens: torch.Tensor,
           draft_probs: torch.Tensor | None, num_drafts: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [R, b, hidden] of the target at the block positions -> (accepted drafts [R],
    the token each row emits after them [R]) on the device, by the rules in the module
    docstring: one greedy_accept over the greedy rows, one rejection_accept over the
    sampling rows (draft_probs: theirs, in row order). num_drafts: the drafts each row
    verifies (`drafts_to_verify`; None = all b-1): a row with fewer is accepted exactly
    as a block of its own length (its later positions are computed but never read)."""
    R, b, _ = hidden.shape
    dev = hidden.device
    V = target.config.vocab_size
    accept_len = torch.zeros(R, dtype=torch.int64, device=dev)
    next_tok = torch.zeros(R, dtype=torch.int64, device=dev)
    judged = draft_tokens   # greedy rows compare these: -1 (no token id) past a row's own drafts
    if num_drafts is not None and min(num_drafts, default=b - 1) < b - 1:
        n = torch.tensor(num_drafts, device=dev)
        judged = torch.where(torch.arange(b - 1, device=dev)[None, :] < n[:, None], draft_tokens, -1)
    samp = _sampling_rows(rows)
    greedy = [r for r, s in enumerate(rows) if s.params.greedy and not s.params.penalized]
    if greedy:
        g = torch.tensor(greedy, device=dev)
        a, n = kernels.greedy_accept(judged[g], greedy_targets(target, hidden[g], judged[g]))
        accept_len[g], next_tok[g] = a, n
    greedy_pen = [r for r, s in enumerate(rows) if s.params.greedy and s.params.penalized]
    if greedy_pen:   # the penalties depend on the drafts before each position: the full head
        g = torch.tensor(greedy_pen, device=dev)
        logits = penalize([rows[r] for r in greedy_pen], target.logits(hidden[g]), draft_tokens[g])
        a, n = kernels.greedy_accept(judged[g], argmax(logits))
        accept_len[g], next_tok[g] = a, n
    if samp:
        idx = torch.tensor(samp, device=dev)
        srows = [rows[r] for r in samp]
        logits = penalize(srows, target.logits(hidden[idx]), draft_tokens[idx])
        target_probs = warp_probs_rows(logits, RowParams.of([s.params for s in srows], dev))
        dp = draft_probs if b > 1 else torch.zeros(len(samp), 0, V, device=dev)
        # rows verifying k drafts: one rejection_accept over a block of k + 1, k + 1 uniforms
        # per row (so a row's draws depend on its own drafts only, not on its batch)
        ks = [b - 1 if num_drafts is None else num_drafts[r] for r in samp]
        for k in sorted(set(ks)):
            grp = [j for j, kj in enumerate(ks) if kj == k]
            gi = torch.tensor(grp, device=dev)
            u = uniforms([srows[j] for j in grp], k + 1, dev)                        # [Rg, k + 1]
            a, n = kernels.rejection_accept(draft_tokens[idx[gi], :k], target_probs[gi, :k + 1], dp[gi, :k],
                                            u[:, :k], u[:, k])
            accept_len[idx[gi]], next_tok[idx[gi]] = a, n
    return accept_len, next_tok


def token_logprobs(rows: list[Sequence], logits_of, chosen: torch.Tensor,
                   k_of=lambda s: s.params.logprobs) -> dict[int, list[TokenLogprob]]:
    """Log-probabilities for the rows that ask for them (`params.logprobs` set):
    row index -> one TokenLogprob per position of `chosen` [R, P] (the token committed
    there), from the target's raw distribution log_softmax(logits) (before temperature,
    top_k, top_p: what vLLM reports by default), with the row's k most likely tokens.
    logits_of(idx) -> logits [len(idx), P, V] of those rows only, so rows that do not ask
    pay no LM head. One read back to the host for all rows (none when no row asks).
    k_of(row) -> its k, or None for a row that does not ask (default: params.logprobs;
    prefill passes params.prompt_logprobs)."""
    want = [r for r, s in enumerate(rows) if k_of(s) is not None]
    if not want:
        return {}
    dev = chosen.device
    idx = torch.tensor(want, device=dev)
    logp = torch.log_softmax(logits_of(idx).float(), dim=-1)                      # [Rl, P, V]
    ch = chosen[idx]                                                              # [Rl, P]
    parts = [ch.double()[..., None], logp.gather(-1, ch[..., None]).double()]
    kk = min(max(k_of(rows[r]) for r in want), logp.shape[-1])                    # alternatives computed
    if kk:
        top_v, top_i = logp.topk(kk, dim=-1)
        parts += [top_v.double(), top_i.double()]                                 # ids < 2**53: exact
    packed = torch.cat(parts, -1).tolist()                                        # [Rl, P, 2 + 2kk]
    out: dict[int, list[TokenLogprob]] = {}
    for r, row in zip(want, packed):
        k = min(k_of(rows[r]), kk)
        out[r] = [TokenLogprob(int(v[0]), v[1], [(int(v[2 + kk + j]), v[2 + j]) for j in range(k)]) for v in row]
    return out
