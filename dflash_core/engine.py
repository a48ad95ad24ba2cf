"""SpecEngine: batched DFlash speculative decoding over a slot-indexed KV cache.

The engine knows nothing about tokenization, HTTP or Ray: token ids in, token ids out
(contract: docs/ENGINE_API.md). It is built from three parts:
- `sequence.py`: a request's state (`Sequence`) and what a step reports (`RequestOutput`
  with this step's `StepStats` and the cumulative `SpecStats`);
- `scheduler.py`: the only waiting queue, slot admission, the prefill budget and the
  grouping of rows by verified block size (`Scheduler.schedule() -> StepPlan`);
- `speculative.py`: draft, verify and accept as plain functions.

Invariants per running sequence (committed = prompt + generated tokens, n = len):
- the target KV cache of its slot holds positions 0..n-2; the last committed token (the
  *anchor*) is not in it yet: it is the first token of the next verify block;
- the drafter's context cache holds the target features of committed tokens whose
  features have been computed, and `pending` holds the rest (features from the last
  target forward that the drafter has not seen); the anchor's features never exist yet.

`step()` = schedule -> run -> postprocess:
  schedule: `Scheduler.schedule()` picks this step's prefill chunks (within
     max_prefill_tokens) and groups the decoding rows by verified block size b
     (1 = plain autoregressive);
  run: (a) prefill the chunks, batched; a row whose prompt is complete samples its first
     token (the anchor); prompt features are queued for the drafter;
     (b) per block-size group: draft (one drafter forward, block [anchor, MASK x (B-1)] at
     positions n-1 .. n+B-2, drafts = outputs 1..b-1), verify (one target forward of
     [anchor, d_1..d_{b-1}]), accept (greedy: longest matching prefix + the target's token
     at the first mismatch; sampling: rejection sampling), commit, crop the target cache
     to the new n-1, queue the accepted positions' features for the drafter;
  postprocess: stop rows on EOS / stop ids / max_new_tokens, one RequestOutput per row
     that ran, free finished slots.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch

from . import corpus as corpus_mod
from . import lookup
from . import runtime
from .runtime import KV_CACHE_DTYPES
from . import speculative as spec
from . import tree
from .models.decoder import Decoder
from .sampling import SamplingParams, WarpedRows
from .scheduler import Scheduler, StepPlan
from .sequence import GenerationResult, RequestOutput, Sequence, SpecStats, StepStats

__all__ = ["EngineConfig", "SpecEngine", "RequestOutput", "GenerationResult", "SpecStats", "StepStats",
           "INF_RUNNING", "parse_block_size_schedule", "check_draft_threshold", "format_block_size_schedule", "auto_block_size_schedule", "schedule_block",
           "DEFAULT_BLOCK_SIZE_SCHEDULE", "FP32_BLOCK_SIZE_SCHEDULE"]

log = logging.getLogger("dflash.engine")

# "any number of running rows" in a block-size schedule ("inf" in its text form)
INF_RUNNING = 1 << 30


def parse_block_size_schedule(value) -> list[tuple[int, int]] | None:
    """The one parser of block-size schedules: "1:16,4:8,inf:1", [[1, 16], ...] or
    None / "none" / "off" -> [(max_running, block_size)] sorted by max_running, or None
    (always block_size). Raises ValueError with a message a user can act on."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
        return None
    pairs = []
    if isinstance(value, str):
        for item in value.split(","):
            if ":" not in item:
                raise ValueError(f"block size schedule entry {item!r} must look like MAX_RUNNING:BLOCK_SIZE")
            a, b = (x.strip().lower() for x in item.split(":", 1))
            try:
                pairs.append((INF_RUNNING if a in ("inf", "*") else int(a), int(b)))
            except ValueError:
                raise ValueError(f"block size schedule entry {item!r} must look like MAX_RUNNING:BLOCK_SIZE "
                                 "with integers (or inf)") from None
    else:
        try:
            pairs = [(int(a), int(b)) for a, b in value]
        except (TypeError, ValueError):
            raise ValueError("block size schedule must be (max_running, block_size) pairs") from None
    if not pairs:
        raise ValueError("block size schedule needs at least one MAX_RUNNING:BLOCK_SIZE pair")
    for a, b in pairs:
        if a < 1 or b < 1:
            raise ValueError(f"block size schedule entries must be positive, got {a}:{b}")
    return sorted(pairs)


