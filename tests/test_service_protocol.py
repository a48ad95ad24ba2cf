"""Pieces of the service that need no engine: detokenization with stop strings, request
parsing, configuration."""
from __future__ import annotations

import random

import pytest

from dflash_core.api import load_tokenizer
from service import protocol as P
from dflash_core.engine import INF_RUNNING, parse_block_size_schedule
from service.config import ServiceConfig
from service.detokenize import IncrementalDetokenizer, decode_text

TEXT = ("Héllo wörld! Here is some code:\n```python\ndef f(x):\n    return x ** 2  # 🤖 squares\n```\n"
        "日本語のテキスト and more text, with   spaces.\t<|im_end|> trailing")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("default")


def feed(tok, ids, stops=(), seed=0):
    """Feed ids in random chunks; -> (released text, detokenizer)."""
    rng = random.Random(seed)
    d = IncrementalDetokenizer(tok, list(stops))
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 4)
        chunk = ids[i:i + n]
        i += n
        out.append(d.add(chunk, finished=i >= len(ids)))
        if d.stopped:
            break
    return "".join(out), d


def test_any_chunking_gives_the_full_decode(tok):
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    want = decode_text(tok, ids)
    assert "🤖" in want and "日本語" in want and "<|im_end|>" not in want   # special tokens skipped
    for seed in range(5):
        text, d = feed(tok, ids, seed=seed)
        assert text == want
        assert d.num_tokens_used == len(ids)


def test_random_token_ids_including_partial_utf8(tok):
    rng = random.Random(1)
    ids = [rng.randrange(tok.vocab_size) for _ in range(300)]
    text, _ = feed(tok, ids, seed=3)
    assert text == decode_text(tok, ids)


@pytest.mark.parametrize("stop", ["return", "x ** 2", "```\n日本", "🤖", "more text"])
def test_stop_string_cuts_before_first_occurrence(tok, stop):
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    full = decode_text(tok, ids)
    for seed in range(3):
        text, d = feed(tok, ids, stops=[stop, "never-there"], seed=seed)
        assert d.stopped
        assert text == full[:full.index(stop)]
        # the tokens used are the shortest prefix whose text contains the stop string
        used = d.num_tokens_used
        assert stop in decode_text(tok, ids[:used]) and stop not in decode_text(tok, ids[:used - 1])


def test_text_that_may_start_a_stop_string_is_held_back(tok):
    d = IncrementalDetokenizer(tok, ["STOP!"])
    ids = tok("abc ST", add_special_tokens=False)["input_ids"]
    released = d.add(ids, finished=False)
    assert released == "abc "          # "ST" could become "STOP!"
    more = tok("OX", add_special_tokens=False)["input_ids"]
    assert d.add(more, finished=True) == "STOX"   # finished: nothing to hold any more
    assert not d.stopped


def test_parse_request_types_and_unsupported_fields():
    ok = P.parse_request(P.CompletionRequest, b'{"model": "m", "prompt": ["only one"], "stop": "x", "n": 1}')
    assert ok.prompt == "only one" and ok.stop_strings == ["x"] and ok.max_tokens == 16
    cases = {
        b'{"model": "m", "prompt": "p", "max_tokens": "5"}': "max_tokens",
        b'{"model": "m", "prompt": "p", "stream": "true"}': "stream",
        b'{"model": "m", "prompt": "p", "logit_bias": {"1": 500}}': "logit_bias",
        b'{"model": "m", "prompt": "p", "logit_bias": {"x1": 5}}': "logit_bias",
        b'{"model": "m", "prompt": "p", "top_k": -2}': "top_k",
        b'{"model": "m", "prompt": "p", "top_k": 18446744073709551616}': "top_k",
        b'{"model": "m", "prompt": "p", "stop": [""]}': "stop",
        b'{"model": "m", "prompt": []}': "prompt",
    }
    for body, param in cases.items():
        with pytest.raises(P.APIError) as e:
            P.parse_request(P.CompletionRequest, body)
        assert e.value.status == 400 and e.value.param == param, (body, e.value.body())
    # "off" values of unsupported features are accepted (clients send them by default)
    r = P.parse_request(P.ChatCompletionRequest, b'{"model": "m", "messages": [{"role": "user", "content": '
                                                  b'[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],'
                                                  b' "logprobs": false, "presence_penalty": 0, "tools": null}')
    assert r.messages[0].text() == "ab"


