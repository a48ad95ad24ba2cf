"""`dflash bench`: autoregressive vs DFlash decoding of the same prompts in one process.

Both modes run through the same SpecEngine (autoregressive = `speculative=False`, one
token verified per target forward), batch 1, interleaved prompt by prompt so that
machine noise hits both alike. Optional extras:
  --verify-cost   target forward cost of 1, 4, 8, 16 tokens against a 1-token step
  --vs-hf         the engine's autoregressive decoding against transformers' generate
                  (same weights, same dtype)
  --block-sizes   DFlash at several verified block sizes (e.g. 4,8,16) in the same run
  --batch-sizes   batched autoregressive throughput at these row counts (e.g. 8,16)
  --prepack-ab    every measurement above also with the prepacked linears turned off
                  (plain F.linear), each pair back to back in this run
  --mm-ab         the verify cost also with fp32's small-weight torch.mm linears taking
                  the oneDNN packed product instead, alternating forward by forward
  --native-ab     every measurement above also with the native fp32 linears
                  (dflash_core.native) replaced by the torch ones they stand in for; the
                  verify cost alternating forward by forward, the rest back to back
  --amx-ab        every measurement above also with the native linears' AMX forms (CPUs
                  with AMX) replaced by the AVX-512 FMA forms of the same weights, back to
                  back (the verify cost alternating forward by forward)
  --amx-inputs-ab every measurement above also with the AMX linears taking the other input
                  (bf16 where they take fp32, and back: --amx-inputs), back to back (the
                  verify cost alternating forward by forward)
  --amx-attention-ab  every measurement above also with the native layers' attention in fp32
                  where it runs on AMX tiles (and an fp32 KV cache where "auto" made it bf16:
                  the engine as --amx-attention off builds it), back to back (the verify cost
                  alternating forward by forward at each --verify-ctx), and the next-token
                  agreement of the two
  --kv-cache-ab   every measurement above also with the target's KV cache in the other dtype
                  (bf16 where it is fp32, and back: --kv-cache-dtype), back to back, and the
                  next-token agreement of the two
  --layers-ab     every measurement above also with the native decoder layers off (the
                  torch ops around the same native linears), alternating likewise
  --kernel-source-ab FILE  every measurement above also with the native decoder layers
                  built with another dflash_layer.c or dflash_amx.c (an earlier revision's),
                  back to back; the verify cost alternating forward by forward at each --verify-ctx
  --lookup-ab     every measurement above also with the lookup branches of the greedy
                  trees (dflash_core/lookup.py) the other way (off where they are on), back to back
  --drafter-weights-ab  every measurement above also with the drafter's weights in the
                  other form (stored vs rounded onto the kernel's 8-bit grid), back to back
  --draft-call-ab every measurement above also with the draft step run as its own calls
                  instead of one native call (native.set_draft_call: the same drafts), back to back
  --prefill-ab    whole prefills (128 / 256 / 512 tokens) with the native layers' row limit
                  of this build (`native.row_limit()`) against the AVX2 build's 192 rows
                  (past it: torch's F.linear), and in the decode forms of the linears
                  instead of their prefill forms, alternating forward by forward
Prints a table and, last, one JSON line (`--json`: only the JSON, the table to stderr).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch

from . import clitools

BENCH_PROMPTS = [
    "Explain how a hash table works and when it is a bad choice.",
    "Write a short story about a robot who learns to paint.",
    "Give me a step by step recipe for pancakes.",
    "What are the main differences between Python lists and tuples?",
    "Write a Python function that checks whether a string is a palindrome.",
    "Summarise the causes of the French Revolution in a paragraph.",
    "How do vaccines train the immune system?",
    "Describe the water cycle for a ten year old.",
]


def _parser():
    from .clitools import _Parser, _positive_int, add_runtime_args
    ap = _Parser(prog="dflash bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=_positive_int, default=4)
    ap.add_argument("--dataset", choices=("bench", "sharegpt", "humaneval"), default="bench",
                    help="prompts: the built-in bench prompts (repeated to --num-prompts), or the first "
                         "--num-prompts of the ShareGPT holdout / HumanEval (those that fit --max-prompt-tokens)")
    ap.add_argument("--max-prompt-tokens", type=_positive_int, default=512)
    ap.add_argument("--max-new-tokens", type=_positive_int, default=128)
    ap.add_argument("--block-size", type=_positive_int, default=16)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    ap.add_argument("--verify-cost", action="store_true")
    ap.add_argument("--vs-hf", action="store_true")
    ap.add_argument("--int8", action="store_true",
                    help="also time weight-only int8 linears against the target's own, on its layer shapes")
    ap.add_argument("--compile", action="store_true",
                    help="also time the target forward eager vs torch.compile (inductor), with compile times")
    ap.add_argument("--prepack-ab", action="store_true",
                    help="also measure everything with the prepacked (oneDNN) linears off, back to back")
    ap.add_argument("--mm-ab", action="store_true",
                    help="with --verify-cost: also time it with the small fp32 weights packed (oneDNN) instead of "
                         "torch.mm, alternating forward by forward")
    ap.add_argument("--native-ab", action="store_true",
                    help="also measure everything with the native fp32 linears replaced by torch's (mm / oneDNN packed)")
    ap.add_argument("--amx-ab", action="store_true",
                    help="also measure everything with the native linears' AMX forms (q4_1x / q8_0x, on CPUs with "
                         "AMX) replaced by the AVX-512 FMA forms of the same weights")
    ap.add_argument("--amx-inputs-ab", action="store_true",
                    help="also measure everything with the AMX linears taking the other input (bf16 where they "
                         "take fp32 and back, --amx-inputs): the same weights, back to back")
    ap.add_argument("--amx-attention-ab", action="store_true",
                    help="also measure everything with the native layers' attention in fp32 where it runs on AMX "
                         "tiles (bf16 products): back to back, and the next-token agreement of the two")
    ap.add_argument("--kv-cache-ab", action="store_true",
                    help="also measure everything with the target's KV cache in the other dtype (bfloat16 where "
                         "it is float32 and back): back to back, and the next-token agreement of the two")
    ap.add_argument("--layers-ab", action="store_true",
                    help="also measure everything with the native decoder layers off (torch's ops around the same "
                         "native linears)")
    ap.add_argument("--kernel-source-ab", default=None, metavar="FILE",
                    help="also measure everything with the native decoder layers built with FILE in place of its "
                         "namesake (another dflash_layer.c or dflash_amx.c with the same signatures, e.g. `git show "
                         "REV:dflash_core/native/dflash_layer.c`), the rest of the kernel as built: a kernel change's "
                         "A/B in one process")
    ap.add_argument("--draft-tree", choices=("on", "off"), default="on",
                    help="greedy DFlash verifies draft trees (EngineConfig.draft_tree, the default where the native "
                         "fp32 layers run the target) or chains")
    ap.add_argument("--tree-ab", action="store_true",
                    help="also measure everything with the other verify (trees where the run has chains, and back)")
    ap.add_argument("--draft-lookup", choices=("on", "off"), default="on",
                    help="tree rows also verify lookup branches (EngineConfig.draft_lookup, dflash_core/lookup.py)")
    ap.add_argument("--lookup-ab", action="store_true",
                    help="also measure everything with the other --draft-lookup")
    ap.add_argument("--draft-corpus", default="auto", help=clitools.CORPUS_HELP)
    ap.add_argument("--draft-call-ab", action="store_true",
                    help="also measure everything with the draft step as its own calls instead of one native call "
                         "(the same drafts; the engine must run the one call)")
    ap.add_argument("--corpus-ab", action="store_true",
                    help="also measure everything with the corpus index off (the run needs one: --draft-corpus)")
    ap.add_argument("--verify-ctx", default=None,
                    help="--verify-cost: comma-separated cached context lengths the forwards run on (default 128; "
                         "the first is the one the A/B comparisons use)")
    ap.add_argument("--verify-tokens", default=None,
                    help="--verify-cost: comma-separated token counts of the timed forwards (default 1,2,3,4,8,16; "
                         "the first is what the others are relative to)")
    ap.add_argument("--verify-reps", type=_positive_int, default=7,
                    help="--verify-cost: forwards timed per token count (the first is dropped)")
    ap.add_argument("--repeats", type=_positive_int, default=1)
    ap.add_argument("--block-sizes", default="", help="comma-separated verified block sizes for DFlash (default: --block-size)")
    ap.add_argument("--draft-thresholds", default="",
                    help="comma-separated dynamic draft length thresholds (EngineConfig.draft_threshold; "
                         "0 = the whole block): each block size runs with each, side by side (default: 0)")
    ap.add_argument("--calibration", action="store_true",
                    help="also decode the prompts with DFlash at the largest block size and report how often "
                         "drafts were accepted by their running product of drafter confidences (what "
                         "--draft-thresholds cuts on), per position and 0.1-wide bin")
    ap.add_argument("--batch-sizes", default="", help="comma-separated row counts for batched autoregressive throughput")
    ap.add_argument("--drafter-weights-ab", action="store_true",
                    help="also measure everything with the drafter's weights in the other form (stored vs q8_0, "
                         "see --drafter-weights), back to back")
    ap.add_argument("--prefill-ab", action="store_true",
                    help="whole prefills of 128/256/512 tokens with this build's native row limit vs the AVX2 "
                         "build's 192 (past it: torch), and in the linears' decode forms, alternating")
    add_runtime_args(ap, drafter="default")
    ap.add_argument("--json", action="store_true", help="print only the JSON summary on stdout")
    ap.add_argument("--peers", action="store_true",
                    help="instead: this engine vs transformers generate / prompt lookup / llama.cpp (bench_peers.py)")
    ap.add_argument("--peer-prompts", type=_positive_int, default=20, help="--peers: prompts per set (ShareGPT holdout, HumanEval)")
    ap.add_argument("--peers-plot", default=None, help="--peers: PNG bar chart path")
    return ap


def _local_drafter(engine):
    """The drafter module of an engine that drafts in this process, else None."""
    return getattr(getattr(engine.drafting, "backend", None), "drafter", None)


def _linear_owners(engine) -> list:
    """Every object that may keep a prepacked linear: the target's and the local
    drafter's modules and the drafting context."""
    owners = list(engine.target.modules())
    drafter = _local_drafter(engine)
    if drafter is not None:
        owners += list(drafter.modules())
    if engine.drafting is not None:
        owners.append(engine.drafting)
    return owners


