"""Sampling parameters and the logits -> probabilities warp.

Every random draw in the engine is a uniform from the request's own `torch.Generator`
(seeded per request), turned into tokens by inverse-CDF sampling
(`kernels.sample_from_probs`). So a request's output depends only on its seed, not on
what else shares the batch, and the acceptance kernels are pure functions of
(p, q, drafts, uniforms).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, fields

import torch


# Most alternatives per token a request may ask for (as vLLM's default max_logprobs and
# OpenAI's top_logprobs limit).
MAX_LOGPROBS = 20
MAX_REPETITION_PENALTY = 10.0
MAX_LOGIT_BIAS = 300   # tokens per request (OpenAI's limit)


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0      # 0 = greedy
    top_p: float = 1.0            # nucleus mass kept, (0, 1]
    top_k: int = 0                # 0 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    speculative: bool = True      # False: verify 1 token per step (plain autoregressive)
    logprobs: int | None = None   # None = off; k = each emitted token's log-probability and the k most
                                  # likely alternatives (0 <= k <= MAX_LOGPROBS), see speculative.token_logprobs
    prompt_logprobs: int | None = None   # vLLM's: the same for each prompt token after the first (what
                                         # OpenAI completions' echo + logprobs returns), computed in prefill
    # penalties on the target's logits (`apply_penalties`): OpenAI's presence / frequency
    # over the generated tokens, and the multiplicative repetition penalty (HF / vLLM) over
    # prompt and generated tokens. 0 / 0 / 1 = off.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # OpenAI's logit_bias: (token id, bias in [-100, 100]) pairs added to the target's
    # logits after the penalties (a dict is accepted and stored as sorted pairs)
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)
    # vLLM's min_tokens: the stop ids (EOS, stop_token_ids) cannot end the output before
    # this many tokens (their logits are -inf at those positions)
    min_tokens: int = 0

    def __post_init__(self):
        def bad(msg):
            raise ValueError(msg)
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            bad(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 100.0:
            bad(f"temperature must be a number in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        def int64_ok(v) -> bool:   # (a top_k past int64 once reached the engine loop and stopped it)
            return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63

        def number(v) -> bool:     # an int or a float, not a bool
            return isinstance(v, (int, float)) and not isinstance(v, bool)
        if not int64_ok(self.top_k):
            bad(f"top_k must be a non-negative integer below 2**63, got {self.top_k!r}")
        if self.seed is not None and not int64_ok(self.seed):   # as the HTTP API: true is not a seed
            bad(f"seed must be a non-negative integer below 2**63, got {self.seed!r}")
        if self.logprobs is not None and not (int64_ok(self.logprobs) and self.logprobs <= MAX_LOGPROBS):
            bad(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.prompt_logprobs is not None and not (int64_ok(self.prompt_logprobs)
                                                     and self.prompt_logprobs <= MAX_LOGPROBS):
            bad(f"prompt_logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not number(v) or not -2.0 <= v <= 2.0:
                bad(f"{name} must be a number in [-2, 2], got {v!r}")
        rp = self.repetition_penalty
        if not number(rp) or not 0.0 < rp <= MAX_REPETITION_PENALTY:
            bad(f"repetition_penalty must be a number in (0, {MAX_REPETITION_PENALTY:g}], got {rp!r}")
        lb = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        try:
            lb = sorted((t, b) for t, b in lb)
        except (TypeError, ValueError):
            bad(f"logit_bias must map token ids to numbers, got {self.logit_bias!r}")
        if len(lb) > MAX_LOGIT_BIAS:
            bad(f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, got {len(lb)}")
        for t, b in lb:
            if not int64_ok(t):
                bad(f"logit_bias keys must be non-negative token ids, got {t!r}")
            if not number(b) or not -100.0 <= b <= 100.0:
                bad(f"logit_bias values must be numbers in [-100, 100], got {b!r} for token {t}")
        self.logit_bias = tuple((int(t), float(b)) for t, b in lb)
        if not int64_ok(self.min_tokens) or self.min_tokens > self.max_new_tokens:
            bad(f"min_tokens must be an integer in [0, max_new_tokens = {self.max_new_tokens}], "
                f"got {self.min_tokens!r}")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether apply_penalties changes this row's logits (penalties, a logit bias, min_tokens)."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
                or bool(self.logit_bias) or self.min_tokens > 0)

    @classmethod
    def from_kwargs(cls, **kw) -> "SamplingParams":
        names = {f.name for f in fields(cls)}
        unknown = set(kw) - names
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
        return cls(**kw)

    def make_generator(self) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(self.seed if self.seed is not None else random.getrandbits(63))
        return g


def warp_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits [N, V] -> the sampling distribution [N, V] (fp32, sums to 1).

    p = softmax(logits / T), then keep the top_k largest (if top_k > 0), then the
    smallest set of largest probabilities whose mass reaches top_p, renormalised. The
    target and the drafter are warped the same way; losslessness is w.r.t. this p.
    One set of parameters for all rows (`warp_probs_rows`: one per row)."""
    return warp_probs_rows(logits, RowParams.of([(temperature, top_k, top_p)] * logits.shape[0], logits.device))


