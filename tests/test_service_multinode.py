"""Two Ray nodes, simulated on this machine
(ray.cluster_utils.Cluster: two raylets on 127.0.0.1, each with its own resources): the
target deployment is pinned to the node offering `target_node`, the drafter to the one
offering `drafter_node`; their torch.distributed group (gloo) spans the two nodes.

Tokens equal the colocated engine's (greedy and seeded sampling); when the drafter's node
is removed mid-stream, the stream completes exactly (plain decoding meanwhile), and when a
node offering `drafter_node` joins, Serve places a new drafter replica there and the target
speculates with it again. Autoscaling: a burst takes the colocated deployment from one
replica to two (one per node), both serve, and going back to one cuts no stream."""
from __future__ import annotations

import os
import threading
import time

import httpx
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from service.deployments import build_app  # noqa: E402
from service.local import free_port  # noqa: E402

from test_service_ray import PROMPTS, TINY, complete, offline, run_and_wait  # noqa: E402

MULTI = {**TINY, "placement": "disaggregated", "target_resources": {"target_node": 0.1},
         "drafter_resources": {"drafter_node": 0.1}, "transport_timeout_s": 120.0, "drafter_step_timeout_s": 2.0}
ENV = {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cluster():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from service.cli import RAY_PATIENCE
    for k, v in RAY_PATIENCE.items():
        os.environ.setdefault(k, v)
    # one proxy (on the head) for both nodes: without this it prefers the replica on its own
    # node while that one has room, and a second replica on the other node gets no traffic
    os.environ["RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"] = "0"
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"target_node": 1},
                                                      "include_dashboard": False,
                                                      "node_ip_address": "127.0.0.1"})
    try:
        drafter_node = c.add_node(num_cpus=1, resources={"drafter_node": 1}, node_ip_address="127.0.0.1")
        # The simulated nodes listen on 127.0.0.1 only; a connecting driver would rewrite a
        # loopback address to the machine's IP (Ray 2.60), so keep the address as given.
        import ray._private.services as services
        resolve = services.resolve_ip_for_localhost
        services.resolve_ip_for_localhost = lambda host: host
        try:
            ray.init(address=c.address, _node_ip_address="127.0.0.1", log_to_driver=False,
                     runtime_env={"env_vars": ENV})
        finally:
            services.resolve_ip_for_localhost = resolve
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
        yield c, drafter_node, f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def tok():
    from dflash_core.api import load_tokenizer
    return load_tokenizer("tiny-random")


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=30).json()


def test_target_and_drafter_on_two_nodes(cluster, tok):
    c, drafter_node, url = cluster
    run_and_wait(url, build_app(MULTI))
    target = serve.get_deployment_handle("DFlashServer", app_name="dflash")
    drafter = serve.get_deployment_handle("DFlashDrafter", app_name="dflash")
    assert target.node_id.remote().result() == c.head_node.node_id
    assert drafter.stats.remote().result()["node_id"] == drafter_node.node_id

    # greedy and seeded sampling: the group spans the nodes, tokens equal the colocated engine's
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    want = [offline(TINY, i, max_new_tokens=24) for i in ids]
    got = [complete(url, p) for p in PROMPTS]
    assert [g["choices"][0]["token_ids"] for g in got] == want
    assert all(g["usage"]["num_draft_tokens"] > 0 for g in got)
    sampled = complete(url, PROMPTS[2], temperature=0.8, seed=5)["choices"][0]["token_ids"]
    assert sampled == offline(TINY, ids[2], max_new_tokens=24, temperature=0.8, seed=5)
    assert drafter.stats.remote().result()["num_steps"] > 0

    # the drafter's node goes away mid-stream: the stream completes, exactly
    long = offline(TINY, ids[0], max_new_tokens=160, ignore_eos=True)
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 160, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    tokens, first, done = [], threading.Event(), []

    def stream():
        import json
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    ch = json.loads(line[6:])["choices"][0]
                    tokens.extend(ch.get("token_ids") or [])
                    first.set()
                elif line == "data: [DONE]":
                    done.append(True)
        first.set()

    t = threading.Thread(target=stream)
    t.start()
    assert first.wait(120)
    c.remove_node(drafter_node)
    t.join(300)
    assert not t.is_alive() and done
    assert tokens == long
    h = health(url)
    assert h["status"] == "degraded" and not h["drafter"]["connected"], h

    # a new node that offers drafter_node: Serve places the drafter there, the target reconnects
    new_node = c.add_node(num_cpus=1, resources={"drafter_node": 1}, node_ip_address="127.0.0.1")
    deadline = time.monotonic() + 240                            # hang guard: restart + reconnect
    while not (h := health(url))["drafter"]["connected"]:
        assert time.monotonic() < deadline, f"the drafter never came back: {h}"
        time.sleep(1)
    assert h["status"] == "ok" and h["drafter"]["num_connects"] == 2
    stats = drafter.stats.remote().result()
    assert stats["node_id"] == new_node.node_id
    again = complete(url, PROMPTS[3])
    assert again["choices"][0]["token_ids"] == want[3] and again["usage"]["num_draft_tokens"] > 0
    assert drafter.stats.remote().result()["num_steps"] > 0
    serve.delete("dflash")