def _linear_swaps(engine, replace) -> list[tuple]:
    """(owner, attribute, prepacked linear fn, its replacement) for each prepacked linear
    fn for which replace(fn) is not False."""
    from .models.layers import is_prepacked
    swaps = []
    for obj in _linear_owners(engine):
        for name, fn in list(vars(obj).items()):
            if is_prepacked(fn):
                new = replace(fn)
                if new is not False:
                    swaps.append((obj, name, fn, new))
    return swaps


@contextlib.contextmanager
def _swapped(swaps):
    """Within: each swap's replacement in place of its fn; yields how many; restored after."""
    for obj, name, _, new in swaps:
        setattr(obj, name, new)
    try:
        yield len(swaps)
    finally:
        for obj, name, fn, _ in swaps:
            setattr(obj, name, fn)


def prepacked_off(engine):
    """Within: the target's and the local drafter's prepacked linears (models.layers.
    prepack_linear, found by their mark wherever a module or the drafting context keeps
    one) are off, so every linear runs as plain F.linear; restored after."""
    return _swapped(_linear_swaps(engine, lambda fn: None))


# the engine's on/off verify switches the bench can flip: EngineConfig field -> the
# SpecEngine property saying whether it is in force
_SWITCHES = {"draft_tree": "draft_trees", "draft_lookup": "draft_lookups"}


@contextlib.contextmanager
def _switch_set(engine, field: str, on: bool):
    """Within: EngineConfig.<field> = on; restored after. Yields 1 where the engine then
    runs it (its `_SWITCHES` property), else 0."""
    was = getattr(engine.config, field)
    setattr(engine.config, field, on)
    try:
        yield int(getattr(engine, _SWITCHES[field]))
    finally:
        setattr(engine.config, field, was)


@contextlib.contextmanager
def draft_call_off():
    """Within: draft steps run as their own calls, not one native call (native.NativeDraft);
    restored after. Yields 1."""
    from . import native
    was = native.draft_call_on()
    native.set_draft_call(False)
    try:
        yield 1
    finally:
        native.set_draft_call(was)


@contextlib.contextmanager
def corpus_set(engine, index):
    """Within: the engine plans its greedy trees with this corpus index (None: without
    one); restored after. Yields 1 where the engine then plans with an index, else 0."""
    was = engine.corpus
    engine.corpus = index
    try:
        yield int(engine.draft_corpus)
    finally:
        engine.corpus = was


def draft_lookup_set(engine, on: bool):
    """Within: EngineConfig.draft_lookup = on; restored after. Yields 1 where the engine's
    tree rows then verify lookup branches, else 0."""
    return _switch_set(engine, "draft_lookup", on)


def draft_tree_set(engine, on: bool):
    """Within: EngineConfig.draft_tree = on (tree verification, or chains);
    restored after. Yields 1 where the engine's steps then verify trees, else 0."""
    return _switch_set(engine, "draft_tree", on)


def native_swaps(engine) -> list[tuple]:
    """The native fp32 linears (dflash_core.native), each with the torch linear it stands
    in for (models.layers.prepack_linear with native=False, built here, once)."""
    from .models.layers import prepack_linear

    def fallback(fn):
        wb = getattr(fn, "native", None)
        return False if wb is None else prepack_linear(*wb, native=False)
    return _linear_swaps(engine, fallback)


def amx_swaps(engine) -> list[tuple]:
    """The native linears in an AMX form (q4_1x / q8_0x), each with the same weight's
    FMA form (q4_1 / q8_0), built here, once."""
    from . import native
    from .models.layers import prepack_linear

    def fma(fn):
        if getattr(fn, "native_format", None) not in native.AMX_KINDS:
            return False
        return prepack_linear(*fn.native, amx=False)
    return _linear_swaps(engine, fma)


def amx_inputs_swaps(engine, inputs: str) -> list[tuple]:
    """The native linears in an AMX form, each with the same weight's AMX form taking
    `inputs` ("fp32" or "bf16": native.set_amx_inputs), built here, once (the ones that
    already take it are left out)."""
    from . import native
    from .models.layers import prepack_linear
    kind = native.AMX_BF16_FORMATS if inputs == "bf16" else native.AMX_FORMATS

    def other(fn):
        fmt = getattr(fn, "native_format", None)
        if fmt not in native.AMX_KINDS or fmt in kind.values():
            return False
        return prepack_linear(*fn.native, amx=True, amx_inputs=inputs)
    return _linear_swaps(engine, other)


