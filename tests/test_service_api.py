"""The HTTP service in-process (uvicorn on a thread, tiny random target + random drafter):
outputs equal the engine offline, concurrency, errors, limits, disconnects, metrics."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dflash_core.api import build_engine, load_tokenizer
from dflash_core.sampling import SamplingParams
from service.config import ServiceConfig
from service.detokenize import decode_text
from service.engines import engine_config
from service.local import LocalServer

MODEL = "tiny"
PROMPTS = ["The quick brown fox", "def fibonacci(n):", "Once upon a time in a land", "1, 2, 3, 4,",
           "Hello, my name is", "The capital of France", "import numpy as np", "Q: why is the sky blue?\nA:"]


def make_cfg(**kw) -> ServiceConfig:
    base = dict(target="tiny-random", drafter="random", max_slots=8, max_seq_len=512, block_size=8,
                block_size_schedule=None, served_model_name=MODEL, log_level="WARNING")
    base.update(kw)
    return ServiceConfig(**base)


def make_engine(cfg: ServiceConfig):
    engine, _ = build_engine(cfg.target, cfg.drafter, engine_config(cfg), tokenizer=False)
    return engine


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-random")


@pytest.fixture(scope="module")
def srv(tok):
    cfg = make_cfg()
    with LocalServer(cfg, make_engine(cfg), tok) as s:
        yield s


def start_server(tok, **kw) -> LocalServer:
    cfg = make_cfg(**kw)
    return LocalServer(cfg, make_engine(cfg), tok).start()


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def chat_ids(tok, text):
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def offline(prompt_ids: list[int], **params):
    """Solo run of a fresh engine with the server's engine config."""
    res = make_engine(make_cfg()).generate([prompt_ids], SamplingParams(**params))[0]
    return res.token_ids, res.finish_reason


def sse(resp):
    """Parsed SSE payloads of a streaming httpx response, '[DONE]' last."""
    out = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def post(url, path, body, **kw):
    return httpx.post(url + path, json=body, timeout=120, **kw)