def test_config_from_dict_and_schedule():
    cfg = ServiceConfig.from_dict({"target": "tiny-random", "max_seq_len": 128,
                                   "block_size_schedule": "1:16, 4:8, inf:1"})
    assert cfg.block_size_schedule == [(1, 16), (4, 8), (INF_RUNNING, 1)]
    assert cfg.max_prompt_tokens == 127 and cfg.max_tokens_limit == 128
    assert ServiceConfig.from_dict(cfg.to_dict()) == cfg
    assert parse_block_size_schedule("none") is None and parse_block_size_schedule([[2, 4], [1, 8]]) == [(1, 8), (2, 4)]
    with pytest.raises(ValueError, match="unknown service option"):
        ServiceConfig.from_dict({"max_slot": 3})
    for bad in ({"placement": "remote"}, {"max_slots": 0}, {"block_size_schedule": "1-16"},
                {"dtype": "int8"}, {"max_prompt_tokens": 5000}, {"drafter_weights": "q4"},
                {"drafter_weights": "q8_0", "dtype": "bfloat16"}):
        with pytest.raises(ValueError):
            ServiceConfig(**bad)
    # dynamic draft length: reaches the engine; outside [0, 1) or not a number is refused by name
    from service.engines import engine_config
    assert ServiceConfig(target="tiny-random").draft_threshold == 0.0
    assert engine_config(ServiceConfig(target="tiny-random", draft_threshold=0.3)).draft_threshold == 0.3
    for bad in (-0.1, 1.0, "0.3", True, float("nan")):
        with pytest.raises(ValueError, match="draft_threshold"):
            ServiceConfig(target="tiny-random", draft_threshold=bad)
    # tree verification and lookup branches: on by default, reach the engine, `--draft-tree off` /
    # `--draft-lookup off` turn them off; not a bool is refused
    from service.cli import build_parser as _parser, config_from_args as _from_args
    for field, flag in (("draft_tree", "--draft-tree"), ("draft_lookup", "--draft-lookup")):
        assert getattr(ServiceConfig(target="tiny-random"), field) is True
        assert getattr(engine_config(ServiceConfig(target="tiny-random")), field) is True
        assert getattr(engine_config(ServiceConfig(target="tiny-random", **{field: False})), field) is False
        for bad in ("yes", "on", 1, 0, None):
            with pytest.raises(ValueError, match=field):
                ServiceConfig(target="tiny-random", **{field: bad})
        assert getattr(_from_args(_parser().parse_args(["--target", "tiny-random", flag, "off"])), field) is False
        assert getattr(_from_args(_parser().parse_args(["--target", "tiny-random"])), field) is True
    # the AMX linears: on by default, `--native-amx off` keeps the FMA forms; not a bool is refused;
    # apply_native (each engine builder calls it first) sets the process's kernel choice
    assert ServiceConfig(target="tiny-random").native_amx is True
    assert _from_args(_parser().parse_args(["--target", "tiny-random", "--native-amx", "off"])).native_amx is False
    for bad in ("off", 0, None):
        with pytest.raises(ValueError, match="native_amx"):
            ServiceConfig(target="tiny-random", native_amx=bad)
    from dflash_core import native
    from service.engines import apply_native
    try:
        apply_native(ServiceConfig(target="tiny-random", native_amx=False))
        assert native.form("q4_1") == "q4_1" and not native.amx()
        apply_native(ServiceConfig(target="tiny-random"))
        assert native.amx() == native.amx_built()
    finally:
        native.set_amx(True)
    # what the AMX linears take: bf16 by default, `--amx-inputs fp32` keeps them exact; others
    # refused; apply_native sets it for the process
    assert ServiceConfig(target="tiny-random").amx_inputs == "bf16"
    assert _from_args(_parser().parse_args(["--target", "tiny-random"])).amx_inputs == "bf16"
    assert _from_args(_parser().parse_args(["--target", "tiny-random", "--amx-inputs", "fp32"])).amx_inputs == "fp32"
    for bad in ("fp16", "BF16", None, True):
        with pytest.raises(ValueError, match="amx_inputs must be fp32 or bf16"):
            ServiceConfig(target="tiny-random", amx_inputs=bad)
    with native.amx_inputs_set("bf16"):
        apply_native(ServiceConfig(target="tiny-random", amx_inputs="fp32"))
        assert native.amx_inputs() == "fp32"
        apply_native(ServiceConfig(target="tiny-random"))
        assert native.amx_inputs() == "bf16"
    # the target's KV cache dtype: auto by default, `--kv-cache-dtype bfloat16` reaches the engine,
    # others refused
    assert ServiceConfig(target="tiny-random").kv_cache_dtype == "auto"
    assert engine_config(ServiceConfig(target="tiny-random")).kv_cache_dtype == "auto"
    a = _parser().parse_args(["--target", "tiny-random", "--kv-cache-dtype", "bfloat16"])
    assert engine_config(_from_args(a)).kv_cache_dtype == "bfloat16"
    for bad in ("bf16", "fp16", None):
        with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
            ServiceConfig(target="tiny-random", kv_cache_dtype=bad)
    from dflash_core.clitools import CliError
    with pytest.raises(CliError, match="--kv-cache-dtype"):
        _parser().parse_args(["--target", "tiny-random", "--kv-cache-dtype", "bf16"])
    # corpus branches: auto by default, `--draft-corpus` reaches the engine config, an empty
    # or non-string value refused
    assert ServiceConfig(target="tiny-random").draft_corpus == "auto"
    assert engine_config(ServiceConfig(target="tiny-random")).draft_corpus == "auto"
    a = _parser().parse_args(["--target", "tiny-random", "--draft-corpus", "none"])
    assert engine_config(_from_args(a)).draft_corpus == "none"
    for bad in ("", None, 1):
        with pytest.raises(ValueError, match="draft_corpus must be"):
            ServiceConfig(target="tiny-random", draft_corpus=bad)
    # the drafter's weights: `dflash serve --drafter-weights` reaches the config, default auto
    from service.cli import build_parser, config_from_args
    assert ServiceConfig(target="tiny-random").drafter_weights == "auto"
    a = build_parser().parse_args(["--target", "tiny-random", "--drafter-weights", "stored"])
    assert config_from_args(a).drafter_weights == "stored"


