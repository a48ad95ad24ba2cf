"""Which rows run in the next step, and how: the engine's only waiting queue.

`Scheduler.schedule()` plans one step:
- prefill: up to `max_prefill_tokens` prompt tokens over all rows: first the next chunks
  of rows already prefilling (admission order), then waiting requests admitted into free
  slots (FIFO) while slots and budget last;
- decode: every running row whose prompt is (or will be, after this step's prefill) in
  the cache, grouped by the verified block size it runs: the schedule's block size for
  the number of running rows (`EngineConfig.block_size_for`), clamped to the drafter's
  block, or 1 (plain decoding) for a request that asked for no speculation or while the
  drafter is out of reach.
The engine runs the plan and calls `release()` for finished rows.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .models.kv_cache import KVCache
from .sequence import Sequence


@dataclass
class StepPlan:
    prefill: list[tuple[Sequence, int, int]] = field(default_factory=list)   # (seq, start, n tokens)
    decode: dict[int, list[Sequence]] = field(default_factory=dict)          # block size -> rows
    admitted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, config, cache: KVCache, max_block_size: int):
        """config: EngineConfig; max_block_size: the drafter's block (1 = no drafter)."""
        self.config = config
        self.cache = cache
        self.max_block_size = max_block_size
        self.waiting: deque[Sequence] = deque()
        self.running: dict[str, Sequence] = {}

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def find(self, request_id: str) -> Sequence | None:
        seq = self.running.get(request_id)
        if seq is None:
            seq = next((s for s in self.waiting if s.request_id == request_id), None)
        return seq

    def remove(self, seq: Sequence) -> None:
        """Take a waiting or running row out (its slot freed by `release`)."""
        if seq.request_id in self.running:
            self.running.pop(seq.request_id)
        else:
            self.waiting.remove(seq)

    def block_size(self, num_running: int, drafting: bool) -> int:
        """The verified block size of a speculating row when num_running rows run."""
        if not drafting:
            return 1
        return max(1, min(self.config.block_size_for(num_running), self.max_block_size))

    def schedule(self, drafting: bool) -> StepPlan:
        plan = StepPlan()
        budget = self.config.max_prefill_tokens
        for seq in self.running.values():
            if seq.prefilling and budget > 0:
                n = min(len(seq.prompt) - seq.prefilled, budget)
                plan.prefill.append((seq, seq.prefilled, n))
                budget -= n
        while self.waiting and self.cache.num_free > 0 and budget > 0:
            seq = self.waiting.popleft()
            seq.slot = self.cache.alloc()
            self.running[seq.request_id] = seq
            plan.admitted.append(seq)
            n = min(len(seq.prompt), budget)
            plan.prefill.append((seq, 0, n))
            budget -= n
        completing = {id(s) for s, st, n in plan.prefill if st + n == len(s.prompt)}
        b_spec = self.block_size(len(self.running), drafting)
        for seq in self.running.values():
            if seq.finished or (seq.prefilling and id(seq) not in completing):
                continue
            b = b_spec if seq.params.speculative else 1
            plan.decode.setdefault(b, []).append(seq)
        plan.decode = dict(sorted(plan.decode.items()))
        return plan