def stream_post(url, path, body):
    with httpx.stream("POST", url + path, json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        return sse(r)


def collect_stream(events, chat: bool):
    """-> text, token_ids, finish_reason, usage (if sent)"""
    assert events[-1] == "[DONE]"
    text, ids, finish, usage = "", [], None, None
    for ev in events[:-1]:
        if ev.get("usage"):
            usage = ev["usage"]
        for c in ev["choices"]:
            text += (c["delta"].get("content") or "") if chat else c["text"]
            ids += c.get("token_ids") or []
            finish = c["finish_reason"] or finish
    return text, ids, finish, usage


def assert_openai_error(r, status: int, param: str | None = None):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


# --------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_endpoints_equal_offline_engine(srv, tok, chat, stream):
    prompt = PROMPTS[1]
    ids = chat_ids(tok, prompt) if chat else encode(tok, prompt)
    want, want_finish = offline(ids, max_new_tokens=40, temperature=0.0)
    body = {"model": MODEL, "max_tokens": 40, "temperature": 0, "return_token_ids": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    if stream:
        text, got, finish, usage = collect_stream(stream_post(srv.url, path, body), chat)
    else:
        r = post(srv.url, path, body)
        assert r.status_code == 200, r.text
        j = r.json()
        c = j["choices"][0]
        text = c["message"]["content"] if chat else c["text"]
        got, finish, usage = c["token_ids"], c["finish_reason"], j["usage"]
    assert got == want
    assert text == decode_text(tok, want)
    assert finish == want_finish
    assert usage["prompt_tokens"] == len(ids) and usage["completion_tokens"] == len(want)
    assert usage["num_draft_tokens"] == 7 * usage["num_drafts"] > 0   # block 8: 7 drafts per verify
    assert len(usage["accepted_per_position"]) == 7


def test_seeded_sampling_and_speculation_off_equal_offline(srv, tok):
    ids = encode(tok, PROMPTS[2])
    want, _ = offline(ids, max_new_tokens=30, temperature=0.9, top_p=0.95, top_k=50, seed=11)
    r = post(srv.url, "/v1/completions", {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 30,
                                           "temperature": 0.9, "top_p": 0.95, "top_k": 50, "seed": 11,
                                           "return_token_ids": True})
    assert r.json()["choices"][0]["token_ids"] == want
    # speculation off for one request: same greedy tokens, no drafts
    want, _ = offline(ids, max_new_tokens=30)
    r = post(srv.url, "/v1/completions", {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 30, "temperature": 0,
                                           "speculative": False, "return_token_ids": True})
    j = r.json()
    assert j["choices"][0]["token_ids"] == want
    assert j["usage"]["num_draft_tokens"] == 0 and j["usage"]["num_drafts"] == 0
    assert j["usage"]["mean_acceptance_length"] == 1.0


def test_penalties_equal_offline(srv, tok):
    """presence / frequency / repetition penalties, logit_bias, stop_token_ids and
    min_tokens reach the engine: greedy and seeded sampling over HTTP equal the offline
    engine with the same settings, speculative and not, and differ from the plain output."""
    ids = encode(tok, PROMPTS[3])   # its unpenalised continuation repeats a 4-token run
    pen = dict(presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.3)
    plain, _ = offline(ids, max_new_tokens=30, ignore_eos=True)
    for extra in (dict(temperature=0.0), dict(temperature=0.9, seed=5)):
        for speculative in (True, False):   # (a seed's samples differ with and without drafts)
            want, _ = offline(ids, max_new_tokens=30, ignore_eos=True, speculative=speculative, **pen, **extra)
            body = {"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 30, "ignore_eos": True,
                    "return_token_ids": True, "speculative": speculative, **pen, **extra}
            assert post(srv.url, "/v1/completions", body).json()["choices"][0]["token_ids"] == want, extra
            assert want != plain
    # logit_bias: a token of the unbiased output banned (keys are token ids as strings)
    want, _ = offline(ids, max_new_tokens=30, ignore_eos=True, logit_bias={plain[1]: -100.0})
    body = {"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 30, "ignore_eos": True, "temperature": 0,
            "return_token_ids": True, "logit_bias": {str(plain[1]): -100}}
    got = post(srv.url, "/v1/completions", body).json()["choices"][0]["token_ids"]
    assert got == want and plain[1] not in got and want != plain
    # stop_token_ids end the output at a token; min_tokens holds them back for that many tokens
    stop = plain[6]
    body = {"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 30, "temperature": 0, "return_token_ids": True,
            "stop_token_ids": [stop]}
    c = post(srv.url, "/v1/completions", body).json()["choices"][0]
    assert c["token_ids"] == plain[:plain.index(stop)] and c["finish_reason"] == "stop"
    want, _ = offline(ids, max_new_tokens=30, stop_token_ids=(stop,), min_tokens=12)
    c = post(srv.url, "/v1/completions", {**body, "min_tokens": 12}).json()["choices"][0]
    assert c["token_ids"] == want and len(want) >= 12 and want != plain[:plain.index(stop)]


def test_stop_strings_cut_text_streaming_and_not(srv, tok):
    ids = encode(tok, PROMPTS[0])
    want, _ = offline(ids, max_new_tokens=40, ignore_eos=True)
    full = decode_text(tok, want)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop and stop in full
    expected = full[:full.index(stop)]
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 40, "temperature": 0, "ignore_eos": True,
            "stop": [stop, "\x00never"], "return_token_ids": True}
    j = post(srv.url, "/v1/completions", body).json()
    assert j["choices"][0]["text"] == expected
    assert j["choices"][0]["finish_reason"] == "stop"
    assert j["usage"]["completion_tokens"] < len(want)
    text, got_ids, finish, _ = collect_stream(stream_post(srv.url, "/v1/completions", {**body, "stream": True}), False)
    assert text == expected and finish == "stop"
    assert got_ids == want[:len(got_ids)] and stop in decode_text(tok, got_ids)


def _offline_logprobs(prompt_ids, k, **params):
    res = make_engine(make_cfg()).generate([prompt_ids], SamplingParams(logprobs=k, **params))[0]
    return res.token_ids, res.logprobs


@pytest.mark.parametrize("chat", [False, True])
def test_logprobs_equal_the_engine_streamed_or_not(srv, tok, chat):
    """logprobs over HTTP are the engine's own (same tokens, same values, same
    alternatives), in OpenAI's shapes; a stream carries each token's entry once, in order
    (concatenated: the non-streamed body); a stop string cuts entries with the tokens."""
    prompt, k = PROMPTS[1], 3
    ids = chat_ids(tok, prompt) if chat else encode(tok, prompt)
    want, lps = _offline_logprobs(ids, k, max_new_tokens=24, ignore_eos=True)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"model": MODEL, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    body.update({"messages": [{"role": "user", "content": prompt}], "logprobs": True, "top_logprobs": k} if chat
                else {"prompt": prompt, "logprobs": k})
    c = post(srv.url, path, body).json()["choices"][0]
    assert c["token_ids"] == want
    strings = [decode_text(tok, [t]) for t in want]
    if chat:
        got = c["logprobs"]["content"]
        assert [e["logprob"] for e in got] == pytest.approx([e.logprob for e in lps], abs=1e-5)
        assert [[a["logprob"] for a in e["top_logprobs"]] for e in got] == \
            [pytest.approx([v for _, v in e.top], abs=1e-5) for e in lps]
        assert [e["token"] for e in got] == strings and [e["top_logprobs"][0]["token"] for e in got] == strings
        assert b"".join(bytes(e["bytes"]) for e in got).decode() == c["message"]["content"]
    else:
        got = c["logprobs"]
        assert got["tokens"] == strings and "".join(got["tokens"]) == c["text"]
        assert got["token_logprobs"] == pytest.approx([e.logprob for e in lps], abs=1e-5)
        assert [sorted(d.values(), reverse=True) for d in got["top_logprobs"]] == \
            [pytest.approx([v for _, v in e.top], abs=1e-5) for e in lps]
        assert got["text_offset"] == [len("".join(strings[:i])) for i in range(len(strings))]
    # streamed: the chunks' entries, concatenated, are the body's
    chunks = [x for x in sse(httpx.post(srv.url + path, json={**body, "stream": True}, timeout=60)) if x != "[DONE]"]
    parts = [ch["choices"][0]["logprobs"] for ch in chunks if ch["choices"] and ch["choices"][0]["logprobs"]]
    assert len(parts) > 1
    if chat:
        assert [e for p in parts for e in p["content"]] == got
    else:
        assert {key: [v for p in parts for v in p[key]] for key in got} == got
    # a stop string: entries end with the tokens that produced the text
    full = decode_text(tok, want)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    j = post(srv.url, path, {**body, "stop": [stop]}).json()
    c = j["choices"][0]
    n = j["usage"]["completion_tokens"]
    assert c["finish_reason"] == "stop" and 0 < n < len(want) and len(c["token_ids"]) == n
    assert len(c["logprobs"]["content"] if chat else c["logprobs"]["tokens"]) == n
    # not asked: null, as before
    plain = {key: v for key, v in body.items() if key not in ("logprobs", "top_logprobs")}
    assert post(srv.url, path, plain).json()["choices"][0]["logprobs"] is None


def test_echo_returns_the_prompt_and_its_logprobs(srv, tok):
    """Completions' echo: the text starts with the prompt; with logprobs, the entries of
    the prompt's tokens (the first None, the rest the engine's prompt_logprobs: the target's
    own values) come before the completion's; streamed chunks concatenate to the body;
    max_tokens 0 returns the prompt alone (what scoring clients send); a token-id prompt
    echoes its text; every choice of n echoes."""
    prompt, k = PROMPTS[0], 2
    ids = encode(tok, prompt)
    res = make_engine(make_cfg()).generate([ids], SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=k,
                                                                 prompt_logprobs=k))[0]
    want, plps = res.token_ids, res.prompt_logprobs
    assert len(plps) == len(ids) - 1 > 0
    strings = [decode_text(tok, [t]) for t in ids + want]
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "echo": True, "logprobs": k, "return_token_ids": True}
    j = post(srv.url, "/v1/completions", body).json()
    c = j["choices"][0]
    assert c["token_ids"] == want and c["text"] == prompt + decode_text(tok, want)
    lp = c["logprobs"]
    assert lp["tokens"] == strings
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:len(ids)] == pytest.approx([e.logprob for e in plps], abs=1e-5)
    assert lp["token_logprobs"][len(ids):] == pytest.approx([e.logprob for e in res.logprobs], abs=1e-5)
    assert [sorted(d.values(), reverse=True) for d in lp["top_logprobs"][1:len(ids)]] == \
        [pytest.approx([v for _, v in e.top], abs=1e-5) for e in plps]
    assert lp["text_offset"] == [len("".join(strings[:i])) for i in range(len(strings))]
    assert j["usage"]["prompt_tokens"] == len(ids) and j["usage"]["completion_tokens"] == len(want)
    chunks = [x for x in sse(httpx.post(srv.url + "/v1/completions", json={**body, "stream": True}, timeout=60))
              if x != "[DONE]"]
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == c["text"]
    assert chunks[0]["choices"][0]["text"].startswith(prompt)
    parts = [ch["choices"][0]["logprobs"] for ch in chunks if ch["choices"][0]["logprobs"]]
    assert {key: [v for p in parts for v in p[key]] for key in lp} == lp
    # without logprobs: the text alone
    c = post(srv.url, "/v1/completions", {**body, "logprobs": None}).json()["choices"][0]
    assert c["text"] == prompt + decode_text(tok, want) and c["logprobs"] is None
    # max_tokens 0: the prompt and its log-probabilities, no completion
    for stream in (False, True):
        b0 = {**body, "max_tokens": 0, "stream": stream}
        if stream:
            chunks = [x for x in sse(httpx.post(srv.url + "/v1/completions", json=b0, timeout=60)) if x != "[DONE]"]
            text = "".join(ch["choices"][0]["text"] for ch in chunks)
            parts = [ch["choices"][0]["logprobs"] for ch in chunks if ch["choices"][0]["logprobs"]]
            got = {key: [v for p in parts for v in p[key]] for key in lp}
            finish = chunks[-1]["choices"][0]["finish_reason"]
        else:
            j0 = post(srv.url, "/v1/completions", b0).json()
            text, got, finish = j0["choices"][0]["text"], j0["choices"][0]["logprobs"], j0["choices"][0]["finish_reason"]
            assert j0["usage"]["completion_tokens"] == 0 and j0["choices"][0]["token_ids"] == []
        assert text == prompt and finish == "length"
        assert got["tokens"] == strings[:len(ids)] and got["token_logprobs"] == lp["token_logprobs"][:len(ids)]
    # token ids in: their text echoed; n choices: each echoes
    j = post(srv.url, "/v1/completions", {**body, "prompt": ids, "logprobs": None, "n": 2}).json()
    assert [ch["text"] for ch in j["choices"]] == [decode_text(tok, ids) + decode_text(tok, want)] * 2