def test_auto_schedule_follows_the_dtype_the_engine_runs_in():
    """Before the engine exists, the default schedule resolves to the table for the dtype the
    engine runs in (bf16: AMX CPUs, GPUs: block 4 at 1-2 running; fp32: block 2 at 1
    running; plain decoding beyond), resolved where the engine runs; "auto" then measures
    it on the built engine where the drafter has a profile (tests/test_autoschedule.py)."""
    from dflash_core.engine import DEFAULT_BLOCK_SIZE_SCHEDULE, FP32_BLOCK_SIZE_SCHEDULE
    from service.engines import engine_config
    cfg = ServiceConfig(target="tiny-random")
    assert cfg.block_size_schedule == "auto" and ServiceConfig.from_dict(cfg.to_dict()) == cfg
    bf16 = ServiceConfig(target="tiny-random", dtype="bfloat16")
    fp32 = ServiceConfig(target="tiny-random", dtype="float32")
    assert bf16.resolved_block_size_schedule() == [tuple(p) for p in DEFAULT_BLOCK_SIZE_SCHEDULE]
    assert fp32.resolved_block_size_schedule() == [tuple(p) for p in FP32_BLOCK_SIZE_SCHEDULE]
    assert engine_config(bf16).block_size_for(1) == 4 and engine_config(bf16).block_size_for(3) == 1
    assert engine_config(fp32).block_size_for(1) == 2 and engine_config(fp32).block_size_for(2) == 1
    assert engine_config(fp32).block_size_for(3) == 1
    gpu = ServiceConfig(target="tiny-random", device="cuda")      # auto dtype on a GPU: bf16
    assert gpu.resolved_block_size_schedule() == [tuple(p) for p in DEFAULT_BLOCK_SIZE_SCHEDULE]
    explicit = ServiceConfig(target="tiny-random", dtype="float32", block_size_schedule="1:8,inf:1")
    assert explicit.resolved_block_size_schedule() == [(1, 8), (INF_RUNNING, 1)]