# The default schedule where the engine runs in bf16/fp16 (GPUs; AMX or AVX512-BF16 CPUs
# where the native fp32 kernels cannot build: elsewhere `auto` runs fp32, runtime.py), measured on the 2-core CPU reference machine (bf16, the default target and the
# shipped drafter, tau ~1.25-1.3 in serving): `python -m service.bench_serve --sweep
# --block-sizes 1,4,8 --concurrency 1,2,4,8` (docs/BENCHMARKS.md, "Serving") served the
# most tokens/s with block 4 at 1-2 running requests (22.3 vs 18.4 tok/s at 1) and with
# plain decoding at 4 and 8 (a verify of 4 rows x 4 tokens costs more than it saves at
# tau 1.3). Re-pick it for a better drafter or a GPU with the same command.
DEFAULT_BLOCK_SIZE_SCHEDULE: tuple[tuple[int, int], ...] = ((2, 4), (INF_RUNNING, 1))
# In fp32 on a CPU without fast bf16, re-picked 2026-12-02 (session 14) with the native
# decoder layers and the sitting-11 drafter (tau ~1.41-1.61 in serving) on a 2-core AVX2
# EPYC: `python -m service.bench_serve --sweep --block-sizes 1,2,3 --concurrency 1,2,4,8
# --per-client 6 --reps 2` served the most tokens/s with block 2 at 1 running request
# (67.1 vs 63.3 tok/s plain, block 3 57.9; means of 2 reps) and plain decoding from 2 on
# (2: 90.2 plain vs 79.3 / 64.7 at block 2 / 3): the same answer as in session 12 with
# the native linears alone (21.5 vs 20.8 tok/s then), at ~3x the tokens/s. Today's
# drafter pays only alone (docs/BENCHMARKS.md, "Serving"). Before: block 3 at 1-2
# running (sitting-8 drafter, torch linears, an AVX512F Xeon). Checked 2026-12-03 with the
# AVX-512 build of the native kernel on a Zen 5 EPYC (batch-1 bench, 20 prompts: block 2
# 1.03x, block 3 1.01x, block 4 0.95x) and re-picked there by the same sweep with
# `--block-sizes 1,2,3 --concurrency 1,2,4`: the same schedule (155.0 vs 142.7 tok/s at 1
# running, plain decoding ahead at 2; docs/BENCHMARKS.md, "Serving"). Re-checked with the
# sitting-15 drafter: 167.6 vs 154.3 tok/s at 1 running over 3 reps, plain ahead at 2; and with
# the sitting-17 drafter on the 8-bit grid (2026-12-04): 180.6 vs 164.9, plain ahead at 2.
FP32_BLOCK_SIZE_SCHEDULE: tuple[tuple[int, int], ...] = ((1, 2), (INF_RUNNING, 1))


def check_draft_threshold(value) -> float:
    """A dynamic draft length threshold (EngineConfig.draft_threshold) as a float, or a
    ValueError naming it: a number (not a bool) in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"draft_threshold must be a number in [0, 1), got {value!r}")
    return float(value)


def check_kv_cache_dtype(value) -> str:
    """A KV-cache dtype name (EngineConfig.kv_cache_dtype), or a ValueError naming the choices."""
    if value not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {value!r}")
    return value


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype, rounds_kv: bool = False) -> torch.dtype:
    """The dtype a target's KV cache stores: "auto" -> the model's own dtype, or bf16 where
    `rounds_kv` (the model's attention reads every K / V value rounded to bf16 anyway:
    Decoder.attention_rounds_kv; the same numbers from half the bytes); "bfloat16" under an
    fp32 or bf16 model; "float32" under an fp32 model only (a 16-bit model's K / V are
    16-bit already), else ValueError."""
    name = check_kv_cache_dtype(name)
    if name == "auto":
        return torch.bfloat16 if rounds_kv else model_dtype
    dtype = getattr(torch, name)
    if dtype == torch.float32 and model_dtype != torch.float32:
        raise ValueError(f"kv_cache_dtype float32 needs a float32 model (this one runs "
                         f"{str(model_dtype).replace('torch.', '')})")
    return dtype


def auto_block_size_schedule(dtype) -> list[tuple[int, int]]:
    """The "auto" schedule for the dtype the engine runs in (a torch.dtype or its name)."""
    name = str(dtype).replace("torch.", "")
    pairs = FP32_BLOCK_SIZE_SCHEDULE if name in ("float32", "float") else DEFAULT_BLOCK_SIZE_SCHEDULE
    return [tuple(p) for p in pairs]


def schedule_block(pairs, num_running: int) -> int:
    """The block size of the first (max_running, block_size) pair covering num_running
    rows (pairs sorted by max_running), else the last pair's."""
    return next((b for max_running, b in pairs if num_running <= max_running), pairs[-1][1])


def format_block_size_schedule(pairs) -> str:
    """The text form of a schedule ("2:4,inf:1"), "none" for None."""
    if pairs is None:
        return "none"
    return ",".join(f"{'inf' if a >= INF_RUNNING else a}:{b}" for a, b in pairs)


