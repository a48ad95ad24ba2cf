"""Lookup branches (dflash_core/lookup.py): the n-gram index against a brute-force search,
the branch length rule, the merge into the drafter's tree (tree.merged_nodes), the engine
with them on against its own plain decoding (greedy, token for token) on a quantised tiny
target and on the embedded default model, and the walk that measures their tau."""
from __future__ import annotations

import random

import pytest
import torch

from dflash_core import lookup, tree
from test_tree import _tiny_engine, needs_kernel


def _brute_find(tokens: list[int]) -> tuple[int, int]:
    """The longest suffix (<= MAX_N) ending at an earlier position too, its latest end."""
    L = len(tokens)
    for n in range(min(lookup.MAX_N, L - 1), 0, -1):
        for e in range(L - 2, n - 2, -1):
            if tokens[e - n + 1:e + 1] == tokens[L - n:]:
                return e, n
    return -1, 0


def test_ngram_index_equals_a_brute_force_search_as_the_list_grows():
    rng = random.Random(0)
    for trial in range(20):
        vocab = rng.choice([2, 3, 5, 20])
        tokens = [rng.randrange(vocab) for _ in range(rng.randrange(1, 6))]
        index = lookup.NgramIndex()
        found = 0
        for _ in range(80):
            got = index.find(tokens)
            assert got == _brute_find(tokens), (trial, tokens)
            found += got[1] > 0
            tokens += [rng.randrange(vocab) for _ in range(rng.choice([1, 1, 2, 5]))]   # steps commit 1+ tokens
        assert found > 0
    assert lookup.NgramIndex().find([7]) == (-1, 0)
    assert lookup.NgramIndex().find([1, 2, 3]) == (-1, 0)
    # the latest occurrence of the longest suffix: [1, 2] last ended at 5, a longer one never
    assert lookup.NgramIndex().find([1, 2, 9, 4, 1, 2, 8, 1, 2]) == (5, 2)


def test_branch_length_and_propose():
    assert [lookup.branch_length(n, 2) for n in range(8)] == [0, 1, 2, 2, 3, 4, 4, 5]
    assert [lookup.branch_length(n, 1) for n in range(8)] == [0, 1, 1, 1, 2, 2, 3, 3]
    assert lookup.branch_length(5, 0) == 0
    toks = [10, 11, 12, 13, 14, 15, 10, 11]
    assert lookup.propose(lookup.NgramIndex(), toks, 3) == [12, 13]       # 2 of 3 nodes after "10 11"
    assert lookup.propose(lookup.NgramIndex(), toks, 7) == [12, 13, 14, 15, 10]
    assert lookup.propose(lookup.NgramIndex(), [10, 11, 12, 11], 4) == [12, 11]   # a 1-token match: half
    assert lookup.propose(lookup.NgramIndex(), [1, 2, 3], 4) == []
    # knowing the drafter's first choice (greedy trees): the whole tree where the branch starts
    # with it (agrees) or where the drafter is unsure and 2+ tokens matched; else as above
    assert lookup.branch_length(6, 1, 0.9, agrees=True) == 6
    assert lookup.branch_length(6, 2, lookup.UNSURE - 0.01) == 6
    assert lookup.branch_length(6, 1, lookup.UNSURE - 0.01) == 3 and lookup.branch_length(6, 2, 0.9) == 4
    assert lookup.propose(lookup.NgramIndex(), toks, 7, (12, 0.95)) == [12, 13, 14, 15, 10, 11]   # agrees
    assert lookup.propose(lookup.NgramIndex(), toks, 3, (99, 0.95)) == [12, 13]                  # a sure drafter
    assert lookup.propose(lookup.NgramIndex(), toks, 3, (99, 0.1)) == [12, 13, 14]               # an unsure one
    assert lookup.propose(lookup.NgramIndex(), [1, 2, 3], 4, (5, 0.1)) == []