def test_sweep_picks_a_schedule_that_only_speculates_where_it_clearly_pays():
    """service.bench_serve.pick_schedule: mean tokens/s per (concurrency, block) over
    repeated rows; speculation only above plain decoding by more than min_gain; the block
    size never grows with concurrency; the last pair covers any batch."""
    from service.bench_serve import pick_schedule

    def rows(table, rep=1):
        return [{"concurrency": c, "block_size": b, "tokens_per_s": t, "rep": rep}
                for c, by_b in table.items() for b, t in by_b.items()]
    # last session's noisy fp32 sweep: 1:3, 2:1, 4:3 by the fastest cell alone
    noisy = {1: {1: 17.75, 2: 19.33, 3: 22.74}, 2: {1: 32.05, 2: 30.37, 3: 29.95}, 4: {1: 36.79, 2: 46.74, 3: 49.31}}
    assert pick_schedule(rows(noisy), min_gain=0.03) == [(1, 3), (INF_RUNNING, 1)]
    # within the margin speculation loses to plain decoding; margin 0 takes the faster cell
    close = {1: {1: 20.0, 2: 20.5}, 4: {1: 40.0, 2: 39.0}}
    assert pick_schedule(rows(close), min_gain=0.03) == [(INF_RUNNING, 1)]
    assert pick_schedule(rows(close), min_gain=0.0) == [(1, 2), (INF_RUNNING, 1)]
    # monotone: only block sizes up to the pick below compete (block 4 at 2 running may
    # not follow block 2 at 1, and block 2 was not measured there); equal neighbours merge
    rising = {1: {1: 10.0, 2: 14.0, 4: 13.0}, 2: {1: 18.0, 4: 30.0}, 8: {1: 50.0, 2: 60.0}}
    assert pick_schedule(rows(rising)) == [(1, 2), (INF_RUNNING, 1)]
    steady = {1: {1: 10.0, 2: 14.0, 4: 13.0}, 2: {1: 18.0, 2: 24.0, 4: 30.0}, 8: {1: 50.0, 2: 60.0}}
    assert pick_schedule(rows(steady)) == [(INF_RUNNING, 2)]
    # repeated rows average: one lucky rep does not decide
    reps = rows({1: {1: 20.0, 2: 30.0}}, 1) + rows({1: {1: 20.0, 2: 10.0}}, 2)
    assert pick_schedule(reps) == [(INF_RUNNING, 1)]
    assert pick_schedule(rows({1: {1: 20.0, 2: 30.0}}) + rows({1: {1: 20.0, 2: 22.0}}, 2)) == [(INF_RUNNING, 2)]
    # ties go to the smaller block; without a block-1 row the fastest block stands
    assert pick_schedule(rows({1: {2: 25.0, 4: 25.0}, 3: {2: 20.0, 4: 30.0}})) == [(INF_RUNNING, 2)]
    with pytest.raises(ValueError, match="no sweep rows"):
        pick_schedule([])
    with pytest.raises(ValueError, match="min_gain"):
        pick_schedule(rows(close), min_gain=-0.1)


def test_serving_benchmark_on_off_reps_alternate_and_summarise_by_medians():
    """bench_serve --reps: each level's on/off order alternates rep by rep; the summary
    gives each rep's ratio and the ratio of the two modes' medians, per server and level,
    and leaves out a level where one mode is missing."""
    from dflash_core.stats import rep_order
    from service.bench_serve import on_off_summary
    assert [rep_order([True, False], r) for r in range(3)] == [[True, False], [False, True], [True, False]]
    assert rep_order([True], 1) == [True]
    rows = [{"concurrency": 16, "speculative": s, "tokens_per_s": t, "rep": rep, "server": 0}
            for rep, (on, off) in enumerate([(400.0, 440.0), (450.0, 430.0), (460.0, 420.0)], 1)
            for s, t in ((True, on), (False, off))]
    rows += [{"concurrency": 1, "speculative": True, "tokens_per_s": 190.0, "server": 0},
             {"concurrency": 1, "speculative": False, "tokens_per_s": 125.0, "server": 0},
             {"concurrency": 4, "speculative": True, "tokens_per_s": 300.0, "server": 0},   # no off row
             {"concurrency": 1, "speculative": True, "tokens_per_s": 100.0, "server": 1},
             {"concurrency": 1, "speculative": False, "tokens_per_s": 200.0, "server": 1}]
    got = on_off_summary(rows)
    assert [(x["server"], x["concurrency"]) for x in got] == [(0, 16), (0, 1), (1, 1)]
    c16 = got[0]
    assert c16["rep_ratios"] == [round(400 / 440, 3), round(450 / 430, 3), round(460 / 420, 3)]
    assert (c16["median_on"], c16["median_off"], c16["ratio"]) == (450.0, 430.0, round(450 / 430, 3))
    assert got[1]["ratio"] == round(190 / 125, 3) and got[1]["rep_ratios"] == [round(190 / 125, 3)]
    assert got[2]["ratio"] == 0.5


