"""Corpus branches (dflash_core/corpus.py): the index's counts, backoff and chains, its
calibration on left-out records, files, the scored tree (tree.scored_nodes), the engine
planning with an index against its own plain decoding (greedy, token for token) on a
quantised tiny target, and every way to switch it (config, build_engine, commands, bench,
the schedule's tau)."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dflash_core import corpus, lookup, tree
from test_lookup import step_lookup_counts
from test_tree import _tiny_engine, needs_kernel

ROOT = Path(__file__).resolve().parents[1]


def _rec(conv, prompt, response, pool=False, sampled=False):
    return {"conv_id": conv, "prompt_ids": list(prompt), "response_ids": list(response),
            "calibration_pool": pool, "sampled": sampled}


def _held_out_ids(share: float, n: int = 2) -> list[str]:
    """Conversation ids the build leaves out at this calibration share."""
    out = [f"c{i}" for i in range(1000) if corpus._held_out(f"c{i}", share)][:n]
    assert len(out) == n
    return out


def _small_index(**kw) -> corpus.CorpusIndex:
    cal = _held_out_ids(0.5)
    recs = [_rec("a", [1, 2], [3, 4, 5, 6, 7]), _rec("b", [1, 2], [3, 4, 5, 6, 7]),
            _rec("c", [9], [3, 4, 5, 6, 8]), _rec("d", [11, 12], [13, 14]),
            _rec(cal[0], [1, 2], [3, 4, 5, 6, 8, 20, 21], pool=True),   # calibration: never indexed
            _rec(cal[1], [1, 2], [3, 4, 5, 6, 7], pool=True, sampled=True)]   # sampled: not walked either
    return corpus.CorpusIndex.build(recs, vocab_size=64, calibration_share=0.5, **kw)


def test_index_keeps_contexts_seen_often_enough_and_their_most_frequent_next_token():
    idx = _small_index()
    assert idx.meta["records"] == 4 and idx.meta["calibration_records"] == 1 and idx.meta["vocab_size"] == 64
    tok = lambda ctx: (idx.next_token(ctx) or (None,))[0]   # noqa: E731
    assert tok([3]) == 4                       # 3 -> 4 in all three responses
    assert tok([5, 6]) == 7                    # 7 twice, 8 once: the most frequent
    assert tok([0, 9, 3, 4, 5, 6]) == 7        # the longest context it holds decides (4 tokens)
    assert tok([2]) == 3                       # the prompt's last token before the response counts
    assert tok([9]) is None and tok([13]) is None   # seen once (min_count 2): not indexed
    assert tok([20]) is None                   # only the calibration record had it: left out
    assert tok([50]) is None and idx.next_token([]) is None
    # backoff: an unknown long context falls back to the longest known suffix
    assert tok([40, 41, 42, 3]) == 4
    # a chain follows its own guesses
    assert idx.chain([1, 2], 6)[0] == [3, 4, 5, 6, 7]   # and stops where no context is known
    assert idx.chain([1, 2], 2)[0] == [3, 4] and idx.chain([50], 3) == ([], [])
    toks, probs = idx.chain([1, 2], 6)
    assert len(probs) == len(toks) and all(0 < p < 1 for p in probs)
    # min_count 1 keeps single contexts too
    one = _small_index(min_count=1)
    assert one.next_token([9]) == (3, pytest.approx(one.next_token([9])[1])) and one.next_token([13])[0] == 14
    assert len(one) > len(idx)


def test_calibration_measures_the_guesses_on_left_out_records():
    """The left-out greedy record (prompt 1 2, response 3 4 5 6 8 ...) is walked: every guess
    the index makes along it is right up to "3 4 5 6", then 7 where the target wrote 8."""
    idx = _small_index()
    assert idx.meta["calibration_anchors"] == 6   # 7 response tokens: 6 anchors with a next token
    bp = idx.bucket_probs

    def bucket_of(ctx):
        keys = corpus.tail_keys(ctx)
        for n in range(len(keys), 0, -1):
            i = int(np.searchsorted(idx.keys, keys[n - 1]))
            if i < len(idx.keys) and idx.keys[i] == keys[n - 1]:
                return int(idx.buckets[i])
    right = bucket_of([1, 2, 3])          # 1 2 3 -> 4: right every time it was asked
    wrong = bucket_of([3, 4, 5, 6])       # -> 7, the target wrote 8: wrong every time
    assert right != wrong
    assert bp[right].max() > 0.5 > bp[wrong].max()
    # buckets nobody walked keep the prior, 1/2
    walked = {right, wrong}
    assert all(bp[b, 0] == bp[b, 1] == 0.5 for b in range(corpus.NUM_BUCKETS) if b not in walked
               and b not in set(idx.buckets.tolist()))
    # the context lookup is measured too: shape [lookup.MAX_N, LOOKUP_DEPTHS], probabilities
    assert idx.lookup_probs.shape == (lookup.MAX_N, corpus.LOOKUP_DEPTHS)
    assert ((idx.lookup_probs > 0) & (idx.lookup_probs < 1)).all()
    assert idx.lookup_prob(9, 9) == idx.lookup_probs[-1, -1]   # longer / deeper: the last row and column


def test_index_files_round_trip_and_bad_ones_are_refused(tmp_path):
    idx = _small_index()
    f = tmp_path / "c.npz"
    idx.save(f)
    back = corpus.CorpusIndex.load(f)
    assert (back.keys == idx.keys).all() and (back.tokens == idx.tokens).all() and (back.buckets == idx.buckets).all()
    assert np.allclose(back.bucket_probs, idx.bucket_probs) and np.allclose(back.lookup_probs, idx.lookup_probs)
    assert back.meta["records"] == 4 and back.chain([1, 2], 6) == idx.chain([1, 2], 6)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a corpus index"):
        corpus.CorpusIndex.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a corpus index"):
        corpus.CorpusIndex.load(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="ascending"):
        corpus.CorpusIndex([5, 3], [1, 2], [0, 0], idx.bucket_probs, idx.lookup_probs, {})
    with pytest.raises(ValueError, match="differ in length"):
        corpus.CorpusIndex([3, 5], [1], [0, 0], idx.bucket_probs, idx.lookup_probs, {})
    with pytest.raises(ValueError, match="lookup_probs"):
        corpus.CorpusIndex([3], [1], [0], idx.bucket_probs, np.zeros((2, 2)), {})
    with pytest.raises(ValueError, match="calibration_share"):
        corpus.CorpusIndex.build([_rec("a", [1], [2])], 64, calibration_share=0)
    with pytest.raises(ValueError, match="no records"):
        corpus.CorpusIndex.build([], 64)


def test_tail_keys_are_the_builds_keys():
    rng = random.Random(1)
    t = np.array([-1] * corpus.MAX_N + [rng.randrange(50000) for _ in range(40)], dtype=np.int64)
    for end in range(corpus.MAX_N, len(t)):
        keys = corpus.tail_keys(t[corpus.MAX_N:end + 1].tolist())
        for n in range(1, len(keys) + 1):
            assert int(corpus._keys_at(t, np.array([end]), n)[0]) == keys[n - 1]


def test_scored_nodes_is_best_first_over_every_source():
    top_p = [[0.6, 0.3, 0.05, 0.05], [0.9, 0.05, 0.03, 0.02], [0.5, 0.4, 0.05, 0.05]]
    top_tok = [[10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]]
    # no chains: the drafter's best-first tree
    par, tok, on = tree.scored_nodes([], top_p, top_tok, 5)
    bf = tree.best_first(top_p, 5)
    assert par == [p for p, _, _ in bf] and tok == [top_tok[d][k] for _, d, k in bf] and not any(on)
    # a sure chain that disagrees with the drafter's first choice is picked first, and deep
    par, tok, on = tree.scored_nodes([([50, 51, 52], [0.95, 0.95, 0.95])], top_p, top_tok, 5)
    assert (par[:3], tok[:3], on[:3]) == ([0, 1, 2], [50, 51, 52], [True] * 3)
    # then the drafter's 20 under 50 (0.95 * 0.9), above its own first choice at the root (0.6)
    assert (par[3:], tok[3:], on[3:]) == ([1, 0], [20, 10], [False, False])
    # a token the chain and the drafter both propose gets 1 - (1 - p)(1 - q): one node
    par, tok, on = tree.scored_nodes([([11], [0.5])], top_p, top_tok, 2)
    assert tok == [11, 10] and par == [0, 0] and on == [True, False]   # 1 - 0.7 * 0.5 = 0.65 > 0.6
    # two chains through the same first token: both continue under the shared node
    par, tok, on = tree.scored_nodes([([10, 60], [0.9, 0.95]), ([10, 61], [0.9, 0.92])], top_p, top_tok, 3)
    assert tok[0] == 10 and set(zip(par[1:], tok[1:])) == {(1, 60), (1, 61)} and all(on)
    # never deeper than the drafter's positions, never more than n nodes
    par, tok, on = tree.scored_nodes([([70, 71, 72, 73, 74], [0.99] * 5)], top_p, top_tok, 6)
    assert tok[:3] == [70, 71, 72] and 73 not in tok and len(tok) == 6
    depth = {0: 0}
    for i, p in enumerate(par):
        depth[i + 1] = depth[p] + 1
    assert max(depth.values()) <= len(top_p)


def test_plan_with_chains_writes_the_scored_trees_and_their_chain_nodes():
    import torch
    top_p = [[[0.6, 0.3, 0.05, 0.05], [0.9, 0.05, 0.03, 0.02]]] * 2
    top_tok = [[[10, 11, 12, 13], [20, 21, 22, 23]]] * 2
    draft = torch.zeros(2, 2, dtype=torch.int64)
    look: dict = {}
    par = tree.plan((top_tok, top_p), [0, 1], draft, None, look, chains={0: [([50, 51], [0.95, 0.95])], 1: []})
    assert par[0] == [0, 1] and draft[0].tolist() == [50, 51] and look == {0: {1, 2}}
    assert draft[1].tolist() == [10, 20] and par[1] == [0, 1]


def _repeating_index(target, prompts, p) -> corpus.CorpusIndex:
    """An index of the tiny target's own greedy responses to these prompts (so its chains
    are right where the target repeats itself)."""
    ref = _tiny_engine(target, 1, False).generate(prompts, p)
    recs = [_rec(f"r{i}", q, o.token_ids) for i, (q, o) in enumerate(zip(prompts, ref))]
    recs += [_rec(c, prompts[0], ref[0].token_ids, pool=True) for c in _held_out_ids(0.5, 2)]
    return corpus.CorpusIndex.build(recs * 2, target.config.vocab_size, calibration_share=0.5), \
        [o.token_ids for o in ref]


@needs_kernel
def test_corpus_branches_keep_greedy_output_and_get_accepted():
    """Greedy trees planned with a corpus index: token for token the engine's plain output,
    batched and alone, at blocks 3 and 6; with an index of the target's own responses more
    drafts are accepted than with lookup branches alone, and the steps count them."""
    from test_native import _quantised_tiny_target
    from dflash_core.sampling import SamplingParams
    target = _quantised_tiny_target()
    prompts = [[5, 6, 7], [100, 200, 300, 400, 500, 600, 700], [40, 41] * 9, list(range(1000, 1023))]
    p = SamplingParams(max_new_tokens=48, ignore_eos=True)
    idx, ref = _repeating_index(target, prompts, p)
    for b in (3, 6):
        accepted = {}
        for use in (True, False):
            eng = _tiny_engine(target, b, True)
            eng.corpus = idx if use else None
            assert eng.draft_corpus is (use and eng.draft_lookups)
            if not eng.draft_trees:
                pytest.skip("trees run in the native fp32 layers")
            out = eng.generate(prompts, p)
            assert [o.token_ids for o in out] == ref, (b, use)
            accepted[use] = sum(o.stats.num_accepted_tokens for o in out)
            if use:
                assert [eng.generate([q], p)[0].token_ids for q in prompts[:2]] == ref[:2]
        assert accepted[True] > accepted[False], (b, accepted)
    eng = _tiny_engine(target, 6, True)
    eng.corpus = idx
    assert step_lookup_counts(eng, prompts, p)["lookup"] > 0
    # off where lookup branches are off, and without trees
    eng.config.draft_lookup = False
    assert not eng.draft_corpus
    assert not _tiny_engine(target, 6, False).draft_corpus


def test_sampling_rows_keep_their_trees_with_a_corpus_index():
    """Sampling rows do not read the index: same seed, same tokens with it and without."""
    from test_native import _quantised_tiny_target
    from dflash_core.sampling import SamplingParams
    target = _quantised_tiny_target()
    prompts = [[5, 6, 7], [40, 41] * 9]
    p = SamplingParams(max_new_tokens=32, ignore_eos=True, temperature=0.8, seed=3)
    idx, _ = _repeating_index(target, prompts, SamplingParams(max_new_tokens=32, ignore_eos=True))
    outs = []
    for use in (True, False):
        eng = _tiny_engine(target, 4, True)
        eng.corpus = idx if use else None
        outs.append([o.token_ids for o in eng.generate(prompts, p)])
    assert outs[0] == outs[1]


def test_build_engine_loads_the_named_index_and_refuses_bad_ones(tmp_path):
    from dflash_core.api import build_engine, corpus_file
    from dflash_core.engine import EngineConfig
    from dflash_core.models.loader import ModelLoadError
    cfg = lambda c: EngineConfig(max_slots=1, max_seq_len=64, block_size=4, draft_corpus=c)   # noqa: E731
    # the default drafter ships one: auto finds it; none turns it off
    assert corpus_file("auto", "default") == ROOT / "dflash_core/assets/drafter-smollm2-135m/corpus.npz"
    assert corpus_file("auto", "random") is None and corpus_file("none", "default") is None
    assert corpus_file("auto", "default", "tiny-random") is None
    f = tmp_path / "c.npz"
    _small_index().save(f)   # built for a vocabulary of 64
    eng, _ = build_engine("tiny-random", "random", cfg("auto"), tokenizer=False)
    assert eng.corpus is None
    with pytest.raises(ModelLoadError, match="vocabulary of 64"):
        build_engine("tiny-random", "random", cfg(str(f)), tokenizer=False)
    with pytest.raises(ModelLoadError, match="no such file"):
        build_engine("tiny-random", "random", cfg(str(tmp_path / "missing.npz")), tokenizer=False)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match="not a corpus index"):
        build_engine("tiny-random", "random", cfg(str(tmp_path / "junk.npz")), tokenizer=False)
    eng, _ = build_engine("tiny-random", None, cfg(str(tmp_path / "missing.npz")), tokenizer=False)
    assert eng.corpus is None   # no drafter, no trees: nothing to plan, nothing loaded
    with pytest.raises(ValueError, match="draft_corpus"):
        EngineConfig(draft_corpus="")


def test_dflash_corpus_command_builds_an_index_and_refuses_bad_input(tmp_path):
    out = tmp_path / "idx.npz"
    data = ROOT / "data/holdout-sharegpt-smollm2-135m"
    r = subprocess.run([sys.executable, "-m", "dflash_core.cli", "corpus", "--data", str(data), "--out", str(out),
                        "--calibration-share", "0.2", "--json"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    idx = corpus.CorpusIndex.load(out)
    assert rec["entries"] == len(idx) > 1000 and rec["vocab_size"] == 49152 == idx.vocab_size
    assert 0 < rec["records"] < 100 and rec["calibration_records"] == 100 - rec["records"]
    for argv, msg in ((["--data", str(tmp_path / "nope"), "--out", str(out)], "no folder"),
                      (["--data", str(tmp_path), "--out", str(out)], "holds no data shards"),
                      (["--data", str(data), "--out", str(out), "--calibrate-on", str(tmp_path)], "calibration folders"),
                      (["--data", str(data), "--out", str(out), "--calibration-share", "1.5"], "calibration_share")):
        r = subprocess.run([sys.executable, "-m", "dflash_core.cli", "corpus", *argv], capture_output=True,
                           text=True, cwd=ROOT)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_the_schedule_predicts_with_the_corpus_tau_where_the_engine_plans_with_one():
    from types import SimpleNamespace
    from dflash_core.autoschedule import check_tree_tau, profile_tree_tau
    prof = {"tree_tau": {4: 1.8}, "tree_lookup_tau": {4: 2.1}, "tree_corpus_tau": {4: 2.3}}
    eng = lambda corpus_on, lookups=True: SimpleNamespace(draft_corpus=corpus_on, draft_lookups=lookups)  # noqa: E731
    assert profile_tree_tau(eng(True), prof) == {4: 2.3}
    assert profile_tree_tau(eng(False), prof) == {4: 2.1}
    assert profile_tree_tau(eng(False, False), prof) == {4: 1.8}
    assert profile_tree_tau(eng(True), {"tree_lookup_tau": {4: 2.1}}) == {4: 2.1}
    # the shipped profile has it, and it is above the lookup walk's at every block size
    shipped = json.loads((ROOT / "dflash_core/assets/drafter-smollm2-135m/acceptance.json").read_text())
    c, lk = check_tree_tau(shipped["tree_corpus_tau"]), check_tree_tau(shipped["tree_lookup_tau"])
    assert set(c) == set(lk) and all(c[b] > lk[b] for b in c if b >= 3)


def test_native_chain_is_the_numpy_search():
    """CorpusIndex.guesses' native call (native.corpus_chain) gives the numpy search's
    guesses and buckets, on the shipped index over real contexts and on a small one with
    short tails; chain's probabilities are their buckets'."""
    from dflash_core import native
    from dflash_core.training.shards import read_shard
    if not native.available():
        pytest.skip("the native kernel is not built here")
    shipped = corpus.CorpusIndex.load(ROOT / "dflash_core/assets/drafter-smollm2-135m/corpus.npz")
    recs = read_shard(ROOT / "data/holdout-sharegpt-smollm2-135m/shard_00000.npz")[:20]
    guessed = 0
    for r in recs:
        seq = r["prompt_ids"] + r["response_ids"]
        for a in range(len(r["prompt_ids"]), len(seq), 3):
            got = native.corpus_chain(shipped.keys, shipped.tokens, shipped.buckets, seq[:a], 7, corpus.MAX_N,
                                      corpus.SEED, corpus.MUL)
            assert got is not None
            assert shipped.guesses(seq[:a], 7) == got == shipped._guesses_numpy(seq[:a], 7)
            guessed += len(got[0])
    assert guessed > 500
    small = _small_index()
    for ctx in ([], [3], [2], [1, 2], [0, 9, 3, 4, 5, 6], [50], [40, 41, 42, 3]):
        toks, buckets = small._guesses_numpy(ctx, 6)
        assert small.guesses(ctx, 6) == (toks, buckets), ctx
        assert small.chain(ctx, 6) == (toks, [float(small.bucket_probs[b, int(j > 0)]) for j, b in enumerate(buckets)])
    assert small.chain([1, 2], 0) == ([], [])