@torch.no_grad()
def next_token_agreement(engine, prompts, responses, variant, reference_is_variant: bool = False) -> dict:
    """Teacher-forced, on the target: for each prompt + response, the next-token
    distribution at every response position as loaded (p) and within the context
    `variant` (q) -> {positions, argmax_agreement: the share of positions whose argmax
    agree, mean_kl: mean KL(p || q) in nats, KL(q || p) with reference_is_variant}. Runs
    in slot 0 of the engine's cache (an idle engine's: its length is reset after)."""
    target, loaded = engine.target, engine.cache
    slot, agree, kl, n = torch.tensor([0]), 0, 0.0, 0

    def logits(seq, P):
        cache = engine.cache   # (a variant may swap the cache: kv_cache_set)
        cache.set_len(0, 0)
        h, _ = target(seq, cache, slot, torch.tensor([0]), [])
        return target.logits(h[0, P - 1:-1]).float()
    try:
        for p, r in zip(prompts, responses):
            if not r:
                continue
            seq = torch.tensor([list(p) + list(r)], device=target.device)
            a = logits(seq, len(p))
            with variant():
                b = logits(seq, len(p))
            if reference_is_variant:
                a, b = b, a
            la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            kl += float((la.exp() * (la - lb)).sum())
            n += a.shape[0]
    finally:
        loaded.set_len(0, 0)
    return {"positions": n, "argmax_agreement": round(agree / max(n, 1), 5), "mean_kl": float(f"{kl / max(n, 1):.3e}")}


def _auto_cache(engine, keep: dict):
    """A context: where the engine's KV cache is "auto", the cache "auto" gives the target
    as it runs now (bf16 where its attention rounds K / V to bf16: the AMX attention, else
    the model's dtype) in place of the one built with the engine (made once, kept in
    `keep`), else nothing."""
    from .engine import resolve_kv_cache_dtype
    t = engine.target
    if engine.config.kv_cache_dtype == "auto":
        want = resolve_kv_cache_dtype("auto", t.dtype, t.attention_rounds_kv())
        if want != engine.cache.k_all.dtype:
            return kv_cache_set(engine, want, keep)
    return contextlib.nullcontext()


@contextlib.contextmanager
def amx_off(engine, swaps, keep: dict | None = None):
    """Within: the swaps' FMA forms in place of the AMX ones (or any other forms of the
    same weights: amx_inputs_swaps), and the target's and the local drafter's native
    layers rebuilt over them, with the "auto" KV cache those layers take (_auto_cache: an
    fp32 one where the AMX attention no longer runs); restored after."""
    from . import native
    models = [m for m in (engine.target, _local_drafter(engine)) if m is not None]
    with _swapped(swaps) as n:
        saved = [(m, m._native_layers) for m in models]
        for m, nl in saved:
            if nl is not None:
                m._native_layers = native.NativeLayers.of(m.layers)
        try:
            with _auto_cache(engine, {} if keep is None else keep):
                yield n
        finally:
            for m, nl in saved:
                m._native_layers = nl


@contextlib.contextmanager
def kv_cache_set(engine, dtype: torch.dtype, keep: dict):
    """Within: the engine's target KV cache is one of `dtype` (made once and kept in `keep`,
    the same shape), then the one it had. Between requests only (an idle engine: no row
    holds a slot). Yields 1."""
    from .models.kv_cache import KVCache
    if engine.num_running or engine.num_waiting:
        raise RuntimeError("kv_cache_set swaps the cache of an idle engine only")
    was = engine.cache
    if dtype not in keep:
        c = engine.target.config
        keep[dtype] = KVCache(c.num_layers, was.max_slots, was.capacity, c.num_kv_heads, c.head_dim, dtype,
                              engine.target.device)
    engine.cache = engine.scheduler.cache = keep[dtype]
    try:
        yield 1
    finally:
        engine.cache = engine.scheduler.cache = was


@contextlib.contextmanager
def amx_attention_off(engine=None, keep: dict | None = None):
    """Within: the native layers' attention in fp32 (native.set_amx_attention(False)) and,
    with an engine, the "auto" KV cache that gives (_auto_cache: fp32 where it was bf16 for
    the AMX attention): the engine as `--amx-attention off` builds it. Yields 1."""
    from . import native
    was = native.amx_attention_on()
    native.set_amx_attention(False)
    try:
        with (_auto_cache(engine, {} if keep is None else keep) if engine is not None else contextlib.nullcontext()):
            yield 1
    finally:
        native.set_amx_attention(was)


@contextlib.contextmanager
def layers_off(engine):
    """Within: the target's decoder layers run as torch ops (around the same native
    linears) instead of one native call per layer."""
    nl = engine.target._native_layers
    was, nl.enabled = nl.enabled, False
    try:
        yield 1
    finally:
        nl.enabled = was


@contextlib.contextmanager
def kernel_source_set(fns):
    """Within: the native decoder layers of another build (native.layer_build) -> yields 1."""
    from . import native
    with native.use_layer_build(fns):
        yield 1


def other_weights_backend(engine, drafter_spec: str, target_spec: str, device: str, dtype, weights: str):
    """A second local draft backend for `engine`: the same drafter loaded with `weights`
    ("stored" / "q8_0"), its own context cache of the same shape (for drafter_swapped)."""
    from .api import load_drafter
    from .drafter import LocalDraftBackend
    backend = engine.drafting.backend
    S, _, cap, _ = backend.cache.k[0].shape
    d = load_drafter(drafter_spec, engine.target.config, target_spec, backend.config.block_size, device, dtype,
                     weights)
    return LocalDraftBackend(d, S, cap)


@contextlib.contextmanager
def drafter_swapped(engine, backend):
    """Within: the engine drafts through `backend` (between requests: the engine holds no
    running request in either backend's cache); yields the drafter's linear weights."""
    was = engine.drafting.backend
    engine.drafting.backend = backend
    try:
        yield sum(1 for n, p in backend.drafter.named_parameters() if n.endswith(".weight") and p.dim() == 2)
    finally:
        engine.drafting.backend = was


def small_mm_swaps(engine) -> list[tuple]:
    """The fp32 linears that multiply by a transposed copy of a small weight
    (models.layers.FP32_MM_MAX_ELEMENTS), each with the oneDNN packed linear it was before
    (built here, once)."""
    from .models.layers import prepack_linear

    def packed(fn):
        wb = getattr(fn, "small_mm", None)
        return False if wb is None else prepack_linear(*wb, mm_max_elements=0)
    return _linear_swaps(engine, packed)


def small_mm_off(engine):
    """Within: the small fp32 weights take the packed product instead of torch.mm, as they
    did before; restored after."""
    return _swapped(small_mm_swaps(engine))


def batched_ar_tps(engine, prompts: list[list[int]], rows: int, max_new_tokens: int) -> float:
    """Autoregressive tokens/s with `rows` sequences decoding together (fixed length)."""
    from .sampling import SamplingParams
    batch = [prompts[i % len(prompts)] for i in range(rows)]
    p = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, speculative=False)
    t0 = time.perf_counter()
    res = engine.generate(batch, p)
    return sum(len(r.token_ids) for r in res) / (time.perf_counter() - t0)


VERIFY_TOKENS = (1, 2, 3, 4, 8, 16)   # --verify-cost's token counts by default