@dataclass
class EngineConfig:
    max_slots: int = 8
    max_seq_len: int = 2048
    block_size: int = 16
    # (max_running, block_size) pairs: the first whose max_running >= running rows picks
    # the verified block size of a step; None = always block_size (any form that
    # parse_block_size_schedule reads)
    block_size_schedule: list[tuple[int, int]] | str | None = None
    # prompt tokens prefilled per step, over all rows: a longer prompt is prefilled in
    # chunks over several steps, interleaved with the decode steps of the running rows
    # (the per-step stall stays bounded by this budget)
    max_prefill_tokens: int = 512
    # target layers whose outputs every RequestOutput carries for the positions committed
    # in its step (feature capture: training data for a drafter); () = none
    capture_layers: tuple[int, ...] = ()
    # dynamic draft length: a speculating row verifies only its leading drafts whose running
    # product of drafter confidences stays >= this (speculative.drafts_to_verify), at most
    # the scheduled block size - 1, and a step's forward is as long as its longest row's
    # block; 0 = always the whole scheduled block
    draft_threshold: float = 0.0
    # tree verification (tree.py): rows without penalties verify trees of b - 1 nodes in the
    # same b target rows instead of chains of b - 1 drafts (greedy: the drafter's most likely
    # paths, best-first over its top tokens per position; sampling: the sampled drafts plus
    # extra children of the anchor for residual draws); where the native fp32 layers
    # serve the forward (Decoder.serves_tree), else the chain; a draft_threshold > 0 asks for
    # chains cut short, so it turns trees off
    draft_tree: bool = True
    # lookup branches (lookup.py): a tree row also verifies what followed its last tokens
    # the last time they occurred in its prompt or output (greedy: merged into its tree,
    # tree.merged_nodes; sampling: off its chain of sampled drafts, tree.sampling_nodes);
    # only where trees run
    draft_lookup: bool = True
    # what the target's KV cache stores (KV_CACHE_DTYPES): "float32", "bfloat16" (each K / V
    # value rounded to the nearest bf16 as it is written: half the bytes a step reads from the
    # cache, which at many rows and long contexts is most of what a decode step reads), or
    # "auto" (resolve_kv_cache_dtype)
    kv_cache_dtype: str = "auto"
    # corpus branches (corpus.py): greedy trees with lookup branches are planned best-first
    # by path probability, with the guesses of an index of the target's own responses and
    # calibrated lookup probabilities (tree.scored_nodes). "auto": the drafter folder's
    # corpus.npz where it has one (api.build_engine), "none": off, or an index file's path.
    # Read where the engine is built; SpecEngine takes the loaded index (`corpus`)
    draft_corpus: str = "auto"

    def __post_init__(self):
        if self.max_slots < 1:
            raise ValueError("max_slots must be >= 1")
        if self.max_seq_len < 2:
            raise ValueError("max_seq_len must be >= 2")
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.max_prefill_tokens < 1:
            raise ValueError("max_prefill_tokens must be >= 1")
        self.draft_threshold = check_draft_threshold(self.draft_threshold)
        self.block_size_schedule = parse_block_size_schedule(self.block_size_schedule)
        self.kv_cache_dtype = check_kv_cache_dtype(self.kv_cache_dtype)
        if not isinstance(self.draft_corpus, str) or not self.draft_corpus:
            raise ValueError(f"draft_corpus must be auto, none or an index file, got {self.draft_corpus!r}")
        self.capture_layers = tuple(int(i) for i in self.capture_layers)
        if any(i < 0 for i in self.capture_layers):
            raise ValueError("capture_layers must be >= 0")

    def block_size_for(self, num_running: int) -> int:
        """The schedule's verified block size for num_running rows (never above block_size)."""
        if self.block_size_schedule:
            return min(schedule_block(self.block_size_schedule, num_running), self.block_size)
        return self.block_size


