"""SpecEngine: losslessness (greedy token for token, sampling in distribution), stop
handling, slots, errors. Real computations on tiny random models."""
from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from dflash_core.api import tiny_random_target
from dflash_core.drafter import DFlashDrafter, LocalDraftBackend
from dflash_core.engine import EngineConfig, SpecEngine
from dflash_core.sampling import SamplingParams, warp_probs

PROMPTS = [[5, 6, 7], [100, 200, 300, 400, 500, 600, 700], [9], list(range(1000, 1023))]
PENALTIES = dict(presence_penalty=0.6, frequency_penalty=0.4, repetition_penalty=1.5)


def make_engine(target, block_size=8, drafter=True, max_slots=4, max_seq_len=160, schedule=None, seed=0, eos=(),
                draft_vocab=None, draft_threshold=0.0):
    cfg = EngineConfig(max_slots=max_slots, max_seq_len=max_seq_len, block_size=block_size, block_size_schedule=schedule,
                       draft_threshold=draft_threshold)
    backend = None
    if drafter:
        d = DFlashDrafter.from_target(target.config, num_layers=1, block_size=block_size, mask_token_id=3,
                                      num_features=2, seed=seed)
        d.config.draft_vocab = draft_vocab
        backend = LocalDraftBackend(d, max_slots, max_seq_len + block_size + 1)
    return SpecEngine(target, backend, cfg, eos_token_ids=eos)


def naive_greedy(target, prompt, n):
    """Reference: recompute the whole sequence from scratch for every token."""
    seq = list(prompt)
    for _ in range(n):
        cache = target.new_cache(1, len(seq) + 1)
        h, _ = target(torch.tensor([seq]), cache, torch.tensor([0]), torch.tensor([0]))
        seq.append(int(target.logits(h[0, -1]).argmax()))
    return seq[len(prompt):]


@pytest.fixture(scope="module")
def target():
    return tiny_random_target(vocab_size=2048, num_layers=3, seed=1)


def test_greedy_equals_target_with_random_drafter(target):
    n = 40
    ref = [naive_greedy(target, p, n) for p in PROMPTS]
    assert len({tuple(r) for r in ref}) == len(ref) and all(len(set(r)) > 5 for r in ref)  # varied text
    for b in (16, 8):
        eng = make_engine(target, block_size=b)
        out = eng.generate(PROMPTS, SamplingParams(max_new_tokens=n, ignore_eos=True))
        assert [o.token_ids for o in out] == ref
        assert all(o.finish_reason == "length" for o in out)
        st = out[0].stats
        assert st.num_draft_tokens == st.num_steps * (b - 1)
        assert eng.num_free_slots == 4 and not eng.has_unfinished_requests()
    ar = make_engine(target, block_size=1, drafter=False)
    assert [o.token_ids for o in ar.generate(PROMPTS, SamplingParams(max_new_tokens=n, ignore_eos=True))] == ref


class OracleDraftBackend:
    """A drafter forced to propose exactly m correct tokens then a wrong one, m cycling
    0..B-1 per row and step, so every acceptance length 1..B occurs. It returns target
    hidden states of a reference run (whose argmax is the reference token) and their
    negation (whose argmax is the reference's argmin, certainly wrong)."""

    def __init__(self, engine_ref, ref_hidden: dict, block_size: int, mask_token_id: int, layer_ids):
        self.engine = engine_ref
        self.ref_hidden = ref_hidden            # tuple(prompt) -> [L, hidden]
        self.config = SimpleNamespace(block_size=block_size, mask_token_id=mask_token_id,
                                      target_layer_ids=list(layer_ids))
        self.cycle = {}
        self.context = {}                       # slot -> positions handed over so far
        self.violations = 0

    def draft(self, ctx_slots, ctx_positions, ctx_features, slots, block_emb, block_positions):
        R, B, H = block_emb.shape
        by_slot = {s.slot: s for s in self.engine.running.values()}
        for s, pos in zip(ctx_slots.tolist(), ctx_positions.tolist()):
            self.context.setdefault(s, []).append(pos)
        out = torch.zeros(R, B, H)
        for r in range(R):
            seq = by_slot[int(slots[r])]
            ref = self.ref_hidden[tuple(seq.prompt)]
            start = int(block_positions[r, 0])
            # the drafter must have seen exactly the committed tokens before the anchor
            self.violations += sorted(self.context.get(int(slots[r]), [])) != list(range(start))
            m = self.cycle.setdefault(seq.request_id, itertools.cycle(range(B)))
            m = next(m)
            for k in range(1, B):
                pos = min(start + k - 1, ref.shape[0] - 1)
                out[r, k] = ref[pos] if k <= m else -ref[pos]
        return out

    def free(self, slot):
        self.context.pop(slot, None)


def reference_hidden(target, ref):
    """tuple(prompt) -> the target's hidden states [L, hidden] over prompt + its reference
    continuation (what OracleDraftBackend drafts from)."""
    out = {}
    for p, r in zip(PROMPTS, ref):
        seq = p + r
        cache = target.new_cache(1, len(seq) + 1)
        h, _ = target(torch.tensor([seq]), cache, torch.tensor([0]), torch.tensor([0]))
        out[tuple(p)] = h[0]
    return out


@pytest.mark.parametrize("block_size", [8, 16])
def test_every_acceptance_length_is_exact(target, block_size):
    n = block_size * (block_size + 1) // 2 + 20  # one full cycle of m = 0..B-1
    ref = [naive_greedy(target, p, n) for p in PROMPTS]
    ref_hidden = reference_hidden(target, ref)
    cfg = EngineConfig(max_slots=4, max_seq_len=200, block_size=block_size)
    backend = OracleDraftBackend(None, ref_hidden, block_size, 3, [0, 2])
    eng = SpecEngine(target, backend, cfg)
    backend.engine = eng
    out = eng.generate(PROMPTS, SamplingParams(max_new_tokens=n, ignore_eos=True))
    assert [o.token_ids for o in out] == ref
    for o in out:
        seen = set(o.stats.acceptance_lengths[:-1])  # the last step may be cut by max tokens
        assert seen == set(range(1, block_size + 1)), seen
        assert o.stats.num_accepted_tokens == sum(o.stats.acceptance_lengths) - len(o.stats.acceptance_lengths)
        assert o.stats.accepted_per_position[0] >= o.stats.accepted_per_position[-1] > 0
    assert backend.violations == 0 and not backend.context  # context exact; all slots freed


def test_drafts_to_verify_reads_the_running_product_of_confidences():
    from dflash_core.speculative import drafts_to_verify
    conf = torch.tensor([[0.9, 0.5, 0.9], [0.2, 0.9, 0.9], [0.6, 0.6, 0.6], [0.3, 1.0, 1.0], [0.99, 0.99, 0.99]])
    # running products: .9 .45 .405 | .2 .. | .6 .36 .216 | .3 .3 .3 | .99 .98 .97
    assert drafts_to_verify(conf, 0.3).tolist() == [3, 0, 2, 3, 3]
    assert drafts_to_verify(conf, 0.5).tolist() == [1, 0, 1, 0, 3]
    assert drafts_to_verify(conf, 0.0).tolist() == [3, 3, 3, 3, 3]
    # a later confident draft never revives the block after an unsure one
    assert drafts_to_verify(torch.tensor([[0.1, 1.0, 1.0]]), 0.05).tolist() == [3]
    assert drafts_to_verify(torch.tensor([[0.9, 0.1, 1.0]]), 0.5).tolist() == [1]
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="draft_threshold"):
            EngineConfig(draft_threshold=bad)


