"""The one engine benchmark: the same prompts decoded autoregressively and with DFlash
on one engine, back to back, in one process (machines are noisy: both modes see the
same noise). `dflash bench` and the speedup part of `dflash eval` both run it.

batch 1: prompt by prompt, each mode in turn on the same prompt (per-prompt times kept);
batch > 1: each mode over all prompts at once (continuous batching), in turn.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

MODES = ("ar", "dflash")


@dataclass
class ModeRun:
    """One mode's results over the prompts (in prompt order; repeats appended)."""
    results: list = field(default_factory=list)      # GenerationResult per prompt (and repeat)
    seconds: list[float] = field(default_factory=list)   # per prompt at batch 1; one entry per batch otherwise

    @property
    def tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.results)

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total_seconds if self.total_seconds > 0 else 0.0

    @property
    def tau(self) -> float:
        """Mean tokens committed per target forward (acceptance length)."""
        lens = [x for r in self.results for x in r.stats.acceptance_lengths]
        return sum(lens) / len(lens) if lens else 0.0

    @property
    def per_position_acceptance(self) -> list[float]:
        """Index k: the share of target forwards in which draft k was accepted."""
        steps = sum(len(r.stats.acceptance_lengths) for r in self.results)
        per_pos: list[int] = []
        for r in self.results:
            app = r.stats.accepted_per_position
            per_pos += [0] * (len(app) - len(per_pos))
            for k, v in enumerate(app):
                per_pos[k] += v
        return [v / max(steps, 1) for v in per_pos]

    @property
    def outputs(self) -> list[list[int]]:
        return [r.token_ids for r in self.results]


def run_modes(engine, prompts: list[list[int]], params, modes=MODES, batch: int = 1,
              repeats: int = 1) -> dict[str, ModeRun]:
    """-> {mode: ModeRun}; params: the SamplingParams of both modes (speculative is set
    per mode: "ar" = plain decoding through the same engine, "dflash" = speculative)."""
    import dataclasses
    runs = {m: ModeRun() for m in modes}
    per_mode = {m: dataclasses.replace(params, speculative=m == "dflash") for m in modes}
    for _ in range(repeats):
        if batch > 1:
            for m in modes:
                t0 = time.perf_counter()
                runs[m].results += engine.generate(prompts, per_mode[m])
                runs[m].seconds.append(time.perf_counter() - t0)
            continue
        for ids in prompts:
            for m in modes:
                t0 = time.perf_counter()
                [r] = engine.generate([ids], per_mode[m])
                runs[m].seconds.append(time.perf_counter() - t0)
                runs[m].results.append(r)
    return runs