def test_n_choices_equal_separate_requests(srv, tok):
    """n choices run side by side: greedy ones equal the offline output each, seeded ones
    use seeds seed, seed+1, ... (each equal to that offline run); streamed chunks carry
    their choice index, each choice ends with its own finish chunk, usage adds up."""
    ids = encode(tok, PROMPTS[6])
    greedy, _ = offline(ids, max_new_tokens=12)
    j = post(srv.url, "/v1/completions", {"model": MODEL, "prompt": PROMPTS[6], "max_tokens": 12, "temperature": 0,
                                           "n": 3, "return_token_ids": True}).json()
    assert [c["index"] for c in j["choices"]] == [0, 1, 2]
    assert [c["token_ids"] for c in j["choices"]] == [greedy] * 3
    assert j["usage"]["completion_tokens"] == 3 * len(greedy) and j["usage"]["prompt_tokens"] == len(ids)
    assert j["usage"]["num_drafts"] == j["usage"]["num_target_forwards"] > 0   # the three choices' forwards
    assert j["usage"]["mean_acceptance_length"] >= 1.0
    want = [offline(ids, max_new_tokens=12, ignore_eos=True, temperature=1.0, seed=7 + i)[0] for i in range(3)]
    assert len({tuple(w) for w in want}) == 3
    body = {"model": MODEL, "prompt": PROMPTS[6], "max_tokens": 12, "temperature": 1.0, "seed": 7, "n": 3,
            "ignore_eos": True, "return_token_ids": True}
    assert [c["token_ids"] for c in post(srv.url, "/v1/completions", body).json()["choices"]] == want
    # chat, streamed
    cids = chat_ids(tok, PROMPTS[6])
    want = [offline(cids, max_new_tokens=12, ignore_eos=True, temperature=1.0, seed=7 + i)[0] for i in range(2)]
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPTS[6]}], "max_tokens": 12,
            "temperature": 1.0, "seed": 7, "n": 2, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, "return_token_ids": True}
    chunks = [x for x in sse(httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)) if x != "[DONE]"]
    got, finish, roles = {0: [], 1: []}, {}, []
    for ch in chunks:
        for c in ch["choices"]:
            got[c["index"]].extend(c.get("token_ids") or [])
            if c["delta"].get("role"):
                roles.append(c["index"])
            if c["finish_reason"]:
                finish[c["index"]] = c["finish_reason"]
    assert [got[0], got[1]] == want and finish == {0: "length", 1: "length"} and sorted(roles) == [0, 1]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 24