class SpecEngine:
    def __init__(self, target: Decoder, draft_backend=None, config: EngineConfig | None = None,
                 eos_token_ids: tuple[int, ...] = (), corpus=None):
        """target: the Decoder; draft_backend: a DraftBackend (LocalDraftBackend or remote,
        whose `.config` is the DrafterConfig) or None (plain autoregressive decoding);
        corpus: a corpus.CorpusIndex of the target's own responses, or None (greedy trees
        with lookup branches then score their nodes with it: `draft_corpus`)."""
        self.target = target
        self.config = config or EngineConfig()
        if corpus is not None and corpus.vocab_size and corpus.vocab_size != target.config.vocab_size:
            raise ValueError(f"the corpus index is for a vocabulary of {corpus.vocab_size} tokens, "
                             f"the target has {target.config.vocab_size}")
        self.corpus = corpus
        self.drafting = spec.DraftContext.of(draft_backend, target) if draft_backend is not None else None
        self.drafter_block_size = self.drafting.block_size if self.drafting else 1
        if self.config.capture_layers and max(self.config.capture_layers) >= target.config.num_layers:
            raise ValueError(f"capture_layers must be < {target.config.num_layers} (the target's layers)")
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.vocab_size = target.config.vocab_size
        self.capacity = self.config.max_seq_len + max(self.drafter_block_size, self.config.block_size) + 1
        self.cache = target.new_cache(self.config.max_slots, self.capacity,
                                      resolve_kv_cache_dtype(self.config.kv_cache_dtype, target.dtype,
                                                             target.attention_rounds_kv()))
        self.scheduler = Scheduler(self.config, self.cache, self.drafter_block_size)
        self._ids: set[str] = set()
        self._aborted: list[RequestOutput] = []
        self._lock = threading.RLock()
        self._built_on: threading.Thread | None = threading.current_thread()   # checked on the first step

    # ---- state -----------------------------------------------------------------------
    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def running(self) -> dict[str, Sequence]:
        return self.scheduler.running

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_free_slots(self) -> int:
        return self.cache.num_free

    @property
    def draft_vocab(self) -> torch.Tensor | None:
        return self.drafting.draft_vocab if self.drafting else None

    @property
    def speculative(self) -> bool:
        return self.drafting is not None and self.drafter_block_size > 1 and self.config.block_size > 1

    @property
    def draft_backend(self):
        """The draft backend, or None: the one `drafting` drafts through, so that a backend
        swapped in there (bench.drafter_swapped) also gets its slots freed."""
        return self.drafting.backend if self.drafting is not None else None

    @property
    def can_draft(self) -> bool:
        """Speculative, and the drafter is in reach (a remote one may not be: the engine
        then decodes plainly until it is back)."""
        return self.speculative and getattr(self.draft_backend, "available", True)

    @property
    def draft_trees(self) -> bool:
        """Whether its speculative steps verify trees (EngineConfig.draft_tree, no
        draft_threshold, a drafter, and a target whose native layers run them; a step
        still falls back to chains where its rows x block exceed what those layers take)."""
        return self._trees_asked and self.target.serves_tree(1, 3)

    @property
    def _trees_asked(self) -> bool:
        """What draft_trees asks of the config: speculative, EngineConfig.draft_tree, no draft_threshold."""
        return self.speculative and self.config.draft_tree and self.config.draft_threshold <= 0

    @property
    def draft_lookups(self) -> bool:
        """Whether its tree rows also verify lookup branches (EngineConfig.draft_lookup,
        where trees run: `draft_trees`)."""
        return self.config.draft_lookup and self.draft_trees

    @property
    def draft_corpus(self) -> bool:
        """Whether its greedy tree rows are planned with the corpus index (where lookup
        branches run: `draft_lookups`, and a corpus index is loaded)."""
        return self.corpus is not None and self.draft_lookups

    @staticmethod
    def _ngrams(s: Sequence) -> lookup.NgramIndex:
        """The row's lookup index (made on first use; it indexes the row's tokens as they grow)."""
        if s.ngrams is None:
            s.ngrams = lookup.NgramIndex()
        return s.ngrams

    def _chains(self, rows: list[Sequence], tree_rows: list[int], nodes: int) -> dict[int, list]:
        """Each greedy tree row's scored chains for tree.scored_nodes (corpus.row_chains)."""
        return {r: corpus_mod.row_chains(self.corpus, self._ngrams(rows[r]), rows[r].prompt + rows[r].output, nodes)
                for r in tree_rows}

    def _greedy_sources(self, rows: list[Sequence], tree_rows, nodes: int, top) -> tuple[dict | None, dict | None]:
        """What these greedy tree rows' trees are planned with besides the drafter's top tokens
        (`top`: nested lists [R, b-1, k]), as (lookups, chains) for tree.plan / tree.plan_row:
        the corpus index's scored chains where one is loaded and lookups run (draft_corpus;
        trees run here), else each row's lookup branch where lookups run, else neither."""
        if self.corpus is not None and self.config.draft_lookup:
            return None, self._chains(rows, tree_rows, nodes)
        return (self._lookups(rows, tree_rows, nodes, top) if self.config.draft_lookup else None), None

    def _lookups(self, rows: list[Sequence], tree_rows: list[int], nodes: int, top=None) -> dict[int, list[int]]:
        """The lookup branch of each of these tree rows (lookup.propose) for trees of `nodes`
        nodes, where its context has one; with `top` (the drafter's top tokens and
        probabilities [R, b-1, k] as nested lists, greedy trees) the branch's length also reads
        the drafter's first choice."""
        out = {}
        firsts = None
        if top is not None:
            firsts = [(top[0][r][0][0], top[1][r][0][0]) for r in tree_rows]
        for j, r in enumerate(tree_rows):
            s = rows[r]
            branch = lookup.propose(self._ngrams(s), s.prompt + s.output, nodes, None if firsts is None else firsts[j])
            if branch:
                out[r] = branch
        return out

    def block_size(self, num_running: int | None = None) -> int:
        """The verified block size a speculating row runs when num_running rows run (now:
        the current number): the schedule's, clamped to the drafter's block; 1 while not
        drafting."""
        n = self.num_running if num_running is None else num_running
        return self.scheduler.block_size(max(n, 1), self.can_draft)

    def set_block_size_schedule(self, schedule) -> None:
        """Replace the schedule (any form parse_block_size_schedule reads; None = always
        block_size) from the next step on: e.g. one measured on this machine once the
        engine is built (dflash_core.autoschedule)."""
        pairs = parse_block_size_schedule(schedule)
        with self._lock:
            self.config.block_size_schedule = pairs

    def has_unfinished_requests(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running or self._aborted)

    # ---- requests --------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None) -> None:
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise ValueError("the prompt is empty")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
        bad = [t for t, _ in params.logit_bias if t >= self.vocab_size]
        if bad:
            raise ValueError(f"logit_bias token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
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
            self.scheduler.add(Sequence(request_id, prompt, params, frozenset(stop)))

    def abort_request(self, request_id: str) -> bool:
        """Drop a waiting request or free a running one; returns whether it was known. Its
        final RequestOutput (finish_reason "abort") comes with the next step."""
        with self._lock:
            seq = self.scheduler.find(request_id)
            if seq is None:
                return False
            self.scheduler.remove(seq)
            self._release(seq)
            self._ids.discard(request_id)
            seq.finish_reason = "abort"
            seq.step = StepStats()
            self._aborted.append(seq.output_of_step([]))
            return True

    def _release(self, seq: Sequence) -> None:
        self.scheduler.running.pop(seq.request_id, None)
        if seq.slot >= 0:
            self.cache.free(seq.slot)
            if self.draft_backend is not None:
                self.draft_backend.free(seq.slot)
            seq.slot = -1
        seq.pending_feats.clear()
        seq.pending_pos.clear()

    # ---- the step: schedule -> run -> postprocess ------------------------------------
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        with self._lock:
            if self._built_on is not None:
                warning = runtime.second_master_warning(self._built_on, self.target.device)
                self._built_on = None
                if warning:
                    log.warning(warning)
            outputs, self._aborted = self._aborted, []
            plan = self.scheduler.schedule(self.can_draft)
            emitted = self._run(plan)
            if self.schedule_tuner is not None and plan.decode:
                self._retune()
            return outputs + self._postprocess(emitted)

    # set by whoever measured the schedule (dflash_core.autoschedule.ScheduleTuner): sees
    # every speculative row's acceptance, and re-picks the schedule every few decode steps
    schedule_tuner = None

    def _retune(self) -> None:
        pairs = self.schedule_tuner.end_step(self.config.block_size_schedule)
        if pairs is not None and pairs != self.config.block_size_schedule:
            log.info("block size schedule %s -> %s (acceptance now: %s)",
                     format_block_size_schedule(self.config.block_size_schedule), format_block_size_schedule(pairs),
                     " / ".join(f"{x:.3f}" for x in self.schedule_tuner.reach()[:4]))
            self.config.block_size_schedule = pairs

    def _run(self, plan: StepPlan) -> dict[str, tuple[Sequence, list[int], list, list]]:
        """-> request id -> (seq, tokens to emit, captured feature chunks [(positions, features)],
        their logprob entries (when the request asks for them))"""
        emitted: dict[str, tuple[Sequence, list[int], list, list]] = {}
        admitted = {id(s) for s in plan.admitted}
        for seq in [s for s, _, _ in plan.prefill] + [s for rows in plan.decode.values() for s in rows]:
            if seq.request_id not in emitted:   # every row of the plan reports this step
                seq.step = StepStats(admitted=id(seq) in admitted)
                emitted[seq.request_id] = (seq, [], [], [])
        for seq, tok, lps in self._prefill(plan.prefill, emitted):
            self._commit(seq, [tok], lps, emitted)
        for b, rows in plan.decode.items():
            rows = [s for s in rows if not s.finished]   # a first token may have ended a row
            if not rows:
                continue
            for seq, (toks, lps) in zip(rows, self._decode(rows, b, emitted)):
                self._commit(seq, toks, lps, emitted)
        return emitted

    @staticmethod
    def _commit(seq: Sequence, toks: list[int], lps, emitted) -> None:
        """Commit a row's tokens; what it emits (a prefix: a stop id or max tokens cut the
        rest) goes to this step's output, with the matching logprob entries."""
        new = seq.commit(toks)
        emitted[seq.request_id][1].extend(new)
        if lps is not None:
            emitted[seq.request_id][3].extend(lps[:len(new)])

    def _postprocess(self, emitted) -> list[RequestOutput]:
        outputs = []
        for rid, (seq, new, captured, lps) in emitted.items():
            out = seq.output_of_step(new, lps)
            if captured:
                out.feature_positions = torch.cat([p for p, _ in captured])
                out.features = torch.cat([f for _, f in captured])
            outputs.append(out)
            if seq.finished:
                self._release(seq)
                self._ids.discard(rid)
        return outputs

    def _capture(self) -> list[int]:
        """Target layers captured in a forward: the drafter's, then feature capture's."""
        return (self.drafting.target_layer_ids if self.speculative else []) + list(self.config.capture_layers)

    def _keep_features(self, seq: Sequence, feats: torch.Tensor | None, r: int, start: int, n: int, emitted) -> None:
        """Route the captured features of row r's n committed positions start .. start + n - 1
        (feats [R, T, ...]: a step's, or None): the drafter's share to the row's pending
        context, kept as (feats, r, n) and range(start, start + n) (no tensor op per row and
        step: a row decoding plainly under load commits one token a step), the capture share
        to this step's output."""
        if feats is None:
            return
        F = self.target.config.hidden_size * len(self.drafting.target_layer_ids) if self.speculative else 0
        if F and seq.params.speculative:
            seq.pending_feats.append((feats, r, n))
            seq.pending_pos.append(range(start, start + n))
        if self.config.capture_layers:
            emitted[seq.request_id][2].append((torch.arange(start, start + n), feats[r, :n, F:]))

    def _prefill(self, work: list[tuple[Sequence, int, int]], emitted) -> list[tuple[Sequence, int, list | None]]:
        """Prefill the planned prompt chunks (batched forwards: `_prefill_batches`); rows
        whose prompt is complete sample their first token (the anchor) -> (row, token, its
        logprob entry or None)."""
        if not work:
            return []
        done: list[tuple[Sequence, torch.Tensor]] = []
        batches = self._prefill_batches(work, self.target.native_rows())
        for batch in batches:
            R, T = len(batch), max(n for _, _, n in batch)
            ids = torch.zeros(R, T, dtype=torch.int64)
            for r, (s, st, n) in enumerate(batch):
                ids[r, :n] = torch.tensor(s.prompt[st:st + n])
            slots = torch.tensor([s.slot for s, _, _ in batch])
            starts = torch.tensor([st for _, st, _ in batch], dtype=torch.int64)
            hidden, feats = self.target(ids, self.cache, slots, starts, self._capture(), prefill=True)
            for r, (s, st, n) in enumerate(batch):
                self.cache.set_len(s.slot, st + n)
                s.prefilled = st + n
                s.step.prefill_tokens += n
                self._keep_features(s, feats, r, st, n, emitted)
                if s.prompt_lps is not None:
                    self._prompt_logprobs(s, hidden[r], st, n)
                if not s.prefilling:   # the prompt is in the cache: its last position gives the anchor
                    done.append((s, hidden[r, n - 1]))
        if not done:
            return []
        rows = [s for s, _ in done]
        logits = self.target.logits(torch.stack([h for _, h in done]))
        first_t = spec.sample_rows(rows, logits)
        lps = spec.token_logprobs(rows, lambda idx: logits[idx, None], first_t[:, None])
        first = first_t.tolist()
        return [(s, t, lps.get(r)) for r, (s, t) in enumerate(zip(rows, first))]

    def _prefill_batches(self, work: list[tuple[Sequence, int, int]], limit: int | None) -> list[list]:
        """The planned chunks (row, start, tokens) as forwards, in order: rows batched while
        every padded row fits in its slot and, where the native layers run the target,
        the padded forward (rows x longest chunk) stays within their `limit` rows; a chunk
        longer than the limit goes in pieces, one forward after the other. A forward past
        the limit would take the torch path, whose bits differ from a one-token step's, so
        the prompt's cache (and the output after it) would depend on what else was
        prefilled beside it."""
        if limit:
            work = [(s, st + a, min(limit, n - a)) for s, st, n in work for a in range(0, n, limit)]
        batches: list[list] = []
        cur: list = []
        for w in work:
            T = max([w[2]] + [n for _, _, n in cur])
            if cur and (any(s is w[0] for s, _, _ in cur) or any(st + T > self.capacity for _, st, _ in cur + [w])
                        or (limit and (len(cur) + 1) * T > limit)):
                batches.append(cur)
                cur = []
            cur.append(w)
        if cur:
            batches.append(cur)
        return batches

    PROMPT_LOGPROBS_CHUNK = 256   # prompt positions per LM-head pass (bounds the [P, vocab] logits)

    def _prompt_logprobs(self, seq: Sequence, hidden: torch.Tensor, st: int, n: int) -> None:
        """The entries of the prompt tokens this chunk's positions predict: position st + j
        (hidden[j]) gives prompt token st + j + 1, up to the prompt's last token."""
        m = min(n, len(seq.prompt) - st - 1)
        for a in range(0, m, self.PROMPT_LOGPROBS_CHUNK):
            e = min(m, a + self.PROMPT_LOGPROBS_CHUNK)
            chosen = torch.tensor([seq.prompt[st + a + 1:st + e + 1]], device=hidden.device)
            lps = spec.token_logprobs([seq], lambda idx: self.target.logits(hidden[None, a:e]), chosen,
                                      k_of=lambda s: s.params.prompt_logprobs)
            seq.prompt_lps.extend(lps[0])

    def _tree_rows(self, rows: list[Sequence], b: int) -> list[int]:
        """Rows that verify a draft tree this step (EngineConfig.draft_tree, no
        draft_threshold): rows without penalties (greedy: tree.plan; sampling:
        tree.sampling_nodes), when the block holds two drafts or more and the native layers
        serve the forward."""
        # (serving R x b tree tokens implies draft_trees' 1 x 3: one check of the native layers)
        if b < 3 or not self._trees_asked or not self.target.serves_tree(len(rows), b):
            return []
        return [r for r, s in enumerate(rows) if not s.params.penalized]

    def _decode(self, rows: list[Sequence], b: int, emitted) -> list[tuple[list[int], list | None]]:
        """One draft + verify + accept over `rows` with verified block size b; returns the
        tokens each row commits (accepted drafts + the target's own next token), with
        their logprob entries for rows that ask (else None)."""
        tree_rows = self._tree_rows(rows, b) if b > 1 else []
        if self.greedy_tree_steps and len(tree_rows) == len(rows) \
                and all(s.params.greedy and s.params.logprobs is None for s in rows):
            return self._decode_greedy_trees(rows, b, emitted)
        R, dev = len(rows), self.target.device
        starts = [s.num_committed - 1 for s in rows]                  # anchor positions
        slots = torch.tensor([s.slot for s in rows])
        anchors = torch.tensor([s.last for s in rows])
        start = torch.tensor(starts)
        draft_tokens, draft_probs, num_drafts = torch.zeros(R, b - 1, dtype=torch.int64, device=dev), None, None
        parents: dict[int, list[int]] = {}   # tree rows: parent block index of each node
        chain_lens: dict[int, int] = {}      # sampling tree rows: nodes 1..L are their sampled drafts
        lookup_nodes: dict[int, set[int]] = {}   # tree rows: block indices of their lookup branch
        layout = None
        if b > 1:
            thr = self.config.draft_threshold
            draft_tokens, draft_probs, conf, top = spec.draft(
                self.drafting, self.target, rows, slots, anchors, start, b, confidence=thr > 0,
                topk=tree.TOPK if tree_rows else 0)
            if conf is not None:   # verify only the drafts the drafter trusts enough (drafts_to_verify)
                num_drafts = spec.drafts_to_verify(conf, thr).tolist()
                b = max(num_drafts) + 1
                draft_tokens = draft_tokens[:, :b - 1]
                draft_probs = None if draft_probs is None else draft_probs[:, :b - 1]
            if tree_rows and top is not None:   # their nodes replace their chain drafts
                greedy_rows = [r for r in tree_rows if rows[r].params.greedy]
                if greedy_rows:
                    top_lists = (top[0].tolist(), top[1].tolist())   # one host copy for the lookups and the plan
                    looks, chains = self._greedy_sources(rows, greedy_rows, b - 1, top_lists)
                    parents = tree.plan(top_lists, greedy_rows, draft_tokens, looks, lookup_nodes, chains=chains)
                samp_rows = [r for r in tree_rows if not rows[r].params.greedy]
                if samp_rows:
                    looks = self._lookups(rows, samp_rows, b - 1) if self.config.draft_lookup else None
                    chain_lens = tree.sampling_plan(top, samp_rows, draft_tokens, parents, looks, lookup_nodes)
                layout = tree.layout([parents.get(r, tree.chain_parents(b - 1)) for r in range(R)], b)
        hidden, feats = spec.verify(self.target, self.cache, slots, anchors, draft_tokens, start, self._capture(),
                                    tree=layout)
        paths: dict[int, list[int]] = {}
        if not parents:
            accept_len, next_tok = spec.accept(self.target, rows, hidden, draft_tokens, draft_probs, num_drafts)
        else:
            accept_len = torch.zeros(R, dtype=torch.int64, device=dev)
            next_tok = torch.zeros(R, dtype=torch.int64, device=dev)
            # draft_probs holds the sampling rows' q in row order
            q_of = {r: i for i, r in enumerate(spec._sampling_rows(rows))}
            chain = [r for r in range(R) if r not in parents]
            if chain:   # penalized rows: the chain's rules
                ci = torch.tensor(chain, device=dev)
                cq = [q_of[r] for r in chain if r in q_of]
                a, n = spec.accept(self.target, [rows[r] for r in chain], hidden[ci], draft_tokens[ci],
                                   draft_probs[torch.tensor(cq, device=dev)] if cq else None,
                                   None if num_drafts is None else [num_drafts[r] for r in chain])
                accept_len[ci], next_tok[ci] = a, n
            greedy_t = [r for r in parents if r not in chain_lens]
            if greedy_t:
                ti = torch.tensor(greedy_t, device=dev)
                walked = tree.walk_rows(self.target.greedy(hidden[ti]), draft_tokens,
                                        {r: parents[r] for r in greedy_t})
                for r, (path, nxt) in walked.items():
                    paths[r] = path
                    accept_len[r], next_tok[r] = len(path) - 1, nxt
            samp_t = list(chain_lens)
            if samp_t:   # the chain's rejection rule along the sampled drafts, extra children for residual draws
                si = torch.tensor(samp_t, device=dev)
                logits = self.target.logits(hidden[si])                                        # [Rs, b, V]
                u = spec.uniforms([rows[r] for r in samp_t], 2 * b, dev)
                toks = draft_tokens[si].tolist()
                for j, r in enumerate(samp_t):   # p warped only at the nodes the walk visits
                    path, nxt = tree.sampling_walk(parents[r], toks[j], chain_lens[r],
                                                   WarpedRows(logits[j], rows[r].params), draft_probs[q_of[r]], u[j])
                    paths[r] = path
                    accept_len[r], next_tok[r] = len(path) - 1, nxt
            # from here on a tree row looks like a chain row: its path where a chain's block is
            order = tree.committed_order(paths, R, b, dev)
            block = torch.cat([anchors[:, None].to(dev), draft_tokens], 1)
            draft_tokens = block.gather(1, order)[:, 1:]
            if any(s.params.logprobs is not None for s in rows):   # (the one later read of hidden)
                hidden = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))
            if feats is not None:
                feats = feats.gather(1, order[..., None].expand(-1, -1, feats.shape[-1]))
        lps = {}
        if any(s.params.logprobs is not None for s in rows):
            # block position j commits draft j while j < accepted, then the target's next token
            committed = torch.where(torch.arange(b, device=dev)[None, :] < accept_len[:, None],
                                    torch.cat([draft_tokens, next_tok[:, None]], 1), next_tok[:, None])
            lps = spec.token_logprobs(rows, lambda idx: self.target.logits(hidden[idx]), committed)
        # the one read of this group's results: [accepted, next token, drafts...] per row
        packed = torch.cat([accept_len[:, None], next_tok[:, None], draft_tokens], 1).tolist()
        result = []
        for r, s in enumerate(rows):
            n, nxt, dt = packed[r][0], packed[r][1], packed[r][2:]
            k = b - 1 if num_drafts is None else num_drafts[r]   # drafts this row verified
            self._settle(s, starts[r], k, n, paths.get(r), r in parents and r not in chain_lens,
                         lookup_nodes.get(r), feats, r, emitted)
            result.append((dt[:n] + [nxt], lps[r][:n + 1] if r in lps else None))
        return result

    def _settle(self, s: Sequence, st: int, k: int, n: int, path: list[int] | None, greedy_tree: bool,
                mine: set[int] | None, feats, r: int, emitted) -> None:
        """A decoded row's bookkeeping: its anchor at position st verified k drafts and kept n;
        path: a tree row's accepted block indices (from the anchor, 0), else None; greedy_tree:
        its acceptance is a greedy tree's depth (for the schedule tuner), not a chain's prefix;
        mine: the block indices of its lookup branch, else None; feats[r, :n + 1]: the
        features of its committed positions, in order."""
        s.stats.record(k, n)
        if self.schedule_tuner is not None:
            if greedy_tree:
                self.schedule_tuner.observe_tree(k + 1, n)
            else:
                self.schedule_tuner.observe(k, n)
        s.step.block_size, s.step.num_draft_tokens, s.step.num_accepted_tokens = k + 1, k, n
        if mine is not None:   # accepted nodes of the lookup branch (shared ones included)
            s.step.num_lookup_accepted_tokens = sum(1 for i in path[1:] if i in mine)
        # committed grows by n+1; the cache keeps anchor + accepted drafts
        if path is not None:   # the accepted nodes' K/V to the positions after the anchor
            tree.commit_path(self.cache, s.slot, st, path)
        self.cache.set_len(s.slot, st + 1 + n)
        self._keep_features(s, feats, r, st, n + 1, emitted)

    # steps whose rows all verify greedy trees run _decode_greedy_trees (False: the general
    # _decode, the same tokens; benchmarks and tests compare the two)
    greedy_tree_steps = True

    def _decode_greedy_trees(self, rows: list[Sequence], b: int, emitted) -> list[tuple[list[int], None]]:
        """`_decode` for a step whose rows all verify greedy trees and ask no logprobs (greedy
        decoding at one row, and greedy batches): the same drafts, trees, verify forward and
        walk, with the drafter's top tokens, the trees and the target's choices kept as host
        lists from the draft on. ~10 torch ops a step instead of ~40: after a forward has
        streamed the weights through the caches, each op costs several times its warm cost
        (the final RMSNorm of one token: ~100 us instead of ~16)."""
        R, n = len(rows), b - 1
        starts = [s.num_committed - 1 for s in rows]
        anchors = [s.last for s in rows]
        slots, start = torch.tensor([s.slot for s in rows]), torch.tensor(starts)
        top_tok, top_p = spec.draft_top(self.drafting, self.target, rows, slots, torch.tensor(anchors), start, b,
                                        tree.TOPK)
        looks, chains = self._greedy_sources(rows, range(R), n, (top_tok, top_p))
        planned = [tree.plan_row(top_p[r], top_tok[r], n, looks.get(r) if looks else None,
                                 None if chains is None else chains.get(r, [])) for r in range(R)]
        # a tree of fewer nodes keeps the drafter's first choices after them (tree.plan's padding)
        toks = [t + [top_tok[r][j][0] for j in range(len(t), n)] for r, (_, t, _) in enumerate(planned)]
        block = torch.tensor([[a] + t for a, t in zip(anchors, toks)])
        hidden, feats = self.target(block, self.cache, slots, start, self._capture(),   # spec.verify's forward
                                    tree=tree.layout([par for par, _, _ in planned], b))
        targets = self.target.greedy(hidden).tolist()
        result = []
        for r, s in enumerate(rows):
            par, _, mine = planned[r]
            path, nxt = tree.greedy_walk(par, toks[r], targets[r])
            m = len(path) - 1
            if feats is not None and path[1:] != list(range(1, m + 1)):   # its features in commit order
                fr, f = 0, feats[r:r + 1, path]
            else:
                fr, f = r, feats
            self._settle(s, starts[r], n, m, path, True, mine, f, fr, emitted)
            result.append(([toks[r][i - 1] for i in path[1:]] + [nxt], None))
        return result

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
        lps = {rid: [] if p.logprobs is not None else None for rid, p in zip(rids, plist)}
        plps = {rid: None for rid in rids}
        done: dict[str, RequestOutput] = {}
        while len(done) < len(rids):
            for o in self.step():
                if o.request_id in tokens:
                    tokens[o.request_id].extend(o.new_token_ids)
                    if o.logprobs is not None:
                        lps[o.request_id].extend(o.logprobs)
                    if o.prompt_logprobs is not None:
                        plps[o.request_id] = o.prompt_logprobs
                    if o.finished:
                        done[o.request_id] = o
        return [GenerationResult(tokens[r], done[r].finish_reason, done[r].num_prompt_tokens, done[r].stats,
                                 done[r].stop_token_id, lps[r], plps[r]) for r in rids]
