"""The fast bf16 path: prepacked oneDNN linears, the per-forward attention plan, and the
row/length invariance that keeps greedy DFlash equal to the engine's own bf16 decoding.
Also: dtype resolution, compact data shards, warm-started training over a drafting
vocabulary. Real computations on tiny random models (and the default model, slow)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dflash_core.api import tiny_random_target
from dflash_core.drafter import DFlashDrafter, LocalDraftBackend
from dflash_core.engine import EngineConfig, SpecEngine
from dflash_core.models.kv_cache import KVCache
from dflash_core.models.layers import prepack_linear
from dflash_core.runtime import cpu_has_fast_bf16, resolve_dtype, set_thread_policy
from dflash_core.sampling import SamplingParams

DFLASH = str(__import__("pathlib").Path(sys.executable).parent / "dflash")
PROMPTS = [[5, 6, 7], [100, 200, 300, 400, 500, 600, 700], [9], list(range(1000, 1023)), [40, 41] * 9]


def _engine(target, block_size, drafter=True, max_slots=6):
    cfg = EngineConfig(max_slots=max_slots, max_seq_len=200, block_size=block_size)
    backend = None
    if drafter:
        d = DFlashDrafter.from_target(target.config, num_layers=1, block_size=block_size, mask_token_id=3,
                                      num_features=2, seed=0).to(target.dtype)
        backend = LocalDraftBackend(d, max_slots, 200 + block_size + 1)
    return SpecEngine(target, backend, cfg)


@pytest.fixture(scope="module")
def bf16_target():
    return tiny_random_target(vocab_size=2048, num_layers=3, seed=1).to(torch.bfloat16).pack_weights()


def test_prepacked_linear_is_exact_and_row_invariant():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(320, 96, generator=g) * 0.1).bfloat16()
    fn = prepack_linear(w)
    if fn is None:
        pytest.skip("oneDNN prepacked linear not available in this torch build")
    x = torch.randn(3, 16, 96, generator=g).bfloat16()
    full = fn(x)
    assert full.shape == (3, 16, 320)
    assert torch.equal(full, F.linear(x, w))                      # same numbers as F.linear
    for r in range(3):                                             # a row alone == inside the block
        for t in range(16):
            assert torch.equal(fn(x[r:r + 1, t:t + 1]), full[r:r + 1, t:t + 1])


@pytest.mark.parametrize("mm_max_elements", [1 << 20, 0], ids=["mm", "packed"])
def test_fp32_prepacked_linear_keeps_small_inputs_exact(mm_max_elements):
    """fp32: inputs of fewer than FP32_PACKED_MIN_ROWS rows (the one-token decode step)
    are F.linear bit for bit, so fp32 decoding still equals transformers'; larger ones
    (verify blocks, batches) take the packed product, or torch.mm against a transposed
    copy for a small weight, equal up to summation order. (This is the fallback where
    the native kernel is unavailable or off: native=False; the native kernel's own
    contract is in tests/test_native.py.)"""
    from dflash_core.models.layers import FP32_PACKED_MIN_ROWS
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(320, 96, generator=g) * 0.1, torch.randn(320, generator=g)
    fn = prepack_linear(w, b, mm_max_elements=mm_max_elements, native=False)
    if fn is None:
        pytest.skip("oneDNN prepacked linear not available in this torch build")
    for shape in [(1, 1, 96), (1, FP32_PACKED_MIN_ROWS - 1, 96), (FP32_PACKED_MIN_ROWS - 1, 96)]:
        x = torch.randn(*shape, generator=g)
        assert torch.equal(fn(x), F.linear(x, w, b)), shape
    for shape in [(1, FP32_PACKED_MIN_ROWS, 96), (3, 16, 96), (40, 96)]:
        x = torch.randn(*shape, generator=g)
        got = fn(x)
        assert got.shape == shape[:-1] + (320,)
        torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert prepack_linear(w.half()) is None                       # other dtypes keep F.linear
    x = torch.randn(5, 96, generator=g)                            # and without a bias
    torch.testing.assert_close(prepack_linear(w, mm_max_elements=mm_max_elements, native=False)(x), F.linear(x, w),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("missing", ["_gate_up_fn", "_down_fn"])
def test_packed_mlp_falls_back_per_linear(missing):
    """A CPU can prepack one MLP weight shape exactly and not another (the probe decides per
    weight); the packed MLP then uses F.linear for that one linear alone and computes what
    the unpacked MLP does."""
    from dflash_core.models.layers import GatedMLP
    torch.manual_seed(0)
    mlp = GatedMLP(64, 160).bfloat16()
    x = torch.randn(2, 5, 64).bfloat16()
    with torch.no_grad():
        want = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    mlp.pack()
    setattr(mlp, missing, None)
    with torch.no_grad():
        got = mlp(x)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_attention_plan_matches_reference_attention():
    """The plan's write-then-attend equals the kernel-contract reference (fp32, several
    rows of different lengths, non-consecutive slots, one row of one token)."""
    from dflash_core.kernels import reference
    from dflash_core.models.decoder import CacheAttentionPlan
    g = torch.Generator().manual_seed(0)
    S, Hkv, rep, D, cap = 6, 2, 3, 8, 40
    for slots, lens, T in (([1, 4, 2], [5, 11, 0], 4), ([3], [7], 1), ([0, 1], [3, 9], 1), ([0, 5], [2, 6], 3)):
        kc = torch.randn(S, Hkv, cap, D, generator=g)
        vc = torch.randn(S, Hkv, cap, D, generator=g)
        R = len(slots)
        q = torch.randn(R, Hkv * rep, T, D, generator=g)
        k = torch.randn(R, Hkv, T, D, generator=g)
        v = torch.randn(R, Hkv, T, D, generator=g)
        st, ln = torch.tensor(slots), torch.tensor(lens)
        ref = reference.block_attention(q, kc, vc, st, ln, k, v, True, 0.3)
        plan = CacheAttentionPlan(st, ln, T, rep)
        kc2, vc2 = kc.clone(), vc.clone()
        plan.write(kc2, k)
        plan.write(vc2, v)
        out = plan.attend(q, kc2, vc2, 0.3)
        assert torch.allclose(out, ref, atol=1e-5), (slots, lens, T)
        for r, (s, n) in enumerate(zip(slots, lens)):
            assert torch.equal(kc2[s, :, n:n + T], k[r])            # the block was written in place


def test_bf16_attention_is_length_invariant_and_reads_no_stale_keys():
    """bf16, SmolLM2's attention shape (3 KV heads x 3 query heads, head dim 64): query t of
    a T-token block gets bit for bit what a one-token step at that position gets, at every
    context length up to 300 (on a Xeon with AMX the unpadded product differed at a few
    lengths, e.g. 161 keys, and greedy DFlash drifted from bf16 decoding on 5 of 6 real
    prompts); keys past a row's own length are never read, whatever the cache holds there;
    and the result is the reference attention's to bf16 accuracy."""
    from dflash_core.kernels import reference
    from dflash_core.models.decoder import CacheAttentionPlan
    g = torch.Generator().manual_seed(0)
    Hkv, rep, D, cap = 3, 3, 64, 400
    kc = torch.randn(1, Hkv, cap, D, generator=g).bfloat16()
    vc = torch.randn(1, Hkv, cap, D, generator=g).bfloat16()
    q = torch.randn(1, Hkv * rep, 16, D, generator=g).bfloat16()
    zero = torch.tensor([0])
    differ = []
    for base in range(1, 301):
        for T in (2, 8, 16):
            block = CacheAttentionPlan(zero, torch.tensor([base]), T, rep).attend(q[:, :, :T], kc, vc, 0.125)
            for t in range(T):
                one = CacheAttentionPlan(zero, torch.tensor([base + t]), 1, rep).attend(q[:, :, t:t + 1], kc, vc,
                                                                                          0.125)
                if not torch.equal(one[:, :, 0], block[:, :, t]):
                    differ.append((base, T, t))
    assert differ == []
    # stale keys: the cache past each row's length holds huge values; the output ignores them
    base, T = 37, 5
    stale_k, stale_v = kc.clone(), vc.clone()
    stale_k[:, :, base + T:] = 1e4
    stale_v[:, :, base + T:] = 1e4
    plan = CacheAttentionPlan(zero, torch.tensor([base]), T, rep)
    got = plan.attend(q[:, :, :T], stale_k, stale_v, 0.125)
    assert torch.equal(got, plan.attend(q[:, :, :T], kc, vc, 0.125))
    ref = reference.block_attention(q[:, :, :T].float(), kc.float(), vc.float(), zero, torch.tensor([base]),
                                    kc[:, :, base:base + T].float(), vc[:, :, base:base + T].float(), True, 0.125)
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)