@torch.inference_mode()   # as the engine's step: the prepacked linears run only without autograd
def verify_cost(target, ctx_len: int = 128, sizes=VERIFY_TOKENS, reps: int = 7, variants=None, cache_dtypes=None):
    """Median wall time of one target forward of T tokens (+ LM head) on a ctx_len cache.
    variants: {name: () -> context manager}: each forward is timed once per variant in
    turn (the order alternating), -> {name: result} instead of one result. cache_dtypes:
    {name: dtype} of a variant's own cache (the same context, written within the variant);
    the others share one cache of the model's dtype."""
    names = list(variants or {None: contextlib.nullcontext})
    slots = torch.tensor([0])
    V = target.config.vocab_size
    g = torch.Generator().manual_seed(0)
    context = torch.randint(0, V, (1, ctx_len), generator=g)
    caches, cache_of = {}, {}
    for name in names:
        dtype = (cache_dtypes or {}).get(name, target.dtype)
        if dtype not in caches:
            caches[dtype] = target.new_cache(1, ctx_len + max(32, *sizes), dtype)
            with (variants[name]() if variants else contextlib.nullcontext()):
                target(context, caches[dtype], slots, torch.tensor([0]))
        cache_of[name] = caches[dtype]
    out = {name: {} for name in names}
    for T in sizes:
        x = torch.randint(0, V, (1, T), generator=g)
        ts = {name: [] for name in names}
        for rep in range(reps):
            for name in (names if rep % 2 == 0 else names[::-1]):
                with (variants[name]() if variants else contextlib.nullcontext()):
                    t0 = time.perf_counter()
                    h, _ = target(x, cache_of[name], slots, torch.tensor([ctx_len]))
                    target.logits(h)
                    ts[name].append(time.perf_counter() - t0)
        for name in names:
            out[name][T] = statistics.median(ts[name][1:]) * 1000
    res = {name: {"ctx_len": ctx_len, "ms": ms, "relative_to_1": {T: ms[T] / ms[sizes[0]] for T in sizes}}
           for name, ms in out.items()}
    return res if variants else res[None]


@torch.inference_mode()
def prefill_ab(target, sizes=(128, 256, 512), reps: int = 5) -> dict:
    """Median ms of a whole prefill of T tokens (one forward, a fresh cache) as the engine
    runs it (Decoder.forward's prefill: the linears' prefill forms where they have one) with
    the native layers' row limit at the build's row_limit() and at the AVX2 build's
    MAX_ROWS, and at the build's limit with the decode forms (prefill=False), the three
    alternating forward by forward; whether the last position's output is the same at the
    two limits, and whether its argmax is the same in the two forms."""
    from . import native
    nl = target._native_layers
    if nl is None:
        return {"error": "the native decoder layers are not in use (dtype, CPU or DFLASH_NATIVE)"}
    limits = {"build": native.row_limit(), "avx2": native.MAX_ROWS}
    variants = {"build": (limits["build"], True), "avx2": (limits["avx2"], True), "decode_forms": (limits["build"], False)}
    g = torch.Generator().manual_seed(0)
    res = {}
    try:
        for T in sizes:
            x = torch.randint(0, target.config.vocab_size, (1, T), generator=g)
            ts, last = {k: [] for k in variants}, {}
            for rep in range(reps + 1):
                for name in (list(variants) if rep % 2 == 0 else list(variants)[::-1]):
                    nl.max_rows, prefill = variants[name]
                    cache = target.new_cache(1, T)
                    t0 = time.perf_counter()
                    h, _ = target(x, cache, torch.tensor([0]), torch.tensor([0]), prefill=prefill)
                    ts[name].append(time.perf_counter() - t0)
                    last[name] = h[0, -1]
            ms = {name: statistics.median(v[1:]) * 1000 for name, v in ts.items()}
            res[T] = {f"{name}_ms": round(v, 1) for name, v in ms.items()}
            res[T]["speedup"] = round(ms["avx2"] / ms["build"], 3)
            res[T]["same_bits"] = bool(torch.equal(last["build"], last["avx2"]))
            res[T]["forms_speedup"] = round(ms["decode_forms"] / ms["build"], 3)
            res[T]["forms_same_argmax"] = bool(int(target.logits(last["build"]).argmax())
                                               == int(target.logits(last["decode_forms"]).argmax()))
    finally:
        nl.max_rows = None
    return {"max_rows": limits, "by_tokens": res}


def _cost_line(vc: dict) -> str:
    """A verify_cost result as printed: each token count's ms and its ratio to one token."""
    return ", ".join(f"{T} tok {ms:.1f} ms ({vc['relative_to_1'][T]:.2f}x)" for T, ms in vc["ms"].items())


def _verify_ab(target, reps: int, variants, label: str, out, ctx_len: int = 128, sizes=VERIFY_TOKENS,
               cache_dtypes=None) -> dict:
    """verify_cost of each variant, forward by forward alternating; prints one line per
    variant (label.format(name)) -> {name: {"verify_ms", "verify_relative_to_1"}}."""
    ab = verify_cost(target, ctx_len=ctx_len, sizes=sizes, reps=max(2, reps), variants=variants,
                     cache_dtypes=cache_dtypes)
    for name, vc in ab.items():
        print(f"{label.format(name)}: verify forward cost (ctx {vc['ctx_len']}, alternating): " + _cost_line(vc),
              file=out)
    return {name: {"verify_ms": {str(k): round(v, 2) for k, v in vc["ms"].items()},
                   "verify_relative_to_1": {str(k): round(v, 3) for k, v in vc["relative_to_1"].items()}}
            for name, vc in ab.items()}


@torch.inference_mode()   # as the engine's step: the prepacked linears run only without autograd
def compile_cost(target, ctx_len: int = 128, sizes=(1, 4, 16), reps: int = 9) -> dict:
    """A T-token target forward + LM head on a ctx_len cache, eager and under
    `torch.compile` (inductor, static shapes), timed alternately in one run; the first
    compiled call of each shape is reported as its compile time."""
    import torch._dynamo
    cache = target.new_cache(1, ctx_len + max(32, *sizes))
    slots, start = torch.tensor([0]), torch.tensor([ctx_len])
    V = target.config.vocab_size
    g = torch.Generator().manual_seed(0)
    target(torch.randint(0, V, (1, ctx_len), generator=g), cache, slots, torch.tensor([0]))

    def step(x):
        h, _ = target(x, cache, slots, start)
        return target.logits(h)

    torch._dynamo.reset()
    compiled = torch.compile(step, dynamic=False)
    out = {}
    for T in sizes:
        x = torch.randint(0, V, (1, T), generator=g)
        t0 = time.perf_counter()
        first = compiled(x)
        compile_s = time.perf_counter() - t0
        same = bool(torch.equal(first.argmax(-1), step(x).argmax(-1)))
        eager, comp = [], []
        for _ in range(reps):
            for fn, ts in ((step, eager), (compiled, comp)):
                t0 = time.perf_counter()
                fn(x)
                ts.append(time.perf_counter() - t0)
        e, c = statistics.median(eager) * 1000, statistics.median(comp) * 1000
        out[T] = {"eager_ms": round(e, 2), "compiled_ms": round(c, 2), "speedup": round(e / c, 3),
                  "compile_s": round(compile_s, 1), "same_argmax": same}
    return {"ctx_len": ctx_len, "by_tokens": out}