def scrape_replicas(url: str, tries: int = 40) -> dict[str, float]:
    """Generation tokens per replica id, from /metrics answered by the replicas in turn."""
    from prometheus_client.parser import text_string_to_metric_families
    seen: dict[str, float] = {}
    for _ in range(tries):
        text = httpx.get(url + "/metrics", timeout=30).text
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "dflash_generation_tokens_total":
                    seen[s.labels["replica"]] = s.value
    return seen


def test_autoscaling_from_one_to_two_replicas_on_two_nodes(cluster, tok):
    """A burst makes Serve add a replica (on the other node: each needs 0.6 of a node's one
    CPU); both serve (per-replica metrics); when the burst is over Serve goes back to one,
    and the streams in flight on the way down all end with a finish_reason and [DONE]."""
    import json
    from concurrent.futures import ThreadPoolExecutor
    cfg = {**TINY, "max_slots": 2, "num_cpus": 0.6, "drafter": "random",
           "autoscaling": {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 1.0,
                           "downscale_delay_s": 8.0, "metrics_interval_s": 0.5, "look_back_period_s": 2.0}}
    run_and_wait(cluster[2], build_app(cfg))
    url = cluster[2]
    app = lambda: serve.status().applications["dflash"].deployments["DFlashServer"]   # noqa: E731

    def stream(max_tokens: int) -> tuple[str | None, bool]:
        body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        finish, done = None, False
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    finish = json.loads(line[6:])["choices"][0].get("finish_reason") or finish
                elif line == "data: [DONE]":
                    done = True
        return finish, done

    # 8 streams in flight at all times against 2 slots: Serve scales to 2 replicas, and both
    # serve (their own metrics, told apart by the replica label, show tokens)
    with ThreadPoolExecutor(8) as ex:
        burst: list = []
        deadline = time.monotonic() + 240                         # hang guard for the scale-up
        per_replica: dict = {}
        while app().replica_states.get("RUNNING", 0) < 2 or len(per_replica) < 2 or \
                not all(v > 0 for v in per_replica.values()):
            assert time.monotonic() < deadline, f"never served from two replicas: {app()} {per_replica}"
            in_flight = sum(not f.done() for f in burst)
            burst += [ex.submit(stream, 200) for _ in range(8 - in_flight)]
            if app().replica_states.get("RUNNING", 0) == 2:
                per_replica = scrape_replicas(url, tries=10)
            time.sleep(0.5)
        nodes = {}
        while len(nodes) < 2 and time.monotonic() < deadline:       # /health names replica and node
            h = httpx.get(url + "/health", timeout=30).json()
            nodes[h["replica"]] = h["node"]
        results = [f.result() for f in burst]
    assert all(r == ("length", True) for r in results), results
    assert len(per_replica) == 2, per_replica
    assert set(nodes) == set(per_replica) and len(set(nodes.values())) == 2, nodes   # one replica per node

    # quiet: back to one replica; streams in flight meanwhile all end properly
    with ThreadPoolExecutor(2) as ex:
        deadline = time.monotonic() + 180
        slow = []
        while app().replica_states.get("RUNNING", 0) > 1:
            assert time.monotonic() < deadline, f"never scaled down: {app()}"
            slow.append(ex.submit(stream, 120))
            time.sleep(2.0)
        results = [f.result() for f in slow]
    assert results and all(r == ("length", True) for r in results), results
    serve.delete("dflash")