def test_n_choices_are_admitted_all_or_none(tok):
    """n choices beyond what the server can hold get one 429 and leave nothing behind."""
    s = start_server(tok, max_slots=1, max_queue=1)
    try:
        r = post(s.url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4, "n": 3})
        assert_openai_error(r, 429)
        _wait(lambda: s.server.loop.num_in_flight == 0, "nothing left in flight")
        r = post(s.url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4, "n": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
        assert s.server.engine.num_free_slots == 1
    finally:
        s.stop()


# --------------------------------------------------------------------------- concurrency

def _stream_tokens(url, prompt, **extra):
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 32, "temperature": 0, "stream": True,
            "return_token_ids": True, **extra}
    _, ids, finish, _ = collect_stream(stream_post(url, "/v1/completions", body), False)
    return ids, finish


def test_eight_concurrent_streams_equal_solo(srv, tok):
    solo = [offline(encode(tok, p), max_new_tokens=32)[0] for p in PROMPTS]
    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(lambda p: _stream_tokens(srv.url, p)[0], PROMPTS))
    assert got == solo


def test_mixed_greedy_and_sampled_batch(srv, tok):
    kinds = [dict(temperature=0.0) if i % 2 == 0 else dict(temperature=0.8, seed=100 + i)
             for i in range(8)]
    solo = [offline(encode(tok, p), max_new_tokens=32, ignore_eos=True, **k)[0] for p, k in zip(PROMPTS, kinds)]
    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(lambda a: _stream_tokens(srv.url, a[0], ignore_eos=True, **a[1]), zip(PROMPTS, kinds)))
    for i, (ids, finish) in enumerate(got):
        assert finish == "length" and len(ids) == 32
        if i % 2 == 0:   # greedy rows are exact whatever shares the batch
            assert ids == solo[i]
        else:            # sampled rows: valid tokens; the first comes from the seed alone
            assert all(0 <= t < 49152 for t in ids)
            assert ids[0] == solo[i][0]