def test_merged_nodes_puts_the_branch_first_and_shares_common_nodes():
    top_p = [[0.6, 0.3, 0.05, 0.05], [0.9, 0.05, 0.03, 0.02], [0.5, 0.5, 0.0, 0.0]]
    top_tok = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    # no branch: the drafter's best-first tree
    nodes = tree.best_first(top_p, 5)
    assert tree.merged_nodes([], top_p, top_tok, 5) == ([p for p, _, _ in nodes], [top_tok[d][k] for _, d, k in nodes])
    # a branch 1 -> 5 -> 42: its first two nodes are the drafter's two best, taken once
    parents, tokens = tree.merged_nodes([1, 5, 42], top_p, top_tok, 5)
    assert parents[:3] == [0, 1, 2] and tokens[:3] == [1, 5, 42]
    assert len(tokens) == 5 and len(set(zip(parents, tokens))) == 5
    assert all(p < i + 1 for i, p in enumerate(parents))                # a parent before its children
    assert (0, 2) in set(zip(parents, tokens))                          # then the drafter's runner-up at 1
    # a branch off the drafter's choices: all its nodes, the rest the drafter's best
    parents, tokens = tree.merged_nodes([7, 7], top_p, top_tok, 4)
    assert (parents, tokens) == ([0, 1, 0, 3], [7, 7, 1, 5])                 # 1, then 1 -> 5 (0.54 > 0.3)
    # never more than n nodes, the branch cut to n
    assert tree.merged_nodes([3, 3, 3, 3, 3], top_p, top_tok, 2) == ([0, 1], [3, 3])


@needs_kernel
def test_lookup_branches_keep_greedy_output_and_get_accepted(monkeypatch):
    """Greedy tree rows with lookup branches: token for token the engine's plain output, batched
    and alone, at blocks 3 and 6; the branches are proposed and accepted (more drafts accepted
    than with the same trees without them, on a target whose greedy output repeats)."""
    from test_native import _quantised_tiny_target
    from dflash_core.sampling import SamplingParams
    target = _quantised_tiny_target()
    prompts = [[5, 6, 7], [100, 200, 300, 400, 500, 600, 700], [40, 41] * 9, list(range(1000, 1023))]
    p = SamplingParams(max_new_tokens=48, ignore_eos=True)
    ref = [o.token_ids for o in _tiny_engine(target, 1, False).generate(prompts, p)]
    proposed = []
    real = lookup.propose
    monkeypatch.setattr(lookup, "propose", lambda ix, toks, n, first=None: (proposed.append(real(ix, toks, n, first)),
                                                                         proposed[-1])[1])
    for b in (3, 6):
        accepted = {}
        for on in (True, False):
            eng = _tiny_engine(target, b, True)
            eng.config.draft_lookup = on
            assert eng.draft_lookups is on
            out = eng.generate(prompts, p)
            assert [o.token_ids for o in out] == ref, (b, on)
            accepted[on] = sum(o.stats.num_accepted_tokens for o in out)
            if on:
                assert [eng.generate([q], p)[0].token_ids for q in prompts[:3]] == ref[:3]
        assert accepted[True] > accepted[False], (b, accepted)
    assert sum(1 for x in proposed if x) > 20
    # each step says how many of its accepted drafts were lookup-branch nodes (the metrics read it)
    for on in (True, False):
        eng = _tiny_engine(target, 6, True)
        eng.config.draft_lookup = on
        got = step_lookup_counts(eng, prompts, p)
        assert (got["lookup"] > 0) is on, got


def step_lookup_counts(eng, prompts, p) -> dict:
    """Decode the prompts step by step -> the accepted drafts summed over steps, and those
    that were lookup-branch nodes; every step's count of those is within its accepted."""
    for i, q in enumerate(prompts):
        eng.add_request(str(i), q, p)
    got = {"lookup": 0, "accepted": 0}
    while eng.has_unfinished_requests():
        for o in eng.step():
            assert 0 <= o.step.num_lookup_accepted_tokens <= o.step.num_accepted_tokens
            got["lookup"] += o.step.num_lookup_accepted_tokens
            got["accepted"] += o.step.num_accepted_tokens
    return got