@dataclass
class RowParams:
    """Per-row warp parameters as tensors on the model's device, and top_k / top_p on the
    host too (so warping never asks the device which rows use them)."""
    temperature: torch.Tensor   # [R] float32, > 0
    top_k: torch.Tensor         # [R] int64, 0 = off
    top_p: torch.Tensor         # [R] float32
    host_top_k: tuple           # the same top_k and top_p, host values
    host_top_p: tuple

    @property
    def any_top_k(self) -> bool:
        return any(k > 0 for k in self.host_top_k)

    @property
    def any_top_p(self) -> bool:
        return any(p < 1.0 for p in self.host_top_p)

    @classmethod
    def of(cls, params, device) -> "RowParams":
        """[SamplingParams] or [(temperature, top_k, top_p)] -> RowParams."""
        t = [(p.temperature, p.top_k, p.top_p) if isinstance(p, SamplingParams) else p for p in params]
        return cls(torch.tensor([max(float(x[0]), 1e-5) for x in t], dtype=torch.float32, device=device),
                   torch.tensor([int(x[1]) for x in t], dtype=torch.int64, device=device),
                   torch.tensor([float(x[2]) for x in t], dtype=torch.float32, device=device),
                   tuple(int(x[1]) for x in t), tuple(float(x[2]) for x in t))