# --------------------------------------------------------------------------- bad input

BAD = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    # hostile bodies that gave 500 before: a 5,000-digit integer, JSON nested 2,000 deep,
    # a lone surrogate in the prompt
    (b'{"model": "tiny", "prompt": "x", "max_tokens": ' + b"1" * 5000 + b"}", 400, None),
    (b'{"model": "tiny", "prompt": ' + b"[" * 2000 + b"]" * 2000 + b"}", 400, None),
    (b'{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 3}', 400, "prompt"),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": MODEL, "prompt": 5}, 400, "prompt"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "prompt": "hi", "temperature": 7}, 400, "temperature"),
    ({"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 10 ** 12}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": list(range(600))}, 400, "prompt"),
    ({"model": MODEL, "prompt": "word " * 2000}, 400, "prompt"),
    ({"model": MODEL, "prompt": [1, 2, 10 ** 7]}, 400, "prompt"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 512}, 400, "max_tokens"),   # prompt + 512 > 512
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ({"model": MODEL, "prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "hi", "logprobs": -1}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "hi", "logprobs": True}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "hi", "top_logprobs": 2}, 400, "top_logprobs"),   # a chat field
    ({"model": MODEL, "prompt": "hi", "n": 0}, 400, "n"),
    ({"model": MODEL, "prompt": "hi", "n": 17}, 400, "n"),
    ({"model": MODEL, "prompt": "hi", "best_of": 3}, 400, "best_of"),
    ({"model": MODEL, "prompt": "hi", "echo": "yes"}, 400, "echo"),
    ({"model": MODEL, "prompt": "hi", "echo": 1}, 400, "echo"),
    ({"model": MODEL, "prompt": "hi", "echo": True, "max_tokens": -1}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "echo": True, "logprobs": 21}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "hi", "frequency_penalty": 2.5}, 400, "frequency_penalty"),
    ({"model": MODEL, "prompt": "hi", "presence_penalty": -2.01}, 400, "presence_penalty"),
    ({"model": MODEL, "prompt": "hi", "presence_penalty": "high"}, 400, "presence_penalty"),
    ({"model": MODEL, "prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"model": MODEL, "prompt": "hi", "logit_bias": {"hello": 1}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "hi", "logit_bias": {"5": "up"}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "hi", "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "hi", "logit_bias": [5, 1]}, 400, "logit_bias"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
    ({"model": MODEL, "prompt": "hi", "min_tokens": -1}, 400, "min_tokens"),
    ({"model": MODEL, "prompt": "hi", "stop_token_ids": [99999999]}, 400, "stop_token_ids"),
    ({"model": MODEL, "prompt": "hi", "stop_token_ids": ["a"]}, 400, "stop_token_ids.0"),
    ({"model": MODEL, "prompt": "hi", "bogus_field": 1}, 400, "bogus_field"),
    ({"model": MODEL, "prompt": "hi", "seed": -3}, 400, "seed"),
    ({"model": MODEL, "prompt": "hi", "stop": ["a"] * 9}, 400, "stop"),
    ({"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt"),
    ({"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": "yes"}}, 400, None),
]

BAD_CHAT = [
    ({"model": MODEL}, 400, "messages"),
    ({"model": MODEL, "messages": "hello"}, 400, "messages"),
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400, "tools"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": 2}, 400, "logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "echo": True}, 400, "echo"),   # completions only
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, 400,
     "top_logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -5}, 400,
     "max_completion_tokens"),
]