@torch.inference_mode()   # as the engine's step: the prepacked linears run only without autograd
def int8_linear_cost(target, rows=(1, 4, 16), reps: int = 30) -> dict:
    """Weight-only int8 (per-output-channel scales, `aten._weight_int8pack_mm`) against
    the target's own linears (its dtype, prepacked where it does that) on the target's
    layer shapes, timed alternately in one run; error = max relative deviation."""
    op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
    if op is None:
        return {"available": False}
    layer = target.layers[0]
    shapes = {"q/k/v (packed)": layer.self_attn._qkv_w if getattr(layer.self_attn, "_qkv_w", None) is not None
              else layer.self_attn.q_proj.weight,
              "o_proj": layer.self_attn.o_proj.weight, "down_proj": layer.mlp.down_proj.weight}
    head = target.embed_tokens.weight if target.lm_head is None else target.lm_head.weight
    shapes["LM head"] = head
    g = torch.Generator().manual_seed(0)
    out = {"available": True, "dtype": str(target.dtype).replace("torch.", ""), "by_shape": {}}
    for name, w in shapes.items():
        w = w.detach()
        scales = (w.float().abs().amax(1) / 127.0).clamp_min(1e-8)
        wq = (w.float() / scales[:, None]).round().clamp(-128, 127).to(torch.int8).contiguous()
        res = {}
        for R in rows:
            x = torch.randn(R, w.shape[1], generator=g).to(target.dtype)
            ref = torch.nn.functional.linear(x, w)
            try:
                q = op(x, wq, scales.to(x.dtype))
            except RuntimeError as e:   # dtype / shape combinations the CPU kernel lacks
                res[R] = {"error": str(e).splitlines()[0][:120]}
                continue
            err = float(((q.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)))
            base, quant = [], []
            for _ in range(reps):
                for fn, ts in ((lambda: torch.nn.functional.linear(x, w), base), (lambda: op(x, wq, scales.to(x.dtype)),
                                                                                  quant)):
                    t0 = time.perf_counter()
                    fn()
                    ts.append(time.perf_counter() - t0)
            b_ms, q_ms = statistics.median(base) * 1000, statistics.median(quant) * 1000
            res[R] = {"linear_ms": round(b_ms, 3), "int8_ms": round(q_ms, 3), "speedup": round(b_ms / q_ms, 2),
                      "max_rel_err": round(err, 4)}
        out["by_shape"][f"{name} {tuple(w.shape)}"] = res
    return out


def hf_generate_tps(target_spec: str, prompts: list[list[int]], max_new_tokens: int,
                    dtype: torch.dtype = torch.float32) -> tuple[float, list[list[int]]]:
    """transformers' greedy `generate` on the prompts one after another -> (tokens/s, outputs)."""
    from .bench_peers import HFGenerate
    from .models.registry import resolve_model
    model = HFGenerate(str(resolve_model(target_spec).folder), dtype)
    n, secs, outs = 0, 0.0, []
    for ids in prompts:
        t0 = time.perf_counter()
        new = model.generate(ids, max_new_tokens)
        secs += time.perf_counter() - t0
        outs.append(new)
        n += len(new)
    return n / secs, outs