def warp_probs_rows(logits: torch.Tensor, rp: RowParams) -> torch.Tensor:
    """logits [R, V] or [R, n, V], row r warped with its own temperature, top_k and top_p
    (`warp_probs`' rule) -> [.., V] distributions, on the logits' device: one call for all
    sampling rows of a step. Every output row depends on its own logits row only, so a
    row gets the same bits whatever else is warped beside it.

    top_k keeps the tokens whose value is at least the k-th largest (ties at the edge all
    kept). top_p orders the tokens by probability, the lower token id first among equal
    ones, keeps a token while the mass strictly before it (the running sum in that order up
    to the token before) is below top_p, and divides the kept probabilities by the running
    sum at the last kept token. Off the GPU only the likeliest tokens are ordered
    (`_top_p_row`), not all V (a sort of the default target's 49152 took ~2.7 ms a row on
    2 cores; docs/BENCHMARKS.md)."""
    x = logits.float()
    squeeze = x.dim() == 2
    if squeeze:
        x = x[:, None]
    R, n, V = x.shape
    x = x / rp.temperature.view(R, 1, 1)
    if rp.any_top_k:
        k = rp.top_k.view(R, 1, 1)
        kmax = min(max(rp.host_top_k), V)
        # the k-th largest value of each row (a value, so ties do not matter)
        kth = x.topk(kmax, dim=-1).values.gather(-1, (k.clamp(1, kmax) - 1).expand(R, n, 1))
        x = x.masked_fill((k > 0) & (k < V) & (x < kth), float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if rp.any_top_p:
        if probs.device.type == "cpu":
            for r, tp in enumerate(rp.host_top_p):
                if tp < 1.0:
                    for i in range(n):
                        probs[r, i] = _top_p_row(probs[r, i], tp)
        else:
            probs = torch.where(rp.top_p.view(R, 1, 1) < 1.0, _top_p_sorted(probs, rp.top_p.view(R, 1, 1)), probs)
    return probs[:, 0] if squeeze else probs


# `_top_p_row`'s first candidates: the tokens of at least this probability (at most 1024 of
# them), then a floor 32x lower each time until their mass reaches top_p.
TOP_P_FLOOR = 2.0 ** -10


def _top_p_sorted(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The top_p rule over whole rows: [.., V] probabilities, top_p broadcasting to [.., 1]."""
    sp, idx = probs.sort(dim=-1, descending=True, stable=True)   # equal ones: the lower id first
    cs = sp.cumsum(-1)
    before = torch.cat([torch.zeros_like(cs[..., :1]), cs[..., :-1]], -1)   # the mass strictly before
    drop = before >= top_p                                        # never the first token
    last = (~drop).sum(-1, keepdim=True) - 1
    return torch.zeros_like(probs).scatter_(-1, idx, sp.masked_fill(drop, 0.0) / cs.gather(-1, last))


def _top_p_row(p: torch.Tensor, top_p: float) -> torch.Tensor:
    """`_top_p_sorted` of one row [V] with the same bits, from the likeliest tokens only:
    the running sums of the first tokens in the order are the same numbers whether the rest
    of the row is sorted behind them or not, and once the candidates' mass reaches top_p
    every token after them is dropped. A chat model's nucleus is tens of tokens: a pass
    over the row picks the candidates, and only they are sorted."""
    V = p.shape[-1]
    floor = TOP_P_FLOOR
    while floor > 2.0 ** -40:
        ids = (p >= floor).nonzero().squeeze(1)                    # ascending ids: ties in id order
        if ids.numel() == V:
            break
        if ids.numel():
            sp, order = p[ids].sort(descending=True, stable=True)
            cs = sp.cumsum(0)
            if float(cs[-1]) >= top_p:
                keep = 1 + int((cs[:-1] < top_p).sum())           # the mass before token j is cs[j - 1]
                out = torch.zeros_like(p)
                out[ids[order[:keep]]] = sp[:keep] / cs[keep - 1]
                return out
        floor /= 32
    return _top_p_sorted(p, torch.tensor(top_p, dtype=p.dtype, device=p.device))


class WarpedRows:
    """One row's warped distributions at its block positions, each computed on first use:
    rows[i] is warp_probs_rows(logits[None, i:i+1], RowParams.of([params]))[0, 0] (the same
    bits as row i of the whole block warped at once: softmax, top_k and top_p are row by
    row). A sampling tree's walk reads p only at the nodes it visits (about tau of them,
    against the block's b); one row of the default target's 49152 tokens costs ~45 us on 2
    cores at a temperature alone, ~190 us with top_p (docs/BENCHMARKS.md)."""

    def __init__(self, logits: torch.Tensor, params: "SamplingParams | tuple"):
        self.logits = logits                                   # [n, V]
        self.params = RowParams.of([params], logits.device)
        self.rows: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.logits.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        if i not in self.rows:
            self.rows[i] = warp_probs_rows(self.logits[None, i:i + 1], self.params)[0, 0]
        return self.rows[i]


def apply_penalties(logits: torch.Tensor, rows, drafts: torch.Tensor | None = None) -> torch.Tensor:
    """Penalised logits [R, P, V] of R rows at P consecutive positions (a verified block:
    position j picks the token after the row's generated tokens and drafts[:, :j]).

    Per row, with c[t] = how often t occurs in the generated tokens before the position
    (the committed output, then the block's drafts before it):
      1. repetition_penalty rp (HF / vLLM): for every t in the prompt or with c[t] > 0,
         logit > 0 -> logit / rp, else logit * rp;
      2. presence / frequency (OpenAI): logit[t] -= frequency * c[t] + presence * (c[t] > 0);
      3. logit_bias (OpenAI): logit[t] += bias[t];
      4. min_tokens (vLLM): the row's stop ids get -inf while fewer than min_tokens tokens
         precede the position.
    rows: objects with .params (SamplingParams), .prompt and .output (token ids) and
    .stop_ids (for min_tokens);
    drafts [R, P-1] on the logits' device. The counts are built on the host from the rows'
    tokens and copied over once: no value is read back from the device."""
    R, P, V = logits.shape
    dev = logits.device
    base = torch.zeros(R, V, dtype=torch.float32)
    for r, s in enumerate(rows):
        if s.output:
            base[r] = torch.bincount(torch.tensor(s.output, dtype=torch.int64), minlength=V)[:V].float()
    counts = base.to(dev)[:, None, :].repeat(1, P, 1)                            # [R, P, V]
    if P > 1:
        onehot = torch.zeros(R, P - 1, V, dtype=torch.float32, device=dev).scatter_(2, drafts[:, :P - 1, None], 1.0)
        counts[:, 1:] += onehot.cumsum(1)
    x = logits.float()
    rep = [float(s.params.repetition_penalty) for s in rows]
    if any(v != 1.0 for v in rep):
        in_prompt = torch.zeros(R, V, dtype=torch.bool)
        for r, s in enumerate(rows):
            in_prompt[r, torch.tensor(s.prompt, dtype=torch.int64)] = True
        seen = (counts > 0) | in_prompt.to(dev)[:, None, :]
        rp = torch.tensor(rep, dtype=torch.float32, device=dev).view(R, 1, 1)
        x = torch.where(seen, torch.where(x > 0, x / rp, x * rp), x)
    freq = torch.tensor([float(s.params.frequency_penalty) for s in rows], dtype=torch.float32, device=dev)
    pres = torch.tensor([float(s.params.presence_penalty) for s in rows], dtype=torch.float32, device=dev)
    x = x - freq.view(R, 1, 1) * counts - pres.view(R, 1, 1) * (counts > 0).float()
    if any(s.params.logit_bias for s in rows):
        bias = torch.zeros(R, V, dtype=torch.float32)
        for r, s in enumerate(rows):
            if s.params.logit_bias:
                ids, vals = zip(*s.params.logit_bias)
                bias[r, torch.tensor(ids)] = torch.tensor(vals, dtype=torch.float32)
        x = x + bias.to(dev)[:, None, :]
    early = [(r, s.params.min_tokens - len(s.output)) for r, s in enumerate(rows)
             if s.params.min_tokens > len(s.output) and getattr(s, "stop_ids", None)]
    if early:   # position j follows len(output) + j generated tokens
        ban = torch.zeros(R, P, V, dtype=torch.bool)
        for r, first_free in early:
            ban[r, :first_free, torch.tensor(sorted(rows[r].stop_ids), dtype=torch.int64)] = True
        x = x.masked_fill(ban.to(dev), float("-inf"))
    return x