def test_bad_inputs_get_openai_errors_and_server_keeps_serving(srv):
    for path, cases in (("/v1/completions", BAD), ("/v1/chat/completions", BAD_CHAT)):
        for body, status, param in cases:
            kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
                else {"json": body}
            r = httpx.post(srv.url + path, timeout=60, **kw)
            assert_openai_error(r, status, param)
            # streaming requests are validated before the stream starts
            if isinstance(body, dict):
                assert_openai_error(httpx.post(srv.url + path, json={**body, "stream": True}, timeout=60),
                                    status, param)
    assert_openai_error(httpx.get(srv.url + "/v1/nothing"), 404)
    assert_openai_error(httpx.get(srv.url + "/v1/completions"), 405)
    r = post(srv.url, "/v1/completions", {"model": MODEL, "prompt": "still alive", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert r.headers.get_list("x-request-id") == [r.json()["id"]]     # one id header, the response's id
    # an omitted model means the served one (vLLM / SGLang convention); a wrong one stays 404
    r = post(srv.url, "/v1/completions", {"prompt": "no model named", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["model"] == MODEL
    r = post(srv.url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 200 and r.json()["model"] == MODEL
    h = httpx.get(srv.url + "/health")
    assert h.status_code == 200 and h.json()["block_size_schedule"] == "none"   # the schedule in force
    # trees need the native fp32 layers on the target: reported as they run here
    eng = srv.server.engine
    assert eng.config.draft_tree is True
    assert h.json()["draft_tree"] is eng.target.serves_tree(1, 3)
    assert eng.config.draft_lookup is True and h.json()["draft_lookup"] is eng.draft_lookups is h.json()["draft_tree"]
    # how the target's linears run: the native kernel's AMX or FMA forms, or torch
    fmt = getattr(eng.target.layers[0].self_attn._qkv_fn, "native_format", None)
    assert h.json()["linears"] == ("torch" if fmt is None else "amx" if fmt.endswith("x")
                                   else "amx-bf16" if fmt.endswith("xb") else "native")
    # no corpus index ships for this target's drafter: greedy trees are planned without one
    assert h.json()["draft_corpus"] is eng.draft_corpus is False and eng.corpus is None
    # what its KV cache stores: the model's dtype by default
    assert h.json()["kv_cache_dtype"] == str(eng.target.dtype).replace("torch.", "") == "float32"


def test_api_key(tok):
    s = start_server(tok, api_key="sekrit", max_slots=2)
    try:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        err = assert_openai_error(post(s.url, "/v1/completions", body), 401)
        assert err["code"] == "invalid_api_key"
        assert_openai_error(post(s.url, "/v1/completions", body, headers={"Authorization": "Bearer nope"}), 401)
        assert_openai_error(httpx.get(s.url + "/v1/models"), 401)
        ok = post(s.url, "/v1/completions", body, headers={"Authorization": "Bearer sekrit"})
        assert ok.status_code == 200
        assert httpx.get(s.url + "/health").status_code == 200   # probes need no key
    finally:
        s.stop()


# --------------------------------------------------------------------------- slots, queue, disconnect

def _wait(pred, what: str, limit_s: float = 120.0):
    """Hang guard only: polls a condition the server must reach."""
    deadline = time.monotonic() + limit_s
    while not pred():
        assert time.monotonic() < deadline, f"never reached: {what}"
        time.sleep(0.02)


def test_disconnect_mid_stream_frees_the_slot(tok):
    s = start_server(tok, max_slots=1, max_queue=0, max_seq_len=2048)
    try:
        long = {"model": MODEL, "prompt": "tell me everything", "max_tokens": 1500, "temperature": 0,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=long, timeout=60) as r:
            lines = r.iter_lines()
            got = [ln for ln in (next(lines) for _ in range(6)) if ln.startswith("data: ")]
            assert len(got) >= 2
            assert s.server.engine.num_running == 1
        # the connection is closed: the slot is freed, the request ended as "abort"
        _wait(lambda: s.server.engine.num_running == 0 and s.server.loop.num_in_flight == 0, "slot freed")
        assert s.server.engine.num_free_slots == 1
        metrics = httpx.get(s.url + "/metrics").text
        assert 'dflash_request_finished_total{finish_reason="abort"} 1.0' in metrics
        r = post(s.url, "/v1/completions", {"model": MODEL, "prompt": "next", "max_tokens": 4})
        assert r.status_code == 200
        # a non-streaming client that gives up (read timeout closes the connection) frees its slot too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/completions", json={**long, "stream": False}, timeout=httpx.Timeout(60, read=1.0))
        _wait(lambda: s.server.loop.num_in_flight == 0, "non-streaming request aborted")
        assert 'dflash_request_finished_total{finish_reason="abort"} 2.0' in httpx.get(s.url + "/metrics").text
    finally:
        s.stop()


def test_full_queue_gets_429_with_retry_after(tok):
    s = start_server(tok, max_slots=1, max_queue=1, max_seq_len=2048, retry_after_s=3)
    try:
        long = {"model": MODEL, "prompt": "go on", "max_tokens": 1500, "temperature": 0, "ignore_eos": True,
                "stream": True}
        clients = [httpx.Client(timeout=60) for _ in range(2)]
        streams = []
        for c in clients:   # one runs, one waits
            cm = c.stream("POST", s.url + "/v1/completions", json=long)
            streams.append((cm, cm.__enter__()))
        _wait(lambda: s.server.loop.num_in_flight == 2, "two requests in flight")
        r = post(s.url, "/v1/completions", {"model": MODEL, "prompt": "one more", "max_tokens": 2})
        err = assert_openai_error(r, 429)
        assert r.headers["retry-after"] == "3" and err["type"] == "rate_limit_error"
        for cm, _ in streams:
            cm.__exit__(None, None, None)
        for c in clients:
            c.close()
        _wait(lambda: s.server.loop.num_in_flight == 0, "aborted")
        assert post(s.url, "/v1/completions", {"model": MODEL, "prompt": "after", "max_tokens": 2}).status_code == 200
    finally:
        s.stop()


def test_request_timeout(tok):
    s = start_server(tok, max_slots=1, max_seq_len=4096, request_timeout_s=0.3)
    try:
        r = post(s.url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 4000, "ignore_eos": True,
                                            "temperature": 0})
        assert assert_openai_error(r, 504)["code"] == "timeout"
        _wait(lambda: s.server.engine.num_running == 0, "timed-out request freed")
    finally:
        s.stop()


def test_health_fails_when_engine_loop_dies(tok):
    s = start_server(tok, max_slots=2)
    try:
        engine = s.server.engine
        real_step, calls = engine.step, []

        def failing_step():   # fault injection: the 3rd step raises
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("injected failure")
            return real_step()

        engine.step = failing_step
        r = post(s.url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 50, "ignore_eos": True})
        assert assert_openai_error(r, 500)["code"] == "engine_error"
        h = httpx.get(s.url + "/health")
        assert h.status_code == 503 and "injected failure" in h.json()["error"]["message"]
        assert_openai_error(post(s.url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2}), 503)
        assert "dflash_engine_alive 0.0" in httpx.get(s.url + "/metrics").text
    finally:
        s.stop()


# --------------------------------------------------------------------------- metrics

def _metric_values(text: str) -> dict:
    out = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            key = smp.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(smp.labels.items())) + "}"
                              if smp.labels else "")
            out[key] = smp.value
    return out


