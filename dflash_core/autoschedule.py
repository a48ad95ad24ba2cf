"""A block-size schedule measured on the machine the engine runs on.

Which verified block size pays at R running rows depends on two things that differ
between deployments: what one engine step costs at R rows and b tokens each (the CPU or
GPU, its threads, the target, the drafter) and how many tokens a speculative step commits
(the drafter's acceptance). A schedule fixed in code is right on the machine it was
measured on only (docs/BENCHMARKS.md: block 2 on the EPYCs, block 4 edged it on an AMX
Xeon; a GPU's verify is nearly flat in b). So:

    predicted tokens/s (R, b) = R * tau(b) / T(R, b)

- T(R, b): the median wall time of a real engine step (draft + verify + accept + the
  engine's own work) with R decoding rows at verified block b, timed on this engine
  (`measure_step_times`: synthetic prompts, greedy, ignore_eos, then aborted);
- tau(b) = 1 + sum_{k < b} reach[k]: tokens a row commits per step, where reach[k] is the
  share of steps whose first k drafts were all accepted, from the drafter's acceptance
  profile (`acceptance.json` beside its weights, written by `dflash eval
  --save-acceptance`: measured through the engine on held-out prompts).

`pick_schedule` turns rows of tokens/s (predicted here, served in `service.bench_serve
--sweep`) into (max_running, block_size) pairs by one rule. Measuring walks R upwards and
times at each R only the block sizes that rule still allows (never above the pick at the
R before; once plain decoding wins, every larger R decodes plainly), so on a CPU it times
a few cells and on a GPU as many as pay.

Acceptance at temperature > 0 is lower than the profile's greedy figure, and prompts
unlike the profile's data draft differently: `ScheduleTuner` re-estimates acceptance from
the engine's own speculative steps (the profile as a prior, recent steps weighing more)
and re-picks among the timed cells as the server runs. The step times are taken once, at
start-up, on whatever else the machine is doing then.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import torch

from .engine import INF_RUNNING, schedule_block
from .sampling import SamplingParams

ACCEPTANCE_FILE = "acceptance.json"
# block sizes timed (those up to the engine's and the drafter's block)
CANDIDATE_BLOCKS = (1, 2, 3, 4, 6, 8, 12, 16)
# a speculative block is picked only where it beats plain decoding by more than this
# (a served level's run-to-run noise, service.bench_serve)
MIN_GAIN = 0.03
# the same margin for a *predicted* gain (measured_schedule, ScheduleTuner): the engine's
# step times leave out what serving adds per token (HTTP, detokenizing, the event loop
# sharing the cores); on a 2-core Xeon a predicted +6.7% at 2 running requests served
# -3% (docs/BENCHMARKS.md, "A block-size schedule measured at start-up")
PREDICTED_MIN_GAIN = 0.10


def pick_schedule(rows: list[dict], min_gain: float = MIN_GAIN) -> list[tuple[int, int]]:
    """Rows {concurrency, block_size, tokens_per_s} -> (max_running, block_size) pairs. Per
    concurrency: the mean tokens/s of each block size over its rows (repeated levels
    average), then the fastest block size, but speculation (block > 1) only where it beats
    plain decoding (block 1, when there) by more than `min_gain`; ties go to the smaller
    block. Then the block size never grows with concurrency (a verify's cost grows with
    the rows batched, so a speculative pick above a plain one is noise): each concurrency
    chooses among the block sizes up to the pick of the one below it (none there: block 1).
    The last pair covers any larger batch; adjacent equal block sizes merge."""
    if min_gain < 0:
        raise ValueError("min_gain must be >= 0")
    sums: dict[tuple[int, int], list[float]] = {}
    for r in rows:
        sums.setdefault((r["concurrency"], r["block_size"]), []).append(float(r["tokens_per_s"]))
    if not sums:
        raise ValueError("no sweep rows to pick a schedule from")
    mean = {k: sum(v) / len(v) for k, v in sums.items()}
    pairs: list[tuple[int, int]] = []
    for c in sorted({c for c, _ in mean}):
        cap = pairs[-1][1] if pairs else None
        sizes = [b for cc, b in mean if cc == c and (cap is None or b <= cap)]
        best = max(sizes, key=lambda b: (mean[c, b], -b)) if sizes else 1
        plain = mean.get((c, 1))
        if best > 1 and plain is not None and mean[c, best] <= plain * (1 + min_gain):
            best = 1
        pairs.append((c, best))
    pairs[-1] = (INF_RUNNING, pairs[-1][1])
    merged: list[tuple[int, int]] = []
    for c, b in pairs:
        if merged and merged[-1][1] == b:
            merged[-1] = (c, b)
        else:
            merged.append((c, b))
    return merged


# ---- the acceptance profile ----------------------------------------------------------
def check_reach(reach) -> list[float]:
    """reach[k-1] = share of steps whose first k drafts were all accepted: numbers in
    [0, 1], non-increasing (a step that accepted k drafts accepted k-1). ValueError else."""
    if not isinstance(reach, (list, tuple)) or not reach:
        raise ValueError("per_position_acceptance must be a non-empty list of numbers")
    out = []
    for x in reach:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 <= x <= 1.0 or math.isnan(x):
            raise ValueError(f"per_position_acceptance entries must be numbers in [0, 1], got {x!r}")
        if out and x > out[-1] + 1e-9:
            raise ValueError("per_position_acceptance must not increase with the position "
                             f"({out[-1]} then {x})")
        out.append(float(x))
    return out


def check_tree_tau(tree_tau) -> dict[int, float]:
    """tree_tau {block size: tau of tree verification at that block} (JSON keys are
    strings): block sizes >= 2, tau in [1, block size]. ValueError else."""
    if not isinstance(tree_tau, dict):
        raise ValueError("tree_tau must be an object {block size: tau}")
    out = {}
    for k, v in tree_tau.items():
        try:
            b = int(k)
        except (TypeError, ValueError):
            raise ValueError(f"tree_tau keys must be block sizes, got {k!r}") from None
        if b < 2 or isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or not 1.0 <= v <= b:
            raise ValueError(f"tree_tau[{k}] must be a tau in [1, {max(b, 1)}] at a block size >= 2, got {v!r}")
        out[b] = float(v)
    return out


TREE_TAU_KEYS = ("tree_tau", "tree_lookup_tau", "tree_corpus_tau")   # the drafter's trees; with lookup
# branches (lookup.py); with lookup and corpus branches (corpus.py)


def load_acceptance(folder) -> dict | None:
    """The acceptance profile in a drafter folder ({per_position_acceptance, block_size,
    and how it was measured}), or None where the folder has none. A file that is there but
    malformed raises ValueError naming it."""
    path = Path(folder) / ACCEPTANCE_FILE
    if not path.is_file():
        return None
    try:
        prof = json.loads(path.read_text())
        if not isinstance(prof, dict):
            raise ValueError("expected a JSON object")
        prof["per_position_acceptance"] = check_reach(prof.get("per_position_acceptance"))
        for key in TREE_TAU_KEYS:
            if key in prof:
                prof[key] = check_tree_tau(prof[key])
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: not an acceptance profile: {e}") from None
    return prof


def save_acceptance(folder, reach, **measured) -> Path:
    """Write `acceptance.json` into a drafter folder: the profile plus `measured` (how)."""
    path = Path(folder) / ACCEPTANCE_FILE
    for key in TREE_TAU_KEYS:
        if measured.get(key) is not None:
            measured[key] = {str(b): round(t, 4) for b, t in sorted(check_tree_tau(measured[key]).items())}
    path.write_text(json.dumps({"per_position_acceptance": [round(x, 4) for x in check_reach(list(reach))],
                                **measured}, indent=1) + "\n")
    return path


def expected_tokens(reach: list[float], b: int) -> float:
    """tau(b): tokens a row commits per step at verified block b (the target's own token
    plus the accepted drafts); positions past the profile count as never accepted."""
    return 1.0 + sum(reach[:max(0, b - 1)])


# ---- step times ----------------------------------------------------------------------
def _timed_steps(engine, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        engine.step()
        out.append(time.perf_counter() - t)
    return out


def measure_step_times(engine, rows: int, blocks, steps: int = 5, prompt_len: int = 128,
                       seed: int = 0, passes: int = 2) -> dict[int, float]:
    """Seconds of one engine step with `rows` decoding rows, for each verified block size in
    `blocks`: the median of `steps` timed steps (after one warm-up step), the lowest such
    median over `passes` passes through all the blocks (a pass that a burst of other load
    slowed does not decide; measured on a 2-core VM, one pass flipped a pick by reading one
    cell 50% slow), on synthetic prompts of
    `prompt_len` random token ids (shorter where max_seq_len needs it), greedy,
    ignore_eos; rows that would run out of room within a block's steps are replaced by
    fresh ones first. The requests are aborted and the engine's schedule (and schedule
    tuner, which sees none of it) restored before it returns, whatever happens; the engine
    must be idle (no request waiting or running), and `rows` at most its slots."""
    if engine.has_unfinished_requests():
        raise RuntimeError("the engine must be idle to time its steps")
    if not 1 <= rows <= engine.config.max_slots:
        raise ValueError(f"rows must be in 1..{engine.config.max_slots} (the engine's slots), got {rows}")
    blocks = list(blocks)
    need = (1 + steps) * max(blocks) + 1          # tokens one block's steps may commit
    prompt_len = max(1, min(prompt_len, engine.config.max_seq_len // 2, engine.config.max_seq_len - need))
    new_tokens = engine.config.max_seq_len - prompt_len
    gen = torch.Generator().manual_seed(seed)
    live: list[str] = []
    saved, tuner = engine.config.block_size_schedule, engine.schedule_tuner
    engine.schedule_tuner = None          # the probe's synthetic rows say nothing of the traffic

    def drop():
        for rid in live:
            engine.abort_request(rid)
        live.clear()
        engine.step()   # hands the aborted outputs back; nothing is left running

    def fresh():
        drop()
        for i in range(rows):
            rid = f"schedule-probe-{time.monotonic_ns()}-{i}"
            prompt = torch.randint(0, engine.vocab_size, (prompt_len,), generator=gen).tolist()
            engine.add_request(rid, prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
            live.append(rid)
        while any(s.prefilling for s in engine.running.values()) or engine.num_waiting:
            engine.step()

    times: dict[int, float] = {}
    try:
        fresh()
        for b in [b for _ in range(max(1, passes)) for b in blocks]:
            engine.config.block_size_schedule = [(INF_RUNNING, b)]
            room = min(len(s.prompt) + s.params.max_new_tokens - s.num_committed for s in engine.running.values())
            if len(engine.running) < rows or room < (1 + steps) * b + 1:
                fresh()
            t = statistics.median(_timed_steps(engine, 1 + steps)[1:])
            times[b] = min(t, times.get(b, t))
    finally:
        engine.config.block_size_schedule, engine.schedule_tuner = saved, tuner
        drop()
    return times


def probe_rows(max_slots: int) -> list[int]:
    """Running-row counts timed: 1, 2, 4, .. below max_slots, and max_slots."""
    out, r = [], 1
    while r < max_slots:
        out.append(r)
        r *= 2
    return out + [max_slots]


def profile_tree_tau(engine, profile: dict) -> dict | None:
    """The tree tau an acceptance profile predicts this engine's greedy tree steps with: the
    walk with lookup and corpus branches (`tree_corpus_tau`) where the engine plans its
    trees with a corpus index, with lookup branches (`tree_lookup_tau`) where it verifies
    them, else the drafter's trees alone (`tree_tau`), each where the profile has it, else
    None."""
    if getattr(engine, "draft_corpus", False) and profile.get("tree_corpus_tau"):
        return profile["tree_corpus_tau"]
    if engine.draft_lookups and profile.get("tree_lookup_tau"):
        return profile["tree_lookup_tau"]
    return profile.get("tree_tau")


def runs_tree(engine, tree_tau: dict[int, float] | None, rows: int, b: int) -> bool:
    """Whether greedy rows verify trees at this shape and the profile knows their tau."""
    return bool(tree_tau and b in tree_tau and b >= 3 and engine.config.draft_tree
                and engine.target.serves_tree(rows, b))


def measured_schedule(engine, reach: list[float], steps: int = 5, prompt_len: int = 128,
                      min_gain: float = PREDICTED_MIN_GAIN, passes: int = 2,
                      tree_tau: dict[int, float] | None = None) -> tuple[list[tuple[int, int]], list[dict]]:
    """-> (schedule pairs for this engine, the rows behind them: {concurrency, block_size,
    step_ms, tau, tokens_per_s}). R walks `probe_rows(max_slots)`; at each R the block
    sizes timed are plain decoding and the candidates up to the pick at the R before (all
    candidates up to the drafter's block at R = 1); once plain decoding is picked, larger R
    are not timed (pick_schedule would decode them plainly anyway). tree_tau (the
    profile's, where it has one): tau at the block sizes where the engine verifies trees."""
    reach = check_reach(reach)
    tree_tau = check_tree_tau(tree_tau) if tree_tau else None
    if not engine.can_draft:
        return [(INF_RUNNING, 1)], []
    cap = min(engine.config.block_size, engine.drafter_block_size)
    rows: list[dict] = []
    pairs = [(INF_RUNNING, 1)]
    for R in probe_rows(engine.config.max_slots):
        blocks = [b for b in CANDIDATE_BLOCKS if b <= cap] + ([cap] if cap not in CANDIDATE_BLOCKS else [])
        times = measure_step_times(engine, R, blocks, steps, prompt_len, passes=passes)
        for b, t in times.items():
            tree = runs_tree(engine, tree_tau, R, b)   # the probe's rows are greedy: trees where they run
            tau = tree_tau[b] if tree else expected_tokens(reach, b)
            rows.append({"concurrency": R, "block_size": b, "step_ms": round(t * 1000, 3), "tau": round(tau, 4),
                         "tokens_per_s": round(R * tau / t, 2), **({"tree_tau": tree_tau[b]} if tree else {})})
        pairs = pick_schedule(rows, min_gain)
        cap = pairs[-1][1]
        if cap == 1:
            break
    return pairs, rows


class ScheduleTuner:
    """Keeps a measured schedule right for the traffic the server actually gets.

    The profile's acceptance was measured on one kind of prompt at temperature 0; code,
    another language or sampling draft differently. The tuner re-estimates acceptance from
    the engine's own speculative steps and re-picks the schedule from the start-up step
    times (`rows`, only the cells timed there) every `every` decode steps.

    Per draft position j it keeps the conditional acceptance a_j = P(draft j accepted |
    drafts before it accepted): the profile's value as a prior worth `prior_steps` steps,
    plus the positions this engine verified (`observe`), every count decaying by half over
    `half_life_steps` decode steps (None: no decay). reach_k = a_1 .. a_k. The decay is
    also how it explores: once plain decoding is picked no position is verified any more,
    the estimate drifts back to the profile, and speculation is tried again. Only the
    schedule changes, never how a step accepts: the output stays exactly the target's.

    Cells where greedy rows verify trees (rows carrying the profile's `tree_tau`) predict
    1 + (tree_tau - 1) x f: f is the drafts the traffic's tree steps accepted over the drafts
    the profile expected of those steps (`observe_tree`), the profile worth `prior_steps`
    steps, decaying like the chain counts."""

    def __init__(self, rows: list[dict], reach: list[float], prior_steps: float = 256.0,
                 half_life_steps: float | None = 4096.0, every: int = 64, min_gain: float = PREDICTED_MIN_GAIN,
                 beyond: tuple[int, int] | None = None):
        reach = check_reach(reach)
        if prior_steps <= 0 or every < 1 or (half_life_steps is not None and half_life_steps <= 0):
            raise ValueError("prior_steps and half_life_steps must be > 0, every >= 1")
        # (top, block): more than `top` running rows always run `block` (the start-up probe
        # stopped timing there: `measured_beyond`), whatever acceptance the traffic shows;
        # None: the pick at the largest timed row count covers every larger one
        self.beyond = beyond
        self.times = {(r["concurrency"], r["block_size"]): r["step_ms"] / 1000.0 for r in rows}
        self.tree_tau = {(r["concurrency"], r["block_size"]): float(r["tree_tau"]) for r in rows if "tree_tau" in r}
        self.tree_by_block = {b: t for (_, b), t in self.tree_tau.items()}
        self.tree_got = self.tree_expected = 0.0   # drafts accepted / expected in tree steps (decayed)
        if not self.times:
            raise ValueError("no timed cells to pick from")
        prev = [1.0] + reach[:-1]
        self.prior = [x / p if p > 0 else 0.0 for x, p in zip(reach, prev)]
        self.prior_steps = float(prior_steps)
        self.decay = 0.5 ** (1.0 / half_life_steps) if half_life_steps else 1.0
        self.every, self.min_gain = every, min_gain
        self.trials = [0.0] * len(reach)
        self.accepts = [0.0] * len(reach)
        self.steps = 0

    def observe(self, verified: int, accepted: int) -> None:
        """One row's speculative step: `verified` drafts judged, the first `accepted` kept
        (position j was tried when the j-1 before it were all accepted)."""
        for j in range(min(accepted + 1, verified, len(self.trials))):
            self.trials[j] += 1.0
        for j in range(min(accepted, len(self.accepts))):
            self.accepts[j] += 1.0

    def observe_tree(self, block: int, accepted: int) -> None:
        """One row's tree step at verified block `block`: `accepted` nodes kept."""
        if block in self.tree_by_block:
            self.tree_got += accepted
            self.tree_expected += self.tree_by_block[block] - 1.0

    def tree_factor(self) -> float:
        """f: the traffic's accepted tree drafts over the profile's, the profile as a prior."""
        if not self.tree_by_block:
            return 1.0
        prior = self.prior_steps * (sum(self.tree_by_block.values()) / len(self.tree_by_block) - 1.0)
        return (prior + self.tree_got) / (prior + self.tree_expected) if prior + self.tree_expected > 0 else 1.0

    def reach(self) -> list[float]:
        """The current estimate of reach_k, k = 1 .. len(profile)."""
        out, p = [], 1.0
        for a0, t, n in zip(self.prior, self.trials, self.accepts):
            p *= (self.prior_steps * a0 + n) / (self.prior_steps + t)
            out.append(p)
        return out

    def _predicted(self) -> dict[tuple[int, int], float]:
        reach, f = self.reach(), self.tree_factor()
        return {(R, b): R * (1.0 + (self.tree_tau[R, b] - 1.0) * f if (R, b) in self.tree_tau
                             else expected_tokens(reach, b)) / t for (R, b), t in self.times.items()}

    def pick(self) -> list[tuple[int, int]]:
        """The schedule pick_schedule makes from the timed cells at today's acceptance (past
        `beyond`'s row count, its block)."""
        rows = [{"concurrency": R, "block_size": b, "tokens_per_s": v} for (R, b), v in self._predicted().items()]
        pairs = pick_schedule(rows, self.min_gain)
        if self.beyond is not None:
            top, block = self.beyond
            if pairs[-1][1] != block:   # the last pick covers up to `top` only
                pairs[-1] = (top, pairs[-1][1])
                pairs.append((INF_RUNNING, block))
        return pairs

    def repick(self, current) -> list[tuple[int, int]]:
        """`pick()`, but the current schedule stays unless the pick is predicted faster by
        more than min_gain at some timed row count (hysteresis: acceptance hovering at a
        break-even would otherwise flip the schedule back and forth every few steps)."""
        new = self.pick()
        if not current:
            return new
        pred = self._predicted()
        for R in sorted({R for R, _ in self.times}):
            old_b, new_b = schedule_block(current, R), schedule_block(new, R)
            if (R, old_b) not in pred or pred.get((R, new_b), 0.0) > pred[R, old_b] * (1 + self.min_gain):
                return new
        return list(current)

    def end_step(self, current=None) -> list[tuple[int, int]] | None:
        """Once per decode step (after its rows were observed): decays the counts; every
        `every` steps returns the schedule to run (`repick(current)`), else None."""
        if self.decay < 1.0:
            self.trials = [t * self.decay for t in self.trials]
            self.accepts = [n * self.decay for n in self.accepts]
            self.tree_got *= self.decay
            self.tree_expected *= self.decay
        self.steps += 1
        return self.repick(current) if self.steps % self.every == 0 else None


def measured_beyond(rows: list[dict], max_slots: int) -> tuple[int, int] | None:
    """ScheduleTuner's `beyond` for the rows of `measured_schedule`: where the probe stopped
    below the engine's slots (plain decoding won at its largest row count, so larger ones
    were not timed), (that row count, 1): a tuner that later finds speculation paying there
    does not extend it to batches nobody timed (measured: served on / off 0.86x at 16
    requests with the pick of 4 rows carried over), else None."""
    top = max((r["concurrency"] for r in rows), default=max_slots)
    return (top, 1) if top < max_slots else None


def format_rows(rows: list[dict]) -> str:
    """One line per running-row count: block -> step ms and predicted tokens/s."""
    by_r: dict[int, list[str]] = {}
    for r in rows:
        by_r.setdefault(r["concurrency"], []).append(
            f"b{r['block_size']} {r['step_ms']:.1f} ms {r['tokens_per_s']:.0f} tok/s")
    return "; ".join(f"{c} running: " + ", ".join(v) for c, v in sorted(by_r.items()))