def test_kv_cache_dtype_is_checked_resolved_and_builds_the_cache():
    """EngineConfig.kv_cache_dtype: "auto" keeps the model's dtype (bf16 where the attention
    reads K / V rounded to bf16 anyway: Decoder.attention_rounds_kv), "bfloat16" stores the
    target's K / V in bf16 under an fp32 or a bf16 model, "float32" needs an fp32 model;
    anything else is refused naming the choices. The drafter's own cache is not touched."""
    from dflash_core.engine import resolve_kv_cache_dtype
    assert EngineConfig().kv_cache_dtype == "auto"
    for bad in ("bf16", "fp32", None, torch.bfloat16, "half"):
        with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, float32, bfloat16"):
            EngineConfig(kv_cache_dtype=bad)
    assert resolve_kv_cache_dtype("auto", torch.float32) == torch.float32
    assert resolve_kv_cache_dtype("auto", torch.float32, rounds_kv=True) == torch.bfloat16   # AMX attention
    assert resolve_kv_cache_dtype("float32", torch.float32, rounds_kv=True) == torch.float32
    assert resolve_kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert resolve_kv_cache_dtype("bfloat16", torch.float32) == torch.bfloat16
    assert resolve_kv_cache_dtype("float32", torch.float32) == torch.float32
    with pytest.raises(ValueError, match="kv_cache_dtype float32 needs a float32 model"):
        resolve_kv_cache_dtype("float32", torch.bfloat16)
    target = tiny_random_target()
    for kv, want in (("auto", torch.float32), ("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        e = SpecEngine(target, None, EngineConfig(max_slots=2, max_seq_len=64, kv_cache_dtype=kv))
        assert e.cache.k_all.dtype == want and e.cache.v_all.dtype == want, kv
        out = e.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4, ignore_eos=True))
        assert len(out[0].token_ids) == 4 and e.cache.num_free == 2   # it decodes, and frees the slot
    with pytest.raises(ValueError, match="float32 needs a float32 model"):
        SpecEngine(tiny_random_target().to(torch.bfloat16), None, EngineConfig(kv_cache_dtype="float32"))


def _cycling_caps(monkeypatch, period: int):
    """drafts_to_verify replaced by a cycle 0, 1, .., period-1 over the rows of every call
    (it reads nothing of the target, like the real one): every cap occurs beside every
    acceptance length. Returns the list of caps handed out."""
    from dflash_core import speculative
    counter, handed = itertools.count(), []

    def caps(conf, threshold):
        assert 0 < threshold < 1 and conf.shape[1] >= 1
        out = torch.tensor([min(next(counter) % period, conf.shape[1]) for _ in range(conf.shape[0])])
        handed.extend(out.tolist())
        return out
    monkeypatch.setattr(speculative, "drafts_to_verify", caps)
    return handed


def test_dynamic_draft_length_is_exact_for_every_cap(target, monkeypatch):
    """Greedy, block 8, the oracle drafter (m correct drafts then a wrong one, m cycling 0..7)
    and a verify cap k cycling 0..6 (a period prime to 8, so every (k, m) pair occurs): the
    output is the target's own token for token; each step verifies k drafts (its forward
    is as long as its longest row's block) and accepts min(k, m) of them."""
    B = 8
    n = 120
    ref = [naive_greedy(target, p, n) for p in PROMPTS]
    ref_hidden = reference_hidden(target, ref)
    handed = _cycling_caps(monkeypatch, 7)
    cfg = EngineConfig(max_slots=4, max_seq_len=200, block_size=B, draft_threshold=0.5)
    backend = OracleDraftBackend(None, ref_hidden, B, 3, [0, 2])
    eng = SpecEngine(target, backend, cfg)
    backend.engine = eng
    from dflash_core import speculative
    widths = []
    real_verify = speculative.verify

    def verify_width(tgt, cache, slots, anchors, drafts, *a, **k):
        widths.append(drafts.shape[1] + 1)
        return real_verify(tgt, cache, slots, anchors, drafts, *a, **k)
    monkeypatch.setattr(speculative, "verify", verify_width)
    out = eng.generate(PROMPTS, SamplingParams(max_new_tokens=n, ignore_eos=True))
    assert [o.token_ids for o in out] == ref
    assert set(handed) == set(range(7))
    for o in out:
        assert o.stats.num_draft_tokens < o.stats.num_steps * (B - 1)     # capped blocks
        lens = set(o.stats.acceptance_lengths)
        assert set(range(1, 6)) <= lens <= set(range(1, B))   # caps of 6 at most: 7 tokens a step at most
        assert o.stats.num_accepted_tokens == sum(o.stats.acceptance_lengths) - len(o.stats.acceptance_lengths)
    assert len(set(widths)) > 3 and max(widths) <= B   # decode forwards as long as their longest row
    assert backend.violations == 0 and not backend.context


def test_dynamic_draft_length_with_real_confidences_is_exact(target):
    """The real rule on a real (random) drafter: a threshold between the drafts'
    confidences gives steps of several lengths; the output stays the target's."""
    n = 40
    ref = [naive_greedy(target, p, n) for p in PROMPTS]
    from dflash_core import speculative
    seen = []
    real = speculative.drafts_to_verify

    def spy(conf, thr):
        seen.append(conf)
        return real(conf, thr)
    speculative.drafts_to_verify = spy
    try:
        probe = make_engine(target, block_size=8, draft_threshold=0.999)
        probe.generate(PROMPTS, SamplingParams(max_new_tokens=8, ignore_eos=True))
        first = torch.cat([c[:, 0] for c in seen])
        thr = float(first.median())          # about half the first drafts pass
        seen.clear()
        eng = make_engine(target, block_size=8, draft_threshold=thr)
        out = eng.generate(PROMPTS, SamplingParams(max_new_tokens=n, ignore_eos=True))
    finally:
        speculative.drafts_to_verify = real
    assert [o.token_ids for o in out] == ref
    caps = torch.cat([real(c, thr) for c in seen])
    assert caps.min() == 0 and caps.max() >= 1
    assert sum(o.stats.num_draft_tokens for o in out) == int(caps.sum())


def test_greedy_with_a_drafting_vocabulary(target):
    """Drafts restricted to a sub-vocabulary (half of it the reference's own tokens)."""
    from dflash_core.drafter import build_draft_vocab
    n = 30
    ref = [naive_greedy(target, p, n) for p in PROMPTS]
    vocab = build_draft_vocab([r[::2] for r in ref], size=40, always=(0,))
    eng = make_engine(target, block_size=8, draft_vocab=vocab)
    out = eng.generate(PROMPTS, SamplingParams(max_new_tokens=n, ignore_eos=True))
    assert [o.token_ids for o in out] == ref
    assert eng.draft_vocab.numel() == len(vocab) <= 41


def test_greedy_batch_mixes_speculative_and_plain_rows(target):
    n = 30
    ref = [naive_greedy(target, p, n) for p in PROMPTS]
    eng = make_engine(target, block_size=8)
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True, speculative=i % 2 == 0) for i in range(4)]
    out = eng.generate(PROMPTS, params)
    assert [o.token_ids for o in out] == ref
    assert out[1].stats.num_draft_tokens == 0 and out[0].stats.num_draft_tokens > 0


