"""SpecEngine: batched DFlash speculative decoding over a slot-indexed KV cache.

The engine knows nothing about tokenization, HTTP or Ray: token ids in, token ids out
(contract: docs/ENGINE_API.md).

Invariants per running sequence (committed = prompt + generated tokens, n = len):
- the target KV cache of its slot holds positions 0..n-2; the last committed token (the
  *anchor*) is not in it yet: it is the first token of the next verify block;
- the drafter's context cache holds the target features of committed tokens whose
  features have been computed, and `pending` holds the rest (features from the last
  target forward that the drafter has not seen); the anchor's features never exist yet.

One step (`step()`):
  1) prefill: up to max_prefill_tokens prompt tokens per step (next chunks of rows still
     prefilling, then waiting requests admitted into free slots), batched; a row whose
     prompt is complete samples its first token (the anchor); the prompt features are
     queued for the drafter. Rows still prefilling skip steps 2-5;
  2) pick the verified block size b from the schedule (1 = plain autoregressive);
  3) draft: one drafter forward over all speculative rows, block [anchor, MASK x (B-1)]
     at positions n-1 .. n+B-2; draft tokens = drafter outputs 1..b-1 (argmax, or
     sampled from the drafter's warped distribution q for sampling rows);
  4) verify: one target forward of [anchor, d_1..d_{b-1}] per row, causally on its cache;
  5) accept per row (greedy: longest matching prefix + the target's token at the first
     mismatch; sampling: rejection sampling, see `_accept`), commit, crop the target
     cache to the new n-1, queue the accepted positions' features for the drafter;
  6) stop per row on EOS / stop ids / max_new_tokens, free finished slots.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from . import kernels
from .models.decoder import Decoder
from .sampling import SamplingParams, warp_probs


@dataclass
class EngineConfig:
    max_slots: int = 8
    max_seq_len: int = 2048
    block_size: int = 16
    # (max_running, block_size) pairs: the first whose max_running >= running rows picks
    # the verified block size of a step; None = always block_size.
    block_size_schedule: list[tuple[int, int]] | None = None
    # prompt tokens prefilled per step, over all rows: a longer prompt is prefilled in
    # chunks over several steps, interleaved with the decode steps of the running rows
    # (the per-step stall stays bounded by this budget)
    max_prefill_tokens: int = 512

    def __post_init__(self):
        if self.max_slots < 1:
            raise ValueError("max_slots must be >= 1")
        if self.max_seq_len < 2:
            raise ValueError("max_seq_len must be >= 2")
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.max_prefill_tokens < 1:
            raise ValueError("max_prefill_tokens must be >= 1")
        if self.block_size_schedule is not None:
            sched = [(int(a), int(b)) for a, b in self.block_size_schedule]
            if not sched or any(a < 1 or b < 1 for a, b in sched):
                raise ValueError("block_size_schedule needs (max_running >= 1, block_size >= 1) pairs")
            if sorted(a for a, _ in sched) != [a for a, _ in sched]:
                raise ValueError("block_size_schedule must be sorted by max_running")
            self.block_size_schedule = sched

    def block_size_for(self, num_running: int) -> int:
        if self.block_size_schedule:
            for max_running, b in self.block_size_schedule:
                if num_running <= max_running:
                    return min(b, self.block_size)
            return min(self.block_size_schedule[-1][1], self.block_size)
        return self.block_size


@dataclass
class SpecStats:
    num_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    acceptance_lengths: list[int] = field(default_factory=list)   # tokens per target forward
    accepted_per_position: list[int] = field(default_factory=list)  # index k: draft k accepted

    @property
    def mean_acceptance_length(self) -> float:
        return sum(self.acceptance_lengths) / len(self.acceptance_lengths) if self.acceptance_lengths else 0.0

    def record(self, num_drafted: int, num_accepted: int) -> None:
        self.num_steps += 1
        self.num_draft_tokens += num_drafted
        self.num_accepted_tokens += num_accepted
        self.acceptance_lengths.append(num_accepted + 1)
        if len(self.accepted_per_position) < num_drafted:
            self.accepted_per_position.extend([0] * (num_drafted - len(self.accepted_per_position)))
        for k in range(num_accepted):
            self.accepted_per_position[k] += 1

    def to_dict(self) -> dict:
        return {
            "num_steps": self.num_steps,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "mean_acceptance_length": round(self.mean_acceptance_length, 4),
            "accepted_per_position": list(self.accepted_per_position),
        }


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_generated_tokens: int
    stats: SpecStats
    stop_token_id: int | None = None   # the EOS / stop id that finished it (never emitted)


@dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: str
    num_prompt_tokens: int
    stats: SpecStats


class _Sequence:
    __slots__ = ("request_id", "prompt", "params", "gen", "slot", "output", "last", "pending_feats",
                 "pending_pos", "stats", "stop_ids", "finish_reason", "arrival_s", "stop_token_id", "prefilled")

    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams, stop_ids: frozenset):
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.gen = params.make_generator()
        self.slot = -1
        self.output: list[int] = []       # generated tokens emitted so far
        self.last = -1                    # the anchor: last committed token (may be unemitted? no: always emitted)
        self.pending_feats: list[torch.Tensor] = []  # [n_i, K*hidden] chunks not yet in the drafter
        self.pending_pos: list[torch.Tensor] = []
        self.stats = SpecStats()
        self.stop_ids = stop_ids
        self.finish_reason: str | None = None
        self.stop_token_id: int | None = None
        self.arrival_s = time.monotonic()
        self.prefilled = 0                # prompt tokens in the target cache (chunked prefill)

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt)

    @property
    def num_committed(self) -> int:
        return len(self.prompt) + len(self.output)


class SpecEngine:
    def __init__(self, target: Decoder, draft_backend=None, config: EngineConfig | None = None,
                 eos_token_ids: tuple[int, ...] = (), mask_token_id: int | None = None,
                 target_layer_ids: list[int] | None = None, drafter_block_size: int | None = None):
        """target: the Decoder; draft_backend: a DraftBackend (LocalDraftBackend or remote)
        or None (plain autoregressive). For a backend, mask_token_id, target_layer_ids and
        drafter_block_size default to its `.config` (DrafterConfig)."""
        self.target = target
        self.config = config or EngineConfig()
        self.draft_backend = draft_backend
        if draft_backend is not None:
            dc = getattr(draft_backend, "config", None)
            self.mask_token_id = mask_token_id if mask_token_id is not None else dc.mask_token_id
            self.target_layer_ids = list(target_layer_ids or dc.target_layer_ids)
            self.drafter_block_size = drafter_block_size or dc.block_size
        else:
            self.mask_token_id, self.target_layer_ids, self.drafter_block_size = None, [], 1
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        # drafting vocabulary: the LM-head rows the drafts are chosen from (all if None)
        vocab = getattr(getattr(draft_backend, "config", None), "draft_vocab", None)
        self.draft_vocab = torch.tensor(sorted(set(vocab)), dtype=torch.int64) if vocab else None
        if self.draft_vocab is not None:
            if int(self.draft_vocab.max()) >= target.config.vocab_size or int(self.draft_vocab.min()) < 0:
                raise ValueError("draft_vocab has ids outside the target vocabulary")
            w = target.embed_tokens.weight if target.lm_head is None else target.lm_head.weight
            self._draft_head = w.detach()[self.draft_vocab.to(w.device)].contiguous()   # [N, hidden]
            from .models.layers import prepack_linear
            self._draft_head_fn = prepack_linear(self._draft_head)                     # bf16 CPU, else None
        self.vocab_size = target.config.vocab_size
        self.capacity = self.config.max_seq_len + max(self.drafter_block_size, self.config.block_size) + 1
        self.cache = target.new_cache(self.config.max_slots, self.capacity)
        self.waiting: deque[_Sequence] = deque()
        self.running: dict[str, _Sequence] = {}
        self._ids: set[str] = set()
        self._aborted: list[RequestOutput] = []
        self._lock = threading.RLock()

    # ---- queue management -------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_free_slots(self) -> int:
        return self.cache.num_free

    @property
    def speculative(self) -> bool:
        return self.draft_backend is not None and self.drafter_block_size > 1 and self.config.block_size > 1

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running or self._aborted)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None) -> None:
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise ValueError("the prompt is empty")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
        total = len(prompt) + params.max_new_tokens
        if total > self.config.max_seq_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} "
                             f"exceeds the context limit of {self.config.max_seq_len} tokens")
        stop = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop |= set(self.eos_token_ids)
        with self._lock:
            if request_id in self._ids:
                raise ValueError(f"duplicate request id {request_id!r}")
            self._ids.add(request_id)
            self.waiting.append(_Sequence(request_id, prompt, params, frozenset(stop)))

    def abort_request(self, request_id: str) -> bool:
        """Drop a waiting request or free a running one; returns whether it was known."""
        with self._lock:
            for seq in self.waiting:
                if seq.request_id == request_id:
                    self.waiting.remove(seq)
                    break
            else:
                seq = self.running.get(request_id)
                if seq is None:
                    return False
                self._release(seq)
            self._ids.discard(request_id)
            seq.finish_reason = "abort"
            self._aborted.append(self._output(seq, []))
            return True

    def _release(self, seq: _Sequence) -> None:
        self.running.pop(seq.request_id, None)
        if seq.slot >= 0:
            self.cache.free(seq.slot)
            if self.draft_backend is not None:
                self.draft_backend.free(seq.slot)
            seq.slot = -1
        seq.pending_feats.clear()
        seq.pending_pos.clear()

    def _output(self, seq: _Sequence, new: list[int]) -> RequestOutput:
        return RequestOutput(seq.request_id, new, seq.finish_reason is not None, seq.finish_reason,
                             len(seq.prompt), len(seq.output), seq.stats, seq.stop_token_id)

    # ---- the step ---------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        with self._lock:
            outputs, self._aborted = self._aborted, []
            emitted: dict[str, list[int]] = {}
            # 1) admit + prefill
            for seq, tok in self._prefill():
                emitted[seq.request_id] = self._commit(seq, [tok])
            # 2-5) one speculative (or autoregressive) step over all running rows
            live = [s for s in self.running.values() if s.finish_reason is None and not s.prefilling]
            if live:
                b_sched = self.config.block_size_for(len(self.running))
                # a remote drafter that is out of reach: decode plainly until it is back
                drafting = self.speculative and getattr(self.draft_backend, "available", True)
                groups: dict[int, list[_Sequence]] = {}
                for s in live:
                    b = b_sched if (s.params.speculative and drafting) else 1
                    b = max(1, min(b, self.drafter_block_size))
                    groups.setdefault(b, []).append(s)
                for b, rows in sorted(groups.items()):
                    for seq, toks in zip(rows, self._spec_step(rows, b)):
                        emitted.setdefault(seq.request_id, []).extend(self._commit(seq, toks))
            # 6) outputs, release finished rows
            for rid, new in emitted.items():
                seq = self.running[rid]
                outputs.append(self._output(seq, new))
                if seq.finish_reason is not None:
                    self._release(seq)
                    self._ids.discard(rid)
            return outputs

    def _commit(self, seq: _Sequence, tokens: list[int]) -> list[int]:
        """Append tokens until a stop condition; returns the tokens to emit (stop ids
        are not emitted). The target cache length is fixed by the caller."""
        new = []
        for t in tokens:
            if t in seq.stop_ids:
                seq.finish_reason = "stop"
                seq.stop_token_id = t
                break
            new.append(t)
            seq.output.append(t)
            if len(seq.output) >= seq.params.max_new_tokens:
                seq.finish_reason = "length"
                break
        seq.last = tokens[-1] if seq.finish_reason is None else seq.last
        return new

    def _prefill(self) -> list[tuple[_Sequence, int]]:
        """Prefill up to max_prefill_tokens prompt tokens: first the next chunks of rows
        already prefilling (admission order), then new requests while slots and budget
        last. Rows whose prompt is complete sample their first token (the anchor)."""
        budget = self.config.max_prefill_tokens
        work: list[tuple[_Sequence, int, int]] = []          # (seq, start, n)
        for seq in self.running.values():
            if seq.prefilling and budget > 0:
                n = min(len(seq.prompt) - seq.prefilled, budget)
                work.append((seq, seq.prefilled, n))
                budget -= n
        while self.waiting and self.cache.num_free > 0 and budget > 0:
            seq = self.waiting.popleft()
            seq.slot = self.cache.alloc()
            self.running[seq.request_id] = seq
            n = min(len(seq.prompt), budget)
            work.append((seq, 0, n))
            budget -= n
        if not work:
            return []
        T = max(n for _, _, n in work)
        # one batched forward when every padded row fits in its slot, else row by row
        batches = [work] if all(st + T <= self.capacity for _, st, _ in work) else [[w] for w in work]
        done: list[tuple[_Sequence, torch.Tensor]] = []
        for batch in batches:
            R, T = len(batch), max(n for _, _, n in batch)
            ids = torch.zeros(R, T, dtype=torch.int64)
            for r, (s, st, n) in enumerate(batch):
                ids[r, :n] = torch.tensor(s.prompt[st:st + n])
            slots = torch.tensor([s.slot for s, _, _ in batch])
            starts = torch.tensor([st for _, st, _ in batch], dtype=torch.int64)
            hidden, feats = self.target(ids, self.cache, slots, starts,
                                        self.target_layer_ids if self.speculative else ())
            for r, (s, st, n) in enumerate(batch):
                self.cache.set_len(s.slot, st + n)
                s.prefilled = st + n
                if feats is not None and s.params.speculative:
                    s.pending_feats.append(feats[r, :n])
                    s.pending_pos.append(torch.arange(st, st + n))
                if not s.prefilling:   # the prompt is in the cache: its last position gives the anchor
                    done.append((s, hidden[r, n - 1]))
        if not done:
            return []
        rows = [s for s, _ in done]
        logits = self.target.logits(torch.stack([h for _, h in done]))   # [R, V]
        first = self._sample_rows(rows, logits)
        return [(s, int(first[r])) for r, s in enumerate(rows)]

    def _uniforms(self, rows: list[_Sequence], n: int) -> torch.Tensor:
        """[R, n] uniforms, each row from its own generator (batch-independent)."""
        return torch.stack([torch.rand(n, generator=s.gen) for s in rows]) if n else torch.zeros(len(rows), 0)

    def _sample_rows(self, rows: list[_Sequence], logits: torch.Tensor) -> torch.Tensor:
        """logits [R, V] -> one token per row: argmax for greedy rows, else inverse-CDF
        sample of the warped distribution with the row's own uniform."""
        logits = logits.cpu()
        out = logits.argmax(-1)
        for r, s in enumerate(rows):
            if not s.params.greedy:
                p = s.params
                probs = warp_probs(logits[r:r + 1], p.temperature, p.top_k, p.top_p)
                out[r] = kernels.sample_from_probs(probs, self._uniforms([s], 1)[:, 0])[0]
        return out

    def _spec_step(self, rows: list[_Sequence], b: int) -> list[list[int]]:
        """One draft + verify over `rows` with verified block size b; returns the tokens
        each row commits (accepted drafts + the target's own next token)."""
        R = len(rows)
        dev = self.target.device
        slots = torch.tensor([s.slot for s in rows])
        anchors = torch.tensor([s.last for s in rows])
        start = torch.tensor([s.num_committed - 1 for s in rows])     # anchor positions
        draft_tokens = torch.zeros(R, b - 1, dtype=torch.int64)
        draft_probs = None
        if b > 1:
            draft_tokens, draft_probs = self._draft(rows, slots, anchors, start, b)
        # 4) verify: [anchor, d_1 .. d_{b-1}] at positions start .. start+b-1
        block = torch.cat([anchors[:, None], draft_tokens], 1)          # [R, b]
        capture = self.target_layer_ids if self.speculative else ()
        hidden, feats = self.target(block, self.cache, slots, start, capture)   # [R, b, hidden]
        # 5) accept
        accept_len, next_tok = self._accept(rows, hidden, draft_tokens, draft_probs)
        result = []
        acc = accept_len.tolist()
        nxt = next_tok.tolist()
        dt = draft_tokens.tolist()
        for r, s in enumerate(rows):
            n = acc[r]
            s.stats.record(b - 1, n) if b > 1 else s.stats.record(0, 0)
            # committed grows by n+1; the cache keeps anchor + accepted drafts
            self.cache.set_len(s.slot, int(start[r]) + 1 + n)
            if feats is not None and s.params.speculative:
                s.pending_feats.append(feats[r, :n + 1])
                s.pending_pos.append(torch.arange(int(start[r]), int(start[r]) + n + 1))
            result.append(dt[r][:n] + [nxt[r]])
        return result

    def _draft(self, rows, slots, anchors, start, b):
        """3) one drafter forward over the rows -> draft tokens [R, b-1] and, for
        sampling rows, the drafter's warped distributions q [R, b-1, V] (else None)."""
        B = self.drafter_block_size
        R = len(rows)
        ctx_slots, ctx_pos, ctx_feats = [], [], []
        for s in rows:
            if s.pending_feats:
                ctx_feats.extend(s.pending_feats)
                ctx_pos.extend(s.pending_pos)
                ctx_slots.extend(torch.full((len(p),), s.slot, dtype=torch.int64) for p in s.pending_pos)
                s.pending_feats, s.pending_pos = [], []
        if ctx_feats:
            ctx_feats, ctx_pos, ctx_slots = torch.cat(ctx_feats), torch.cat(ctx_pos), torch.cat(ctx_slots)
        else:
            F = self.target.config.hidden_size * len(self.target_layer_ids)
            ctx_feats = torch.zeros(0, F, dtype=self.target.dtype, device=self.target.device)
            ctx_pos = ctx_slots = torch.zeros(0, dtype=torch.int64)
        ids = torch.full((R, B), self.mask_token_id, dtype=torch.int64)
        ids[:, 0] = anchors
        block_emb = self.target.embed(ids.to(self.target.device))                 # [R, B, hidden]
        block_pos = start[:, None] + torch.arange(B)[None]                       # [R, B]
        hidden = self.draft_backend.draft(ctx_slots, ctx_pos, ctx_feats, slots, block_emb, block_pos)
        h = hidden[:, 1:b].to(self.target.device, self.target.dtype)
        if self.draft_vocab is None:
            logits = self.target.logits(h)                                       # [R, b-1, V]
            tokens = logits.argmax(-1).cpu()
        else:  # logits over the drafting vocabulary only: [R, b-1, N]
            logits = (self._draft_head_fn(h) if self._draft_head_fn is not None
                      else torch.nn.functional.linear(h, self._draft_head)).float()
            tokens = self.draft_vocab[logits.argmax(-1).cpu()]
        probs = None
        if any(not s.params.greedy for s in rows):
            V = self.vocab_size
            probs = torch.zeros(R, b - 1, V)
            for r, s in enumerate(rows):
                if s.params.greedy:
                    continue
                p = s.params
                q = warp_probs(logits[r], p.temperature, p.top_k, p.top_p).cpu()    # [b-1, V or N]
                if self.draft_vocab is not None:   # q is 0 outside the drafting vocabulary
                    q = torch.zeros(b - 1, V).index_copy_(1, self.draft_vocab, q)
                probs[r] = q
                tokens[r] = kernels.sample_from_probs(q, self._uniforms([s], b - 1)[0])
        return tokens, probs

    VERIFY_HEAD_FIRST = 1  # positions of the first LM-head chunk; each next chunk doubles

    def _greedy_targets(self, hidden: torch.Tensor, draft_tokens: torch.Tensor) -> torch.Tensor:
        """Target argmax tokens [R, b] at the block positions, computing the LM head (the
        V x hidden matmul, a large share of a CPU verify: its cost grows with the number of
        positions) in chunks of 1, 2, 4, ... positions and only for rows whose drafts so
        far all matched, so a row pays for at most about 2 x (accepted + 1) positions.
        Positions after a row's first mismatch are never read by greedy_accept (-1)."""
        R, b, _ = hidden.shape
        out = torch.full((R, b), -1, dtype=torch.int64)
        rows = torch.arange(R)
        lo, chunk = 0, self.VERIFY_HEAD_FIRST
        while lo < b and rows.numel():
            hi = min(b, lo + chunk)
            chunk *= 2
            tok = self.target.logits(hidden[rows.to(hidden.device), lo:hi]).argmax(-1).cpu()   # [r, hi-lo]
            out[rows, lo:hi] = tok
            if hi >= b:
                break
            # rows whose drafts d_1..d_hi all equal the target's tokens need more positions
            ok = (draft_tokens[rows, :hi] == out[rows, :hi]).all(dim=1)
            rows, lo = rows[ok], hi
        return out

    def _accept(self, rows, hidden, draft_tokens, draft_probs):
        """hidden [R, b, hidden] of the target at the block positions (logits = LM head).
        Greedy rows: accept the longest prefix with d_k == argmax p_k, then emit argmax at
        the first mismatch (or the bonus after the last draft): exactly the target's greedy
        output. Sampling rows: rejection sampling (kernels.rejection_accept):
            accept d_k with probability min(1, p_k(d_k) / q_k(d_k));
            at the first rejection emit x ~ max(p_k - q_k, 0) / sum(max(p_k - q_k, 0));
            if all b-1 drafts pass emit the bonus x ~ p_b.
        Each emitted token is then distributed exactly as the target's p given the
        prefix (Leviathan et al. 2023, Thm. 1), whatever q is."""
        R, b, _ = hidden.shape
        V = self.vocab_size
        greedy_rows = [r for r, s in enumerate(rows) if s.params.greedy]
        accept_len = torch.zeros(R, dtype=torch.int64)
        next_tok = torch.zeros(R, dtype=torch.int64)
        if greedy_rows:
            g = torch.tensor(greedy_rows)
            a, n = kernels.greedy_accept(draft_tokens[g], self._greedy_targets(hidden[g.to(hidden.device)],
                                                                               draft_tokens[g]))
            accept_len[g], next_tok[g] = a, n
        for r, s in enumerate(rows):
            if s.params.greedy:
                continue
            p = s.params
            logits = self.target.logits(hidden[r]).cpu()                                 # [b, V]
            target_probs = warp_probs(logits, p.temperature, p.top_k, p.top_p)[None]     # [1, b, V]
            dp = draft_probs[r:r + 1] if b > 1 else torch.zeros(1, 0, V)
            u = self._uniforms([s], b)                                     # [1, b]
            a, n = kernels.rejection_accept(draft_tokens[r:r + 1], target_probs, dp, u[:, :b - 1], u[:, b - 1])
            accept_len[r], next_tok[r] = a[0], n[0]
        return accept_len, next_tok

    # ---- offline convenience ---------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 ) -> list[GenerationResult]:
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError("need one SamplingParams per prompt")
        base = f"gen-{id(self)}-{time.monotonic_ns()}"
        rids = [f"{base}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(rids, prompts, plist):
            self.add_request(rid, prompt, p)
        tokens = {rid: [] for rid in rids}
        done: dict[str, RequestOutput] = {}
        while len(done) < len(rids):
            for o in self.step():
                if o.request_id in tokens:
                    tokens[o.request_id].extend(o.new_token_ids)
                    if o.finished:
                        done[o.request_id] = o
        return [GenerationResult(tokens[r], done[r].finish_reason, done[r].num_prompt_tokens, done[r].stats)
                for r in rids]