def test_lookup_needs_trees_and_the_bench_switch():
    from test_native import _quantised_tiny_target
    from dflash_core.bench import draft_lookup_set
    target = _quantised_tiny_target()
    eng = _tiny_engine(target, 4, False)
    assert eng.config.draft_lookup and not eng.draft_lookups
    with draft_lookup_set(eng, True) as n:   # bench --lookup-ab: 1 only where lookups then run
        assert n == 0
    eng = _tiny_engine(target, 4, True)
    trees = eng.draft_trees
    assert eng.draft_lookups is trees
    with draft_lookup_set(eng, False) as n:
        assert n == 0 and not eng.draft_lookups
    assert eng.config.draft_lookup and eng.draft_lookups is trees          # restored


@needs_kernel
@pytest.mark.parametrize("draft_corpus", ["none", "auto"])
def test_walk_with_lookup_replays_the_engine_on_the_default_model(draft_corpus):
    """tree_walk_tau(lookup=True) replays the engine's greedy steps with lookup branches
    (draft_corpus none), and with its corpus index too (auto: the default drafter's
    corpus.npz, corpus=engine.corpus): on the embedded default model its step lengths are
    the engine's, step for step, and its tau is above the walk without them."""
    from dflash_core.api import build_engine
    from dflash_core.chat import encode_prompt
    from dflash_core.engine import EngineConfig
    from dflash_core.sampling import SamplingParams
    from dflash_core.training.walk import tree_walk_tau
    engine, tok = build_engine("default", "default", EngineConfig(max_slots=4, max_seq_len=512, block_size=4,
                                                                  draft_corpus=draft_corpus), dtype=torch.float32)
    if not engine.target.serves_tree(1, 4):
        pytest.skip("trees run in the native fp32 layers")
    assert engine.draft_corpus == (draft_corpus == "auto")
    prompts = [encode_prompt(tok, q, chat=True)
               for q in ("List the days of the week, one per line.", "Write a haiku about rain.",
                         "Repeat after me: the cat sat on the mat. The cat sat on the mat.")]
    out = engine.generate(prompts, SamplingParams(max_new_tokens=40, speculative=False, ignore_eos=True))
    recs = [{"prompt_ids": q, "response_ids": o.token_ids} for q, o in zip(prompts, out)]
    w = tree_walk_tau(engine.target, engine.draft_backend.drafter, recs, [4], lookup=True, corpus=engine.corpus)
    base = tree_walk_tau(engine.target, engine.draft_backend.drafter, recs, [4])
    assert w["walks"] == base["walks"] and "lookup_walks" not in base   # the drafter's trees, as without
    spec = engine.generate(prompts, SamplingParams(max_new_tokens=40, ignore_eos=True))
    assert [o.token_ids for o in spec] == [o.token_ids for o in out]
    steps = [o.stats.acceptance_lengths for o in spec]
    # the walk knows no token past the response: its last step is cut there
    for walked, real in zip(w["lookup_walks"][4], steps):
        assert walked[:-1] == real[:len(walked) - 1]
    assert w["lookup_tau"][4] > base["tau"][4]