def test_block_size_schedule_follows_running_rows(target):
    n = 24
    ref = [naive_greedy(target, p, n) for p in PROMPTS]
    eng = make_engine(target, block_size=8, schedule=[(1, 8), (2, 4), (100, 1)])
    assert eng.config.block_size_for(1) == 8 and eng.config.block_size_for(2) == 4 and eng.config.block_size_for(3) == 1
    out = eng.generate(PROMPTS, SamplingParams(max_new_tokens=n, ignore_eos=True))
    assert [o.token_ids for o in out] == ref
    assert out[0].stats.num_draft_tokens == 0  # 4 rows running: plain decoding all along
    [solo] = eng.generate([PROMPTS[0]], SamplingParams(max_new_tokens=n, ignore_eos=True))
    assert solo.token_ids == ref[0] and solo.stats.num_draft_tokens == 7 * solo.stats.num_steps


def test_each_output_carries_its_step_and_the_block_size_it_ran(target):
    """The per-step statistics of a request's outputs add up to its cumulative stats; the
    block size each row ran is the schedule's for the running rows, clamped to the
    drafter's block (schedule 1:16 with a block-4 drafter runs 4), 1 for a request that
    asked for plain decoding; a request is admitted exactly once and prefills its whole
    prompt; the engine's block_size() reports what the next step would run."""
    n = 20
    eng = make_engine(target, block_size=4, schedule=[(1, 16), (100, 1)])
    assert eng.block_size(1) == 4 and eng.block_size(2) == 1      # the drafter clamp, in one place
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True), SamplingParams(max_new_tokens=n, ignore_eos=True,
                                                                                  speculative=False)]
    for solo in (True, False):
        rids = ["a"] if solo else ["a", "b"]
        for rid, p in zip(rids, params):
            eng.add_request(rid, PROMPTS[3] if rid == "a" else PROMPTS[1], p)
        outs = {rid: [] for rid in rids}
        while eng.has_unfinished_requests():
            for o in eng.step():
                outs[o.request_id].append(o)
        for rid in rids:
            os_ = outs[rid]
            final = os_[-1].stats
            assert os_[-1].finished and sum(len(o.new_token_ids) for o in os_) == n
            assert sum(o.step.num_draft_tokens for o in os_) == final.num_draft_tokens
            assert sum(o.step.num_accepted_tokens for o in os_) == final.num_accepted_tokens
            assert sum(1 for o in os_ if o.step.block_size) == final.num_steps      # one verify per decode step
            assert 3 * sum(o.step.num_drafts for o in os_) == final.num_draft_tokens   # blocks of 4: 3 drafts each
            per_pos = [0] * len(final.accepted_per_position)
            for o in os_:
                for k, v in enumerate(o.step.accepted_per_position):
                    per_pos[k] += v
            assert per_pos == final.accepted_per_position
            assert sum(o.step.admitted for o in os_) == 1 and os_[0].step.admitted
            assert sum(o.step.prefill_tokens for o in os_) == len(PROMPTS[3] if rid == "a" else PROMPTS[1])
            ran = {o.step.block_size for o in os_ if o.step.block_size}
            if rid == "b":
                assert ran == {1} and final.num_draft_tokens == 0
            else:
                assert ran == ({4} if solo else {1})
                assert all(o.step.num_draft_tokens == o.step.block_size - 1 for o in os_ if o.step.block_size)


def test_stop_tokens_and_max_tokens(target):
    n = 40
    ref = naive_greedy(target, PROMPTS[1], n)
    stop = ref[10]
    first = ref.index(stop)
    eng = make_engine(target, block_size=8, eos=(stop,))
    [o] = eng.generate([PROMPTS[1]], SamplingParams(max_new_tokens=n))
    assert o.token_ids == ref[:first] and o.finish_reason == "stop"
    [o] = eng.generate([PROMPTS[1]], SamplingParams(max_new_tokens=n, ignore_eos=True, stop_token_ids=(ref[5],)))
    assert o.token_ids == ref[:ref.index(ref[5])] and o.finish_reason == "stop"
    [o] = eng.generate([PROMPTS[1]], SamplingParams(max_new_tokens=7, ignore_eos=True))
    assert o.token_ids == ref[:7] and o.finish_reason == "length"
    [o] = eng.generate([PROMPTS[1]], SamplingParams(max_new_tokens=1, ignore_eos=True))
    assert o.token_ids == ref[:1]
    assert eng.num_free_slots == 4


def test_more_requests_than_slots_and_abort(target):
    eng = make_engine(target, block_size=8, max_slots=2)
    prompts = PROMPTS * 2
    ref = [naive_greedy(target, p, 12) for p in PROMPTS] * 2
    out = eng.generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert [o.token_ids for o in out] == ref
    # abort: a running and a waiting request end with "abort" and free their slot
    p = SamplingParams(max_new_tokens=50, ignore_eos=True)
    for i in range(3):
        eng.add_request(f"r{i}", PROMPTS[i], p)
    eng.step()
    assert eng.num_running == 2 and eng.num_waiting == 1
    assert eng.abort_request("r0") and eng.abort_request("r2") and not eng.abort_request("nope")
    outs = eng.step()
    aborted = {o.request_id for o in outs if o.finish_reason == "abort"}
    assert aborted == {"r0", "r2"}
    assert eng.num_running == 1 and eng.num_waiting == 0 and eng.num_free_slots == 1
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.num_free_slots == 2
    eng.add_request("r0", PROMPTS[0], p)  # the id is free again
    assert eng.abort_request("r0")


def reference_logprobs(target, prompt, tokens):
    """log_softmax of the target's raw logits at every generated position, from one
    from-scratch forward over prompt + tokens: [len(tokens), V]."""
    seq = list(prompt) + list(tokens)
    cache = target.new_cache(1, len(seq) + 1)
    h, _ = target(torch.tensor([seq]), cache, torch.tensor([0]), torch.tensor([0]))
    return torch.log_softmax(target.logits(h[0]).float(), -1)[len(prompt) - 1:len(seq) - 1]