def main(argv=None) -> int:
    from .clitools import apply_runtime_args, int_list, threshold_list
    from .runtime import dtype_name
    args = _parser().parse_args(argv)
    dtype = apply_runtime_args("dflash bench", args)
    block_sizes = int_list(args.block_sizes, "--block-sizes", "dflash bench") or [args.block_size]
    batch_sizes = int_list(args.batch_sizes, "--batch-sizes", "dflash bench")
    thresholds = threshold_list(args.draft_thresholds, "--draft-thresholds", "dflash bench") or [0.0]
    out = sys.stderr if args.json else sys.stdout
    from .api import build_engine
    from .chat import encode_prompt
    from .clitools import CliError
    from .engine import EngineConfig, resolve_kv_cache_dtype
    from .sampling import SamplingParams

    if args.mm_ab and not args.verify_cost:
        raise CliError("dflash bench: --mm-ab compares verify costs; add --verify-cost")
    if args.verify_ctx is not None and not args.verify_cost:
        raise CliError("dflash bench: --verify-ctx sets the context of --verify-cost; add --verify-cost")
    verify_ctx = int_list(args.verify_ctx or "128", "--verify-ctx", "dflash bench")
    if not verify_ctx:
        raise CliError("dflash bench: --verify-ctx needs at least one context length")
    if args.verify_tokens is not None and not args.verify_cost:
        raise CliError("dflash bench: --verify-tokens sets the forwards of --verify-cost; add --verify-cost")
    vt = tuple(int_list(args.verify_tokens, "--verify-tokens", "dflash bench")) if args.verify_tokens else VERIFY_TOKENS
    if not vt:
        raise CliError("dflash bench: --verify-tokens needs at least one token count")
    try:
        base = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=0,
                              ignore_eos=args.ignore_eos)
    except ValueError as e:
        raise CliError(f"dflash bench: {e}")
    engine, tok = build_engine(args.target, args.drafter, EngineConfig(
        max_slots=max([1] + batch_sizes), max_seq_len=1024 + args.max_new_tokens, block_size=max(block_sizes),
        kv_cache_dtype=args.kv_cache_dtype, draft_corpus=args.draft_corpus),
        device=args.device, dtype=dtype, drafter_weights=args.drafter_weights)
    if args.dataset == "bench":
        texts = (BENCH_PROMPTS * (args.num_prompts // len(BENCH_PROMPTS) + 1))[:args.num_prompts]
        prompts = [encode_prompt(tok, t, chat=True) for t in texts]
    else:
        from .datasets import load_eval_prompts
        prompts = load_eval_prompts(args.dataset, tok, args.num_prompts, args.max_prompt_tokens)
        if not prompts:
            raise CliError(f"dflash bench: no {args.dataset} prompt fits --max-prompt-tokens {args.max_prompt_tokens}")

    if args.peers:
        return _peers(args, engine, tok, dtype, out)
    # warm-up (first calls allocate)
    engine.generate([prompts[0]], SamplingParams(max_new_tokens=4))
    from .api import resolve_drafter_weights
    summary = {"target": args.target, "drafter": args.drafter,
               "drafter_weights": resolve_drafter_weights(args.drafter_weights, args.device, dtype),
               "dtype": dtype_name(dtype), "dataset": args.dataset,
               "temperature": args.temperature, "num_prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
               "threads": torch.get_num_threads(), "kv_cache_dtype": dtype_name(engine.cache.k_all.dtype)}
    # each A/B mode: (summary key, label, context manager factory yielding the count swapped)
    off_modes = []
    if args.prepack_ab:
        off_modes.append(("prepacked_off", "prepacked linears off", lambda: prepacked_off(engine)))
    # the native linears, counted without building their fallbacks (only --native-ab needs those)
    formats: dict[str, int] = {}
    for _, _, fn, _ in _linear_swaps(engine, lambda fn: None if hasattr(fn, "native") else False):
        formats[fn.native_format] = formats.get(fn.native_format, 0) + 1
    from . import native
    summary["native_linears"] = {"count": sum(formats.values()), "formats": formats, "why_not": native.reason(),
                                 # fp32 lanes per accumulator of the kernel build (8 AVX2, 16 AVX-512)
                                 "vector_width": native.vector_width() if formats else 0,
                                 # the quantised weights in AMX forms (q4_1x / q8_0x, dflash_amx.c)
                                 "amx": any(f in native.AMX_KINDS for f in formats),
                                 # what those take as input (--amx-inputs)
                                 "amx_inputs": native.amx_inputs()}
    nswaps = native_swaps(engine) if args.native_ab else []
    if args.native_ab and not nswaps:
        raise CliError("dflash bench: --native-ab: this engine has no native linears ("
                       + (native.reason() or "they take fp32 on a CPU") + ")")
    if args.native_ab:
        off_modes.append(("native_off", "native linears off", lambda: _swapped(nswaps)))
    amx_keep: dict = {}   # amx_off's fp32 KV cache where the engine's "auto" one is bf16 (made once)
    aswaps = amx_swaps(engine) if args.amx_ab else []
    if args.amx_ab and not aswaps:
        raise CliError("dflash bench: --amx-ab: this engine has no AMX linears ("
                       + ("the native kernel is off: " + native.reason() if native.reason() else
                          "they need a CPU with AMX-BF16 and the native fp32 path; DFLASH_NATIVE_AMX=0 turns them off")
                       + ")")
    if args.amx_ab:
        off_modes.append(("amx_off", "AMX linears off", lambda: amx_off(engine, aswaps, amx_keep)))
    if args.amx_inputs_ab:
        other_inputs = "fp32" if native.amx_inputs() == "bf16" else "bf16"
        iswaps = amx_inputs_swaps(engine, other_inputs)
        if not iswaps:
            raise CliError("dflash bench: --amx-inputs-ab: this engine has no AMX linears ("
                           + (native.reason() or "they need a CPU with AMX-BF16 and the native fp32 path") + ")")
        off_modes.append((f"amx_inputs_{other_inputs}", f"AMX linears taking {other_inputs}",
                          lambda: amx_off(engine, iswaps, amx_keep)))
    if args.amx_attention_ab:
        if not engine.target.attention_rounds_kv():
            raise CliError("dflash bench: --amx-attention-ab: this engine's attention is not on AMX tiles (it needs "
                           "the native layers with every linear in the bf16-input AMX forms, on a CPU with AMX)")
        att_keep: dict = {}
        att_cache = engine.cache.k_all.dtype
        # the cache --amx-attention off builds (what _auto_cache swaps in)
        att_off_cache = resolve_kv_cache_dtype(engine.config.kv_cache_dtype, engine.target.dtype)
        off_modes.append(("amx_attention_off", f"fp32 attention, {dtype_name(att_off_cache)} KV cache",
                          lambda: amx_attention_off(engine, att_keep)))
    kv_other = None
    if args.kv_cache_ab:
        kv_other = torch.float32 if engine.cache.k_all.dtype == torch.bfloat16 else torch.bfloat16
        if kv_other == torch.float32 and engine.target.dtype != torch.float32:
            raise CliError("dflash bench: --kv-cache-ab compares a float32 cache with a bfloat16 one: use --dtype float32")
        kv_keep: dict = {}
        off_modes.append((f"kv_cache_{dtype_name(kv_other)}", f"KV cache {dtype_name(kv_other)}",
                          lambda: kv_cache_set(engine, kv_other, kv_keep)))
    if args.drafter_weights_ab:
        if engine.drafting is None or not hasattr(engine.drafting.backend, "drafter"):
            raise CliError("dflash bench: --drafter-weights-ab needs a drafter")
        if dtype != torch.float32:
            raise CliError("dflash bench: --drafter-weights-ab compares fp32 drafter weights with q8_0: use "
                           "--dtype float32")
        other = "stored" if summary["drafter_weights"] == "q8_0" else "q8_0"
        alt = other_weights_backend(engine, args.drafter, args.target, args.device, dtype, other)
        off_modes.append((f"drafter_weights_{other}", f"drafter weights {other}",
                          lambda: drafter_swapped(engine, alt)))
    if args.layers_ab:
        if engine.target._native_layers is None:
            raise CliError("dflash bench: --layers-ab: this engine has no native decoder layers ("
                           + (native.reason() or "they take fp32 on a CPU, every linear native") + ")")
        off_modes.append(("layers_off", "native layers off", lambda: layers_off(engine)))
    if args.kernel_source_ab:
        if engine.target._native_layers is None:
            raise CliError("dflash bench: --kernel-source-ab: this engine has no native decoder layers ("
                           + (native.reason() or "they take fp32 on a CPU, every linear native") + ")")
        if not os.path.isfile(args.kernel_source_ab):
            raise CliError(f"dflash bench: --kernel-source-ab: no file {args.kernel_source_ab}")
        try:
            lfns = native.layer_build(args.kernel_source_ab)
        except (OSError, RuntimeError, AttributeError) as e:
            raise CliError(f"dflash bench: --kernel-source-ab: could not build {args.kernel_source_ab}: {e}") from None
        off_modes.append(("kernel_source", f"layers built with {args.kernel_source_ab}", lambda: kernel_source_set(lfns)))
    for field, value, ab in (("draft_tree", args.draft_tree, args.tree_ab),
                             ("draft_lookup", args.draft_lookup, args.lookup_ab)):
        setattr(engine.config, field, value == "on")
        summary[field] = getattr(engine, _SWITCHES[field])
        if ab:   # the other setting, back to back
            other = "off" if value == "on" else "on"
            off_modes.append((f"{field}_{other}", f"{field.replace('_', ' ')} {other}",
                              lambda field=field, other=other: _switch_set(engine, field, other == "on")))
    summary["draft_corpus"] = engine.draft_corpus
    if args.corpus_ab:
        if engine.corpus is None:
            raise CliError("dflash bench: --corpus-ab compares planning with a corpus index and without: this run "
                           "loads none (--draft-corpus)")
        off_modes.append(("draft_corpus_off", "draft corpus off", lambda: corpus_set(engine, None)))
    if args.draft_call_ab:
        nd = engine.drafting.native_draft if engine.drafting is not None else None
        if nd is None or nd[1] is None:   # (the warm-up above drafted a step)
            raise CliError("dflash bench: --draft-call-ab: this engine's draft step does not run as one native call "
                           "(it needs this process's fp32 drafter with every linear native, a drafting vocabulary and "
                           "the native kernel: " + (native.reason() or "on") + ")")
        off_modes.append(("draft_call_off", "draft step as its own calls", draft_call_off))
    runs, runs_off, n_off = {}, {key: {} for key, _, _ in off_modes}, {}
    plain_outputs: list[list[int]] = []   # --amx-inputs-ab / --kv-cache-ab: the responses next_token_agreement reads
    by_threshold: dict[str, dict] = {}
    for b in block_sizes:
        engine.config.block_size = b   # verified block size of this run (<= the engine's capacity)
        for thr in thresholds:
            engine.config.draft_threshold = thr
            if len(thresholds) > 1:
                print(f"draft threshold {thr:g}", file=out)
            r = _ar_vs_dflash(engine, prompts, base, args.repeats, args.temperature, out,
                              plain_outputs if (args.amx_inputs_ab or args.kv_cache_ab or args.amx_attention_ab)
                              and not plain_outputs else None)
            by_threshold.setdefault(f"{thr:g}", {})[str(b)] = r
            runs.setdefault(b, r)   # the first threshold's run stands for the block size
        engine.config.draft_threshold = thresholds[0]
        for key, label, ctx in off_modes:
            with ctx() as n_off[key]:
                print(f"({n_off[key]} {label})", file=out)
                runs_off[key][b] = _ar_vs_dflash(engine, prompts, base, args.repeats, args.temperature, out)
    for key, _, _ in off_modes:
        summary[key] = {"num_linears": n_off.get(key, 0),
                        "by_block_size": {str(b): r for b, r in runs_off[key].items()}}
    if args.amx_inputs_ab:   # how far the two input kinds' models are apart, on the plain responses
        fp32_loaded = native.amx_inputs() == "fp32"
        ag = next_token_agreement(engine, prompts, plain_outputs, lambda: amx_off(engine, iswaps, amx_keep),
                                  reference_is_variant=not fp32_loaded)
        print(f"next-token agreement of bf16 and fp32 inputs over {ag['positions']} response positions: "
              f"argmax {ag['argmax_agreement']:.4f}, mean KL(fp32 || bf16) {ag['mean_kl']:.2e}", file=out)
        summary[f"amx_inputs_{other_inputs}"]["next_token_agreement"] = ag
    if args.amx_attention_ab:   # how far the two attentions' models are apart, on the plain responses
        ag = next_token_agreement(engine, prompts, plain_outputs, lambda: amx_attention_off(engine, att_keep),
                                  reference_is_variant=True)
        print(f"next-token agreement of AMX and fp32 attention over {ag['positions']} response positions: "
              f"argmax {ag['argmax_agreement']:.4f}, mean KL(fp32 || AMX) {ag['mean_kl']:.2e}", file=out)
        summary["amx_attention_off"]["next_token_agreement"] = ag
    if args.kv_cache_ab:   # how far the two caches' models are apart, on the plain responses
        fp32_loaded = engine.cache.k_all.dtype == torch.float32
        ag = next_token_agreement(engine, prompts, plain_outputs, lambda: kv_cache_set(engine, kv_other, kv_keep),
                                  reference_is_variant=not fp32_loaded)
        print(f"next-token agreement of a bf16 and an fp32 KV cache over {ag['positions']} response positions: "
              f"argmax {ag['argmax_agreement']:.4f}, mean KL(fp32 || bf16) {ag['mean_kl']:.2e}", file=out)
        summary[f"kv_cache_{dtype_name(kv_other)}"]["next_token_agreement"] = ag
    first = runs[block_sizes[0]]
    summary.update(block_size=block_sizes[0], **first)
    if len(block_sizes) > 1:
        summary["by_block_size"] = {str(b): r for b, r in runs.items()}
    summary["draft_threshold"] = thresholds[0]
    if len(thresholds) > 1:
        summary["by_draft_threshold"] = by_threshold
    if args.calibration:
        cal = draft_calibration(engine, prompts, base, max(block_sizes))
        print(f"drafter calibration, block {cal['block_size']}, {cal['steps']} steps: running confidence bin -> "
              "steps, accepted", file=out)
        for j, rows in cal["by_position"].items():
            print(f"  position {j}: " + ", ".join(f"{r['bin']} {r['steps']} {r['accepted']:.0%}" for r in rows
                                                  if r["steps"]), file=out)
        summary["calibration"] = cal
    if args.verify_cost:
        seq_modes = [(None, "", contextlib.nullcontext)] + [m for m in off_modes if m[0] == "prepacked_off"]
        for key, label, ctx in seq_modes:
            with ctx():
                vc = verify_cost(engine.target, ctx_len=verify_ctx[0], sizes=vt, reps=max(2, args.verify_reps))
            print((label + ", " if label else "") + f"verify forward cost (ctx {vc['ctx_len']}): " + _cost_line(vc),
                  file=out)
            dest = summary[key] if key else summary
            dest["verify_ms"] = {str(k): round(v, 2) for k, v in vc["ms"].items()}
            dest["verify_relative_to_1"] = {str(k): round(v, 3) for k, v in vc["relative_to_1"].items()}
        if args.native_ab:
            summary["native_ab"] = {"num_linears": len(nswaps), **_verify_ab(
                engine.target, args.verify_reps, {"native": contextlib.nullcontext, "torch": lambda: _swapped(nswaps)},
                "{} linears", out, verify_ctx[0], vt)}
        if len(verify_ctx) > 1:   # how the cost of verified rows grows with the cached context
            summary["verify_ms_by_ctx"] = {str(verify_ctx[0]): summary["verify_ms"]}   # measured above
            for c in verify_ctx[1:]:
                vc = verify_cost(engine.target, ctx_len=c, sizes=vt, reps=max(2, args.verify_reps))
                print(f"verify forward cost (ctx {c}): " + _cost_line(vc), file=out)
                summary["verify_ms_by_ctx"][str(c)] = {str(k): round(v, 2) for k, v in vc["ms"].items()}
        if args.amx_ab:
            summary["amx_ab"] = {"num_linears": len(aswaps), **_verify_ab(
                engine.target, args.verify_reps, {"AMX": contextlib.nullcontext, "FMA": lambda: amx_off(engine, aswaps, amx_keep)},
                "{} linears", out, verify_ctx[0], vt)}
        if args.amx_inputs_ab:
            summary["amx_inputs_ab"] = {"num_linears": len(iswaps), **_verify_ab(
                engine.target, args.verify_reps, {f"{native.amx_inputs()} inputs": contextlib.nullcontext,
                                                  f"{other_inputs} inputs": lambda: amx_off(engine, iswaps, amx_keep)},
                "{}", out, verify_ctx[0], vt)}
        if args.amx_attention_ab:   # each token count at each cached context, the two alternating
            on_name = f"AMX attention, {dtype_name(att_cache)} KV cache"
            off_name = f"fp32 attention, {dtype_name(att_off_cache)} KV cache"
            summary["amx_attention_ab"] = {str(c): _verify_ab(
                engine.target, args.verify_reps, {on_name: contextlib.nullcontext, off_name: amx_attention_off},
                "{}", out, c, vt, cache_dtypes={on_name: att_cache, off_name: att_off_cache}) for c in verify_ctx}
        if args.layers_ab:
            summary["layers_ab"] = _verify_ab(
                engine.target, args.verify_reps,
                {"native layers": contextlib.nullcontext, "torch layers": lambda: layers_off(engine)}, "{}", out,
                verify_ctx[0], vt)
        if args.kernel_source_ab:   # each token count at each cached context, the two builds alternating
            summary["kernel_source_ab"] = {str(c): _verify_ab(
                engine.target, args.verify_reps,
                {"layers as built": contextlib.nullcontext, "layers with the file": lambda: kernel_source_set(lfns)},
                "{}", out, c, vt) for c in verify_ctx}
        if args.mm_ab:
            swaps = small_mm_swaps(engine)   # the packed versions built once, swapped in per forward
            n_mm = len(swaps)
            ab = verify_cost(engine.target, ctx_len=verify_ctx[0], sizes=vt, reps=max(2, args.verify_reps),
                             variants={"mm": contextlib.nullcontext, "packed": lambda: _swapped(swaps)})
            for name, vc in ab.items():
                print(f"{name}: verify forward cost (ctx {vc['ctx_len']}, {n_mm} small fp32 linears): " +
                      ", ".join(f"{T} tok {ms:.1f} ms" for T, ms in vc["ms"].items()), file=out)
            summary["small_mm_ab"] = {"num_linears": n_mm, **{
                name: {"verify_ms": {str(k): round(v, 2) for k, v in vc["ms"].items()}} for name, vc in ab.items()}}
    if args.prefill_ab:
        pa = prefill_ab(engine.target, reps=max(2, args.verify_reps))
        if "error" in pa:
            print(f"prefill A/B: {pa['error']}", file=out)
        for T, r in pa.get("by_tokens", {}).items():
            print(f"prefill of {T} tokens: native up to {pa['max_rows']['build']} rows {r['build_ms']} ms, "
                  f"up to {pa['max_rows']['avx2']} rows {r['avx2_ms']} ms ({r['speedup']}x); decode forms "
                  f"{r['decode_forms_ms']} ms ({r['forms_speedup']}x, same argmax: {r['forms_same_argmax']})", file=out)
        summary["prefill_ab"] = pa
    if args.int8:
        ic = int8_linear_cost(engine.target)
        for shape, res in ic.get("by_shape", {}).items():
            print(f"int8 weight-only, {shape}: " + ", ".join(
                f"{R} rows {r['linear_ms']} -> {r['int8_ms']} ms ({r['speedup']}x, err {r['max_rel_err']})"
                if "error" not in r else f"{R} rows: {r['error']}" for R, r in res.items()), file=out)
        summary["int8"] = ic
    if args.compile:
        cc = compile_cost(engine.target)
        for T, r in cc["by_tokens"].items():
            print(f"torch.compile, {T}-token forward: eager {r['eager_ms']} ms, compiled {r['compiled_ms']} ms "
                  f"({r['speedup']}x), compile {r['compile_s']} s, same argmax {r['same_argmax']}", file=out)
        summary["compile"] = cc
    if batch_sizes:
        summary["batched_ar_tokens_per_s"] = {}
        for rows in batch_sizes:
            for key, label, ctx in [(None, "", contextlib.nullcontext)] + off_modes:
                with ctx():
                    tps = batched_ar_tps(engine, prompts, rows, args.max_new_tokens)
                print(f"{label + ', ' if label else ''}batched autoregressive, {rows} rows: {tps:.1f} tok/s", file=out)
                dest = summary[key] if key else summary
                dest.setdefault("batched_ar_tokens_per_s", {})[str(rows)] = round(tps, 2)
    if args.vs_hf:
        hf_prompts = prompts[:min(2, len(prompts))]
        n_eng, t_eng = 0, 0.0
        for ids in hf_prompts:  # the engine's AR with a fixed token count, as HF below
            t0 = time.perf_counter()
            [r] = engine.generate([ids], SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True,
                                                       speculative=False))
            t_eng += time.perf_counter() - t0
            n_eng += len(r.token_ids)
        hf_tps, _ = hf_generate_tps(args.target, hf_prompts, args.max_new_tokens, dtype)
        eng_tps = n_eng / t_eng
        print(f"engine autoregressive {eng_tps:.2f} tok/s vs transformers generate {hf_tps:.2f} tok/s "
              f"({eng_tps / hf_tps:.2f}x, {dtype_name(dtype)})", file=out)
        summary.update(engine_ar_tokens_per_s=round(eng_tps, 3), hf_generate_tokens_per_s=round(hf_tps, 3))
    print(json.dumps(summary))
    return 0


def _peers(args, engine, tok, dtype, out) -> int:
    from .bench_peers import _prompt_sets, build_systems, run_peers, write_chart
    from .runtime import dtype_name
    systems, skipped = build_systems(args.target, engine, dtype, torch.get_num_threads())
    for name, why in skipped.items():
        print(f"skipped {name}: {why}", file=out)
    summary = run_peers(systems, _prompt_sets(tok, args.peer_prompts), args.max_new_tokens, out)
    if args.peers_plot:
        write_chart(args.peers_plot, summary)
    print(json.dumps({"target": args.target, "drafter": args.drafter, "dtype": dtype_name(dtype),
                      "block_size": engine.config.block_size, "max_new_tokens": args.max_new_tokens,
                      "threads": torch.get_num_threads(), "results": summary, "skipped": skipped}))
    return 0


def draft_calibration(engine, prompts, base, block_size: int, positions: int = 3) -> dict:
    """Decode each prompt with DFlash at `block_size` (every draft verified) and count, per
    block position j <= `positions` and 0.1-wide bin of the running product of the drafter's
    confidences up to j (speculative.draft(confidence=True): what drafts_to_verify reads),
    the steps and the share whose draft j was accepted. Chains (draft_tree off meanwhile)."""
    from . import speculative
    real_draft, real_accept = speculative.draft, speculative.accept
    pending: list = []
    counts = [[[0, 0] for _ in range(10)] for _ in range(positions)]

    def draft(*a, **k):
        k["confidence"] = True
        tokens, q, conf, top = real_draft(*a, **k)
        pending.append(conf.cumprod(dim=1))
        return tokens, q, conf if engine.config.draft_threshold > 0 else None, top

    def accept(*a, **k):
        acc, nxt = real_accept(*a, **k)
        if not pending:   # a step that drafted nothing
            return acc, nxt
        run = pending.pop()
        for r, n_acc in enumerate(acc.tolist()):
            for j in range(min(positions, run.shape[1])):
                c = counts[j][min(int(float(run[r, j]) * 10), 9)]
                c[0] += 1
                c[1] += n_acc > j
        return acc, nxt
    old_b, old_thr, old_tree = engine.config.block_size, engine.config.draft_threshold, engine.config.draft_tree
    speculative.draft, speculative.accept = draft, accept
    try:   # chains: the calibration is of each draft position's own acceptance
        engine.config.block_size, engine.config.draft_threshold, engine.config.draft_tree = block_size, 0.0, False
        for p in prompts:
            engine.generate([p], base)
    finally:
        speculative.draft, speculative.accept = real_draft, real_accept
        engine.config.block_size, engine.config.draft_threshold, engine.config.draft_tree = old_b, old_thr, old_tree
    return {"block_size": block_size, "steps": sum(c[0] for c in counts[0]),
            "by_position": {str(j + 1): [{"bin": f"{i / 10:.1f}-{(i + 1) / 10:.1f}", "steps": c[0],
                                         "accepted": round(c[1] / c[0], 4) if c[0] else None}
                                        for i, c in enumerate(counts[j])] for j in range(positions)}}


def _ar_vs_dflash(engine, prompts, base, repeats: int, temperature: float, out, outputs: list | None = None) -> dict:
    """Each prompt autoregressive then DFlash, back to back (speedup.run_modes); `outputs`
    (a list) receives the autoregressive token ids of each prompt's first repeat."""
    from .speedup import run_modes
    runs = run_modes(engine, prompts, base, repeats=repeats)
    ar, df = runs["ar"], runs["dflash"]
    if outputs is not None:
        outputs.extend(list(r.token_ids) for r in ar.results[:len(prompts)])
    print(f"block size {engine.config.block_size}", file=out)
    print(f"{'prompt':>6} {'prompt_tok':>10} {'new_tok':>8} {'ar_tok/s':>9} {'dflash_tok/s':>12} {'tau':>6} {'speedup':>8}",
          file=out)
    for k, (r_ar, r_df) in enumerate(zip(ar.results, df.results)):
        i = k % len(prompts)
        ar_tps, df_tps = len(r_ar.token_ids) / ar.seconds[k], len(r_df.token_ids) / df.seconds[k]
        print(f"{i:>6} {len(prompts[i]):>10} {len(r_df.token_ids):>8} {ar_tps:>9.2f} {df_tps:>12.2f} "
              f"{r_df.stats.mean_acceptance_length:>6.2f} {df_tps / ar_tps:>7.2f}x", file=out)
    print(f"{'all':>6} {'':>10} {df.tokens:>8} {ar.tokens_per_s:>9.2f} {df.tokens_per_s:>12.2f} {df.tau:>6.2f} "
          f"{df.tokens_per_s / ar.tokens_per_s:>7.2f}x", file=out)
    same = ar.outputs == df.outputs
    return {"ar_tokens_per_s": round(ar.tokens_per_s, 3), "dflash_tokens_per_s": round(df.tokens_per_s, 3),
            "acceptance_length": round(df.tau, 3), "speedup": round(df.tokens_per_s / ar.tokens_per_s, 3),
            "greedy_outputs_identical": same if temperature == 0 else None}


if __name__ == "__main__":
    sys.exit(main())
