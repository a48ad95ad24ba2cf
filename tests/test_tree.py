"""Tree verification (dflash_core/tree.py): the node picking, the layouts, the greedy walk
and the K/V move by hand; the native layers' tree attention against one-token steps along
each node's path (bit for bit); the engine with trees on against its own decoding (greedy
token for token, sampling rows in a shared batch unchanged, logprobs, penalties), on a
quantised tiny target and on the embedded default model with the shipped drafter."""
from __future__ import annotations

import shutil

import pytest
import torch

from dflash_core import native, tree
from dflash_core.runtime import cpu_flags

HAS_KERNEL = {"avx2", "fma"} <= cpu_flags() and shutil.which("cc") is not None
needs_kernel = pytest.mark.skipif(not (HAS_KERNEL and native.available()),
                                  reason="tree verify runs in the native kernel (AVX2 + FMA, cc, not DFLASH_NATIVE=0)")


def test_best_first_follows_path_probabilities():
    # position 1 is unsure (0.5 / 0.4), position 2 sure (0.9), position 3 unsure
    top_p = [[0.5, 0.4, 0.05, 0.05], [0.9, 0.05, 0.03, 0.02], [0.3, 0.3, 0.2, 0.2]]
    nodes = tree.best_first(top_p, 5)
    # (parent block index, position - 1, rank) in pick order; scores .5, .45, .4, .36, .15
    assert nodes == [(0, 0, 0), (1, 1, 0), (0, 0, 1), (3, 1, 0), (2, 2, 0)]
    # a sure drafter makes a chain of its argmaxes
    sure = [[0.95, 0.02, 0.02, 0.01]] * 4
    assert tree.best_first(sure, 4) == [(0, 0, 0), (1, 1, 0), (2, 2, 0), (3, 3, 0)]
    assert tree.best_first(top_p, 0) == [] and tree.best_first([], 3) == []
    # never deeper than the positions drafted; every parent picked before its child
    wide = tree.best_first([[0.25] * 4] * 2, 20)
    assert len(wide) == 20 and max(d for _, d, _ in wide) == 1
    assert all(p < i + 1 for i, (p, _, _) in enumerate(wide))


def test_layout_lists_each_tokens_path_root_first():
    # nodes 1..4: 1 <- 0, 2 <- 1, 3 <- 0, 4 <- 3
    lay = tree.layout([[0, 1, 0, 3], tree.chain_parents(4)], 5)
    assert lay.dtype == torch.int32 and lay.shape == (2, 5, 6)
    want = [[0], [0, 1], [0, 1, 2], [0, 3], [0, 3, 4]]
    for t, path in enumerate(want):
        assert lay[0, t, 0] == len(path) and lay[0, t, 1:len(path) + 1].tolist() == path
    for t in range(5):   # a chain reads causally
        assert lay[1, t, 0] == t + 1 and lay[1, t, 1:t + 2].tolist() == list(range(t + 1))
    short = tree.layout([[0]], 4)   # fewer nodes than tokens: the rest padded as a chain
    assert short[0, 3, 0] == 4 and short[0, 3, 1:5].tolist() == [0, 1, 2, 3]


def test_greedy_walk_follows_the_targets_choices():
    parents, tokens = [0, 1, 0, 3], [10, 11, 20, 21]   # 0 -> 10 -> 11 ; 0 -> 20 -> 21
    # targets[j]: the target's argmax after block token j
    assert tree.greedy_walk(parents, tokens, [20, 99, 99, 21, 7]) == ([0, 3, 4], 7)
    assert tree.greedy_walk(parents, tokens, [10, 11, 5, 99, 99]) == ([0, 1, 2], 5)
    assert tree.greedy_walk(parents, tokens, [30, 99, 99, 99, 99]) == ([0], 30)
    assert tree.greedy_walk(parents, tokens, [20, 99, 99, 8, 99]) == ([0, 3], 8)
    # a token repeated among siblings: the first node is taken
    assert tree.greedy_walk([0, 0], [5, 5], [5, 6, 7]) == ([0, 1], 6)