def test_metrics_counters_agree_with_usage(tok):
    s = start_server(tok, max_slots=4, block_size=4)
    try:
        bodies = [{"model": MODEL, "prompt": p, "max_tokens": 12 + i, "temperature": 0 if i % 2 else 0.7,
                   "seed": i, "speculative": i != 3} for i, p in enumerate(PROMPTS[:6])]
        with ThreadPoolExecutor(4) as ex:
            usages = list(ex.map(lambda b: post(s.url, "/v1/completions", b).json()["usage"], bodies))
        chat = post(s.url, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 9, "stream": True,
                                                     "stream_options": {"include_usage": True}})
        usages.append([json.loads(ln[6:]) for ln in chat.text.splitlines()
                       if ln.startswith("data: {") and '"usage":{' in ln][-1]["usage"])
        m = _metric_values(httpx.get(s.url + "/metrics").text)
        assert m["dflash_spec_decode_num_drafts_total"] == sum(u["num_drafts"] for u in usages) > 0
        assert m["dflash_spec_decode_num_draft_tokens_total"] == sum(u["num_draft_tokens"] for u in usages)
        assert m["dflash_spec_decode_num_accepted_tokens_total"] == sum(u["num_accepted_tokens"] for u in usages)
        for k in range(3):
            total = sum(u["accepted_per_position"][k] for u in usages if len(u["accepted_per_position"]) > k)
            assert m.get(f"dflash_spec_decode_num_accepted_tokens_per_pos_total{{position={k}}}", 0.0) == total
        assert m["dflash_generation_tokens_total"] == sum(u["completion_tokens"] for u in usages)
        assert m["dflash_prompt_tokens_total"] == sum(u["prompt_tokens"] for u in usages)
        assert m['dflash_requests_total{status=200}'] == len(usages)
        assert m["dflash_time_to_first_token_seconds_count"] == len(usages)
        assert m["dflash_e2e_request_latency_seconds_count"] == len(usages)
        assert m["dflash_request_queue_time_seconds_count"] == len(usages)
        assert m["dflash_inter_token_latency_seconds_count"] > 0
        assert m["dflash_num_requests_running"] == 0 and m["dflash_slots_total"] == 4
    finally:
        s.stop()


# --------------------------------------------------------------------------- the openai client

def test_official_openai_client(srv, tok):
    import openai
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    want, _ = offline(encode(tok, PROMPTS[5]), max_new_tokens=20)
    c = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=20, temperature=0)
    assert c.choices[0].text == decode_text(tok, want)
    assert c.usage.completion_tokens == len(want)
    chat_want, _ = offline(chat_ids(tok, "Say hi"), max_new_tokens=20)
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}],
                                                 max_tokens=20, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == decode_text(tok, chat_want)
    assert chunks[-1].usage.completion_tokens == len(chat_want)
    assert chunks[-1].usage.model_extra["mean_acceptance_length"] >= 1.0
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=20, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in stream) == decode_text(tok, want)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, logprobs=21)
    assert "logprobs" in str(e.value)
    # logprobs parse into the client's own types
    c = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=20, temperature=0, logprobs=2)
    assert c.choices[0].text == decode_text(tok, want) and len(c.choices[0].logprobs.token_logprobs) == len(want)
    assert all(len(d) == 2 for d in c.choices[0].logprobs.top_logprobs)
    # echo + max_tokens 0 (how scoring clients ask for a text's log-likelihood)
    e = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=0, echo=True, logprobs=1)
    n_prompt = len(encode(tok, PROMPTS[5]))
    assert e.choices[0].text == PROMPTS[5] and e.usage.completion_tokens == 0
    assert e.choices[0].logprobs.token_logprobs[0] is None and len(e.choices[0].logprobs.tokens) == n_prompt
    assert all(v < 0 for v in e.choices[0].logprobs.token_logprobs[1:])
    ch = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=20,
                                        temperature=0, logprobs=True, top_logprobs=3)
    content = ch.choices[0].logprobs.content
    assert len(content) == len(chat_want) and all(len(t.top_logprobs) == 3 for t in content)
    assert b"".join(bytes(t.bytes) for t in content).decode() == decode_text(tok, chat_want)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=4)


