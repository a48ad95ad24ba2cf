"""Drafter training on tiny random models: the block mask, the loss weights, learning,
exact resume, and resumable data generation."""
import json
import math
import platform

import pytest
import torch

from dflash_core.api import tiny_random_target
from dflash_core.drafter import DFlashDrafter
from dflash_core.engine import EngineConfig, SpecEngine
from dflash_core.training import datagen
from dflash_core.training.blocks import (IGNORE, accepted_lengths, build_block_batch, default_gamma,
                                         loss_weights, sample_anchors, walk_landings, weighted_block_loss)
from dflash_core.datasets import Prompt
from dflash_core.training.train import TrainConfig, Trainer, lr_factor

VOCAB = 96
MASK = 16


def _target(seed=0):
    return tiny_random_target(vocab_size=VOCAB, num_layers=4, seed=seed)


def _drafter(target, block_size=4, seed=1, target_layer_ids=None):
    d = DFlashDrafter.from_target(target.config, num_layers=1, block_size=block_size, mask_token_id=MASK,
                                  num_features=2, target_layer_ids=target_layer_ids, seed=seed)
    with torch.no_grad():  # a larger init so that every input visibly moves the output
        for n, p in d.named_parameters():
            if not n.endswith("norm.weight"):
                p.mul_(10)
    return d


def _block_logits(target, drafter, tokens, anchors, feats=None):
    """Drafter logits [R, T, V] for blocks at `anchors` [R, N] of `tokens` [R, C]."""
    R, C = tokens.shape
    B = drafter.config.block_size
    seq_lens = torch.full((R,), C)
    bb = build_block_batch(tokens, seq_lens, anchors, torch.ones_like(anchors, dtype=torch.bool), B, MASK)
    if feats is None:
        cache = target.new_cache(R, C)
        _, feats = target(tokens, cache, torch.arange(R), torch.zeros(R, dtype=torch.long),
                          capture_layers=drafter.config.target_layer_ids)
    with torch.no_grad():
        h = drafter.forward_blocks(target.embed(bb.block_ids), bb.block_pos, feats, bb.ctx_pos, bb.attn_mask)
        return target.logits(h), bb


# ---- the block attention mask -----------------------------------------------------------
def test_block_sees_only_its_context_and_itself():
    torch.manual_seed(0)
    target = _target()
    drafter = _drafter(target)
    B = drafter.config.block_size
    tokens = torch.randint(17, VOCAB, (1, 30))
    anchors = torch.tensor([[8, 20]])                    # block 0: 8..11, block 1: 20..23
    base, _ = _block_logits(target, drafter, tokens, anchors)
    blk0, blk1 = slice(0, B), slice(B, 2 * B)

    def changed(pos):
        t = tokens.clone()
        t[0, pos] = (t[0, pos] + 1 - 17) % (VOCAB - 17) + 17
        got, _ = _block_logits(target, drafter, t, anchors)
        return [not torch.allclose(got[0, s], base[0, s], atol=1e-5) for s in (blk0, blk1)]

    # the other block's anchor token: only that block moves
    assert changed(20) == [False, True]
    # tokens after block 0's anchor (inside / after its span, before block 1's anchor)
    assert changed(9) == [False, True]
    assert changed(15) == [False, True]
    # the anchor itself is a block-0 input; a token before it is context for both
    assert changed(8) == [True, True]
    assert changed(3) == [True, True]
    # after both anchors: nobody sees it
    assert changed(25) == [False, False]


def test_block_mask_shape_and_padding():
    tokens = torch.arange(20)[None].repeat(2, 1)
    seq_lens = torch.tensor([20, 12])
    g = torch.Generator().manual_seed(0)
    anchors, valid = sample_anchors([20, 12], [5, 9], 4, g)
    assert valid[0].all() and valid[1].sum() == 2     # row 1 has anchors 9, 10 only
    assert anchors[1, :2].tolist() == [9, 10]
    bb = build_block_batch(tokens, seq_lens, anchors, valid, 4, MASK)
    assert bb.attn_mask.shape == (2, 16, 20 + 16)
    # context visible iff position < anchor
    a = int(anchors[0, 0])
    assert bb.attn_mask[0, 0, :20].tolist() == [c < a for c in range(20)]
    # targets: k = 0 none, beyond the sequence none, padding blocks none
    assert bb.targets[0, 0] == IGNORE and bb.targets[0, 1] == tokens[0, a + 1]
    assert (bb.targets[1, 8:] == IGNORE).all()
    # row 1 block at anchor 10: positions 10..13, sequence ends at 12 -> targets at k=1 only
    assert bb.targets[1, 4:8].tolist() == [IGNORE, 11, IGNORE, IGNORE]
    assert bb.block_ids[0, 1:4].tolist() == [MASK] * 3 and bb.block_ids[0, 0] == a


# ---- the loss ----------------------------------------------------------------------------
def test_anchors_are_a_uniform_sorted_subset_of_the_response():
    """Every row: min(N, candidates) distinct anchors in [resp_start, L-2], ascending, then
    padding (0, invalid); over many draws each candidate is taken with probability
    N / candidates."""
    g = torch.Generator().manual_seed(0)
    lens, starts, N = [30, 12, 9, 50], [10, 9, 9, 0], 6
    counts = torch.zeros(4, 50)
    draws = 4000
    for _ in range(draws):
        anchors, valid = sample_anchors(lens, starts, N, g)
        for r, (L, s) in enumerate(zip(lens, starts)):
            n_cand = max(0, L - 2 - s + 1)
            a = anchors[r][valid[r]].tolist()
            assert len(a) == min(N, n_cand) and valid[r, :len(a)].all()
            assert a == sorted(set(a)) and all(s <= x <= L - 2 for x in a)
            assert (anchors[r][~valid[r]] == 0).all()
            counts[r, a] += 1
    for r, (L, s) in enumerate(zip(lens, starts)):
        n_cand = max(0, L - 2 - s + 1)
        if n_cand == 0:
            continue
        p = min(N, n_cand) / n_cand
        freq = counts[r, s:L - 1] / draws
        sd = (p * (1 - p) / draws) ** 0.5
        assert (freq - p).abs().max() <= 5 * sd + 1e-9, (r, freq, p)
    assert sample_anchors([], [], 3, g)[0].shape == (0, 3)


def test_loss_weights_values():
    w = loss_weights(16)
    assert w[0] == 0 and w[1] == 1
    for k in range(1, 16):
        assert math.isclose(float(w[k]), math.exp(-(k - 1) / 7), rel_tol=1e-6)
    assert math.isclose(float(loss_weights(8)[3]), math.exp(-2 / 4), rel_tol=1e-6)
    assert default_gamma(16) == 7 and default_gamma(8) == 4
    assert torch.all(w[1:-1] > w[2:])


def test_weighted_loss_is_normalised():
    torch.manual_seed(0)
    logits = torch.randn(5, 11)
    targets = torch.randint(0, 11, (5,))
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    w = torch.tensor([1.0, 0.5, 0.25, 2.0, 0.0])
    got = weighted_block_loss(logits, targets, w)
    assert torch.allclose(got, (w * ce).sum() / w.sum())
    # scale-free in the weights; a constant CE gives that CE whatever the weights
    assert torch.allclose(weighted_block_loss(logits, targets, 3 * w), got)
    flat = torch.zeros(5, 11)
    assert torch.allclose(weighted_block_loss(flat, targets, w), torch.tensor(math.log(11)))