def test_commit_path_moves_the_accepted_nodes_kv():
    from dflash_core.models.kv_cache import KVCache
    cache = KVCache(2, 2, 16, 2, 8, torch.float32, "cpu")   # 2 layers, 2 slots, 2 KV heads
    for i in range(2):
        cache.k[i].copy_(torch.arange(cache.k[i].numel(), dtype=torch.float32).view_as(cache.k[i]) + i)
        cache.v[i].copy_(-cache.k[i])
    before = [c.clone() for c in cache.k + cache.v]
    tree.commit_path(cache, 1, 4, [0, 1, 2])        # already where a chain puts them: untouched
    assert all(torch.equal(a, b) for a, b in zip(before, cache.k + cache.v))
    tree.commit_path(cache, 1, 4, [0, 3, 5])        # nodes 3 and 5 -> positions 5 and 6
    for i in range(2):
        for c, old in ((cache.k[i], before[i]), (cache.v[i], before[2 + i])):
            assert torch.equal(c[1, :, 5], old[1, :, 7]) and torch.equal(c[1, :, 6], old[1, :, 9])
            assert torch.equal(c[1, :, :5], old[1, :, :5]) and torch.equal(c[0], old[0])
    # the sources overlap the destinations (nodes 2, 3 -> positions 5, 6): read before written
    before = [c.clone() for c in cache.k + cache.v]
    tree.commit_path(cache, 0, 4, [0, 2, 3])
    for i in range(2):
        for c, old in ((cache.k[i], before[i]), (cache.v[i], before[2 + i])):
            assert torch.equal(c[0, :, 5], old[0, :, 6]) and torch.equal(c[0, :, 6], old[0, :, 7])
            assert torch.equal(c[0, :, 7:], old[0, :, 7:]) and torch.equal(c[1], old[1])
    assert all(k.data_ptr() == cache.k_all[i].data_ptr() for i, k in enumerate(cache.k))   # views of one tensor


@needs_kernel
def test_native_tree_attention_equals_one_token_steps_along_each_path():
    """Each token of a tree verify gets the bits a one-token step gets with its path in the
    cache after the context: hidden states and K/V, for two rows with different trees at
    different positions, one of them a chain."""
    from test_native import _variant_target
    t = _variant_target(qk_norm=True, family="qwen3")
    assert t.serves_tree(2, 5) and not t.serves_tree(2, native.TREE_MAX + 1)
    V = t.config.vocab_size
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, V, (2, 9), generator=g)
    block = torch.randint(0, V, (2, 5), generator=g)
    parents = [[0, 0, 2, 1], tree.chain_parents(4)]
    lay = tree.layout(parents, 5)
    starts = torch.tensor([9, 6])                      # row 1 rewinds into its prompt

    def prefilled():
        cache = t.new_cache(2, 32)
        t(prompt, cache, torch.tensor([0, 1]), torch.tensor([0, 0]))
        return cache
    cache = prefilled()
    hidden, feats = t(block, cache, torch.tensor([0, 1]), starts, [1], tree=lay)
    for r in range(2):
        for i in range(5):
            path = lay[r, i, 1:int(lay[r, i, 0]) + 1].tolist()
            ref = prefilled()
            for d, j in enumerate(path):               # the path one token at a time
                h, f = t(block[r:r + 1, j:j + 1], ref, torch.tensor([r]), torch.tensor([int(starts[r]) + d]), [1])
            assert torch.equal(hidden[r, i], h[0, 0]) and torch.equal(feats[r, i], f[0, 0]), (r, i)
            pos = int(starts[r]) + i                   # its K/V where the verify wrote them
            assert torch.equal(cache.k[2][r, :, pos], ref.k[2][r, :, int(starts[r]) + len(path) - 1])
    with pytest.raises(ValueError, match="tree of shape"):
        t._native_layers.forward(t.embed(block), torch.tensor([0, 1]), starts, *t.rotary(
            starts[:, None] + torch.arange(5)[None], torch.float32), cache, 0, {}, tree=lay[:, :4])
    nl = t._native_layers
    nl.enabled = False
    try:
        assert not t.serves_tree(2, 5)
        with pytest.raises(ValueError, match="native fp32 layers"):
            t(block, prefilled(), torch.tensor([0, 1]), starts, tree=lay)
    finally:
        nl.enabled = True


