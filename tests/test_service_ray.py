"""The Ray Serve application (one Ray session for the module): the disaggregated placement
over a real gloo group between two replicas (Ray actors) equals the colocated engine,
survives a drafter restart, and deploy/serve.yaml serves the default model end to end."""
from __future__ import annotations

import json
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from dflash_core.api import load_tokenizer  # noqa: E402
from dflash_core.sampling import SamplingParams  # noqa: E402
from service.config import ServiceConfig  # noqa: E402
from service.deployments import build_app  # noqa: E402
from service.detokenize import decode_text  # noqa: E402
from service.engines import build_colocated, torch_dtype  # noqa: E402
from service.local import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The quick brown fox", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
TINY = dict(target="tiny-random", drafter="random", max_slots=4, max_seq_len=256, block_size=8,
            block_size_schedule=None, served_model_name="tiny", num_cpus=0.25, log_level="WARNING",
            drafter_step_timeout_s=2.0)


@pytest.fixture(scope="module")
def serve_url():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from service.cli import RAY_PATIENCE
    for k, v in RAY_PATIENCE.items():      # a busy 2-core machine: the proxy may start slowly
        os.environ.setdefault(k, v)
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
                                       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-random")


def offline(cfg_kw: dict, prompt_ids: list[int], **params) -> list[int]:
    engine, _ = build_colocated(ServiceConfig(**cfg_kw))   # the served dtype (auto), one process
    return engine.generate([prompt_ids], SamplingParams(**params))[0].token_ids


def run_and_wait(url: str, app) -> None:
    """serve.run returns once every replica's constructor (the model load) has returned:
    the app answers at once, and healthy."""
    serve.run(app, name="dflash", route_prefix="/")
    r = httpx.get(url + "/health", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text


def complete(url: str, prompt: str, **extra) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0, "return_token_ids": True, **extra}
    r = httpx.post(url + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_disaggregated_equals_colocated_and_survives_drafter_restart(serve_url, tok):
    run_and_wait(serve_url, build_app({**TINY, "placement": "disaggregated"}))
    want = [offline(TINY, tok(p, add_special_tokens=False)["input_ids"], max_new_tokens=24) for p in PROMPTS]
    # concurrent greedy requests: drafts travel over the gloo group each step
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda p: complete(serve_url, p), PROMPTS))
    assert [g["choices"][0]["token_ids"] for g in got] == want
    assert all(g["usage"]["num_draft_tokens"] > 0 for g in got)
    # seeded sampling: the remote drafter computes the same q as the colocated one
    ids = tok(PROMPTS[2], add_special_tokens=False)["input_ids"]
    sampled = complete(serve_url, PROMPTS[2], temperature=0.8, seed=5)["choices"][0]["token_ids"]
    assert sampled == offline(TINY, ids, max_new_tokens=24, temperature=0.8, seed=5)

    drafter = serve.get_deployment_handle("DFlashDrafter", app_name="dflash")
    stats = drafter.stats.remote().result()
    assert stats["serving"] and stats["num_steps"] > 0
    health = httpx.get(serve_url + "/health").json()
    assert health["status"] == "ok" and health["drafter"]["bytes_sent"] > 0 and health["drafter"]["num_steps"] > 0
    assert health["drafter"]["connected"] and health["drafter"]["num_connects"] == 1

    # hang the drafter (SIGSTOP): the step times out (drafter_step_timeout_s), requests go on
    # without drafts and stay exact, /health says degraded; after SIGCONT the ingress
    # reconnects in the background and drafts flow again
    os.kill(stats["pid"], signal.SIGSTOP)
    try:
        hung = complete(serve_url, PROMPTS[0])
        assert hung["choices"][0]["token_ids"] == want[0]
        health = httpx.get(serve_url + "/health").json()
        assert health["status"] == "degraded" and health["drafter"]["state"] == "degraded"
        assert health["drafter"]["num_failed_steps"] >= 1 and health["drafter"]["last_error"]
        metrics = httpx.get(serve_url + "/metrics").text
        link = [ln for ln in metrics.splitlines() if ln.startswith("dflash_drafter_link_up{")]
        assert len(link) == 1 and link[0].startswith('dflash_drafter_link_up{replica="') and link[0].endswith(" 0.0")
    finally:
        os.kill(stats["pid"], signal.SIGCONT)
    deadline = time.monotonic() + 120                            # hang guard for the reconnect
    while not (h := httpx.get(serve_url + "/health").json())["drafter"]["connected"]:
        assert time.monotonic() < deadline, f"the drafter link never came back: {h}"
        time.sleep(0.5)
    assert h["status"] == "ok" and h["drafter"]["num_connects"] == 2
    steps = drafter.stats.remote().result()["num_steps"]
    assert complete(serve_url, PROMPTS[1])["choices"][0]["token_ids"] == want[1]
    assert drafter.stats.remote().result()["num_steps"] > steps  # the same replica drafts again

    # kill the drafter replica: Serve restarts it, the ingress rebuilds the group in the background
    n = h["drafter"]["num_connects"]
    os.kill(stats["pid"], signal.SIGKILL)
    again = complete(serve_url, PROMPTS[0])
    assert again["choices"][0]["token_ids"] == want[0]          # exact whatever the drafter state
    deadline = time.monotonic() + 180                            # hang guard for the restart
    while httpx.get(serve_url + "/health").json()["drafter"]["num_connects"] <= n:
        assert time.monotonic() < deadline, "the group was never rebuilt"
        complete(serve_url, PROMPTS[1], max_tokens=4)
        time.sleep(1)
    new_stats = drafter.stats.remote().result()
    assert new_stats["pid"] != stats["pid"] and new_stats["serving"]
    assert complete(serve_url, PROMPTS[3])["choices"][0]["token_ids"] == want[3]
    assert drafter.stats.remote().result()["num_steps"] > 0       # the new replica drafts
    serve.delete("dflash")


