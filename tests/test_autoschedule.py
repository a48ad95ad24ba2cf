"""The block-size schedule measured on the machine (dflash_core.autoschedule): the
acceptance profile, the engine's step times, the pick, and the service's "auto" /
"measure" / "table" modes. Real engine steps on tiny random models."""
from __future__ import annotations

import json
import logging

import pytest

from dflash_core import autoschedule as auto
from dflash_core.api import tiny_random_config, tiny_random_target
from dflash_core.drafter import DFlashDrafter, LocalDraftBackend
from dflash_core.engine import INF_RUNNING, EngineConfig, SpecEngine
from dflash_core.sampling import SamplingParams


def make_engine(target, block_size=8, max_slots=4, max_seq_len=256, schedule=None):
    d = DFlashDrafter.from_target(target.config, num_layers=1, block_size=block_size, mask_token_id=3,
                                  num_features=2, seed=0)
    cfg = EngineConfig(max_slots=max_slots, max_seq_len=max_seq_len, block_size=block_size,
                       block_size_schedule=schedule)
    return SpecEngine(target, LocalDraftBackend(d, max_slots, max_seq_len + block_size + 1), cfg)


@pytest.fixture(scope="module")
def target():
    return tiny_random_target(vocab_size=2048, num_layers=3, seed=1)