def _tiny_engine(target, block_size, draft_tree, max_slots=6, capture=()):
    from dflash_core.drafter import DFlashDrafter, LocalDraftBackend
    from dflash_core.engine import EngineConfig, SpecEngine
    cfg = EngineConfig(max_slots=max_slots, max_seq_len=200, block_size=block_size, draft_tree=draft_tree,
                       capture_layers=capture)
    backend = None
    if block_size > 1:
        d = DFlashDrafter.from_target(target.config, num_layers=1, block_size=block_size, mask_token_id=3,
                                      num_features=2, seed=0).pack_weights()
        backend = LocalDraftBackend(d, max_slots, 200 + block_size + 1)
    return SpecEngine(target, backend, cfg)


@needs_kernel
def test_tree_engine_equals_its_own_decoding_on_a_quantised_target(monkeypatch):
    """Greedy rows with trees: token for token the engine's autoregressive output, logprobs
    included, batched and alone; sampling rows sharing those steps keep their exact chain
    output (same seed, same tokens as with trees off); penalized greedy rows keep the chain."""
    from test_native import _quantised_tiny_target
    from dflash_core.sampling import SamplingParams
    target = _quantised_tiny_target()
    prompts = [[5, 6, 7], [100, 200, 300, 400, 500, 600, 700], [9], list(range(1000, 1023)), [40, 41] * 9]
    p = SamplingParams(max_new_tokens=40, ignore_eos=True, logprobs=2)
    ar = _tiny_engine(target, 1, False)
    ref = ar.generate(prompts, p)
    moved = []
    real = tree.commit_path
    monkeypatch.setattr(tree, "commit_path", lambda c, s, st, path: (moved.append(path), real(c, s, st, path)))
    for b in (3, 6):
        eng = _tiny_engine(target, b, True)
        out = eng.generate(prompts, p)
        assert [o.token_ids for o in out] == [o.token_ids for o in ref], b
        for o, r in zip(out, ref):
            assert [(x.token_id, [t for t, _ in x.top]) for x in o.logprobs] == \
                   [(x.token_id, [t for t, _ in x.top]) for x in r.logprobs]
            torch.testing.assert_close(torch.tensor([x.logprob for x in o.logprobs]),
                                       torch.tensor([x.logprob for x in r.logprobs]), rtol=0, atol=1e-5)
        assert sum(o.stats.num_draft_tokens for o in out) > 0
        assert [eng.generate([q], p)[0].token_ids for q in prompts[:2]] == [o.token_ids for o in ref[:2]]
    assert moved   # steps went through the tree walk
    # mixed batch in one forward: greedy and sampling rows on trees, a penalized row on its chain
    mixed = [SamplingParams(max_new_tokens=30, ignore_eos=True),
             SamplingParams(max_new_tokens=30, ignore_eos=True, temperature=0.9, seed=11),
             SamplingParams(max_new_tokens=30, ignore_eos=True, repetition_penalty=1.3),
             SamplingParams(max_new_tokens=30, ignore_eos=True, temperature=1.2, top_k=20, seed=5)]
    qs = prompts[:4]
    on = _tiny_engine(target, 4, True).generate(qs, mixed)
    off = _tiny_engine(target, 4, False).generate(qs, mixed)
    plain = ar.generate(qs[:3:2], [SamplingParams(**{**m.__dict__, "speculative": False}) for m in mixed[:3:2]])
    assert [on[0].token_ids, on[2].token_ids] == [off[0].token_ids, off[2].token_ids] == [o.token_ids for o in plain]
    # a sampling row's output depends on its seed only: alone, or beside other rows, the same
    eng = _tiny_engine(target, 4, True)
    assert [eng.generate([qs[i]], mixed[i])[0].token_ids for i in (1, 3)] == [on[1].token_ids, on[3].token_ids]