@pytest.mark.parametrize("argv, needle", [
    (["--sweep", "--reps", "0"], "--reps"),
    (["--reps", "0"], "--reps"),
    (["--min-gain", "-1"], "--min-gain"),
    (["--concurrency", "1,x"], "--concurrency takes comma-separated positive integers"),
    (["--sweep", "--block-sizes", "0,2"], "--block-sizes takes positive integers"),
    (["--concurrency", ","], "need at least one value"),
    (["--draft-trees", "on,maybe"], "--draft-trees takes on and off"),
    (["--draft-lookups", "off,1"], "--draft-lookups takes on and off"),
    (["--draft-corpora", "auto,,none"], "--draft-corpora takes auto, none or index files"),
    (["--amx-inputs", "bf16,fp16"], "--amx-inputs takes fp32 and bf16"),
    (["--kv-cache-dtypes", "float32,bf16"], "--kv-cache-dtypes takes auto, float32, bfloat16"),
    (["--server-envs", "DFLASH_NATIVE_AMX=1,AMX"], "--server-envs: 'AMX' is not KEY=VALUE"),
    (["--server-envs", "=1"], "--server-envs: '=1' is not KEY=VALUE"),
])
def test_serving_benchmark_bad_options_one_line(capsys, argv, needle):
    from dflash_core.clitools import run_command
    from service.bench_serve import main
    assert run_command("python -m service.bench_serve", main, argv) == 2   # refused before any server starts
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and err.startswith("python -m service.bench_serve:")


@pytest.mark.parametrize("argv, code, needle", [
    (["--placement", "sideways"], 2, "placement"),
    (["--max-slots", "0"], 2, "max_slots"),
    (["--port", "70000"], 2, "port"),
    (["--block-size-schedule", "1-16"], 2, "MAX_RUNNING:BLOCK_SIZE"),
    (["--block-size-schedule", "fastest"], 2, "must be auto, measure, table, none or MAX_RUNNING:BLOCK_SIZE"),
    (["--block-size-schedule", "measure", "--placement", "disaggregated"], 2, "colocated placement only"),
    (["--draft-threshold", "1.5"], 2, "draft_threshold"),
    (["--draft-threshold", "half"], 2, "--draft-threshold"),
    (["--draft-tree", "maybe"], 2, "--draft-tree"),
    (["--draft-lookup", "yes"], 2, "--draft-lookup"),
    (["--target", "/no/such/model"], 1, "unknown model"),
    (["--drafter", "/no/such/drafter", "--target", "tiny-random"], 2, "drafter"),
    (["--runtime", "uvicorn", "--placement", "disaggregated", "--target", "tiny-random"], 2, "colocated only"),
])
def test_cli_bad_options_one_line_and_exit_code(capsys, argv, code, needle):
    from service.cli import main
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err


def test_autoscaling_option():
    """Serve autoscaling of the ingress: target_ongoing_requests defaults to the slot count,
    bad settings fail with their names, and the built application carries the config."""
    from service.deployments import build_app
    cfg = ServiceConfig(target="tiny-random", max_slots=6, autoscaling={"min_replicas": 1, "max_replicas": 3})
    assert cfg.autoscaling == {"target_ongoing_requests": 6, "min_replicas": 1, "max_replicas": 3}
    assert ServiceConfig.from_dict(cfg.to_dict()) == cfg
    for bad, needle in (({"max_replica": 3}, "unknown autoscaling option"), ({"min_replicas": 3, "max_replicas": 1},
                        "min_replicas <= max_replicas"), ("lots", "mapping")):
        with pytest.raises(ValueError, match=needle):
            ServiceConfig(target="tiny-random", autoscaling=bad)
    with pytest.raises(ValueError, match="colocated"):
        ServiceConfig(target="tiny-random", placement="disaggregated", autoscaling={"max_replicas": 2})
    app = build_app({"target": "tiny-random", "drafter": "random", "max_slots": 6,
                     "autoscaling": {"min_replicas": 1, "max_replicas": 3}})
    dep = app._bound_deployment
    auto = dep._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 3, 6)
    assert build_app({"target": "tiny-random"})._bound_deployment._deployment_config.autoscaling_config is None