def test_teacher_forced_acceptance_length():
    correct = torch.tensor([[[False, True, True, False, True], [False, False, True, True, True]]])
    has = torch.ones_like(correct)
    has[0, 1, 3:] = False                            # block near the sequence end
    assert accepted_lengths(correct, has).tolist() == [[3, 1]]


def test_walk_landings_mark_the_anchors_a_walk_hands_over_to():
    # anchors 3, 5, 6, 9, 12 (+ one padding block): the block at 3 accepts 2 -> lands on 5,
    # 5 accepts 4 -> 9, 6 accepts 1 -> 7 (not an anchor), 9 accepts 3 -> 12, 12 has no target
    anchors = torch.tensor([[3, 5, 6, 9, 12, 0]])
    valid = torch.tensor([[True, True, True, True, True, False]])
    acc = torch.tensor([[2, 4, 1, 3, 0, 3]])          # the padding block's 3 would land on 3: ignored
    assert walk_landings(anchors, valid, acc).tolist() == [[False, True, False, True, True, False]]
    # against a loop over random rows (the rows never mix)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        anchors, valid = sample_anchors([40, 33, 7], [5, 9, 2], 12, g)
        acc = torch.randint(0, 5, anchors.shape, generator=g)
        got = walk_landings(anchors, valid, acc)
        for r in range(anchors.shape[0]):
            lands = {int(anchors[r, j] + acc[r, j]) for j in range(anchors.shape[1]) if valid[r, j] and acc[r, j] > 0}
            want = [bool(valid[r, j]) and int(anchors[r, j]) in lands for j in range(anchors.shape[1])]
            assert got[r].tolist() == want