def test_expected_tokens_and_the_profile_checks(tmp_path):
    reach = [0.5, 0.2, 0.1]
    assert auto.expected_tokens(reach, 1) == 1.0
    assert auto.expected_tokens(reach, 2) == pytest.approx(1.5)
    assert auto.expected_tokens(reach, 4) == pytest.approx(1.8)
    assert auto.expected_tokens(reach, 8) == pytest.approx(1.8)     # past the profile: never accepted
    for bad, words in (([], "non-empty"), ([0.5, 0.6], "must not increase"), ([1.2], "in [0, 1]"),
                       ([float("nan")], "in [0, 1]"), ([True], "in [0, 1]"), ("0.5", "non-empty")):
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
            auto.check_reach(bad)
    assert auto.load_acceptance(tmp_path) is None
    path = auto.save_acceptance(tmp_path, [0.44912, 0.171, 0.0], tau=1.62, block_size=8)
    prof = auto.load_acceptance(tmp_path)
    assert path == tmp_path / "acceptance.json"
    assert prof["per_position_acceptance"] == [0.4491, 0.171, 0.0] and prof["tau"] == 1.62
    (tmp_path / "acceptance.json").write_text(json.dumps({"per_position_acceptance": [0.1, 0.3]}))
    with pytest.raises(ValueError, match="acceptance.json: not an acceptance profile"):
        auto.load_acceptance(tmp_path)
    (tmp_path / "acceptance.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="not an acceptance profile"):
        auto.load_acceptance(tmp_path)


def test_step_times_leave_the_engine_as_they_found_it(target):
    """Timing runs real steps on synthetic rows, then aborts them: the slots are free again,
    the schedule and its tuner are the ones before (the tuner saw none of the probe), and
    decoding afterwards is unchanged (lossless)."""
    eng = make_engine(target, schedule=[(1, 4), (INF_RUNNING, 1)])
    ref = make_engine(target, schedule=[(1, 4), (INF_RUNNING, 1)])
    eng.schedule_tuner = tuner = auto.ScheduleTuner([{"concurrency": 1, "block_size": 1, "step_ms": 1.0}], [0.5])
    prompt, params = [5, 6, 7, 8], SamplingParams(max_new_tokens=24, ignore_eos=True)
    times = auto.measure_step_times(eng, 3, [1, 2, 4], steps=3, prompt_len=32)
    assert sorted(times) == [1, 2, 4] and all(t > 0 for t in times.values())
    assert not eng.has_unfinished_requests() and eng.num_free_slots == 4
    assert eng.config.block_size_schedule == [(1, 4), (INF_RUNNING, 1)]
    assert eng.schedule_tuner is tuner and tuner.steps == 0 and tuner.trials == [0.0]
    eng.schedule_tuner = None
    [a] = eng.generate([prompt], params)
    [b] = ref.generate([prompt], params)
    assert a.token_ids == b.token_ids and a.stats.num_draft_tokens == 3 * a.stats.num_steps
    # a short context: rows are replaced before they run out of room, never cut mid-timing
    short = make_engine(target, block_size=8, max_slots=2, max_seq_len=64)
    seen = []
    real_step = short.step

    def step():
        out = real_step()
        sched = short.config.block_size_schedule
        seen.append((len(short.running), sched and sched[0][1], sum(o.finish_reason == "length" for o in out)))
        return out
    short.step = step
    assert sorted(auto.measure_step_times(short, 2, [1, 2, 4, 8], steps=3, prompt_len=128)) == [1, 2, 4, 8]
    assert not short.has_unfinished_requests() and short.num_free_slots == 2
    timed = [x for x in seen if x[0] == 2]
    assert {b for _, b, _ in timed} >= {1, 2, 4, 8} and not any(f for _, _, f in seen)   # none ran out of room
    eng.add_request("busy", prompt, params)
    with pytest.raises(RuntimeError, match="idle"):
        auto.measure_step_times(eng, 1, [1])
    eng.abort_request("busy")
    eng.step()
    with pytest.raises(ValueError, match="rows must be in 1..4"):
        auto.measure_step_times(eng, 5, [1])


def test_measured_schedule_follows_step_costs_and_acceptance(target, monkeypatch):
    """The pick: R * tau(b) / T(R, b) per cell, speculation only above plain decoding by
    PREDICTED_MIN_GAIN (10%), never a larger block at more rows. Rows grow 1, 2, 4 (max_slots); each R
    times only plain decoding and the blocks up to the R before's pick, and nothing past
    the first R that decodes plainly."""
    eng = make_engine(target, block_size=8, max_slots=4)
    timed = []

    def fake(cost):
        def measure(engine, rows, blocks, steps=5, prompt_len=128, seed=0, passes=2):
            timed.append((rows, list(blocks)))
            return {b: cost(rows, b) for b in blocks}
        return measure

    # verify cost flat in b at one row, growing with rows x b beyond: speculate alone only
    reach = [0.6, 0.3, 0.1, 0.05, 0.02, 0.01, 0.01]
    monkeypatch.setattr(auto, "measure_step_times", fake(lambda R, b: 0.01 * (1 + (R - 1) * (b - 1))))
    pairs, rows = auto.measured_schedule(eng, reach)
    assert pairs == [(1, 8), (INF_RUNNING, 1)]
    assert timed == [(1, [1, 2, 3, 4, 6, 8]), (2, [1, 2, 3, 4, 6, 8])]     # R = 4 never timed
    cell = next(r for r in rows if r["concurrency"] == 1 and r["block_size"] == 4)
    assert cell["tau"] == pytest.approx(2.0) and cell["tokens_per_s"] == pytest.approx(200.0)
    # every step costs the same whatever its rows and block: the largest block everywhere
    timed.clear()
    monkeypatch.setattr(auto, "measure_step_times", fake(lambda R, b: 0.01))
    assert auto.measured_schedule(eng, reach)[0] == [(INF_RUNNING, 8)]
    assert [r for r, _ in timed] == [1, 2, 4]
    # a drafter that is never right: plain decoding, decided at one row
    timed.clear()
    assert auto.measured_schedule(eng, [0.0])[0] == [(INF_RUNNING, 1)]
    assert [r for r, _ in timed] == [1]
    # a gain inside the margin is not taken; the cap: R = 2 only times blocks up to R = 1's pick
    timed.clear()
    monkeypatch.setattr(auto, "measure_step_times", fake(lambda R, b: 0.01 * (1 + 0.5 * max(0, b - 2) + 0.01 * b)))
    pairs, _ = auto.measured_schedule(eng, [0.9, 0.02])
    assert pairs == [(INF_RUNNING, 2)] and timed[1] == (2, [1, 2])
    assert auto.measured_schedule(eng, [0.02])[0] == [(INF_RUNNING, 1)]    # block 2: 1.0098x plain, inside 10%
    assert auto.measured_schedule(eng, [0.1])[0] == [(INF_RUNNING, 1)]     # block 2: 1.089x plain ..
    assert auto.measured_schedule(eng, [0.1], min_gain=0.03)[0] == [(INF_RUNNING, 2)]   # .. above a 3% margin


def test_measured_schedule_on_a_real_engine(target):
    """Unpatched: the tiny engine's real steps give a schedule the engine accepts (pairs
    ascending, the last covering any batch, blocks within the drafter's), with a row per
    timed cell, and leave the engine idle."""
    eng = make_engine(target, block_size=4, max_slots=2)
    pairs, rows = auto.measured_schedule(eng, [0.9, 0.8, 0.7], steps=2, prompt_len=16)
    assert pairs[-1][0] == INF_RUNNING and all(1 <= b <= 4 for _, b in pairs)
    assert [p[0] for p in pairs] == sorted(p[0] for p in pairs)
    assert {(r["concurrency"], r["block_size"]) for r in rows if r["concurrency"] == 1} == {(1, b) for b in (1, 2, 3, 4)}
    assert all(r["step_ms"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    eng.set_block_size_schedule(pairs)
    assert eng.config.block_size_schedule == pairs and not eng.has_unfinished_requests()
    assert auto.format_rows(rows).startswith("1 running: b1 ")


def test_service_schedule_modes(tmp_path, caplog):
    """"table": the per-dtype table; "auto": measured where the drafter folder has an
    acceptance profile (set on the engine with a tuner, and logged), else the table; "measure": measured,
    or a clear error without a profile or outside the colocated placement."""
    from service.config import ServiceConfig
    from service.engines import build_colocated, measure_schedule
    from dflash_core.engine import FP32_BLOCK_SIZE_SCHEDULE
    table = [tuple(p) for p in FP32_BLOCK_SIZE_SCHEDULE]
    base = dict(target="tiny-random", dtype="float32", max_slots=2, max_seq_len=256, log_level="WARNING")
    for mode in ("table", "auto", "measure"):
        assert ServiceConfig(**base, block_size_schedule=mode.upper()).block_size_schedule == mode
        assert ServiceConfig(**base, block_size_schedule=mode).resolved_block_size_schedule() == table
    with pytest.raises(ValueError, match="colocated placement only"):
        ServiceConfig(**base, block_size_schedule="measure", placement="disaggregated")
    # the random drafter has no folder: auto keeps the table, measure says why
    eng, _ = build_colocated(ServiceConfig(**base, drafter="random", block_size_schedule="auto"))
    assert eng.config.block_size_schedule == table and eng.schedule_tuner is None
    with pytest.raises(ValueError, match="'measure': no drafter folder for 'random'"):
        measure_schedule(eng, ServiceConfig(**base, drafter="random", block_size_schedule="measure"))
    # a drafter folder without, then with, its acceptance profile
    DFlashDrafter.from_target(tiny_random_config(), num_layers=1, block_size=4, mask_token_id=3, num_features=2).save(tmp_path)
    cfg = ServiceConfig(**base, drafter=str(tmp_path), block_size_schedule="measure")
    with pytest.raises(ValueError, match="no acceptance profile in .*dflash eval --save-acceptance"):
        build_colocated(cfg)
    auto.save_acceptance(tmp_path, [0.95, 0.9, 0.85])
    with caplog.at_level(logging.INFO, logger="dflash.service"):
        eng, _ = build_colocated(cfg)
    assert "block size schedule" in caplog.text and "measured in" in caplog.text and "1 running: b1" in caplog.text
    assert isinstance(eng.schedule_tuner, auto.ScheduleTuner)          # the traffic re-picks it from here on
    assert eng.schedule_tuner.reach() == pytest.approx([0.95, 0.9, 0.85])
    got = measure_schedule(eng, ServiceConfig(**base, drafter=str(tmp_path), block_size_schedule="auto"))
    assert got["schedule"] == eng.config.block_size_schedule and got["profile"].endswith("acceptance.json")
    assert not eng.has_unfinished_requests() and eng.num_free_slots == 2
    assert measure_schedule(eng, ServiceConfig(**base, drafter=str(tmp_path), block_size_schedule="table")) is None
    assert measure_schedule(eng, ServiceConfig(**base, drafter=str(tmp_path), block_size_schedule="1:2,inf:1")) is None
    # a malformed profile is an error in both modes, not a silent table
    (tmp_path / "acceptance.json").write_text("{}")
    with pytest.raises(ValueError, match="not an acceptance profile"):
        build_colocated(ServiceConfig(**base, drafter=str(tmp_path), block_size_schedule="auto"))


def test_tuner_estimates_acceptance_from_the_steps_it_sees():
    """Per position: the profile's conditional acceptance as a prior worth prior_steps
    steps, plus the positions verified (position j tried only after j-1 accepted), the
    counts halving every half_life_steps decode steps."""
    rows = [{"concurrency": 1, "block_size": b, "step_ms": 10.0} for b in (1, 2, 4)]
    t = auto.ScheduleTuner(rows, [0.5, 0.25, 0.125], prior_steps=10, half_life_steps=None)
    assert t.reach() == pytest.approx([0.5, 0.25, 0.125])
    for _ in range(10):
        t.observe(3, 3)        # all three drafts kept
        t.observe(3, 0)        # the first one rejected: positions 2, 3 never tried
    a1 = (10 * 0.5 + 10) / (10 + 20)
    a2 = (10 * 0.5 + 10) / (10 + 10)
    assert t.reach() == pytest.approx([a1, a1 * a2, a1 * a2 * a2])
    t.observe(1, 1)            # a block of 2 verified one draft: nothing known past it
    assert t.trials == [21.0, 10.0, 10.0] and t.accepts == [11.0, 10.0, 10.0]
    d = auto.ScheduleTuner(rows, [0.5, 0.25, 0.125], prior_steps=10, half_life_steps=2)
    d.observe(3, 0)
    d.end_step()
    d.end_step()
    assert d.trials[0] == pytest.approx(0.5) and d.accepts[0] == 0.0
    with pytest.raises(ValueError, match="prior_steps"):
        auto.ScheduleTuner(rows, [0.5], prior_steps=0)
    with pytest.raises(ValueError, match="no timed cells"):
        auto.ScheduleTuner([], [0.5])


def test_tuner_turns_speculation_off_for_traffic_that_rejects_and_tries_it_again():
    """Start-up times where block 4 pays at the profile's acceptance: rows whose drafts are
    all rejected turn the pick to plain decoding within a few re-picks; with no position
    verified after that, the decaying counts drift back to the profile and speculation is
    picked again."""
    rows = [{"concurrency": 1, "block_size": b, "step_ms": ms} for b, ms in ((1, 10.0), (2, 11.0), (4, 12.0))]
    t = auto.ScheduleTuner(rows, [0.8, 0.6, 0.4], prior_steps=16, half_life_steps=256, every=16)
    assert t.pick() == [(INF_RUNNING, 4)]
    picks = []
    for step in range(200):
        t.observe(3, 0)
        p = t.end_step()
        if p is not None:
            picks.append(p)
    assert picks[0] == [(INF_RUNNING, 4)] and picks[-1] == [(INF_RUNNING, 1)]
    off_at = next(i for i, p in enumerate(picks) if p == [(INF_RUNNING, 1)])
    assert off_at <= 7                         # by step 128: tau(4) = 1 + 2.25 a_1, a_1 = 12.8 / (16 + steps)
    back = next(i for i in range(1, 4000) if t.end_step() is not None and t.pick() != [(INF_RUNNING, 1)])
    assert 16 <= back < 4000 and t.reach()[0] > 0.105      # b4 pays again above a_1 = 0.105


def test_engine_retunes_its_schedule_and_stays_lossless(target, caplog):
    """A tuner on a real engine: a random drafter (whose drafts the target rejects) under an
    optimistic profile starts at block 4, the engine's own acceptance turns it to plain
    decoding (logged), and every output equals the same prompts decoded without a tuner."""
    eng = make_engine(target, block_size=4, max_slots=2, schedule=[(INF_RUNNING, 4)])
    ref = make_engine(target, block_size=4, max_slots=2, schedule=[(INF_RUNNING, 4)])
    rows = [{"concurrency": R, "block_size": b, "step_ms": ms} for R in (1, 2)
            for b, ms in ((1, 10.0), (2, 15.0), (4, 20.0))]
    eng.schedule_tuner = auto.ScheduleTuner(rows, [0.9, 0.8, 0.7], prior_steps=8, half_life_steps=None, every=4)
    prompts = [[5, 6, 7, 8], [100, 200, 300], [9, 10], [1000, 1001, 1002, 1003, 1004]]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    with caplog.at_level(logging.INFO, logger="dflash.engine"):
        out = eng.generate(prompts, params)
    assert [o.token_ids for o in out] == [o.token_ids for o in ref.generate(prompts, params)]
    assert eng.config.block_size_schedule == [(INF_RUNNING, 1)]
    assert "block size schedule inf:4 -> " in caplog.text and eng.schedule_tuner.reach()[0] < 0.5
    steps = [o.stats for o in out]
    assert steps[-1].num_draft_tokens < 3 * steps[-1].num_steps          # it stopped drafting midway


def test_step_times_keep_the_fastest_pass(target, monkeypatch):
    """Every block is timed once per pass; a cell takes its lowest median over the passes,
    so a pass that other load slowed does not decide."""
    eng = make_engine(target, block_size=4, max_slots=1)
    calls = []

    def timed(engine, n):
        calls.append(engine.config.block_size_schedule[0][1])
        return [0.2 if len(calls) <= 2 else 0.1] * n          # the first pass through both blocks: slow
    monkeypatch.setattr(auto, "_timed_steps", timed)
    assert auto.measure_step_times(eng, 1, [1, 4], steps=3, prompt_len=8, passes=2) == {1: 0.1, 4: 0.1}
    assert calls == [1, 4, 1, 4]
    calls.clear()
    assert auto.measure_step_times(eng, 1, [1, 4], steps=3, prompt_len=8, passes=1) == {1: 0.2, 4: 0.2}
    assert not eng.has_unfinished_requests()


def test_tuner_keeps_the_running_schedule_inside_the_margin():
    """repick(current): a pick predicted faster than the current schedule by no more than
    min_gain at every timed row count leaves the current one (no flapping at a break-even);
    a clear gain either way switches."""
    rows = [{"concurrency": 1, "block_size": 1, "step_ms": 10.0}, {"concurrency": 1, "block_size": 2, "step_ms": 12.0}]
    spec, plain = [(INF_RUNNING, 2)], [(INF_RUNNING, 1)]
    even = auto.ScheduleTuner(rows, [0.2])                 # b2: 1.2 / 12 ms = plain's 1 / 10 ms
    assert even.pick() == plain and even.repick(spec) == spec and even.repick(plain) == plain
    assert auto.ScheduleTuner(rows, [0.0]).repick(spec) == plain        # b2 at 83% of plain
    assert auto.ScheduleTuner(rows, [0.5]).repick(plain) == spec        # b2 at 125%
    assert even.repick(None) == plain and even.repick([(1, 3), (INF_RUNNING, 1)]) == plain   # an untimed block


def test_tree_tau_profiles_and_which_one_an_engine_reads(target, tmp_path, monkeypatch):
    """acceptance.json's tree_tau / tree_lookup_tau (tree walks, with and without lookup
    branches) round-trip and are checked; an engine whose trees carry lookup branches
    predicts its tree cells with tree_lookup_tau, one without them with tree_tau; cells
    where trees run take the profile's tau instead of the chain's."""
    path = auto.save_acceptance(tmp_path, [0.4, 0.1], tree_tau={3: 1.61234, "4": 1.7}, tree_lookup_tau={4: 2.05})
    prof = auto.load_acceptance(tmp_path)
    assert path.name == "acceptance.json"
    assert prof["tree_tau"] == {3: 1.6123, 4: 1.7} and prof["tree_lookup_tau"] == {4: 2.05}
    for bad, needle in (({"x": 1.5}, "keys must be block sizes"), ({1: 1.0}, "block size >= 2"),
                        ({4: 5.0}, r"tau in \[1, 4\]"), ({4: True}, "tau in"), ([1.5], "must be an object")):
        with pytest.raises(ValueError, match=needle):
            auto.check_tree_tau(bad)
        (tmp_path / "acceptance.json").write_text(json.dumps({"per_position_acceptance": [0.4],
                                                              "tree_lookup_tau": bad}))
        with pytest.raises(ValueError, match="not an acceptance profile"):
            auto.load_acceptance(tmp_path)

    class Eng:   # what profile_tree_tau reads
        draft_lookups = True
    assert auto.profile_tree_tau(Eng, prof) == {4: 2.05}
    Eng.draft_lookups = False
    assert auto.profile_tree_tau(Eng, prof) == {3: 1.6123, 4: 1.7}
    Eng.draft_lookups = True
    assert auto.profile_tree_tau(Eng, {"tree_tau": {4: 1.7}}) == {4: 1.7}     # an older profile
    assert auto.profile_tree_tau(Eng, {}) is None
    # the measured schedule reads the tree tau where trees run (here: forced), the chain's elsewhere
    eng = make_engine(target, block_size=8, max_slots=1)
    monkeypatch.setattr(auto, "measure_step_times", lambda engine, rows, blocks, steps=5, prompt_len=128, seed=0,
                        passes=2: {b: 0.01 for b in blocks})
    monkeypatch.setattr(auto, "runs_tree", lambda engine, tt, R, b: bool(tt) and b in tt)
    _, rows = auto.measured_schedule(eng, [0.4, 0.1], tree_tau={4: 2.05})
    by_b = {r["block_size"]: r for r in rows}
    assert by_b[4]["tau"] == 2.05 and by_b[4]["tree_tau"] == 2.05
    assert by_b[3]["tau"] == pytest.approx(1.5) and "tree_tau" not in by_b[3]


def test_tuner_never_carries_speculation_past_the_rows_the_probe_timed():
    """Where the start-up probe stopped below the engine's slots (plain decoding won at its
    largest row count: measured_beyond), a tuner that later finds speculation paying there
    keeps larger batches plain; without `beyond` (or where the probe timed every slot count)
    the last pick covers every larger batch."""
    rows = [{"concurrency": R, "block_size": b, "step_ms": ms}
            for R, cells in ((1, ((1, 10.0), (4, 12.0))), (2, ((1, 11.0), (4, 16.0)))) for b, ms in cells]
    reach = [0.3, 0.1, 0.03]                       # tau(4) 1.43: b4 pays at 1 row, not at 2
    assert auto.pick_schedule([{**r, "tokens_per_s": r["concurrency"] * (1.43 if r["block_size"] == 4 else 1.0)
                                / r["step_ms"]} for r in rows], auto.PREDICTED_MIN_GAIN) == [(1, 4), (INF_RUNNING, 1)]
    assert auto.measured_beyond(rows, 8) == (2, 1) and auto.measured_beyond(rows, 2) is None
    capped = auto.ScheduleTuner(rows, reach, prior_steps=4, half_life_steps=None, beyond=(2, 1))
    free = auto.ScheduleTuner(rows, reach, prior_steps=4, half_life_steps=None)
    assert capped.pick() == free.pick() == [(1, 4), (INF_RUNNING, 1)]
    for t in (capped, free):
        for _ in range(200):
            t.observe(3, 3)                        # traffic that accepts every draft
    assert free.pick() == [(INF_RUNNING, 4)]
    assert capped.pick() == [(2, 4), (INF_RUNNING, 1)]
    assert capped.repick([(1, 4), (INF_RUNNING, 1)]) == [(2, 4), (INF_RUNNING, 1)]