@needs_kernel
def test_tree_falls_back_to_the_chain_where_it_cannot_run():
    """Block 2 (one draft: the tree would be the chain), a draft_threshold (chains cut short)
    and forwards the native layers do not serve run chains; the output is the same."""
    from test_native import _quantised_tiny_target
    from dflash_core.sampling import SamplingParams
    target = _quantised_tiny_target()
    eng = _tiny_engine(target, 4, True)
    rows = [type("S", (), {"params": SamplingParams()})()] * 2
    assert eng._tree_rows(rows, 4) == [0, 1] and eng._tree_rows(rows, 2) == []
    eng.config.draft_threshold = 0.3             # chains cut short by confidence: no trees
    assert eng._tree_rows(rows, 4) == []
    eng.config.draft_threshold = 0.0
    target._native_layers.max_rows = 4          # 2 rows x 4 tokens no longer native
    try:
        assert eng._tree_rows(rows, 4) == []
        p = SamplingParams(max_new_tokens=20, ignore_eos=True)
        assert [o.token_ids for o in eng.generate([[5, 6, 7], [9, 10]], p)] == \
               [o.token_ids for o in _tiny_engine(target, 1, False).generate([[5, 6, 7], [9, 10]], p)]
    finally:
        del target._native_layers.max_rows


def _run_steps(eng, prompts, params):
    """Every request through engine.step() -> {request index: (tokens, features [n, F] of
    the committed positions in order, their positions)}."""
    for i, q in enumerate(prompts):
        eng.add_request(str(i), q, params)
    got = {i: ([], [], []) for i in range(len(prompts))}
    while eng.has_unfinished_requests():
        for o in eng.step():
            toks, feats, pos = got[int(o.request_id)]
            toks += o.new_token_ids
            if o.features is not None:
                feats.append(o.features)
                pos.append(o.feature_positions)
    return {i: (t, torch.cat(f), torch.cat(p)) for i, (t, f, p) in got.items()}


@needs_kernel
@pytest.mark.parametrize("fast", [True, False])
def test_off_chain_paths_commit_the_right_kv_and_features(monkeypatch, fast):
    """An oracle drafter puts the target's next token at rank 0 or 1 of each position (a
    real drafter's runner-up), so the tree walk accepts nodes off the argmax chain and
    commit_path moves their K/V: the output still equals plain decoding token for token,
    and the features committed for the drafter and for capture are the plain run's. Both
    in the engine's greedy tree steps (fast) and in its general step."""
    from test_native import _quantised_tiny_target
    from dflash_core import speculative as spec
    from dflash_core.sampling import SamplingParams
    target = _quantised_tiny_target()
    V = target.config.vocab_size
    prompts = [[5, 6, 7], [100, 200, 300, 400, 500, 600, 700], list(range(1000, 1023))]
    p = SamplingParams(max_new_tokens=36, ignore_eos=True)
    plain = _run_steps(_tiny_engine(target, 1, False, capture=(0, 1)), prompts, p)
    truth = {tuple(q): plain[i][0] for i, q in enumerate(prompts)}
    real = spec.draft

    def oracle(ctx, tgt, rows, slots, anchors, start, b, confidence=False, topk=0, context=None):
        tokens, q, conf, top = real(ctx, tgt, rows, slots, anchors, start, b, confidence, topk, context)
        if top is None:
            return tokens, q, conf, top
        tt, tp = top[0].clone(), torch.full_like(top[1], 0.02)
        tp[..., :2] = 0.45
        for r, s in enumerate(rows):
            cont, done = truth[tuple(s.prompt)], s.num_committed - len(s.prompt)
            for d in range(b - 1):
                true = cont[done + d] if done + d < len(cont) else 0
                others = [(true + 1 + d + j) % V for j in range(tt.shape[-1])]
                rank = (done + d + r) % 2                  # truth at rank 0 or 1
                tt[r, d] = torch.tensor(others[:rank] + [true] + others[rank:-1])
        return tokens, q, conf, (tt, tp)
    monkeypatch.setattr(spec, "draft", oracle)
    moved = []
    commit = tree.commit_path
    monkeypatch.setattr(tree, "commit_path", lambda c, sl, st, path: (moved.append(path), commit(c, sl, st, path)))
    eng = _tiny_engine(target, 6, True, capture=(0, 1))
    eng.greedy_tree_steps = fast
    out = _run_steps(eng, prompts, p)
    off_chain = [x for x in moved if x[1:] != list(range(1, len(x)))]
    assert len(off_chain) > 10 and max(len(x) for x in moved) >= 3
    for i in range(len(prompts)):
        assert out[i][0] == plain[i][0]
        # the same positions in order (a step may verify past the token limit: one more), same bits
        n = len(plain[i][2])
        assert len(out[i][2]) >= n and torch.equal(out[i][2][:n], plain[i][2])
        assert torch.equal(out[i][1][:n], plain[i][1])