def test_bf16_greedy_dflash_equals_bf16_autoregressive(bf16_target):
    """Losslessness in bf16 is bitwise: verify blocks of any size and batches of any
    size compute each token exactly as a one-token step does."""
    n = 40
    ar = _engine(bf16_target, 1, drafter=False)
    ref = [o.token_ids for o in ar.generate(PROMPTS, SamplingParams(max_new_tokens=n, ignore_eos=True))]
    assert len({tuple(r) for r in ref}) == len(ref)
    one_by_one = [ar.generate([p], SamplingParams(max_new_tokens=n, ignore_eos=True))[0].token_ids for p in PROMPTS]
    assert one_by_one == ref                                      # batch-invariant
    for b in (4, 16):
        eng = _engine(bf16_target, b)
        out = eng.generate(PROMPTS, SamplingParams(max_new_tokens=n, ignore_eos=True))
        assert [o.token_ids for o in out] == ref, b
        assert sum(o.stats.num_draft_tokens for o in out) > 0


def test_resolve_dtype_and_thread_policy(monkeypatch):
    assert resolve_dtype("float32") == torch.float32
    assert resolve_dtype("bf16") == torch.bfloat16
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    # auto on a CPU: fp32 where the native kernels run (faster than oneDNN bf16 up to ~8
    # rows, measured), else bf16 where it is native, else fp32
    from dflash_core import native
    import dflash_core.runtime as runtime
    assert runtime.native_kernels_available() == native.available()   # the same conditions
    want = torch.float32 if native.available() or not cpu_has_fast_bf16() else torch.bfloat16
    assert resolve_dtype("auto", "cpu") == want
    monkeypatch.setenv("DFLASH_NATIVE", "0")
    assert not runtime.native_kernels_available()
    monkeypatch.delenv("DFLASH_NATIVE")
    assert resolve_dtype("auto", "cpu", prefer_native=False) == (torch.bfloat16 if cpu_has_fast_bf16()
                                                                 else torch.float32)
    for has_native in (True, False):
        for fast_bf16 in (True, False):
            monkeypatch.setattr(runtime, "native_kernels_available", lambda v=has_native: v)
            monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda v=fast_bf16: v)
            got = resolve_dtype("auto", "cpu")
            assert got == (torch.bfloat16 if fast_bf16 and not has_native else torch.float32), (has_native, fast_bf16)
            assert resolve_dtype("auto", "cpu", prefer_native=False) == (torch.bfloat16 if fast_bf16
                                                                         else torch.float32)
            assert resolve_dtype("auto", "cuda") == torch.bfloat16
    monkeypatch.undo()
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8")
    # the Python API takes the names the commands take
    from dflash_core.api import build_engine
    from dflash_core.engine import EngineConfig
    cfg = EngineConfig(max_slots=1, max_seq_len=32, block_size=1)
    for name, want in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("auto", resolve_dtype("auto"))):
        engine, _ = build_engine("tiny-random", None, cfg, dtype=name, tokenizer=False)
        assert engine.target.dtype == want, name
    with pytest.raises(ValueError, match="unknown dtype"):
        build_engine("tiny-random", None, cfg, dtype="float8", tokenizer=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    # a process sharing its cores keeps the OpenMP runtime's spin-then-sleep (unset)
    assert set_thread_policy(shared=True) == "default" and "OMP_WAIT_POLICY" not in os.environ
    assert set_thread_policy(shared=False) == "ACTIVE" == os.environ["OMP_WAIT_POLICY"]
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")              # an explicit setting wins
    assert set_thread_policy(shared=True) == "PASSIVE" and set_thread_policy(shared=False) == "PASSIVE"


def test_on_fresh_thread_runs_on_a_thread_that_is_gone_after():
    """The server loads its model on a thread that exits (dflash_core/runtime.py: one OpenMP
    master per process): every builder of service/engines.py goes through it."""
    import threading
    from dflash_core.runtime import on_fresh_thread
    seen = []

    def work(a, b=0):
        seen.append(threading.current_thread())
        return a + b
    assert on_fresh_thread(work, 2, b=3) == 5
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()

    def fail():
        raise ValueError("bad model")
    with pytest.raises(ValueError, match="bad model"):
        on_fresh_thread(fail)

    from service import engines
    from service.config import ServiceConfig
    built = []

    def recording(fn):
        def wrapped(*a, **kw):
            built.append(threading.current_thread())
            return fn(*a, **kw)
        return wrapped
    cfg = ServiceConfig(target="tiny-random", drafter="random", max_slots=1, max_seq_len=64, block_size=4)
    real_engine, real_drafter = engines.build_engine, engines.load_drafter
    try:
        engines.build_engine, engines.load_drafter = recording(real_engine), recording(real_drafter)
        engine, _ = engines.build_colocated(cfg)
        engines.build_remote_target(cfg, engine.draft_backend.drafter.config.to_json(), lambda h, p: None,
                                    backend="gloo")
        assert engines.build_drafter_server(cfg).drafter is not None
    finally:
        engines.build_engine, engines.load_drafter = real_engine, real_drafter
    assert len(built) == 3 and all(t is not threading.current_thread() and not t.is_alive() for t in built)


def test_engine_warns_once_when_stepped_beside_the_live_thread_that_built_it(monkeypatch, caplog):
    """A CPU engine stepped on another thread while its building thread lives makes two
    OpenMP masters (runtime.py): the first step logs one warning; built on a thread that
    has exited (on_fresh_thread), or stepped where it was built, it logs nothing."""
    import logging
    import threading
    from dflash_core import runtime
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    target = tiny_random_target(vocab_size=512, num_layers=2, seed=3)
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)

    def run_on_other_thread(engine):
        def go():
            engine.add_request("r", [5, 6, 7], params)
            while engine.has_unfinished_requests():
                engine.step()
        th = threading.Thread(target=go, name="stepper")
        th.start()
        th.join()

    def warnings():
        return [r.getMessage() for r in caplog.records if r.name == "dflash.engine" and r.levelno == logging.WARNING]
    with caplog.at_level(logging.WARNING, logger="dflash.engine"):
        run_on_other_thread(_engine(target, 4, drafter=False))   # built here (alive), stepped there
        assert len(warnings()) == 1
        msg = warnings()[0]
        assert "MainThread" in msg and "stepper" in msg and "on_fresh_thread" in msg
        caplog.clear()
        run_on_other_thread(runtime.on_fresh_thread(_engine, target, 4, drafter=False))
        assert warnings() == []
        engine = _engine(target, 4, drafter=False)
        assert engine.generate([[5, 6, 7]], params)[0].token_ids and warnings() == []
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)   # one thread: no pool, nothing to warn about
    alive = threading.Event()
    holder = threading.Thread(target=alive.wait, name="holder")
    holder.start()
    try:
        assert runtime.second_master_warning(holder, "cpu") is None
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
        assert "holder" in runtime.second_master_warning(holder, "cpu")
        assert runtime.second_master_warning(holder, "cuda:0") is None
    finally:
        alive.set()
        holder.join()
    assert runtime.second_master_warning(holder, "cpu") is None   # its thread has exited