def test_walk_weight_weighs_the_landed_blocks_in_the_loss(tmp_path):
    """--walk-weight w: a block anchored where another block of the step hands over
    (walk_landings over this step's own teacher-forced drafts) weighs 1 + w; w = 0 is the
    plain loss. Checked against the loss recomputed from the drafter's block logits."""
    from dflash_core.training.blocks import collate
    from dflash_core.training.train import block_step
    target = _target()
    _write_shards(tmp_path / "data", target, n_records=3, shard_size=3)
    losses, landed_any = {}, False
    for w in (0.0, 2.0):
        tr = Trainer(_cfg(tmp_path, out=str(tmp_path / f"run{w}"), walk_weight=w, dtype="float32", blocks_per_seq=12),
                     target)
        recs = tr.data.records(tr.data.finished_shards())
        tokens, seq_lens, starts = collate(recs)
        feats = tr.features(recs, tokens, seq_lens)
        loss, st = block_step(tr.drafter, target, tokens, seq_lens, starts, feats, tr.cfg,
                              torch.Generator().manual_seed(5), tr.weights_k, head=tr.head, amp=False)
        anchors, valid = sample_anchors(seq_lens.tolist(), starts, 12, torch.Generator().manual_seed(5))
        bb = build_block_batch(tokens, seq_lens, anchors, valid, 4, MASK)
        with torch.no_grad():
            h = tr.drafter.forward_blocks(target.embed(bb.block_ids), bb.block_pos, feats, bb.ctx_pos, bb.attn_mask)
            logits = target.logits(h)                                         # [R, T, V]
        R, T = bb.targets.shape
        sel = bb.targets != IGNORE
        correct = torch.zeros(R, T, dtype=torch.bool)
        correct[sel] = logits[sel].argmax(-1) == bb.targets[sel]
        assert torch.equal(st["correct"], correct.view(R, -1, 4))
        landed = walk_landings(anchors, valid, accepted_lengths(correct.view(R, -1, 4), sel.view(R, -1, 4)))
        assert torch.equal(st["landed"], landed)
        landed_any |= bool(landed.any()) and not bool(landed[valid].all())
        bw = (1 + w * landed.float()).repeat_interleave(4, dim=1)            # [R, T]
        wt = (tr.weights_k[bb.block_k].expand_as(bb.targets) * bw)[sel]
        ce = torch.nn.functional.cross_entropy(logits[sel], bb.targets[sel], reduction="none")
        want = (wt * ce).sum() / wt.sum()
        assert torch.allclose(loss, want, rtol=1e-5, atol=1e-6), (w, float(loss), float(want))
        losses[w] = float(loss.detach())
    assert landed_any                                  # some blocks landed, some did not: the weights differ
    assert losses[0.0] != losses[2.0]
    # a run with it trains, and logs teacher-forced tau over the landed blocks
    tr = Trainer(_cfg(tmp_path, out=str(tmp_path / "runlog"), walk_weight=1.0, steps=4, blocks_per_seq=12), target)
    tr.run()
    rows = [json.loads(x) for x in (tmp_path / "runlog" / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and 0 < rows[-1]["landed_share"] < 1 and rows[-1]["tau_tf_landed"] >= 1
    assert json.loads((tmp_path / "runlog" / "train_config.json").read_text())["walk_weight"] == 1.0
    with pytest.raises(ValueError, match="walk-weight"):
        _cfg(tmp_path, walk_weight=-1)


def test_lr_schedule():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)


# ---- training ----------------------------------------------------------------------------
def _write_shards(folder, target, n_records=12, shard_size=4, with_features=False, layers=()):
    """Records = the tiny target's own greedy continuations of random prompts."""
    folder.mkdir(parents=True, exist_ok=True)
    from dflash_core.sampling import SamplingParams
    from dflash_core.engine import EngineConfig, SpecEngine
    gen = SpecEngine(target, None, EngineConfig(max_slots=4, max_seq_len=64, block_size=1,
                                                capture_layers=tuple(layers) or (0,)))
    g = torch.Generator().manual_seed(0)
    recs = []
    for i in range(n_records):
        prompt = torch.randint(17, VOCAB, (6,), generator=g).tolist()
        gen.add_request(str(i), prompt, SamplingParams(max_new_tokens=20))
        recs.append({"conv_id": f"c{i}", "prompt_ids": prompt, "response_ids": [], "sampled": False,
                     "finish_reason": "length"})
    while gen.has_unfinished_requests():
        for o in gen.step():
            recs[int(o.request_id)]["response_ids"] += o.new_token_ids
            if with_features and o.features is not None:
                recs[int(o.request_id)].setdefault("chunks", []).append(o.features.to(torch.float16))
            if o.finished and with_features:
                recs[int(o.request_id)]["features"] = torch.cat(recs[int(o.request_id)].pop("chunks"))
    man = {"config": {"capture_layers": list(layers) if with_features else []}, "shards": {}}
    for s in range(0, n_records, shard_size):
        name = datagen.shard_name(s // shard_size, with_features=True)  # torch.save format
        torch.save(recs[s:s + shard_size], folder / name)
        man["shards"][name] = {"num_records": len(recs[s:s + shard_size])}
    (folder / "manifest.json").write_text(json.dumps(man))
    return recs


def _cfg(tmp_path, **kw):
    base = dict(data=[str(tmp_path / "data")], out=str(tmp_path / "run"), num_layers=1, num_features=2,
                block_size=4, mask_token_id=MASK, blocks_per_seq=4, seqs_per_step=3, steps=8, lr=3e-3,
                warmup_steps=2, ckpt_every_s=1e9, snapshot_every=1000, log_every=2)
    base.update(kw)
    return TrainConfig(**base)


def test_training_steps_lower_the_loss(tmp_path):
    target = _target()
    _write_shards(tmp_path / "data", target, n_records=3, shard_size=3)
    tr = Trainer(_cfg(tmp_path, steps=40, seqs_per_step=3, blocks_per_seq=8), target)
    losses = [tr.train_step()["loss"] for _ in range(40)]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    # the target stayed frozen and untouched by the optimiser
    assert all(not p.requires_grad for p in target.parameters())
    log_free = tr.drafter.state_dict()
    assert set(k for k in log_free if not k.startswith("rotary")) == {
        k for k in DFlashDrafter(tr.drafter.config).state_dict() if not k.startswith("rotary")}


@pytest.mark.parametrize("stored", [False, True])
def test_resume_equals_uninterrupted(tmp_path, stored):
    target = _target()
    layers = (1, 2)
    _write_shards(tmp_path / "data", target, n_records=8, shard_size=3, with_features=stored, layers=layers)
    cfg = _cfg(tmp_path, steps=7)
    ref = Trainer(cfg, target)
    assert ref.features.stored_ok == stored
    if stored:
        assert ref.drafter.config.target_layer_ids == list(layers)
    ref.run(stop_at=7)                                   # crosses an epoch boundary (8 records / 3)
    ref_params = {k: v.clone() for k, v in ref.drafter.state_dict().items()}

    cfg2 = _cfg(tmp_path, steps=7, out=str(tmp_path / "run2"))
    first = Trainer(cfg2, target)
    first.run(stop_at=4)                                 # "interrupted" after step 4 (checkpointed)
    del first
    second = Trainer(cfg2, target)
    assert second.try_resume() and second.step == 4
    second.run()
    assert second.step == 7 and second.tokens_seen == ref.tokens_seen
    for k, v in second.drafter.state_dict().items():
        assert torch.equal(v, ref_params[k]), k
    # the checkpoint is a loadable public-format drafter
    loaded = DFlashDrafter.load(tmp_path / "run2" / "latest")
    assert torch.equal(loaded.fc.weight, ref_params["fc.weight"])
    lines = (tmp_path / "run2" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [2, 4, 6, 7]
    assert len(json.loads(lines[-1])["acc_k"]) == 3


def test_a_signal_stops_training_after_the_step_with_a_checkpoint(tmp_path):
    """SIGINT/SIGTERM: the step in flight finishes, a checkpoint is written at it, and a
    resumed run ends where an uninterrupted one does (a killed run would go back to its last
    timed checkpoint)."""
    import os
    import signal
    target = _target()
    _write_shards(tmp_path / "data", target, n_records=8, shard_size=3)
    ref = Trainer(_cfg(tmp_path, steps=6), target)
    ref.run()
    handler = signal.getsignal(signal.SIGINT)
    for sig in (signal.SIGINT, signal.SIGTERM):
        cfg = _cfg(tmp_path, steps=6, out=str(tmp_path / f"run-{int(sig)}"))
        first = Trainer(cfg, target)
        real = first.train_step

        def step_then_signal():
            r = real()
            if first.step == 3:
                os.kill(os.getpid(), sig)
            return r
        first.train_step = step_then_signal
        first.run()
        assert first.step == 3
        assert signal.getsignal(signal.SIGINT) is handler          # the caller's handlers are back
        second = Trainer(cfg, target)
        assert second.try_resume() and second.step == 3
        second.run()
        assert second.step == 6
        for k, v in second.drafter.state_dict().items():
            assert torch.equal(v, ref.drafter.state_dict()[k]), k


def test_a_time_budget_fits_the_schedule_and_stops_with_a_checkpoint(tmp_path, monkeypatch):
    """--time-budget-s on a fake clock (each step takes 1 s): the cosine horizon is refitted
    to the step where the budget runs out, training stops there with a checkpoint, and the
    last step's learning rate is the schedule's floor; --steps stays the upper bound."""
    import types
    import dflash_core.training.train as train_mod
    clock = [0.0]
    fake = types.SimpleNamespace(perf_counter=lambda: clock[0], monotonic=lambda: clock[0])
    monkeypatch.setattr(train_mod, "time", fake)
    target = _target()
    _write_shards(tmp_path / "data", target, n_records=8, shard_size=4)
    for steps, expect in ((1000, 30), (12, 12)):
        tr = Trainer(_cfg(tmp_path, steps=steps, out=str(tmp_path / f"run-{steps}"), log_every=100), target)
        real = tr.train_step

        def timed_step():
            clock[0] += 1.0
            return real()
        tr.train_step = timed_step
        clock[0] = 0.0
        last = tr.run(time_budget_s=30.5)
        assert tr.step == expect and tr.cfg.steps == expect
        assert last["step"] == expect and last["steps_planned"] == expect
        assert last["lr"] == pytest.approx(tr.cfg.lr * tr.cfg.min_lr_ratio)
        assert json.loads((tmp_path / f"run-{steps}" / "log.jsonl").read_text().splitlines()[-1])["step"] == expect
        resumed = Trainer(_cfg(tmp_path, steps=steps, out=str(tmp_path / f"run-{steps}"), log_every=100), target)
        assert resumed.try_resume() and resumed.step == expect
    with pytest.raises(ValueError, match="time-budget"):
        Trainer(_cfg(tmp_path, out=str(tmp_path / "run-bad")), target).run(time_budget_s=0)


def test_resume_refuses_other_settings(tmp_path):
    target = _target()
    _write_shards(tmp_path / "data", target, n_records=4, shard_size=4)
    Trainer(_cfg(tmp_path, steps=2), target).run()
    other = Trainer(_cfg(tmp_path, steps=2, lr=1e-2), target)
    with pytest.raises(ValueError, match="lr"):
        other.try_resume()


def test_feature_cache_matches_target_features_and_resumes_exactly(tmp_path):
    """The on-disk feature cache holds what a target forward gives (fp16), later runs read it
    instead of recomputing, a resumed run with it equals an uninterrupted one, and a cache
    built for other settings is refused."""
    from dflash_core.training.features import FeatureCache
    from dflash_core.training.train import collate
    target = _target()
    _write_shards(tmp_path / "data", target, n_records=8, shard_size=3)
    cache_dir = tmp_path / "fc"
    cfg = _cfg(tmp_path, steps=7)
    plain = Trainer(cfg, target)
    cached = Trainer(cfg, target, feature_cache=str(cache_dir))
    filled = cached.fill_cache()
    assert filled["shards"] == 3 and filled["computed"] == 3
    assert cached.fill_cache()["computed"] == 0                       # nothing recomputed
    recs = plain.next_batch()
    tokens, seq_lens, _ = collate(recs)
    ref = plain.features(recs, tokens, seq_lens)
    got = cached.features(recs, tokens, seq_lens)
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)
    # positions past each sequence's last context position stay zero, as without the cache
    for i, n in enumerate(seq_lens.tolist()):
        assert torch.count_nonzero(got[i, n - 1:]) == 0

    # reading never calls the target again
    calls = []
    orig = FeatureCache.compute
    FeatureCache.compute = lambda self, *a, **k: calls.append(a) or orig(self, *a, **k)
    try:
        ref_run = Trainer(cfg, target, feature_cache=str(cache_dir))
        ref_run.run(stop_at=7)
        params = {k: v.clone() for k, v in ref_run.drafter.state_dict().items()}
        cfg2 = _cfg(tmp_path, steps=7, out=str(tmp_path / "run2"))
        Trainer(cfg2, target, feature_cache=str(cache_dir)).run(stop_at=4)
        second = Trainer(cfg2, target, feature_cache=str(cache_dir))
        assert second.try_resume() and second.step == 4
        second.run()
    finally:
        FeatureCache.compute = orig
    assert calls == []
    for k, v in second.drafter.state_dict().items():
        assert torch.equal(v, params[k]), k

    other = _cfg(tmp_path, num_features=1, out=str(tmp_path / "run3"))
    with pytest.raises(ValueError, match="layer_ids"):
        Trainer(other, target, feature_cache=str(cache_dir))


def test_warm_start_grows_layers_without_changing_the_output(tmp_path):
    """--init from a 1-layer drafter into a 2-layer run: the new layer's residual branches
    start at zero, so the grown drafter's block logits equal the saved one's at step 0,
    and training then moves the new layer."""
    target = _target()
    _write_shards(tmp_path / "data", target, n_records=6, shard_size=3)
    small = _drafter(target)
    small.save(tmp_path / "small")
    grown = Trainer(_cfg(tmp_path, num_layers=2, init=str(tmp_path / "small"), steps=6), target)
    assert grown.drafter.config.num_layers == 2
    tokens = torch.randint(17, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    anchors = torch.tensor([[5, 12], [7, 15]])
    want, _ = _block_logits(target, DFlashDrafter.load(tmp_path / "small"), tokens, anchors)
    got, _ = _block_logits(target, grown.drafter.eval(), tokens, anchors)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    before = grown.drafter.layers[1].mlp.down_proj.weight.clone()
    grown.drafter.train()
    grown.run()
    assert grown.drafter.layers[1].mlp.down_proj.weight.abs().sum() > 0 and not torch.equal(
        grown.drafter.layers[1].mlp.down_proj.weight, before)
    with pytest.raises(ValueError, match="add layers, not drop"):
        Trainer(_cfg(tmp_path, num_layers=1, init=str(tmp_path / "run" / "latest"), out=str(tmp_path / "r4")),
                target)


def test_warm_start_grows_context_features_without_changing_the_output(tmp_path):
    """--init from a drafter fed by target layers [1, 2] into a run with --target-layer-ids
    1,2,3 (the target's last layer appended): fc's new columns start at zero, so the grown
    drafter's block logits equal the saved one's at step 0; training then moves those
    columns; the grown drafter, saved and loaded into the engine, stays lossless."""
    target = _target()
    _write_shards(tmp_path / "data", target, n_records=6, shard_size=3)
    small = _drafter(target, target_layer_ids=[1, 2])
    small.save(tmp_path / "small")
    cfg = _cfg(tmp_path, init=str(tmp_path / "small"), target_layer_ids=[1, 2, 3], steps=6)
    assert cfg.num_features == 3
    grown = Trainer(cfg, target)
    assert grown.drafter.config.target_layer_ids == [1, 2, 3]
    H = target.config.hidden_size
    assert grown.drafter.fc.weight.shape == (H, 3 * H)
    assert torch.count_nonzero(grown.drafter.fc.weight[:, 2 * H:]) == 0
    tokens = torch.randint(17, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    anchors = torch.tensor([[5, 12], [7, 15]])
    want, _ = _block_logits(target, DFlashDrafter.load(tmp_path / "small"), tokens, anchors)
    got, _ = _block_logits(target, grown.drafter.eval(), tokens, anchors)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grown.drafter.train()
    grown.run()
    assert torch.count_nonzero(grown.drafter.fc.weight[:, 2 * H:]) > 0
    saved = DFlashDrafter.load(tmp_path / "run" / "latest")
    assert saved.config.target_layer_ids == [1, 2, 3]
    # lossless with the last layer among the features: greedy speculative == plain decoding
    from dflash_core.sampling import SamplingParams
    prompt = torch.randint(17, VOCAB, (9,), generator=torch.Generator().manual_seed(5)).tolist()
    outs = {}
    from dflash_core.drafter import LocalDraftBackend
    for name, backend, block in (("ar", None, 1), ("spec", LocalDraftBackend(saved.eval(), 1, 64 + 5), 4)):
        eng = SpecEngine(target, backend, EngineConfig(max_slots=1, max_seq_len=64, block_size=block))
        eng.add_request("r", prompt, SamplingParams(max_new_tokens=24))
        toks = []
        while eng.has_unfinished_requests():
            for o in eng.step():
                toks += o.new_token_ids
        outs[name] = toks
    assert len(outs["ar"]) == 24 and outs["spec"] == outs["ar"]
    # only appended layers grow a drafter; others are refused with the reason
    with pytest.raises(ValueError, match="new feature layers may only follow"):
        Trainer(_cfg(tmp_path, init=str(tmp_path / "small"), target_layer_ids=[2, 3], out=str(tmp_path / "r5")),
                target)
    with pytest.raises(ValueError, match="distinct layer indices"):
        _cfg(tmp_path, target_layer_ids=[1, 1])


def test_train_command_rejects_a_malformed_layer_list():
    from dflash_core.clitools import CliError
    from dflash_core.training.train import main
    with pytest.raises(CliError, match="--target-layer-ids: expected comma-separated layer indices"):
        main(["--target-layer-ids", "1,x"])
    with pytest.raises(CliError, match="distinct layer indices"):
        main(["--target-layer-ids", "3,3"])


# ---- data generation ---------------------------------------------------------------------
class _CharTokenizer:
    """Chat template = fixed ids around the text's characters mapped into the tiny vocab."""

    def apply_chat_template(self, msgs, add_generation_prompt=True, tokenize=True):
        return [1] + [17 + ord(c) % (VOCAB - 17) for c in msgs[0]["content"]] + [2, 1]


class _CountingEngine(SpecEngine):
    """The engine as `dflash data` builds it (plain decoding, feature capture), counting requests."""

    def __init__(self, target, layers, max_slots, max_seq_len):
        super().__init__(target, None, EngineConfig(max_slots=max_slots, max_seq_len=max_seq_len, block_size=1,
                                                    capture_layers=tuple(layers)))
        self.added = []

    def add_request(self, request_id, prompt_ids, params):
        self.added.append(request_id)
        super().add_request(request_id, prompt_ids, params)


def _prompts(n):
    return [Prompt(f"id{i:03d}", f"prompt number {i} " + "x" * (i % 5), "train") for i in range(n)]


def test_datagen_resume_skips_finished_shards(tmp_path):
    target = _target()
    cfg = datagen.DataConfig(out=str(tmp_path / "d"), num_prompts=4, shard_size=2, max_new_tokens=6,
                             max_prompt_tokens=64, max_slots=3, sample_frac=0.5, capture_layers=(1, 3))
    g1 = _CountingEngine(target, [1, 3], 3, 80)
    s1 = datagen.generate_shards(cfg, g1, _CharTokenizer(), _prompts(10), progress=False)
    assert s1["shards"] == 2 and s1["records"] == 4 and len(g1.added) == 4
    first = datagen.load_shards(tmp_path / "d")
    mtime = (tmp_path / "d" / "shard_00000.pt").stat().st_mtime_ns
    # more prompts, same settings: only the new shard is generated
    cfg2 = datagen.DataConfig(**{**cfg.__dict__, "num_prompts": 6})
    g2 = _CountingEngine(target, [1, 3], 3, 80)
    s2 = datagen.generate_shards(cfg2, g2, _CharTokenizer(), _prompts(10), progress=False)
    assert s2["shards"] == 3 and len(g2.added) == 2
    assert (tmp_path / "d" / "shard_00000.pt").stat().st_mtime_ns == mtime
    recs = datagen.load_shards(tmp_path / "d")
    assert [r["response_ids"] for r in recs[:4]] == [r["response_ids"] for r in first]
    for r in recs:
        L = len(r["prompt_ids"]) + len(r["response_ids"])
        assert r["features"].shape == (L - 1, 2 * target.config.hidden_size)
    # a changed setting is refused
    cfg3 = datagen.DataConfig(**{**cfg.__dict__, "max_new_tokens": 7})
    with pytest.raises(ValueError, match="max_new_tokens"):
        datagen.generate_shards(cfg3, g2, _CharTokenizer(), _prompts(10), progress=False)


def test_feature_capture_through_the_engine_matches_decoding_and_full_forward():
    """`dflash data` generates through the engine: with feature capture on, greedy tokens
    equal the engine's autoregressive decoding without it, the stop token is the engine's
    EOS, and the captured features of every position read equal one full forward of the
    finished sequence."""
    from dflash_core.sampling import SamplingParams
    target = _target()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(17, VOCAB, (n,), generator=g).tolist() for n in (5, 9, 3, 7)]
    params = SamplingParams(max_new_tokens=12, speculative=False)
    eng = SpecEngine(target, None, EngineConfig(max_slots=2, max_seq_len=64, block_size=1), eos_token_ids=(2,))
    want = eng.generate(prompts, params)
    gen = SpecEngine(target, None, EngineConfig(max_slots=3, max_seq_len=64, block_size=1, capture_layers=(0, 2)),
                     eos_token_ids=(2,))
    got, feats, stop = {}, {}, {}
    for i, p in enumerate(prompts):
        gen.add_request(str(i), p, params)
    while gen.has_unfinished_requests():
        for o in gen.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.features is not None:
                assert o.features.shape[0] == o.feature_positions.shape[0]
                feats.setdefault(o.request_id, []).append(o.features)
            if o.finished:
                stop[o.request_id] = o.stop_token_id
    for i, p in enumerate(prompts):
        assert got[str(i)] == want[i].token_ids and stop[str(i)] == want[i].stop_token_id
        resp = got[str(i)] + ([stop[str(i)]] if stop[str(i)] is not None else [])
        seq = torch.tensor([p + resp])
        cache = target.new_cache(1, 64)
        _, full = target(seq, cache, torch.tensor([0]), torch.tensor([0]), capture_layers=[0, 2])
        f = torch.cat(feats[str(i)])
        assert f.shape[0] == seq.shape[1] - 1
        assert torch.allclose(f.float(), full[0, :-1], atol=2e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="capture_layers"):
        SpecEngine(target, None, EngineConfig(block_size=1, capture_layers=(target.config.num_layers,)))


# ---- evaluation --------------------------------------------------------------------------
def test_evaluate_reports_tau_speedup_and_plot(tmp_path):
    from dflash_core.drafter import LocalDraftBackend
    from dflash_core.engine import EngineConfig, SpecEngine
    from dflash_core.training.evaluate import evaluate, write_plot
    target = _target()
    drafter = _drafter(target, block_size=4)
    eng = SpecEngine(target, LocalDraftBackend(drafter, 1, 80), EngineConfig(max_slots=1, max_seq_len=64, block_size=4),
                     eos_token_ids=())
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(17, VOCAB, (6,), generator=g).tolist() for _ in range(3)]
    r = evaluate(eng, prompts, 0.0, 10)
    assert r["greedy_outputs_equal"] == 3
    assert 1.0 <= r["tau"] <= 4.0 and len(r["per_position_acceptance"]) == 3
    assert r["spec_tokens"] == r["ar_tokens"] == 30 and r["speedup"] > 0
    pp = r["per_position_acceptance"]
    assert all(a >= b for a, b in zip(pp, pp[1:]))      # position k+1 accepted only after k
    assert abs(r["tau"] - (1 + sum(pp))) < 1e-3          # tau = 1 + sum_k P(k accepted)
    r1 = evaluate(eng, prompts, 1.0, 10, speedup=False)
    assert "speedup" not in r1 and 1.0 <= r1["tau"] <= 4.0
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"tokens_seen": 10, "tau_tf": 1.5}) + "\n")
    write_plot(tmp_path / "p.png", {"x@T0": r}, [{"tokens_seen": 10, "tau": 1.2}], log)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_command_reports_the_block_it_verifies(tmp_path, capsys):
    """`dflash eval --block-size 16` with a block-4 drafter verifies blocks of 4 (the engine
    caps the request at the drafter's block): the JSON says so, and keeps the request."""
    from dflash_core.api import build_engine
    from dflash_core.engine import EngineConfig
    from dflash_core.training.evaluate import main as eval_main
    engine, _ = build_engine("tiny-random", "random", EngineConfig(max_slots=1, max_seq_len=64, block_size=4))
    engine.draft_backend.drafter.save(tmp_path / "d4")
    out = tmp_path / "e.json"
    assert eval_main(["--target", "tiny-random", "--drafter", str(tmp_path / "d4"), "--datasets", "humaneval",
                      "--temperatures", "0", "--num-prompts", "2", "--max-new-tokens", "6", "--no-speedup",
                      "--block-size", "16", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["block_size"] == 4 and summary["requested_block_size"] == 16
    r = summary["results"]["humaneval@T0"]
    assert len(r["per_position_acceptance"]) == 3 and 1.0 <= r["tau"] <= 4.0
    # --walk: the same greedy outputs replayed from one prefill per prompt
    assert eval_main(["--target", "tiny-random", "--drafter", str(tmp_path / "d4"), "--datasets", "humaneval",
                      "--temperatures", "0", "--num-prompts", "2", "--max-new-tokens", "6", "--no-speedup",
                      "--block-size", "4", "--walk", "--out", str(out)]) == 0
    r = json.loads(out.read_text())["results"]["humaneval@T0"]
    assert r["walk_prompts"] == 2 and r["walk_steps_equal"] == 2 and 1.0 <= r["walk_tau"] <= 4.0
    # --walk-data without decoding: the drafter and every snapshot on a holdout folder
    from dflash_core.drafter import DFlashDrafter
    from dflash_core.training.walk import walk_tau
    held = tmp_path / "held"
    recs = _write_shards(held, engine.target, n_records=3, shard_size=3)
    man = json.loads((held / "manifest.json").read_text())
    man["config"]["split"] = "holdout"
    (held / "manifest.json").write_text(json.dumps(man))
    snaps = tmp_path / "snaps"
    for step in (5, 9):
        engine.draft_backend.drafter.save(snaps / f"step_{step:06d}")
        (snaps / f"step_{step:06d}" / "meta.json").write_text(json.dumps({"step": step, "tokens_seen": 10 * step}))
    assert eval_main(["--target", "tiny-random", "--drafter", str(tmp_path / "d4"), "--datasets",
                      "--walk-data", str(held), "--snapshots", str(snaps), "--block-size", "4", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    expect = walk_tau(engine.target, DFlashDrafter.load(tmp_path / "d4"), recs, block_size=4)["tau"]
    assert list(summary["results"]) == ["walk:held@T0"]
    assert summary["results"]["walk:held@T0"]["tau"] == pytest.approx(expect, abs=1e-4)
    assert [(c["step"], c["tokens_seen"], c["method"]) for c in summary["snapshot_curve"]] == [
        (5, 50, "walk"), (9, 90, "walk")]
    assert summary["snapshot_curve"][0]["tau"] == pytest.approx(expect, abs=1e-4)
    from dflash_core.clitools import CliError
    with pytest.raises(CliError, match="nothing to evaluate"):   # the CLI prints it as one line
        eval_main(["--target", "tiny-random", "--datasets"])


def test_curve_sittings_add_up(tmp_path):
    """--prior-curve/--tokens-offset: an earlier sitting's points come first unchanged; this
    run's snapshots follow with the earlier tokens added and their sitting label."""
    from dflash_core.training.evaluate import extend_curve, write_plot
    prior = {"snapshot_curve": [{"step": 100, "tokens_seen": 50, "tau": 1.1, "sitting": "1"},
                                {"step": 200, "tokens_seen": 100, "tau": 1.2, "sitting": "1"}]}
    now = [{"step": 500, "tokens_seen": 30, "tau": 1.3}, {"step": 1000, "tokens_seen": 60, "tau": 1.4}]
    out = extend_curve(prior, now, tokens_offset=100, sitting="2")
    assert [c["tokens_seen"] for c in out] == [50, 100, 130, 160]
    assert [c.get("sitting") for c in out] == ["1", "1", "2", "2"]
    assert [c["step"] for c in out] == [100, 200, 500, 1000] and now[0]["tokens_seen"] == 30   # inputs untouched
    assert extend_curve(None, now) == now
    write_plot(tmp_path / "c.png", {}, out, None)
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("block", [3, 4])
def test_walk_replays_the_engines_greedy_acceptance_step_for_step(tmp_path, block):
    """walk.walk_tau (one prefill + one drafter pass over blocks at every anchor) gives the
    same accepted length at every step as the engine's speculative decoding of the same
    prompts, for a drafter that accepts often enough to tell (trained on those responses)."""
    from dflash_core.drafter import LocalDraftBackend
    from dflash_core.sampling import SamplingParams
    from dflash_core.training.walk import walk, walk_tau
    assert walk([3, 1, 1, 2, 1, 1]) == [3, 2, 1] and walk([]) == []
    target = _target()
    recs = _write_shards(tmp_path / "data", target, n_records=8, shard_size=4)
    tr = Trainer(_cfg(tmp_path, steps=150, blocks_per_seq=12, seqs_per_step=4, lr=1e-2, dtype="float32"), target)
    tr.run()
    drafter = tr.drafter.eval()
    engine = SpecEngine(target, LocalDraftBackend(drafter, 4, 64 + 8),
                        EngineConfig(max_slots=4, max_seq_len=64, block_size=block, draft_tree=False))
    res = engine.generate([r["prompt_ids"] for r in recs], SamplingParams(max_new_tokens=20))
    assert [r.token_ids for r in res] == [r["response_ids"] for r in recs]          # lossless, as generated
    w = walk_tau(target, drafter, recs, block_size=block, rows=3)
    for r, got in zip(res, w["walks"]):
        eng = r.stats.acceptance_lengths
        # every step equal but the last, which the response's end cuts differently (the walk
        # knows no token past it; the engine verified drafts there, then cut its output)
        assert len(got) == len(eng) and got[:-1] == eng[:-1] and got[-1] >= 1, (got, eng)
    assert sum(s > 1 for x in w["walks"] for s in x) >= 10                             # drafts were accepted
    assert w["tau"] == pytest.approx(w["tokens"] / w["steps"])
    assert len(w["per_position_acceptance"]) == block - 1
    # tree verification (tree.py), replayed the same way: tree_walk_tau against the engine's trees
    import copy
    from dflash_core.training.walk import tree_walk_tau
    if not target.serves_tree(4, block):   # trees run in the native layers: the same weights, packed
        target = copy.deepcopy(target).pack_weights()
    if not target.serves_tree(4, block):   # no native kernel here: trees never run (the chain above did)
        return
    engine = SpecEngine(target, LocalDraftBackend(drafter, 4, 64 + 8),
                        EngineConfig(max_slots=4, max_seq_len=64, block_size=block, draft_tree=True,
                                     draft_lookup=False))
    res_t = engine.generate([r["prompt_ids"] for r in recs], SamplingParams(max_new_tokens=20))
    assert [r.token_ids for r in res_t] == [r["response_ids"] for r in recs]
    wt = tree_walk_tau(target, drafter, recs, [block, 2], rows=3, lookup=True)
    for r, got in zip(res_t, wt["walks"][block]):
        eng = r.stats.acceptance_lengths
        assert len(got) == len(eng) and got[:-1] == eng[:-1] and got[-1] >= 1, (got, eng)
    assert wt["tau"][block] == pytest.approx(sum(map(sum, wt["walks"][block])) / sum(map(len, wt["walks"][block])))
    assert sum(s > 1 for x in wt["walks"][block] for s in x) >= 10                    # drafts were accepted
    # one node is the argmax draft: a tree of block 2 is the chain of block 2
    assert wt["walks"][2] == walk_tau(target, drafter, recs, block_size=2, rows=3)["walks"]
    assert wt["chain_tau"][2] == pytest.approx(wt["tau"][2])
    assert wt["chain_tau"][block] == pytest.approx(w["tau"], abs=0.02)   # the chain, from the same pass
    # trees with lookup branches (lookup.py, the engine's default): tree_walk_tau(lookup=True)
    engine.config.draft_lookup = True
    res_l = engine.generate([r["prompt_ids"] for r in recs], SamplingParams(max_new_tokens=20))
    assert [r.token_ids for r in res_l] == [r["response_ids"] for r in recs]
    for r, got in zip(res_l, wt["lookup_walks"][block]):
        eng = r.stats.acceptance_lengths
        assert len(got) == len(eng) and got[:-1] == eng[:-1] and got[-1] >= 1, (got, eng)


def test_chunked_target_features_equal_the_whole_prefill():
    from dflash_core.training.features import target_features
    target = _target()
    tokens = torch.randint(17, VOCAB, (2, 30), generator=torch.Generator().manual_seed(3))
    whole = target_features(target, tokens, [1, 2])
    for chunk in (1, 7, 30, 64):
        part = target_features(target, tokens, [1, 2], chunk=chunk)
        assert part.shape == whole.shape and torch.allclose(part, whole, atol=1e-5, rtol=1e-5), chunk


def test_heldout_tau_is_logged_from_a_holdout_folder_that_is_never_trained_on(tmp_path):
    from dflash_core.training.walk import walk_tau
    target = _target()
    _write_shards(tmp_path / "data", target, n_records=6, shard_size=3)
    held = tmp_path / "held"
    recs = _write_shards(held, target, n_records=3, shard_size=3)
    man = json.loads((held / "manifest.json").read_text())
    with pytest.raises(ValueError, match="holdout split"):      # a train folder is no evaluation set
        Trainer(_cfg(tmp_path), target, eval_data=str(held))
    man["config"]["split"] = "holdout"
    (held / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="never trained on"):   # and a holdout folder is no training data
        Trainer(_cfg(tmp_path, data=[str(held)]), target)
    tr = Trainer(_cfg(tmp_path, steps=6, log_every=100), target, eval_data=str(held), eval_every=4)
    before = walk_tau(target, tr.drafter, recs)["tau"]
    tr.run()
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], "heldout_tau" in r) for r in rows] == [(0, True), (4, True), (6, True)]
    assert rows[0]["heldout_tau"] == pytest.approx(before, abs=1e-4)
    assert rows[-1]["heldout_tau"] == pytest.approx(walk_tau(target, tr.drafter, recs)["tau"], abs=1e-4)
    assert rows[-1]["heldout_records"] == 3 and len(rows[-1]["heldout_acc_k"]) == 3
    # best/: the drafter at the highest held-out tau of the run, with its step
    meta = json.loads((tmp_path / "run" / "best" / "meta.json").read_text())
    top = max(rows, key=lambda r: r["heldout_tau"])      # the first of equals
    assert meta["heldout_tau"] == top["heldout_tau"] and meta["step"] == top["step"]
    best = DFlashDrafter.load(tmp_path / "run" / "best")
    assert walk_tau(target, best, recs)["tau"] == pytest.approx(top["heldout_tau"], abs=1e-4)
    # an evaluation that fails is logged and switched off; training goes on
    tr2 = Trainer(_cfg(tmp_path, steps=4, log_every=100, out=str(tmp_path / "run-evfail")), target,
                  eval_data=str(held), eval_every=2)
    tr2.eval_records = [{}]          # a record without tokens: the walk raises
    tr2.run()
    rows2 = [json.loads(x) for x in (tmp_path / "run-evfail" / "log.jsonl").read_text().splitlines()]
    assert "heldout_error" in rows2[0] and tr2.step == 4 and not (tmp_path / "run-evfail" / "best").exists()
    assert all("heldout_tau" not in r and "heldout_error" not in r for r in rows2[1:])
    from dflash_core.training.evaluate import write_plot   # the plot reads such a log
    write_plot(tmp_path / "p.png", {}, [], tmp_path / "run" / "log.jsonl")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_draft_vocab_training_and_warm_start(tmp_path):
    """--draft-vocab: the loss runs over the N most frequent response tokens and the saved
    drafter carries that vocabulary; --init: a new run starts from the saved weights."""
    target = _target()
    recs = _write_shards(tmp_path / "data", target, n_records=6, shard_size=3)
    tr = Trainer(_cfg(tmp_path, steps=6, draft_vocab=24, dtype="float32"), target)
    vocab = tr.drafter.config.draft_vocab
    counts = {}
    for r in recs:
        for t in r["response_ids"]:
            counts[t] = counts.get(t, 0) + 1
    assert len(vocab) == min(24, len(counts)) and vocab == sorted(vocab)
    assert min(counts[t] for t in vocab) >= max((c for t, c in counts.items() if t not in vocab), default=0)
    losses = [tr.train_step()["loss"] for _ in range(6)]
    assert all(torch.isfinite(torch.tensor(losses)))
    tr.save()
    saved = tmp_path / "run" / "latest"
    assert json.loads((saved / "draft_vocab.json").read_text()) == vocab
    tr2 = Trainer(_cfg(tmp_path, out=str(tmp_path / "run2"), draft_vocab=24, dtype="float32", init=str(saved)), target)
    for (k, a), b in zip(tr.drafter.state_dict().items(), tr2.drafter.state_dict().values()):
        assert torch.equal(a, b), k
    assert tr2.drafter.config.draft_vocab == vocab               # a warm start keeps its vocabulary
    # ... unless asked to choose it again from this run's data: same weights, the N most
    # frequent tokens of the data it now sees (here other shards: the first two records)
    more = tmp_path / "data2"
    _write_shards(more, target, n_records=2, shard_size=2)
    recs2 = datagen.load_shards(more)
    tr2b = Trainer(_cfg(tmp_path, data=[str(more)], out=str(tmp_path / "run2b"), draft_vocab=5, dtype="float32",
                        init=str(saved), rebuild_draft_vocab=True), target)
    for (k, a), b in zip(tr.drafter.state_dict().items(), tr2b.drafter.state_dict().values()):
        assert torch.equal(a, b), k
    counts2 = {}
    for r in recs2:
        for t in r["response_ids"]:
            counts2[t] = counts2.get(t, 0) + 1
    eos = set(getattr(target.config, "eos_token_ids", ()) or ())
    want = sorted(set(sorted(counts2, key=lambda t: (-counts2[t], t))[:5]) | eos)
    assert tr2b.drafter.config.draft_vocab == want != vocab
    assert tr2b.head[1].shape[0] == len(want)
    with pytest.raises(ValueError, match="rebuild-draft-vocab"):
        TrainConfig(data=[str(more)], init=None, draft_vocab=5, rebuild_draft_vocab=True)
    # a warm start refuses a drafter it cannot continue: other context features (more
    # layers are grown: test_warm_start_grows_layers_without_changing_the_output)
    with pytest.raises(ValueError, match="target_layer_ids"):
        Trainer(_cfg(tmp_path, out=str(tmp_path / "run3"), num_features=1, init=str(saved)), target)
    # another block size continues from the same weights (none depends on it) and trains
    # and saves at the new size
    tr4 = Trainer(_cfg(tmp_path, out=str(tmp_path / "run4"), block_size=8, draft_vocab=24, dtype="float32",
                       init=str(saved)), target)
    assert tr.drafter.config.block_size == 4 and tr4.drafter.config.block_size == 8
    for (k, a), b in zip(tr.drafter.state_dict().items(), tr4.drafter.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.isfinite(torch.tensor(tr4.train_step()["loss"]))
    tr4.save()
    assert json.loads((tmp_path / "run4" / "latest" / "config.json").read_text())["block_size"] == 8


@pytest.mark.parametrize("vocab", [0, 24])
def test_distill_pulls_each_position_towards_the_targets_own_distribution(tmp_path, vocab):
    """--distill a: each drafted position's loss is (1-a) CE + a KL(target || drafter), the
    target's distribution of token p being its LM head on its own output at p - 1 (on the
    data, the target's greedy continuations, that distribution's argmax is the token); over
    the drafting vocabulary when there is one. Computed here from a full forward of the
    target and the drafter's block logits, independently of the training step."""
    from dflash_core.training.blocks import collate
    from dflash_core.training.train import block_step
    target = _target()
    _write_shards(tmp_path / "data", target, n_records=3, shard_size=3)
    for a in (0.0, 0.4, 1.0):
        tr = Trainer(_cfg(tmp_path, out=str(tmp_path / f"run{a}"), distill=a, draft_vocab=vocab, dtype="float32",
                          blocks_per_seq=6), target)
        assert tr.features.keep_outputs == (a > 0)
        recs = tr.data.records(tr.data.finished_shards())
        tokens, seq_lens, starts = collate(recs)
        feats = tr.features(recs, tokens, seq_lens)
        outs = tr.features.last_outputs
        assert (outs is None) == (a == 0)
        loss, _ = block_step(tr.drafter, target, tokens, seq_lens, starts, feats, tr.cfg,
                             torch.Generator().manual_seed(5), tr.weights_k, head=tr.head, amp=False, outputs=outs)
        # the same blocks by hand
        R, C = tokens.shape
        anchors, valid = sample_anchors(seq_lens.tolist(), starts, tr.cfg.blocks_per_seq,
                                        torch.Generator().manual_seed(5))
        bb = build_block_batch(tokens, seq_lens, anchors, valid, 4, MASK)
        with torch.no_grad():
            full, f2 = target(tokens, target.new_cache(R, C), torch.arange(R), torch.zeros(R, dtype=torch.long),
                              capture_layers=tr.drafter.config.target_layer_ids)
            t_logits = target.logits(full)                                    # [R, C, V]
            h = tr.drafter.forward_blocks(target.embed(bb.block_ids), bb.block_pos, f2, bb.ctx_pos, bb.attn_mask)
            d_logits = target.logits(h)                                       # [R, T, V]
        sel = bb.targets != IGNORE
        rows = torch.arange(R)[:, None].expand_as(bb.targets)[sel]
        pos = bb.block_pos[sel]
        tgt = bb.targets[sel]
        teacher = t_logits[rows, pos - 1]
        assert torch.equal(teacher.argmax(-1), tgt)          # greedy data: the target's argmax is the token
        student = d_logits[sel]
        if vocab:
            ids = torch.tensor(tr.drafter.config.draft_vocab)
            keep = torch.isin(tgt, ids)
            teacher, student, tgt = teacher[:, ids][keep], student[:, ids][keep], tgt[keep]
            tgt = torch.searchsorted(ids, tgt)
            w = tr.weights_k[bb.block_k].expand_as(bb.targets)[sel][keep]
        else:
            w = tr.weights_k[bb.block_k].expand_as(bb.targets)[sel]
        ce = torch.nn.functional.cross_entropy(student, tgt, reduction="none")
        lq, lp = torch.log_softmax(teacher, -1), torch.log_softmax(student, -1)
        kl = (lq.exp() * (lq - lp)).sum(-1)
        assert bool((kl > 0).all())
        want = (w * ((1 - a) * ce + a * kl)).sum() / w.sum()
        assert torch.allclose(loss, want, rtol=1e-4, atol=1e-5), (a, float(loss), float(want))
    # distillation trains (the loss falls); with no room to memoise, every batch recomputes
    # the same features and outputs, and the steps are those of a memoising run
    runs = {}
    for gb in (None, 0.0):
        tr = Trainer(_cfg(tmp_path, out=str(tmp_path / f"runtrain{gb}"), distill=0.5, dtype="float32", steps=30,
                          blocks_per_seq=8), target, memo_gb=gb)
        runs[gb] = [tr.train_step()["loss"] for _ in range(30)]
        assert (tr.features.memo_bytes > 0 and len(tr.features.memo) == 3) if gb is None else (
            tr.features.memo_bytes == 0 and not tr.features.memo)
    losses = runs[None]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    assert runs[0.0] == losses
    with pytest.raises(ValueError, match="memo-gb"):
        Trainer(_cfg(tmp_path, out=str(tmp_path / "runm")), target, memo_gb=-1)
    with pytest.raises(ValueError, match="between 0 and 1"):
        _cfg(tmp_path, distill=1.5)
    with pytest.raises(ValueError, match="feature-cache"):
        Trainer(_cfg(tmp_path, out=str(tmp_path / "runc"), distill=0.5), target, feature_cache=str(tmp_path / "fc"))


_MALLOC_SCRIPT = r"""
import ctypes, json, sys, torch
from dflash_core import runtime
libc = ctypes.CDLL("libc.so.6")
class Info(ctypes.Structure):   # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
if sys.argv[1] == "retain":
    assert runtime.retain_freed_memory()
before = libc.mallinfo2()
x = torch.empty(900, 8192)                      # ~28 MiB: a training step's draft-head logits
x.fill_(1.0)
live = libc.mallinfo2()
del x
after = libc.mallinfo2()
print(json.dumps({"mmapped": live.hblkhd - before.hblkhd, "heap_change": after.arena - live.arena}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_retained_memory_stays_in_the_heap():
    """The training loop allocates the same ~28 MiB tensors every step. glibc's defaults
    serve such a block from mmap (or trim it off the heap) and hand it back on free, so the
    next step faults its pages in again; retain_freed_memory() keeps it in the heap
    (dflash train calls it: ~6% faster steps at 2 threads, docs/BENCHMARKS.md)."""
    import subprocess
    import sys
    size = 900 * 8192 * 4

    def run(v):
        out = subprocess.run([sys.executable, "-c", _MALLOC_SCRIPT, v], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        return r["mmapped"], r["heap_change"]
    mmapped, _ = run("default")
    assert mmapped >= size                        # glibc's default: the block is mmapped (returned on free)
    mmapped, kept = run("retain")
    assert mmapped == 0 and kept == 0             # from the heap, and kept there for the next step


def test_train_command_retains_memory_with_a_feature_cache_unless_told_not_to(tmp_path, monkeypatch):
    from dflash_core import runtime
    from dflash_core.training import train as train_mod
    calls = []
    monkeypatch.setattr(runtime, "retain_freed_memory", lambda: calls.append(1) or True)
    args = ["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--target", "tiny-random",
            "--steps", "1", "--no-progress"]
    cache = ["--feature-cache", str(tmp_path / "fc")]
    # kept with a feature cache (where it was measured faster); never while the target's
    # forward runs beside every step (a run kept growing to 9.8 GB there; 3.2-4.4 GB without)
    for extra, expected in ((cache, 1), (cache + ["--no-retain-memory"], 0), ([], 0), (["--no-retain-memory"], 0)):
        calls.clear()
        try:
            train_mod.main(args + extra)
        except (SystemExit, Exception):   # the data folder does not exist: only the call matters here
            pass
        assert len(calls) == expected, extra


def test_eval_saves_the_acceptance_profile_the_server_reads(tmp_path, capsys):
    """`dflash eval --save-acceptance DIR` writes DIR/acceptance.json from the first greedy
    decoded cell (its per-position acceptance, tau and how it was measured), which
    dflash_core.autoschedule loads; without a greedy decoded cell, or with DIR not a
    folder, it refuses in one line before loading anything."""
    from dflash_core.api import build_engine
    from dflash_core.autoschedule import expected_tokens, load_acceptance
    from dflash_core.clitools import run_command
    from dflash_core.engine import EngineConfig
    from dflash_core.training.evaluate import main as eval_main
    engine, _ = build_engine("tiny-random", "random", EngineConfig(max_slots=1, max_seq_len=64, block_size=4))
    d4 = tmp_path / "d4"
    engine.draft_backend.drafter.save(d4)
    out = tmp_path / "e.json"
    args = ["--target", "tiny-random", "--drafter", str(d4), "--datasets", "humaneval", "--num-prompts", "2",
            "--max-new-tokens", "6", "--no-speedup", "--block-size", "4", "--out", str(out)]
    assert eval_main(args + ["--temperatures", "1", "0", "--save-acceptance", str(d4)]) == 0
    cell = json.loads(out.read_text())["results"]["humaneval@T0"]
    prof = load_acceptance(d4)
    assert prof["per_position_acceptance"] == cell["per_position_acceptance"] and prof["tau"] == cell["tau"]
    assert prof["block_size"] == 4 and prof["temperature"] == 0.0 and prof["dtype"] == "float32"
    assert expected_tokens(prof["per_position_acceptance"], 4) == pytest.approx(cell["tau"], abs=1e-3)
    for extra, needle in ((["--temperatures", "1", "--save-acceptance", str(d4)], "needs a greedy decoded cell"),
                          (["--temperatures", "0", "--save-acceptance", str(tmp_path / "nope")], "not a folder")):
        capsys.readouterr()
        assert run_command("dflash eval", eval_main, args + extra) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err