def test_serve_yaml_builds_the_app():
    import yaml
    conf = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())
    app = conf["applications"][0]
    assert app["import_path"] == "service.deployments:build_app"
    cfg = ServiceConfig.from_dict(app["args"])           # every key is a known option
    assert cfg.placement == "colocated" and cfg.target == "default"
    with pytest.raises(ValueError, match="unknown service option"):
        build_app({**app["args"], "max_slot": 3})


@pytest.mark.slow
def test_default_model_end_to_end_from_serve_yaml(serve_url):
    """The shipped config, shrunk to 2 slots, serving the embedded default model."""
    import yaml
    args = yaml.safe_load((ROOT / "deploy" / "serve.yaml").read_text())["applications"][0]["args"]
    args = {**args, "max_slots": 2, "max_seq_len": 512, "served_model_name": "smollm2"}
    run_and_wait(serve_url, build_app(args))
    tok = load_tokenizer("default")
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    cfg = ServiceConfig(**{**args, "log_level": "WARNING"})
    engine, _ = build_colocated(cfg)   # the same dtype as the replica (auto)
    want = engine.generate([ids], SamplingParams(max_new_tokens=20))[0].token_ids

    body = {"model": "smollm2", "messages": msgs, "max_tokens": 20, "temperature": 0, "return_token_ids": True}
    r = httpx.post(serve_url + "/v1/chat/completions", json=body, timeout=300)
    j = r.json()
    # one x-request-id (Ray's proxy); the app's own id in X-DFlash-Request-Id = the body's id
    assert len(r.headers.get_list("x-request-id")) == 1 and r.headers["x-dflash-request-id"] == j["id"]
    assert j["choices"][0]["token_ids"] == want
    assert j["choices"][0]["message"]["content"] == decode_text(tok, want)
    if torch_dtype(cfg) == torch.float32:   # bf16: a near-tie first token (tests/test_default_model.py)
        assert "Paris" in j["choices"][0]["message"]["content"]
    with httpx.stream("POST", serve_url + "/v1/chat/completions", timeout=300,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        events = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    text = "".join(c["delta"].get("content", "") for e in events for c in e["choices"])
    assert text == decode_text(tok, want)
    usage = events[-1]["usage"]
    metrics = httpx.get(serve_url + "/metrics").text     # served by the ingress replica through the proxy
    replica = re.search(r'dflash_engine_alive\{replica="([^"]+)"\}', metrics).group(1)   # every sample carries it
    assert f'dflash_generation_tokens_total{{replica="{replica}"}} {float(2 * len(want))}' in metrics
    assert (f'dflash_spec_decode_num_draft_tokens_total{{replica="{replica}"}} '
            f'{float(2 * usage["num_draft_tokens"])}') in metrics
    serve.delete("dflash")