def test_replica_threads_and_wait_policy(monkeypatch):
    """Ray gives a replica floor(num_cpus) >= 1 OpenMP threads; `threads` sets them (0: every
    CPU the process may run on), `omp_wait_policy` auto leaves OMP_WAIT_POLICY alone."""
    from service.config import ServiceConfig
    from service.deployments import deployment_options
    from service.engines import apply_threads
    before = torch.get_num_threads()
    try:
        assert apply_threads(ServiceConfig(threads=1)) == 1
        assert apply_threads(ServiceConfig()) == len(os.sched_getaffinity(0))
    finally:
        torch.set_num_threads(before)
    assert deployment_options(ServiceConfig())["ray_actor_options"]["runtime_env"]["env_vars"] == {}
    for policy in ("passive", "active"):
        env = deployment_options(ServiceConfig(omp_wait_policy=policy))["ray_actor_options"]["runtime_env"]
        assert env["env_vars"] == {"OMP_WAIT_POLICY": policy.upper()}
    for bad in ({"threads": -1}, {"threads": 1.5}, {"threads": True}, {"omp_wait_policy": "spin"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServiceConfig(**bad)


def test_importing_the_core_sets_no_environment():
    code = ("import os; before = dict(os.environ); import dflash_core, dflash_core.engine, dflash_core.api; "
            "print(sorted(set(os.environ.items()) - set(before.items())))")
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_compact_shards_roundtrip(tmp_path):
    from dflash_core.training.shards import read_shard, write_shard
    recs = [{"conv_id": "a_0", "prompt_ids": [1, 2, 49151], "response_ids": [7, 8, 2], "sampled": True,
             "finish_reason": "stop"},
            {"conv_id": "b_1", "prompt_ids": [5], "response_ids": [], "sampled": False, "finish_reason": "length"}]
    write_shard(tmp_path / "shard_00000.npz", recs)
    assert read_shard(tmp_path / "shard_00000.npz") == recs
    assert not list(tmp_path.glob("*.tmp"))
    with __import__("numpy").load(tmp_path / "shard_00000.npz") as z:
        assert z["prompt_ids"].dtype.name == "uint16"


def test_bench_verify_cost_at_several_context_lengths():
    """--verify-ctx: the verify forwards timed on each cached context length, the first also
    as verify_ms; without --verify-cost, or with a bad list, one line and exit 2."""
    out = subprocess.run([DFLASH, "bench", "--target", "tiny-random", "--drafter", "random", "--num-prompts", "1",
                          "--max-new-tokens", "4", "--verify-cost", "--verify-ctx", "16,96", "--verify-reps", "2",
                          "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    by_ctx = summary["verify_ms_by_ctx"]
    assert set(by_ctx) == {"16", "96"} and all(set(v) == set(summary["verify_ms"]) for v in by_ctx.values())
    assert all(ms > 0 for v in by_ctx.values() for ms in v.values())
    assert "verify forward cost (ctx 96)" in out.stderr and "verify forward cost (ctx 16)" in out.stderr
    for argv, needle in ((["--verify-ctx", "16,96"], "add --verify-cost"),
                         (["--verify-cost", "--verify-ctx", "16,x"], "--verify-ctx")):
        bad = subprocess.run([DFLASH, "bench", "--target", "tiny-random", "--drafter", "random", *argv],
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and needle in bad.stderr, bad.stderr


def test_bench_json_reports_verify_cost_by_block_size():
    out = subprocess.run([DFLASH, "bench", "--target", "tiny-random",
                          "--drafter", "random", "--num-prompts", "1", "--max-new-tokens", "8", "--verify-cost",
                          "--block-sizes", "4,8", "--batch-sizes", "2", "--dtype", "bfloat16",
                          "--draft-thresholds", "0,0.5", "--dataset", "sharegpt", "--calibration", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["dtype"] == "bfloat16" and summary["dataset"] == "sharegpt" and summary["num_prompts"] == 1
    assert summary["native_linears"]["count"] == 0 and summary["native_linears"]["vector_width"] == 0   # fp32 only
    assert set(summary["verify_ms"]) == {"1", "2", "3", "4", "8", "16"} and all(v > 0 for v in summary["verify_ms"].values())
    assert "verify_ms_by_ctx" not in summary     # one context length: only verify_ms
    assert set(summary["by_block_size"]) == {"4", "8"}
    assert all(r["greedy_outputs_identical"] for r in summary["by_block_size"].values())
    # each block size with each dynamic draft length threshold, the first standing for the block size
    by_thr = summary["by_draft_threshold"]
    assert set(by_thr) == {"0", "0.5"} and all(set(v) == {"4", "8"} for v in by_thr.values())
    assert all(r["greedy_outputs_identical"] for v in by_thr.values() for r in v.values())
    assert by_thr["0"] == summary["by_block_size"] and summary["draft_threshold"] == 0
    # calibration: every step of the block-8 run counted once per position, in one bin each
    cal = summary["calibration"]
    assert cal["block_size"] == 8 and cal["steps"] > 0 and set(cal["by_position"]) == {"1", "2", "3"}
    for rows in cal["by_position"].values():
        assert len(rows) == 10 and sum(r["steps"] for r in rows) == cal["steps"]
        assert all(0 <= r["accepted"] <= 1 for r in rows if r["steps"])
    assert summary["batched_ar_tokens_per_s"]["2"] > 0
    for argv, needle in ((["--dtype", "fp8"], "dtype"), (["--draft-thresholds", "0,1.5"], "--draft-thresholds"),
                         (["--draft-thresholds", "x"], "--draft-thresholds")):
        bad = subprocess.run([DFLASH, "bench", "--target", "tiny-random", *argv],
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and needle in bad.stderr, bad.stderr


def test_bench_prepack_ab_reports_both_and_restores_the_packed_linears():
    out = subprocess.run([DFLASH, "bench", "--target", "tiny-random", "--drafter", "random", "--num-prompts", "1",
                          "--max-new-tokens", "8", "--verify-cost", "--block-sizes", "4", "--batch-sizes", "4",
                          "--dtype", "float32", "--prepack-ab", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads(out.stdout.strip().splitlines()[-1])
    off = s["prepacked_off"]
    assert off["num_linears"] > 0
    assert set(off["verify_ms"]) == set(s["verify_ms"]) and all(v > 0 for v in off["verify_ms"].values())
    assert off["batched_ar_tokens_per_s"]["4"] > 0 and s["batched_ar_tokens_per_s"]["4"] > 0
    on4, off4 = s["by_block_size"]["4"] if "by_block_size" in s else s, off["by_block_size"]["4"]
    assert on4["greedy_outputs_identical"] and off4["greedy_outputs_identical"]

    from dflash_core.api import build_engine
    from dflash_core.bench import prepacked_off
    from dflash_core.engine import EngineConfig
    from dflash_core.models.layers import is_prepacked
    engine, _ = build_engine("tiny-random", "random", EngineConfig(max_slots=1, max_seq_len=64, block_size=4),
                             tokenizer=False)
    mlp = engine.target.layers[0].mlp
    before = (mlp._gate_up_fn, engine.target._head_fn)
    assert all(f is not None for f in before)
    owners = [*engine.target.modules(), *engine.draft_backend.drafter.modules(), engine.drafting]

    def packed_now():
        return sum(is_prepacked(v) for o in owners for v in vars(o).values())
    n_packed = packed_now()
    # every attention (qkv, o) and MLP (gate_up, down) of the target, its LM head, the
    # drafter's own layers and the draft head
    assert n_packed >= 4 * engine.target.config.num_layers + 1
    x = torch.randn(1, 6, engine.target.config.hidden_size)
    with torch.no_grad():
        packed = mlp(x)
        with prepacked_off(engine) as n:
            assert n == n_packed and mlp._gate_up_fn is None and engine.target._head_fn is None
            assert packed_now() == 0
            plain = mlp(x)
    assert (mlp._gate_up_fn, engine.target._head_fn) == before and packed_now() == n_packed
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)


def test_bench_mm_ab_times_both_and_restores_the_mm_linears():
    """--mm-ab: the verify cost with the small fp32 weights through torch.mm and through the
    packed product, both reported; small_mm_off swaps exactly those linears (same numbers
    up to summation order) and puts them back."""
    out = subprocess.run([DFLASH, "bench", "--target", "tiny-random", "--drafter", "random", "--num-prompts", "1",
                          "--max-new-tokens", "4", "--block-size", "4", "--verify-cost", "--mm-ab", "--verify-reps", "3",
                          "--dtype", "float32", "--json"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "DFLASH_NATIVE": "0"})   # the fallback path (no native linears)
    assert out.returncode == 0, out.stderr[-2000:]
    ab = json.loads(out.stdout.strip().splitlines()[-1])["small_mm_ab"]
    assert ab["num_linears"] > 0
    assert set(ab["mm"]["verify_ms"]) == set(ab["packed"]["verify_ms"]) == {"1", "2", "3", "4", "8", "16"}
    assert all(v > 0 for k in ("mm", "packed") for v in ab[k]["verify_ms"].values())
    bad = subprocess.run([DFLASH, "bench", "--target", "tiny-random", "--mm-ab"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--verify-cost" in bad.stderr

    from dflash_core import native
    from dflash_core.api import build_engine
    from dflash_core.bench import small_mm_off
    from dflash_core.engine import EngineConfig
    was = native.enabled()
    native.set_enabled(False)
    try:
        engine, _ = build_engine("tiny-random", "random", EngineConfig(max_slots=1, max_seq_len=64, block_size=4),
                                 tokenizer=False, dtype=torch.float32)
    finally:
        native.set_enabled(was)
    attn = engine.target.layers[0].self_attn
    before = (attn._qkv_fn, attn._o_fn, engine.target.layers[0].mlp._down_fn)
    assert all(getattr(f, "small_mm", None) is not None for f in before)
    x = torch.randn(6, engine.target.config.hidden_size)
    with torch.no_grad():
        mm = attn._o_fn(x)
        with small_mm_off(engine) as n:
            assert n >= 3 * engine.target.config.num_layers and attn._o_fn is not before[1]
            assert getattr(attn._o_fn, "small_mm", None) is None
            packed = attn._o_fn(x)
    assert (attn._qkv_fn, attn._o_fn, engine.target.layers[0].mlp._down_fn) == before
    torch.testing.assert_close(mm, packed, rtol=1e-5, atol=1e-5)


def test_peer_benchmark_runs_on_the_tiny_model(tmp_path):
    out = subprocess.run([DFLASH, "bench", "--peers", "--target", "tiny-random", "--drafter", "random",
                          "--peer-prompts", "1", "--max-new-tokens", "6", "--block-size", "4", "--json",
                          "--peers-plot", str(tmp_path / "peers.png")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(s["results"]) == {"sharegpt", "humaneval"}
    for ds in s["results"].values():
        rows = ds["systems"]
        assert set(rows) == {"engine-ar", "engine-dflash"}
        assert rows["engine-ar"]["identical_to_engine_ar"] == 1 and rows["engine-ar"]["dflash_speedup_over_it"] > 0
        assert rows["engine-dflash"]["identical_to_engine_ar"] == 1          # lossless
    assert {"hf-fp32", "hf-bf16", "hf-lookup", "llama.cpp"} <= set(s["skipped"])
    assert all(s["skipped"].values())                                        # each with its reason
    assert (tmp_path / "peers.png").stat().st_size > 1000