def test_logprobs_are_the_targets_own(target):
    """Each emitted token's logprob is the target's raw log-probability at its position
    (from-scratch reference), with the k most likely tokens in order; speculative rows
    report what autoregressive rows report; a stop token or max tokens cut entries and
    tokens alike; sampling rows get raw (not temperature-warped) values; rows that do not
    ask get None."""
    n, k = 30, 4
    ref = [naive_greedy(target, p, n) for p in PROMPTS]
    stop = ref[1][12]
    runs = {}
    for b in (8, 1):
        eng = make_engine(target, block_size=b, drafter=b > 1, eos=(stop,))
        params = [SamplingParams(max_new_tokens=n, logprobs=k, ignore_eos=i != 1) for i in range(3)] + \
                 [SamplingParams(max_new_tokens=n, ignore_eos=True)]
        out = eng.generate(PROMPTS, params)
        assert out[3].logprobs is None and out[3].token_ids == ref[3]
        assert out[1].finish_reason == "stop" and out[1].token_ids == ref[1][:ref[1].index(stop)]
        for p, o, want in zip(PROMPTS, out[:3], ref):
            assert o.token_ids == want[:len(o.token_ids)] and len(o.logprobs) == len(o.token_ids) > 0
            lp = reference_logprobs(target, p, o.token_ids)
            top_v, top_i = lp.topk(k, -1)
            for j, (tok, e) in enumerate(zip(o.token_ids, o.logprobs)):
                assert e.token_id == tok and abs(e.logprob - lp[j, tok].item()) < 1e-4
                assert [t for t, _ in e.top] == top_i[j].tolist() and e.top[0][0] == tok   # greedy: top 1
                assert max(abs(v - w) for (_, v), w in zip(e.top, top_v[j].tolist())) < 1e-4
        runs[b] = out
        assert eng.num_free_slots == 4
    assert runs[8][0].stats.num_accepted_tokens >= 0 and runs[8][0].stats.num_draft_tokens > 0
    for spec_o, ar_o in zip(runs[8][:3], runs[1][:3]):
        assert spec_o.token_ids == ar_o.token_ids
        assert max(abs(a.logprob - c.logprob) for a, c in zip(spec_o.logprobs, ar_o.logprobs)) < 1e-4
    # sampling: raw log-probabilities, not those of the warped distribution it sampled from
    eng = make_engine(target, block_size=8)
    [o] = eng.generate([PROMPTS[2]], SamplingParams(max_new_tokens=n, ignore_eos=True, temperature=0.5, top_k=5,
                                                    seed=3, logprobs=5))
    lp = reference_logprobs(target, PROMPTS[2], o.token_ids)
    warped = torch.log_softmax(lp / 0.5, -1)
    for j, (tok, e) in enumerate(zip(o.token_ids, o.logprobs)):
        assert e.token_id == tok and abs(e.logprob - lp[j, tok].item()) < 1e-4
        assert tok in [t for t, _ in e.top]                    # top_k 5 sampled among the 5 most likely
    assert max(abs(e.logprob - warped[j, e.token_id].item()) for j, e in enumerate(o.logprobs)) > 0.1
    [o] = eng.generate([PROMPTS[2]], SamplingParams(max_new_tokens=3, logprobs=0, ignore_eos=True))
    assert [e.top for e in o.logprobs] == [[], [], []]


def test_prompt_logprobs_are_the_targets_own(target, monkeypatch):
    """prompt_logprobs: one entry per prompt token after the first, the target's raw
    log-probability of that token given the tokens before it (from-scratch reference) with
    the k most likely in order; reported once, with the first token; the same whether the
    prompt is prefilled in one piece or in chunks over several steps beside other rows,
    speculative or not; rows that do not ask get None."""
    long = [(7 * i + 3) % 2000 for i in range(40)]
    prompts = [long, PROMPTS[1], PROMPTS[2], PROMPTS[3]]
    k = 3
    want = []
    for p in prompts:
        cache = target.new_cache(1, len(p) + 1)
        h, _ = target(torch.tensor([p]), cache, torch.tensor([0]), torch.tensor([0]))
        want.append(torch.log_softmax(target.logits(h[0]).float(), -1)[:-1])   # position j predicts p[j + 1]
    monkeypatch.setattr(SpecEngine, "PROMPT_LOGPROBS_CHUNK", 5)   # several LM-head passes per chunk
    for b, max_prefill in ((8, 512), (8, 9), (1, 4)):
        eng = make_engine(target, block_size=b, drafter=b > 1)
        eng.config.max_prefill_tokens = max_prefill
        params = [SamplingParams(max_new_tokens=6, prompt_logprobs=k, ignore_eos=True)] * 3 + \
                 [SamplingParams(max_new_tokens=6, ignore_eos=True)]
        rids = [f"p{i}" for i in range(4)]
        for rid, p, sp in zip(rids, prompts, params):
            eng.add_request(rid, p, sp)
        got, reports = {}, {rid: 0 for rid in rids}
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.prompt_logprobs is not None:
                    reports[o.request_id] += 1
                    assert o.new_token_ids          # with the first token
                    got[o.request_id] = o.prompt_logprobs
        assert reports == {"p0": 1, "p1": 1, "p2": 1, "p3": 0}
        for i in range(3):
            p, lp = prompts[i], want[i]
            entries = got[rids[i]]
            assert [e.token_id for e in entries] == p[1:]        # [9] alone: no entry
            top_v, top_i = lp.topk(k, -1)
            for j, e in enumerate(entries):
                assert abs(e.logprob - lp[j, p[j + 1]].item()) < 1e-4
                assert [t for t, _ in e.top] == top_i[j].tolist()
                assert max(abs(v - w) for (_, v), w in zip(e.top, top_v[j].tolist())) < 1e-4
        assert eng.num_free_slots == 4
    [r] = make_engine(target).generate([long], SamplingParams(max_new_tokens=2, prompt_logprobs=0, ignore_eos=True))
    assert len(r.prompt_logprobs) == len(long) - 1 and all(e.top == [] for e in r.prompt_logprobs)
    assert make_engine(target).generate([long], SamplingParams(max_new_tokens=2))[0].prompt_logprobs is None


