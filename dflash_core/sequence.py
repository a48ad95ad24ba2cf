"""The state of one request inside the engine, and what a step reports about it.

- `Sequence`: prompt, generated tokens, the anchor (the last committed token), its slot,
  the target features the drafter has not seen yet, its own random generator.
- `StepStats`: what one step did for one row (block size run, drafts, accepted, prompt
  tokens prefilled, admitted or not): the server adds these to its counters as they
  come, instead of diffing cumulative totals.
- `SpecStats`: the cumulative statistics of a request (what usage reports).
- `RequestOutput`: one row's result of one `step()` (with `TokenLogprob`s when asked for).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams


@dataclass
class StepStats:
    """One row, one step."""
    block_size: int = 0             # verified block size run (1 = plain decoding; 0 = no decode this step)
    num_draft_tokens: int = 0       # drafts verified (block_size - 1 when speculating)
    num_accepted_tokens: int = 0    # drafts accepted
    num_lookup_accepted_tokens: int = 0   # of those, nodes of the row's lookup branch (lookup.py)
    prefill_tokens: int = 0         # prompt tokens prefilled this step
    admitted: bool = False          # got its slot this step

    @property
    def num_drafts(self) -> int:
        """Draft blocks verified (0 or 1)."""
        return 1 if self.num_draft_tokens > 0 else 0

    @property
    def accepted_per_position(self) -> list[int]:
        """Index k: 1 if draft k was accepted."""
        return [1] * self.num_accepted_tokens + [0] * (self.num_draft_tokens - self.num_accepted_tokens)


@dataclass
class SpecStats:
    """Cumulative per request."""
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
class TokenLogprob:
    """One emitted token's log-probability under the target's own distribution (its raw
    logits: before temperature, top_k and top_p), and the `logprobs` most likely tokens
    at that position, most likely first, as (token id, log-probability)."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_generated_tokens: int
    stats: SpecStats                 # cumulative
    stop_token_id: int | None = None   # the EOS / stop id that finished it (never emitted)
    step: StepStats = field(default_factory=StepStats)   # this step only
    # feature capture (SamplingParams.capture_features): the target features of the
    # positions committed this step, [n, K*hidden], positions in `feature_positions`
    features: torch.Tensor | None = None
    feature_positions: torch.Tensor | None = None
    # SamplingParams.logprobs set: one entry per token of new_token_ids, else None
    logprobs: list[TokenLogprob] | None = None
    # SamplingParams.prompt_logprobs set: one entry per prompt token after the first, in the
    # output of the step that finished the prompt's prefill (its first token), else None
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: str
    num_prompt_tokens: int
    stats: SpecStats
    stop_token_id: int | None = None
    logprobs: list[TokenLogprob] | None = None   # one per token_ids entry when asked for
    prompt_logprobs: list[TokenLogprob] | None = None   # one per prompt token after the first, when asked for


class Sequence:
    __slots__ = ("request_id", "prompt", "params", "gen", "slot", "output", "last", "pending_feats",
                 "pending_pos", "stats", "stop_ids", "finish_reason", "arrival_s", "stop_token_id", "prefilled",
                 "step", "prompt_lps", "ngrams")

    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams, stop_ids: frozenset):
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.gen = params.make_generator()
        self.slot = -1
        self.output: list[int] = []       # generated tokens emitted so far
        self.last = -1                    # the anchor: the last committed token (emitted, not in the target cache)
        # committed positions whose target features the drafter has not seen: (a step's
        # features [R, T, >= K*hidden], this row's index r, n) and range(start, start + n) each
        self.pending_feats: list[tuple[torch.Tensor, int, int]] = []
        self.pending_pos: list[range] = []
        self.stats = SpecStats()
        self.stop_ids = stop_ids
        self.finish_reason: str | None = None
        self.stop_token_id: int | None = None
        self.arrival_s = time.monotonic()
        self.prefilled = 0                # prompt tokens in the target cache (chunked prefill)
        self.step = StepStats()           # what the current step did for this row
        self.ngrams = None                # lookup.NgramIndex over prompt + output, made at its first tree step
        # params.prompt_logprobs: entries of the prompt tokens prefilled so far (None once reported)
        self.prompt_lps: list[TokenLogprob] | None = [] if params.prompt_logprobs is not None else None

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt)

    @property
    def num_committed(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def commit(self, tokens: list[int]) -> list[int]:
        """Append tokens until a stop condition; returns the tokens to emit (a stop id
        ends the request and is not emitted). The target cache length is the caller's."""
        new = []
        for t in tokens:
            if t in self.stop_ids:
                self.finish_reason = "stop"
                self.stop_token_id = t
                break
            new.append(t)
            self.output.append(t)
            if len(self.output) >= self.params.max_new_tokens:
                self.finish_reason = "length"
                break
        if self.finish_reason is None:
            self.last = tokens[-1]
        return new

    def output_of_step(self, new: list[int], logprobs: list[TokenLogprob] | None = None) -> RequestOutput:
        out = RequestOutput(self.request_id, new, self.finished, self.finish_reason, len(self.prompt),
                            len(self.output), self.stats, self.stop_token_id, self.step)
        if self.params.logprobs is not None:
            out.logprobs = list(logprobs or [])
        if self.prompt_lps is not None and not self.prefilling and (new or self.finished):
            out.prompt_logprobs, self.prompt_lps = self.prompt_lps, None   # reported once, with the first token
        return out