def test_sampling_nodes_with_a_lookup_branch():
    drafts, top = [7, 8, 9, 10, 11], [7, 20, 21, 22]
    # no branch: the chain, then half the nodes as extra children of the anchor (as before)
    assert tree.sampling_nodes(drafts, top, 5) == ([0, 1, 2, 0, 0], [7, 8, 9, 20, 21], 3)
    assert tree.sampling_nodes(drafts, top, 5, []) == tree.sampling_nodes(drafts, top, 5)
    # a branch off the anchor: its own chain after the extras it leaves (half the nodes in all)
    assert tree.sampling_nodes(drafts, top, 5, [30, 31, 32]) == ([0, 1, 2, 0, 4], [7, 8, 9, 30, 31], 3)
    assert tree.sampling_nodes(drafts, top, 5, [20]) == ([0, 1, 2, 0, 0], [7, 8, 9, 21, 20], 3)   # not twice
    # a branch that starts with the chain's first draft hangs off chain node 1
    assert tree.sampling_nodes(drafts, top, 5, [7, 40, 41]) == ([0, 1, 2, 0, 1], [7, 8, 9, 20, 40], 3)
    # a branch the chain already holds: no node of its own
    assert tree.sampling_nodes(drafts, top, 5, [7, 8]) == tree.sampling_nodes(drafts, top, 5)
    assert tree.sampling_nodes(drafts, top, 1, [30]) == ([0], [7], 1)   # one node: the chain's
    # the branch's block indices: the chain nodes it starts with, then its own (last)
    assert tree.sampling_lookup_nodes(drafts, 5, [30, 31, 32], 5) == {4, 5}
    assert tree.sampling_lookup_nodes(drafts, 5, [7, 40, 41], 5) == {1, 5}
    assert tree.sampling_lookup_nodes(drafts, 5, [7, 8], 5) == {1, 2}
    assert tree.sampling_lookup_nodes(drafts, 5, None, 5) == set()


def test_lookup_accepted_tokens_reach_the_metrics():
    from service.metrics import ServiceMetrics
    m = ServiceMetrics("m", max_slots=2)
    m.on_spec(1, 4, 2, [1, 1], 2)
    m.on_spec(1, 4, 1, [1], 0)
    text = m.render().decode()
    assert "dflash_spec_decode_num_lookup_accepted_tokens_total 2.0" in text
    assert "dflash_spec_decode_num_accepted_tokens_total 3.0" in text


@needs_kernel
def test_sampling_trees_with_lookup_branches_match_the_target_distribution(monkeypatch):
    """Sampling rows whose trees carry lookup branches (nodes off the chain, reached only by
    the target's own draws): 3-token continuations on a 6-token vocabulary follow the
    target's exact joint distribution (chi-square, 4000 samples, alpha 0.1%), and walks
    do pass through lookup nodes."""
    from test_engine import chi_square_pvalue, exact_joint, make_engine, sample_many
    from dflash_core import native
    from dflash_core.models.registry import tiny_random_target
    target = tiny_random_target(vocab_size=6, num_layers=2, seed=3)
    with torch.no_grad():
        target.lm_head.weight.mul_(0.15)
    target.pack_weights()
    slots = min(64, native.row_limit() // 4)
    prompt, length, n = [1, 4, 2, 1, 4], 3, 4000
    probs = exact_joint(target, prompt, length, 1.0, 0, 1.0, None)
    own_nodes, taken = [], []
    real_nodes, real_walk = tree.sampling_nodes, tree.sampling_walk

    def nodes(drafts, top, m, look=None):
        parents, toks, L = real_nodes(drafts, top, m, look)
        k = min(len(look), m // 2) if look else 0
        j = 0
        while j < k and look[j] == drafts[j]:
            j += 1
        own_nodes.append(set(range(len(parents) - (k - j) + 1, len(parents) + 1)))   # the branch's own nodes
        return parents, toks, L

    def walk(parents, tokens, L, p, q, u):
        path, nxt = real_walk(parents, tokens, L, p, q, u)
        taken.append(bool(own_nodes[-1] & set(path)))
        return path, nxt
    monkeypatch.setattr(tree, "sampling_nodes", nodes)
    monkeypatch.setattr(tree, "sampling_walk", walk)
    eng = make_engine(target, block_size=4, max_slots=slots, max_seq_len=16, seed=5)
    assert eng.draft_lookups
    counts = sample_many(eng, prompt, n, length, temperature=1.0)
    assert chi_square_pvalue(counts, probs, n) > 1e-3
    assert sum(1 for s in own_nodes if s) > 1000 and sum(taken) > 40   # 1857 trees with one, 80 walks through it