def naive_greedy_penalized(target, prompt, n, **pen):
    seq = list(prompt)
    for _ in range(n):
        cache = target.new_cache(1, len(seq) + 1)
        h, _ = target(torch.tensor([seq]), cache, torch.tensor([0]), torch.tensor([0]))
        seq.append(int(penalized_reference(target.logits(h[0, -1]), prompt, seq[len(prompt):], **pen).argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("pen", [dict(presence_penalty=1.5), dict(frequency_penalty=0.7),
                                 dict(repetition_penalty=1.8), PENALTIES, dict(frequency_penalty=-0.5),
                                 "logit_bias"])
def test_greedy_with_penalties_equals_the_penalized_target(target, monkeypatch, pen):
    """Penalties count the generated tokens before each verified position, drafts included:
    greedy DFlash with drafts that are right for m = 0..b-1 positions then wrong (every
    acceptance length) equals the penalised target decoded token by token from scratch,
    and so does autoregressive decoding; the penalties change the output. (logit_bias:
    one token of the unbiased output banned, another raised.)"""
    from dflash_core import speculative
    n, b = 40, 6
    if pen == "logit_bias":
        plain = naive_greedy(target, PROMPTS[0], n)
        pen = dict(logit_bias={plain[2]: -100.0, plain[9]: 3.0})
    ref = [naive_greedy_penalized(target, p, n, **pen) for p in PROMPTS]
    assert ref != [naive_greedy(target, p, n) for p in PROMPTS]
    V = target.config.vocab_size
    cycle = {}

    def oracle_draft(ctx, tgt, rows, slots, anchors, start, bb, confidence=False, topk=0):
        out = torch.zeros(len(rows), bb - 1, dtype=torch.int64)
        for r, s in enumerate(rows):
            want = ref[PROMPTS.index(s.prompt)] + [0] * bb
            k = len(s.output)                       # the drafts continue after the anchor
            m = next(cycle.setdefault(s.request_id, itertools.cycle(range(bb))))
            for j in range(bb - 1):
                out[r, j] = want[k + j] if j < m else (want[k + j] + 1) % V
        return out, None, None, None

    monkeypatch.setattr(speculative, "draft", oracle_draft)
    eng = make_engine(target, block_size=b)
    out = eng.generate(PROMPTS, SamplingParams(max_new_tokens=n, ignore_eos=True, **pen))
    assert [o.token_ids for o in out] == ref
    assert set(out[3].stats.acceptance_lengths[:-1]) == set(range(1, b + 1))
    ar = make_engine(target, block_size=1, drafter=False)
    assert [o.token_ids for o in ar.generate(PROMPTS, SamplingParams(max_new_tokens=n, ignore_eos=True,
                                                                       **pen))] == ref
    assert eng.num_free_slots == 4


def test_min_tokens_hold_the_stop_ids_back_at_every_acceptance_length(target, monkeypatch):
    """min_tokens: the stop ids cannot end the output before min_tokens tokens, counted per
    verified position (drafts before it included): greedy DFlash with drafts right for
    m = 0..b-1 positions then wrong equals a token-by-token reference, and so does
    autoregressive decoding; without min_tokens the output ends early."""
    from dflash_core import speculative
    n, b, m_min = 40, 6, 17
    plain = naive_greedy(target, PROMPTS[1], n)
    stop = plain[4]
    first = plain.index(stop)
    assert first < m_min

    seq = list(PROMPTS[1])                                  # the reference, token by token
    for i in range(n):
        cache = target.new_cache(1, len(seq) + 1)
        h, _ = target(torch.tensor([seq]), cache, torch.tensor([0]), torch.tensor([0]))
        logits = target.logits(h[0, -1]).clone()
        if i < m_min:
            logits[stop] = float("-inf")
        seq.append(int(logits.argmax()))
        if seq[-1] == stop:
            break
    ref = seq[len(PROMPTS[1]):]
    ref = ref[:-1] if ref[-1] == stop else ref
    assert len(ref) >= m_min and ref[:first] == plain[:first]
    V = target.config.vocab_size
    cycle = itertools.cycle(range(b))

    def oracle_draft(ctx, tgt, rows, slots, anchors, start, bb, confidence=False, topk=0):
        out = torch.zeros(len(rows), bb - 1, dtype=torch.int64)
        want = ref + [stop] + [0] * bb
        k, m = len(rows[0].output), next(cycle)
        for j in range(bb - 1):
            out[0, j] = want[k + j] if j < m else (want[k + j] + 1) % V
        return out, None, None, None

    monkeypatch.setattr(speculative, "draft", oracle_draft)
    for eng in (make_engine(target, block_size=b, eos=(stop,)), make_engine(target, block_size=1, drafter=False,
                                                                             eos=(stop,))):
        [o] = eng.generate([PROMPTS[1]], SamplingParams(max_new_tokens=n, min_tokens=m_min))
        assert o.token_ids == ref and o.finish_reason == ("stop" if len(ref) < n else "length")
        if eng.speculative:   # the drafts crossed the min_tokens boundary at several acceptance lengths
            assert len(set(o.stats.acceptance_lengths)) >= 4, o.stats.acceptance_lengths
        [o] = eng.generate([PROMPTS[1]], SamplingParams(max_new_tokens=n))
        assert o.token_ids == plain[:first] and o.finish_reason == "stop"


def test_bad_requests_are_rejected(target):
    eng = make_engine(target, max_seq_len=64)
    with pytest.raises(ValueError, match="empty"):
        eng.add_request("a", [], SamplingParams())
    with pytest.raises(ValueError, match="vocabulary"):
        eng.add_request("a", [1, 99999], SamplingParams())
    with pytest.raises(ValueError, match="logit_bias token id 99999"):
        eng.add_request("a", [1], SamplingParams(logit_bias={99999: 1.0}))
    with pytest.raises(ValueError, match="context limit"):
        eng.add_request("a", [1] * 60, SamplingParams(max_new_tokens=10))
    eng.add_request("a", [1, 2], SamplingParams(max_new_tokens=3))
    with pytest.raises(ValueError, match="duplicate"):
        eng.add_request("a", [1, 2], SamplingParams(max_new_tokens=3))
    for bad in (dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(seed=-1),
                dict(top_k=2**63), dict(top_k=2**64), dict(seed=2**63), dict(seed=True), dict(top_k=True),
                dict(seed=1.0), dict(logprobs=-1), dict(logprobs=21), dict(logprobs=True), dict(logprobs=2.0),
                dict(prompt_logprobs=-1), dict(prompt_logprobs=21), dict(prompt_logprobs=True),
                dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(presence_penalty=True),
                dict(repetition_penalty=0), dict(repetition_penalty=11), dict(repetition_penalty="1"),
                dict(logit_bias={5: 101}), dict(logit_bias={-1: 1}), dict(logit_bias={"5": 1}),
                dict(logit_bias={5: True}), dict(logit_bias=5), dict(logit_bias={t: 1 for t in range(301)}),
                dict(min_tokens=-1), dict(min_tokens=200), dict(min_tokens=2.0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    # the largest accepted top_k goes through a sampled step (it found the engine loop's
    # int64 overflow through the HTTP fuzz test once)
    eng.add_request("k", [1, 2], SamplingParams(max_new_tokens=2, temperature=1.0, top_k=2**63 - 1, seed=0))
    while eng.has_unfinished_requests():
        eng.step()
    with pytest.raises(ValueError, match="unknown"):
        SamplingParams.from_kwargs(max_new_tokens=3, temprature=1.0)


# ---- sampling -------------------------------------------------------------------------
def penalized_reference(logits, prompt, generated, presence_penalty=0.0, frequency_penalty=0.0,
                        repetition_penalty=1.0, logit_bias=None):
    """The penalty rules written out token by token (the test's own reference): logits [V]
    of the position after `generated`."""
    x = logits.float().clone()
    for t in set(prompt) | set(generated):
        if repetition_penalty != 1.0:
            x[t] = x[t] / repetition_penalty if x[t] > 0 else x[t] * repetition_penalty
    for t in set(generated):
        c = generated.count(t)
        x[t] -= frequency_penalty * c + presence_penalty
    for t, b in (logit_bias or {}).items():
        x[t] += b
    return x


@torch.no_grad()
def exact_joint(target, prompt, length, temperature, top_k, top_p, pen=None):
    """Exact probability of every continuation of `length` tokens under the warped target
    (after the penalties `pen`, when given)."""
    V = target.config.vocab_size
    probs = {}
    for seq in itertools.product(range(V), repeat=length):
        p = 1.0
        for i in range(length):
            ids = prompt + list(seq[:i])
            cache = target.new_cache(1, len(ids) + 1)
            h, _ = target(torch.tensor([ids]), cache, torch.tensor([0]), torch.tensor([0]))
            logits = target.logits(h[:, -1])
            if pen:
                logits = penalized_reference(logits[0], prompt, list(seq[:i]), **pen)[None]
            dist = warp_probs(logits, temperature, top_k, top_p)[0]
            p *= float(dist[seq[i]])
            if p == 0:
                break
        probs[seq] = p
    return probs


def chi_square_pvalue(counts: dict, probs: dict, n: int) -> float:
    """Pearson chi-square goodness of fit, cells with expected count < 5 pooled."""
    from scipy.stats import chi2
    stat, dof, pool_o, pool_e = 0.0, -1, 0, 0.0
    for cell, p in probs.items():
        e, o = n * p, counts.get(cell, 0)
        if e < 5:
            pool_o, pool_e = pool_o + o, pool_e + e
            continue
        stat += (o - e) ** 2 / e
        dof += 1
    if pool_e > 0:
        stat += (pool_o - pool_e) ** 2 / max(pool_e, 1e-9)
        dof += 1
    return float(chi2.sf(stat, max(dof, 1)))


def sample_many(eng, prompt, n, length, **kw):
    params = [SamplingParams(max_new_tokens=length, ignore_eos=True, seed=1000 + i, **kw) for i in range(n)]
    counts = {}
    for o in eng.generate([prompt] * n, params):
        counts[tuple(o.token_ids)] = counts.get(tuple(o.token_ids), 0) + 1
    return counts


@pytest.mark.parametrize("temperature,top_k,top_p,draft_vocab,pen", [(1.0, 0, 1.0, None, None),
                                                                     (0.7, 4, 0.9, None, None),
                                                                     (1.0, 0, 1.0, [0, 2, 3, 5], None),
                                                                     (1.0, 0, 1.0, None, PENALTIES),
                                                                     (0.8, 0, 1.0, None,
                                                                      dict(logit_bias={0: 1.5, 3: -1.0}))])
def test_speculative_sampling_matches_target_distribution(temperature, top_k, top_p, draft_vocab, pen):
    """3-token continuations on a 6-token vocabulary: the first token comes from the
    prefill, the next two from one speculative step (accept / residual / bonus paths).
    4000 samples; the test fails if the chi-square p-value < 0.001 (alpha = 0.1%).
    With penalties the reference applies them token by token (penalized_reference)."""
    target = tiny_random_target(vocab_size=6, num_layers=2, seed=3)
    with torch.no_grad():
        target.lm_head.weight.mul_(0.15)  # a spread-out distribution over the 6 tokens
    prompt, length, n = [1, 4, 2], 3, 4000
    probs = exact_joint(target, prompt, length, temperature, top_k, top_p, pen)
    assert abs(sum(probs.values()) - 1) < 1e-4
    assert sum(p >= 5 / n for p in probs.values()) >= 20  # many cells with real mass
    eng = make_engine(target, block_size=4, max_slots=64, max_seq_len=16, seed=5, draft_vocab=draft_vocab)
    counts = sample_many(eng, prompt, n, length, temperature=temperature, top_k=top_k, top_p=top_p, **(pen or {}))
    p_value = chi_square_pvalue(counts, probs, n)
    assert p_value > 1e-3, p_value
    if pen:   # power: the same samples do not fit the distribution without penalties
        assert chi_square_pvalue(counts, exact_joint(target, prompt, length, temperature, top_k, top_p), n) < 1e-3
    # power check: accepting every draft (sampling from the drafter q) is detected
    from dflash_core import kernels
    orig = kernels.rejection_accept
    try:
        kernels.rejection_accept = lambda d, tp, dp, ua, us: orig(d, tp, dp, torch.zeros_like(ua), us)
        bad = sample_many(make_engine(target, block_size=4, max_slots=64, max_seq_len=16, seed=5,
                                      draft_vocab=draft_vocab),
                          prompt, n, length, temperature=temperature, top_k=top_k, top_p=top_p, **(pen or {}))
    finally:
        kernels.rejection_accept = orig
    assert chi_square_pvalue(bad, probs, n) < 1e-3


@pytest.mark.parametrize("temperature,top_k,top_p,pen", [(1.0, 0, 1.0, None), (0.7, 4, 0.9, PENALTIES)])
def test_dynamic_draft_length_sampling_matches_target_distribution(monkeypatch, temperature, top_k, top_p, pen):
    """As above, with every speculative step's verify cap cycling 0..3 over the rows (block 4):
    rows capped at k drafts are accepted as blocks of k + 1 (accept / residual at k' < k,
    a plain target sample at k), uncapped ones beside them; the 3-token continuations
    still follow the warped target's distribution."""
    target = tiny_random_target(vocab_size=6, num_layers=2, seed=3)
    with torch.no_grad():
        target.lm_head.weight.mul_(0.15)
    prompt, length, n = [1, 4, 2], 3, 4000
    probs = exact_joint(target, prompt, length, temperature, top_k, top_p, pen)
    handed = _cycling_caps(monkeypatch, 4)
    eng = make_engine(target, block_size=4, max_slots=64, max_seq_len=16, seed=5, draft_threshold=0.5)
    counts = sample_many(eng, prompt, n, length, temperature=temperature, top_k=top_k, top_p=top_p, **(pen or {}))
    assert set(handed) == {0, 1, 2, 3}
    assert chi_square_pvalue(counts, probs, n) > 1e-3
    # power: a cap that emitted a residual (as after a rejected draft) at the capped position
    # instead of a plain target sample is detected: here a draft of the target's most likely
    # token there with q = one-hot, always rejected, so that token is never emitted there
    from dflash_core import kernels
    orig = kernels.rejection_accept

    def residual_at_cap(d, tp, dp, ua, us):
        if d.shape[1] < 3:   # a capped row
            k = d.shape[1]
            mode = tp[:, k].argmax(-1)
            dd = torch.cat([d, mode[:, None]], 1)
            q = torch.nn.functional.one_hot(mode, tp.shape[-1]).to(tp.dtype)[:, None]
            a, nx = orig(dd, torch.cat([tp, tp[:, -1:]], 1), torch.cat([dp, q], 1),
                         torch.cat([ua, torch.ones_like(ua[:, :1])], 1), us)
            return a.clamp(max=k), nx
        return orig(d, tp, dp, ua, us)
    monkeypatch.setattr(kernels, "rejection_accept", residual_at_cap)
    bad = sample_many(make_engine(target, block_size=4, max_slots=64, max_seq_len=16, seed=5, draft_threshold=0.5),
                      prompt, n, length, temperature=temperature, top_k=top_k, top_p=top_p, **(pen or {}))
    assert chi_square_pvalue(bad, probs, n) < 1e-3


@pytest.mark.parametrize("draft_threshold", [0.0, 6e-4])
def test_same_seed_same_output_regardless_of_batch(target, monkeypatch, draft_threshold):
    """Also with dynamic draft length (a threshold that caps rows at different lengths in
    one step: a row's cap and its random draws follow its own drafts, not its batch)."""
    from dflash_core import speculative
    caps, real = [], speculative.drafts_to_verify
    monkeypatch.setattr(speculative, "drafts_to_verify", lambda c, t: caps.append(real(c, t)) or caps[-1])
    eng = make_engine(target, block_size=8, draft_threshold=draft_threshold)
    p = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.95, seed=42, ignore_eos=True)
    [a] = eng.generate([PROMPTS[0]], p)
    b = eng.generate(PROMPTS, [p, SamplingParams(max_new_tokens=5, temperature=0.8, seed=1), p, p])
    assert b[0].token_ids == a.token_ids
    if draft_threshold:
        batched = [c for c in caps if c.numel() > 1]
        assert any(len(set(c.tolist())) > 1 for c in batched), caps   # rows of one step capped differently
    [c] = eng.generate([PROMPTS[0]], SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.95, seed=43,
                                                    ignore_eos=True))
    assert c.token_ids != a.token_ids
    assert math.isfinite(a.stats.mean_acceptance_length)


@pytest.mark.parametrize("speculative", [True, False])
def test_chunked_prefill_is_exact_bounded_and_interleaved(target, speculative):
    """A prompt longer than max_prefill_tokens is prefilled in chunks over several steps:
    no step prefills more than the budget, rows already running emit a token every step
    meanwhile, the long row emits nothing until its prompt is in, and every output equals
    the target's own greedy continuation (the naive reference, no chunks)."""
    budget = 16
    long_prompt = [(7 * i + 3) % 2000 + 10 for i in range(70)]          # 70 tokens: 5 chunks
    ref_long, ref_short = naive_greedy(target, long_prompt, 12), naive_greedy(target, PROMPTS[1], 30)
    cfg = EngineConfig(max_slots=3, max_seq_len=160, block_size=8, max_prefill_tokens=budget)
    backend = None
    if speculative:
        d = DFlashDrafter.from_target(target.config, num_layers=1, block_size=8, mask_token_id=3, num_features=2)
        backend = LocalDraftBackend(d, 3, 160 + 8 + 1)
    eng = SpecEngine(target, backend, cfg)
    p = SamplingParams(max_new_tokens=30, ignore_eos=True)
    eng.add_request("short", PROMPTS[1], p)
    got = {"short": [], "long": []}
    for o in eng.step():                                                 # short is decoding now
        got[o.request_id] += o.new_token_ids
    eng.add_request("long", long_prompt, SamplingParams(max_new_tokens=12, ignore_eos=True))
    long_seq = eng.waiting[0]
    steps_until_anchor = 0
    while eng.has_unfinished_requests():
        before = long_seq.prefilled
        outs = {o.request_id: o for o in eng.step()}
        assert long_seq.prefilled - before <= budget
        if long_seq.prefilling:
            steps_until_anchor += 1
            assert "long" not in outs or not outs["long"].new_token_ids
            if len(got["short"]) < 30:
                assert outs["short"].new_token_ids                          # decode went on meanwhile
        for rid, o in outs.items():
            got[rid] += o.new_token_ids
    assert steps_until_anchor == math.ceil(len(long_prompt) / budget) - 1
    assert got["long"] == ref_long and got["short"] == ref_short
    assert eng.num_free_slots == 3


# ---- host round trips -----------------------------------------------------------------
SYNC_METHODS = ("tolist", "item", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")


@pytest.mark.parametrize("R,b", [(1, 2), (1, 3), (1, 8), (2, 4), (4, 16)])
def test_greedy_targets_match_the_full_head_where_acceptance_reads(target, monkeypatch, R, b):
    """The chunked LM head of a greedy verify gives the target's argmax at every position up
    to each row's first mismatch (all that greedy_accept reads), whatever the chunking; a
    block whose rows x positions fit VERIFY_HEAD_FIRST_ROWS takes one head call."""
    from dflash_core import kernels, speculative
    g = torch.Generator().manual_seed(R * 100 + b)
    hidden = torch.randn(R, b, target.config.hidden_size, generator=g)
    full = target.logits(hidden).argmax(-1)                        # [R, b]
    drafts = full[:, :b - 1].clone()
    for r in range(R):                                             # row r keeps r (mod b) drafts
        k = r % b
        if k < b - 1:
            drafts[r, k] = (drafts[r, k] + 1) % target.config.vocab_size
    calls = []
    real = target.greedy   # (the head's greedy pick: from the logits, or the native head's argmax)
    monkeypatch.setattr(target, "greedy", lambda h: calls.append(h.shape[:-1].numel()) or real(h))
    got = speculative.greedy_targets(target, hidden, drafts)
    for r in range(R):
        upto = min(r % b, b - 1) + 1                               # positions greedy_accept reads
        assert torch.equal(got[r, :upto], full[r, :upto]), (r, got[r], full[r])
    assert [a.tolist() for a in kernels.greedy_accept(drafts, got)] == \
        [a.tolist() for a in kernels.greedy_accept(drafts, full)]
    if R * b <= speculative.VERIFY_HEAD_FIRST_ROWS:
        assert calls == [R * b]
    else:
        assert len(calls) >= 1 and sum(calls) <= 2 * R * b


class _SyncCounter:
    """Counts calls of the tensor methods that read a value back to the host (on CUDA each
    one waits for the device). On CPU they are cheap, but a call is a call: the count is
    what a GPU step would pay."""

    def __init__(self, monkeypatch):
        self.n = 0
        for name in SYNC_METHODS:
            real = getattr(torch.Tensor, name)

            def counted(t, *a, _real=real, **kw):
                self.n += 1
                return _real(t, *a, **kw)
            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("mixed", [False, True, "logprobs"])
def test_host_round_trips_per_step_do_not_grow_with_rows(target, monkeypatch, mixed):
    """One decode step over 2 rows and over 4 rows (all greedy; or sampling rows with
    top-k / top-p beside greedy ones; or rows asking for logprobs beside rows that do
    not) reads the same number of values back to the host:
    drafts, target tokens, probabilities and acceptance stay on the model's device, the
    per-row loops over the vocabulary are gone. (The greedy LM head picks the rows that go
    on once per chunk, <= log2(b) times a step; one chunk here, so the count is exact.)"""
    from dflash_core import speculative
    monkeypatch.setattr(speculative, "VERIFY_HEAD_FIRST_ROWS", 64)   # one chunk: 4 rows x 8 positions
    sampled = [SamplingParams(max_new_tokens=30, ignore_eos=True, temperature=0.9, top_p=0.9, seed=1),
               SamplingParams(max_new_tokens=30, ignore_eos=True, temperature=1.2, top_k=50, seed=2)]
    greedy = SamplingParams(max_new_tokens=30, ignore_eos=True)

    def one_step(params: list[SamplingParams]) -> int:
        eng = make_engine(target, block_size=8, max_slots=4)
        for i, p in enumerate(params):
            eng.add_request(f"r{i}", PROMPTS[i], p)
        eng.step()   # prefill (and the first decode step)
        with monkeypatch.context() as m:
            counter = _SyncCounter(m)
            outs = eng.step()
        assert len(outs) == len(params) and all(o.step.block_size == 8 for o in outs)
        return counter.n

    if mixed == "logprobs":
        lp = [SamplingParams(max_new_tokens=30, ignore_eos=True, logprobs=2),
              SamplingParams(max_new_tokens=30, ignore_eos=True, temperature=0.9, seed=4, logprobs=0)]
        two, four = one_step([lp[0], greedy]), one_step([lp[0], greedy, lp[1], greedy])
    elif mixed:
        two, four = one_step([sampled[0], greedy]), one_step([sampled[0], greedy, sampled[1], greedy])
    else:
        two, four = one_step([greedy] * 2), one_step([greedy] * 4)
    assert 0 < two and four == two, (two, four)


def test_the_engines_argmax_is_torchs_ties_and_nan_included():
    """speculative.argmax (every greedy choice: plain steps, drafts, verification) picks
    what torch.argmax picks: the first maximum, and the first NaN where there is one."""
    from dflash_core import speculative as spec
    g = torch.Generator().manual_seed(0)
    for shape in ((3, 49152), (2, 4, 777), (5,)):
        x = torch.randint(0, 3, shape, generator=g).float()      # many ties
        assert torch.equal(spec.argmax(x), x.argmax(-1))
    x = torch.zeros(2, 10)
    x[0, 3] = x[0, 6] = float("nan")
    x[1, 2] = x[1, 8] = 1.0
    assert spec.argmax(x).tolist() == [3, 2] == x.argmax(-1).tolist()


def test_bench_ab_runs_a_git_revision_beside_this_checkout():
    """`python -m dflash_core.bench_ab --baseline REV`: the package at REV imported beside
    this one, both engines on the same prompts alternating, each engine's DFlash output its
    own plain output; a revision git does not know is refused in one line."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    if subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    base = [sys.executable, "-m", "dflash_core.bench_ab", "--target", "tiny-random", "--drafter", "random",
            "--num-prompts", "2", "--max-new-tokens", "8", "--block-size", "4", "--threads", "1", "--dtype", "float32"]
    bad = subprocess.run(base + ["--baseline", "no-such-rev"], capture_output=True, text=True, timeout=300, cwd=repo)
    lines = [ln for ln in bad.stderr.strip().splitlines() if ln.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and "--baseline no-such-rev" in lines[0], bad.stderr
    out = subprocess.run(base + ["--baseline", "HEAD", "--json"], capture_output=True, text=True, timeout=600, cwd=repo)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["baseline_rev"] == "HEAD" and res["num_prompts"] == 2 and res["block_size"] == 4
    for k in ("baseline", "working"):
        assert res[k]["ar_tokens_per_s"] > 0 and res[k]["dflash_tokens_per_s"] > 0, k
        assert res[k]["greedy_outputs_identical"] is True and res[k]["tau"] >= 1, k
    assert isinstance(res["plain_outputs_equal"], bool) and res["speedup_over_baseline"] > 0
    assert res["plain_outputs_equal"] == (res["plain_outputs_same"] == 2)
    assert res["temperature"] == 0.0 and 0 <= res["dflash_outputs_same"] <= 2
    # sampled runs (prompt i with seed i in both engines): no greedy comparison; a bad temperature in one line
    bad = subprocess.run(base + ["--baseline", "HEAD", "--temperature", "-1"], capture_output=True, text=True,
                         timeout=300, cwd=repo)
    lines = [ln for ln in bad.stderr.strip().splitlines() if ln.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and "--temperature must be >= 0" in lines[0], bad.stderr
    for flags, msg in ((["--top-p", "0"], "--top-p must be in (0, 1]"),
                       (["--top-k", "5"], "need --temperature > 0"),
                       (["--context-tokens", "100"], "--context-tokens must be 0 or at least 600")):
        bad = subprocess.run(base + ["--baseline", "HEAD"] + flags, capture_output=True, text=True, timeout=300,
                             cwd=repo)
        lines = [ln for ln in bad.stderr.strip().splitlines() if ln.strip()]
        assert bad.returncode == 2 and len(lines) == 1 and msg in lines[0], bad.stderr
    out = subprocess.run(base + ["--baseline", "HEAD", "--json", "--temperature", "0.8", "--top-p", "0.9"],
                         capture_output=True, text=True, timeout=600, cwd=repo)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["temperature"] == 0.8 and res["top_p"] == 0.9 and 0 <= res["dflash_outputs_same"] <= 2
    for k in ("baseline", "working"):
        assert res[k]["greedy_outputs_identical"] is None and res[k]["dflash_tokens_per_s"] > 0, k
    # long prompts, decoding timed apart from their prefills
    out = subprocess.run(base + ["--baseline", "HEAD", "--json", "--context-tokens", "700"], capture_output=True,
                         text=True, timeout=600, cwd=repo)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["context_tokens"] == 700 and res["plain_outputs_equal"] is True
    for k in ("baseline", "working"):
        assert res[k]["greedy_outputs_identical"] is True and res[k]["ar_tokens_per_s"] > 0, k


def test_long_prompts_join_holdout_prompts_and_end_with_one():
    """bench_ab --context-tokens: holdout prompts joined in turn, cut so that the end of the
    next one (its last LONG_TAIL tokens, or all of a shorter one) ends the prompt."""
    from dflash_core.bench_ab import LONG_TAIL, long_prompts
    sizes = [50, 450, 350, 320, 500, 40]
    pool = [list(range(1000 * i, 1000 * i + n)) for i, n in enumerate(sizes)]
    got = long_prompts(pool, 2, 1000)
    assert LONG_TAIL == 300
    assert got[0] == pool[0] + pool[1] + pool[2][:200] + pool[4][-300:]
    assert got[1] == pool[5] + pool[0] + pool[1] + pool[2][:160] + pool[4][-300:]
    short = long_prompts([list(range(600)), list(range(5000, 5030))], 1, 1000)[0]
    assert short == (list(range(600)) + list(range(5000, 5030)) + list(range(600)))[:970] + list(range(5000, 5030))


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.8, 0, 1.0), (1.3, 50, 1.0), (0.7, 0, 0.9), (0.6, 7, 0.5)])
def test_warped_rows_are_the_block_warps_rows_computed_on_first_use(temperature, top_k, top_p):
    """A sampling tree's walk takes p as sampling.WarpedRows: each row warped when first
    read, bit for bit row i of warp_probs_rows over the whole block (ties included), and
    rows never read never warped."""
    from dflash_core import sampling
    from dflash_core.sampling import RowParams, WarpedRows, warp_probs_rows
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(6, 49152, generator=g) * 4
    logits[2, :100] = logits[2, 100]            # ties at the top-k / top-p edge
    p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    whole = warp_probs_rows(logits[None], RowParams.of([p], "cpu"))[0]
    calls = []
    real = sampling.warp_probs_rows

    def counted(x, rp):
        calls.append(x.shape)
        return real(x, rp)
    lazy = WarpedRows(logits, p)
    assert len(lazy) == 6
    sampling.warp_probs_rows, saved = counted, sampling.warp_probs_rows
    try:
        for i in (0, 2, 5, 2):
            assert torch.equal(lazy[i], whole[i]), i
    finally:
        sampling.warp_probs_rows = saved
    assert calls == [(1, 1, 49152)] * 3          # rows 0, 2 and 5 once each; 1, 3, 4 never


def _top_p_reference(p: torch.Tensor, top_p: float) -> torch.Tensor:
    """The top_p rule spelled out on the host: tokens by probability, the lower id first
    among equal ones; a token is kept while the mass before it is below top_p."""
    order = sorted(range(p.numel()), key=lambda i: (-float(p[i]), i))
    kept, mass = [], 0.0
    for i in order:
        if mass >= top_p:
            break
        kept.append(i)
        mass += float(p[i])
    out = torch.zeros(p.numel(), dtype=torch.float64)
    out[kept] = p.double()[kept] / p.double()[kept].sum()
    return out


def test_top_p_keeps_the_most_likely_tokens_lower_ids_first_among_equal_ones():
    """warp_probs_rows' top_p on the CPU (candidates first, `_top_p_row`): the kept tokens
    are the host rule's, ties at the cut broken by the lower id, with the same bits as the
    rule over the whole sorted row (`_top_p_sorted`, what runs on a GPU), also where the
    candidates have to grow to the whole vocabulary; each row's bits do not depend on the
    rows warped beside it."""
    from dflash_core.sampling import RowParams, _top_p_row, _top_p_sorted, warp_probs_rows
    g = torch.Generator().manual_seed(11)
    V = 3000
    for scale in (0.05, 1.0, 4.0):
        x = torch.randn(V, generator=g) * scale
        x[10:40] = x[5]                                  # a tie group around the cut
        p = torch.softmax(x, -1)
        for top_p in (0.05, 0.3, 0.8, 0.97):
            got = _top_p_row(p, top_p)
            assert torch.equal(got, _top_p_sorted(p[None], torch.tensor([[top_p]]))[0]), (scale, top_p)
            ref = _top_p_reference(p, top_p)
            assert torch.equal(got > 0, ref > 0), (scale, top_p)      # the same tokens kept
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-9)
    p = torch.zeros(V)
    p[[7, 3, 9]] = 0.25                                    # equal mass: the lower ids go first
    p[100] = 0.25
    assert (_top_p_row(p, 0.3) > 0).nonzero().flatten().tolist() == [3, 7]
    rows = [(0.8, 0, 0.9), (1.0, 0, 1.0), (0.6, 40, 0.7), (1.2, 5, 0.5)]
    logits = torch.randn(4, 3, V, generator=g) * 3
    whole = warp_probs_rows(logits, RowParams.of(rows, "cpu"))
    for r, prm in enumerate(rows):
        for i in range(3):
            alone = warp_probs_rows(logits[r:r + 1, i:i + 1], RowParams.of([prm], "cpu"))[0, 0]
            assert torch.equal(alone, whole[r, i]), (r, i)