def test_graceful_shutdown_ends_running_streams_cleanly(tok):
    s = start_server(tok, max_slots=2, max_seq_len=2048)
    try:
        long = {"model": MODEL, "prompt": "a long story", "max_tokens": 1500, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=long, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            # shutdown with no grace: running streams end with finish_reason "abort" and [DONE]
            stopper = threading.Thread(target=s.server.shutdown, args=(0.0,))
            stopper.start()
            rest = [ln for ln in lines if ln.startswith("data: ")]
            stopper.join()
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "abort"
        r = post(s.url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert assert_openai_error(r, 503)["code"] == "unavailable"
    finally:
        s.stop()


def test_omitted_sampling_fields_take_the_model_defaults(tok, tmp_path):
    """A request that leaves temperature / top_p / top_k out gets the served model's
    defaults (its generation_config.json; here set in the config); given fields win."""
    ids = encode(tok, PROMPTS[2])
    greedy, _ = offline(ids, max_new_tokens=16)
    sampled, _ = offline(ids, max_new_tokens=16, temperature=0.8, top_k=50, seed=3)
    assert sampled != greedy
    s = start_server(tok, sampling_defaults={"temperature": 0.0})
    try:
        base = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 16, "return_token_ids": True}
        r = post(s.url, "/v1/completions", base)
        assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == greedy
        r = post(s.url, "/v1/completions", {**base, "temperature": 0.8, "top_k": 50, "seed": 3})
        assert r.json()["choices"][0]["token_ids"] == sampled
    finally:
        s.stop()
    with pytest.raises(ValueError, match="sampling_defaults"):
        make_cfg(sampling_defaults={"repetition_penalty": 1.1})


def test_generation_defaults_read_the_model_folder(tmp_path):
    from dflash_core.api import generation_defaults
    (tmp_path / "config.json").write_text("{}")
    assert generation_defaults(str(tmp_path)) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 9}))
    assert generation_defaults(str(tmp_path)) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert generation_defaults(str(tmp_path)) == {"temperature": 0.0}
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 9.0, "top_p": "x"}))
    assert generation_defaults(str(tmp_path)) == {}
    assert generation_defaults("tiny-random") == {}


def test_body_caps_count_received_bytes_and_time(tok):
    """A chunked body (no Content-Length) over the cap gets 413 without being read to the
    end; a client trickling its body gets 408 after body_read_timeout_s while other
    requests are served meanwhile; both leave the server healthy."""
    import socket

    from service.app import MAX_BODY_BYTES
    s = start_server(tok, body_read_timeout_s=1.0)
    try:
        def chunks():
            piece = b"x" * (1 << 20)
            yield b'{"model": "tiny", "prompt": "'
            for _ in range(MAX_BODY_BYTES // len(piece) + 2):
                yield piece
            yield b'"}'
        r = httpx.post(s.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"},
                       timeout=60)
        assert_openai_error(r, 413)
        host, port = s.url.rsplit(":", 1)
        slow = socket.create_connection((host.split("//")[1], int(port)))
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"model\": ")
        t0 = time.monotonic()
        r = post(s.url, "/v1/completions", {"model": MODEL, "prompt": "meanwhile", "max_tokens": 3})
        assert r.status_code == 200                                         # not held up by the slow client
        slow.settimeout(30)
        reply = slow.recv(4096).decode()
        assert reply.startswith("HTTP/1.1 408") and '"request_timeout"' in reply, reply[:300]
        assert 0.9 < time.monotonic() - t0 < 20
        slow.close()
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.stop()
    with pytest.raises(ValueError, match="body_read_timeout_s"):
        make_cfg(body_read_timeout_s=0)


def test_metrics_carry_the_replica_id():
    """Several Serve replicas answer /metrics behind one proxy: every sample of a replica
    carries its id (no label outside Serve)."""
    from service.metrics import ServiceMetrics
    m = ServiceMetrics(MODEL, 4, replica_id="r-1")
    m.on_finished("length", 0.5, 3)
    m.on_state(1, 0, 1, 4, True)
    families = list(text_string_to_metric_families(m.render().decode()))
    samples = [s for f in families for s in f.samples]
    assert len(samples) > 20 and all(s.labels.get("replica") == "r-1" for s in samples)
    assert any(s.name == "dflash_request_finished_total" and s.labels["finish_reason"] == "length" and s.value == 1
               for s in samples)
    plain = ServiceMetrics(MODEL, 4)
    assert all("replica" not in s.labels for f in text_string_to_metric_families(plain.render().decode())
               for s in f.samples)