@needs_kernel
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 4, 0.9)])
def test_sampling_trees_match_the_target_distribution(monkeypatch, temperature, top_k, top_p):
    """Sampling rows on trees (the chain's rejection rule along the sampled drafts, extra
    children of the anchor for residual draws): 3-token continuations on a 6-token
    vocabulary follow the warped target's exact joint distribution (chi-square, 4000
    samples, alpha 0.1%), with residual draws landing on extra children; a walk that skips
    the rejection test (always keeps the sampled draft) is detected."""
    from test_engine import chi_square_pvalue, exact_joint, make_engine, sample_many
    from dflash_core.models.registry import tiny_random_target
    target = tiny_random_target(vocab_size=6, num_layers=2, seed=3)
    with torch.no_grad():
        target.lm_head.weight.mul_(0.15)
    target.pack_weights()
    slots = min(64, native.row_limit() // 4)   # every step's forward in the native layers (AVX2 build: 48 rows)
    assert target.serves_tree(slots, 4)
    prompt, length, n = [1, 4, 2], 3, 4000
    probs = exact_joint(target, prompt, length, temperature, top_k, top_p, None)
    walks = []
    real = tree.sampling_walk

    def recorded(parents, tokens, L, p, q, u):
        walks.append((real(parents, tokens, L, p, q, u)[0], L))
        return real(parents, tokens, L, p, q, u)
    monkeypatch.setattr(tree, "sampling_walk", recorded)
    eng = make_engine(target, block_size=4, max_slots=slots, max_seq_len=16, seed=5)
    assert eng.config.draft_tree
    counts = sample_many(eng, prompt, n, length, temperature=temperature, top_k=top_k, top_p=top_p)
    assert chi_square_pvalue(counts, probs, n) > 1e-3
    assert len(walks) >= n // 2
    assert sum(1 for path, L in walks if len(path) > 1 and path[1] > L) > 100   # extra children taken

    def no_test(parents, tokens, L, p, q, u):   # keeps every sampled draft: samples the drafter's q there
        return real(parents, tokens, L, p, q, torch.zeros_like(u).index_fill_(
            0, torch.arange(1, u.numel(), 2), 0.5))
    monkeypatch.setattr(tree, "sampling_walk", no_test)
    bad = sample_many(make_engine(target, block_size=4, max_slots=slots, max_seq_len=16, seed=5), prompt, n, length,
                      temperature=temperature, top_k=top_k, top_p=top_p)
    assert chi_square_pvalue(bad, probs, n) < 1e-3
