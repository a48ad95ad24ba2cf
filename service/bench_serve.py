"""Serving benchmark: served tokens/s, TTFT and ITL through the HTTP API.

    python -m service.bench_serve                      # concurrency 1,4,16 x speculation on/off
    python -m service.bench_serve --sweep              # block sizes 1,4,8,16 x concurrency 1,2,4,8
    python -m service.bench_serve --sweep --block-sizes 1,2,3 --per-client 8 --reps 2   # -> a schedule
    python -m service.bench_serve --schedules table,measure  # two servers' schedules, one run
    python -m service.bench_serve --url http://host:8000 --model NAME   # an already running server
    python -m service.bench_serve --concurrency 16 --reps 3  # on/off three times, alternating which goes first

Without --url each configuration gets its own server process (`python -m service.cli
--runtime uvicorn`, colocated), so client threads never share the server's GIL. Requests
are streaming chat completions over held-out ShareGPT prompts and HumanEval prompts
(alternating), greedy, `max_tokens` fixed, `ignore_eos` so every request generates the same
number of tokens. Speculation on/off is the per-request `"speculative"` switch, both
measured against the same server in one run; with --reps N each level runs on and off N
times, the order alternating (on first in odd reps, off first in even ones), and the
summary gives each rep's on/off ratio and the ratio of the medians. Per level: tokens/s =
completion tokens of all requests / wall time; TTFT = send -> first content chunk; ITL =
gap between chunks divided by the tokens in the chunk (per token); means and p50/p90 over
requests/tokens.
Prints a table and, last, one JSON line.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from dflash_core.autoschedule import pick_schedule   # the one rule, shared with the measured schedule
from dflash_core.engine import format_block_size_schedule
from dflash_core.native import AMX_INPUTS
from dflash_core.runtime import KV_CACHE_DTYPES
from dflash_core.stats import on_off, percentile, rep_order

from .local import free_port


def bench_prompts(n: int, max_chars: int = 600) -> list[str]:
    from dflash_core.datasets import holdout_texts, humaneval_texts
    share, human = holdout_texts(max_chars), humaneval_texts(max_chars)
    out = []
    for i in range(n):
        src = share if i % 2 == 0 else human
        out.append(src[(i // 2) % len(src)])
    return out


class ServerProcess:
    def __init__(self, args: list[str], env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "service.cli", "--runtime", "uvicorn", "--port", str(self.port),
               "--log-level", "WARNING"] + args
        self.proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not become ready")

    def model(self) -> str:
        return httpx.get(self.url + "/v1/models").json()["data"][0]["id"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def one_request(url: str, model: str, prompt: str, max_tokens: int, speculative: bool) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "return_token_ids": True,
            "speculative": speculative, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, last, itl, usage = None, None, [], None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=3600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                usage = ev["usage"]
            n = sum(len(c.get("token_ids") or []) for c in ev.get("choices", []))
            if n == 0:
                continue
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                itl.extend([(now - last) / n] * n)
            last = now
    return {"ttft_s": first - t0, "itl_s": itl, "e2e_s": time.perf_counter() - t0,
            "tokens": usage["completion_tokens"], "tau": usage["mean_acceptance_length"]}


def _pct(xs: list[float], q: float) -> float:
    """The project's percentile (dflash_core.stats), q in [0, 1]."""
    v = percentile(xs, 100 * q)
    return float("nan") if v is None else v


def run_level(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int,
              speculative: bool) -> dict:
    one_request(url, model, prompts[0], 4, speculative)   # warm-up
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        res = list(ex.map(lambda p: one_request(url, model, p, max_tokens, speculative), prompts))
    wall = time.perf_counter() - t0
    ttft = [r["ttft_s"] for r in res]
    itl = [x for r in res for x in r["itl_s"]]
    tokens = sum(r["tokens"] for r in res)
    return {"concurrency": concurrency, "speculative": speculative, "requests": len(res), "tokens": tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "ttft_mean_ms": round(1000 * statistics.mean(ttft), 1), "ttft_p50_ms": round(1000 * _pct(ttft, 0.5), 1),
            "ttft_p90_ms": round(1000 * _pct(ttft, 0.9), 1),
            "itl_mean_ms": round(1000 * statistics.mean(itl), 2) if itl else None,
            "itl_p50_ms": round(1000 * _pct(itl, 0.5), 2), "itl_p90_ms": round(1000 * _pct(itl, 0.9), 2),
            "mean_acceptance_length": round(statistics.mean(r["tau"] for r in res), 3)}


def on_off_summary(rows: list[dict]) -> list[dict]:
    """Speculation on/off rows (each with concurrency, speculative, tokens_per_s and rep)
    -> per concurrency (and per server, where rows carry a `server` index), in order:
    each rep's on/off tokens/s ratio, the median tokens/s of each mode and their ratio.
    A level with either mode missing is left out."""
    groups: dict[tuple, dict[bool, dict[int, float]]] = {}
    for r in rows:
        g = groups.setdefault((r.get("server", 0), r["concurrency"]), {True: {}, False: {}})
        g[bool(r["speculative"])][r.get("rep", 1)] = r["tokens_per_s"]
    out = []
    for (server, c), g in groups.items():
        if not g[True] or not g[False]:
            continue
        x = on_off(g[True], g[False])
        out.append({"server": server, "concurrency": c, "rep_ratios": [round(r, 3) for r in x["rep_ratios"]],
                    "median_on": round(x["median_on"], 2), "median_off": round(x["median_off"], 2),
                    "ratio": None if x["ratio"] is None else round(x["ratio"], 3)})
    return out


def requests_for(concurrency: int, per_client: int) -> int:
    return max(4, concurrency * per_client)


def main(argv: list[str] | None = None) -> int:
    from dflash_core.clitools import _Parser, int_list
    ap = _Parser(prog="python -m service.bench_serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=None, help="benchmark a running server instead of starting one")
    ap.add_argument("--model", default=None)
    ap.add_argument("--target", default="default")
    ap.add_argument("--drafter", default="default")
    ap.add_argument("--max-slots", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--per-client", type=int, default=2, help="requests per concurrent client")
    ap.add_argument("--concurrency", default=None, help="comma list (default 1,4,16; sweep 1,2,4,8)")
    ap.add_argument("--sweep", action="store_true", help="fixed block sizes (1,4,8,16) x concurrency")
    ap.add_argument("--block-sizes", default="1,4,8,16")
    ap.add_argument("--reps", type=int, default=1,
                    help="sweep: run every block size this many times, alternating (a fresh server each); "
                         "on/off: run each level's on and off this many times, alternating which goes first")
    ap.add_argument("--min-gain", type=float, default=0.03,
                    help="sweep: speculate at a concurrency only where it beats block 1 by more than this")
    ap.add_argument("--server-args", default="", help="extra `dflash serve` options")
    ap.add_argument("--schedules", default=None,
                    help="comma list of --block-size-schedule values (e.g. table,measure): one server each, one "
                         "after another in this run, speculation on and off at every level of each")
    ap.add_argument("--draft-trees", default=None,
                    help="comma list of --draft-tree values (e.g. on,off): one server each (per schedule), in this "
                         "run, speculation on and off at every level of each")
    ap.add_argument("--draft-lookups", default=None,
                    help="comma list of --draft-lookup values (e.g. on,off): one server each (per schedule and draft "
                         "tree), in this run, speculation on and off at every level of each")
    ap.add_argument("--draft-corpora", default=None,
                    help="comma list of --draft-corpus values (e.g. auto,none): one server each (per schedule, draft "
                         "tree and lookup), in this run, speculation on and off at every level of each")
    ap.add_argument("--amx-inputs", default=None,
                    help="comma list of --amx-inputs values (bf16,fp32): one server each (per schedule, draft tree "
                         "and lookup), in this run, speculation on and off at every level of each")
    ap.add_argument("--kv-cache-dtypes", default=None,
                    help="comma list of --kv-cache-dtype values (e.g. float32,bfloat16): one server each (per "
                         "schedule, draft tree, lookup and amx inputs), in this run, speculation on and off at "
                         "every level of each")
    ap.add_argument("--server-envs", default=None,
                    help="comma list of server environments, each KEY=VALUE (several joined by '+'), e.g. "
                         "DFLASH_NATIVE_AMX=1,DFLASH_NATIVE_AMX=0: one server each (per schedule and draft tree), "
                         "in this run, speculation on and off at every level of each")
    ap.add_argument("--out", default=None, help="write the JSON result here too")
    a = ap.parse_args(argv)
    if a.reps < 1 or a.per_client < 1 or a.max_tokens < 1:
        ap.error("--reps, --per-client and --max-tokens must be >= 1")
    if a.min_gain < 0:
        ap.error("--min-gain must be >= 0")
    trees = [t.strip() for t in a.draft_trees.split(",")] if a.draft_trees else [None]
    if any(t not in (None, "on", "off") for t in trees):
        ap.error("--draft-trees takes on and off")
    lookups = [t.strip() for t in a.draft_lookups.split(",")] if a.draft_lookups else [None]
    if any(t not in (None, "on", "off") for t in lookups):
        ap.error("--draft-lookups takes on and off")
    corpora = [t.strip() for t in a.draft_corpora.split(",")] if a.draft_corpora else [None]
    if any(t is not None and not t for t in corpora):
        ap.error("--draft-corpora takes auto, none or index files")
    amxs = [t.strip() for t in a.amx_inputs.split(",")] if a.amx_inputs else [None]
    if any(t is not None and t not in AMX_INPUTS for t in amxs):
        ap.error(f"--amx-inputs takes {' and '.join(AMX_INPUTS)}")
    kvs = [t.strip() for t in a.kv_cache_dtypes.split(",")] if a.kv_cache_dtypes else [None]
    if any(t is not None and t not in KV_CACHE_DTYPES for t in kvs):
        ap.error(f"--kv-cache-dtypes takes {', '.join(KV_CACHE_DTYPES)}")
    envs: list[dict | None] = [None]
    if a.server_envs:
        envs = []
        for item in a.server_envs.split(","):
            pairs = [kv.strip() for kv in item.split("+") if kv.strip()]
            if not pairs or any("=" not in kv or not kv.split("=", 1)[0] for kv in pairs):
                ap.error(f"--server-envs: {item.strip()!r} is not KEY=VALUE[+KEY=VALUE...]")
            envs.append(dict(kv.split("=", 1) for kv in pairs))
    conc = int_list(a.concurrency or ("1,2,4,8" if a.sweep else "1,4,16"), "--concurrency", ap.prog)
    sizes = int_list(a.block_sizes, "--block-sizes", ap.prog)
    if not conc or not sizes:
        ap.error("--concurrency and --block-sizes need at least one value")
    prompts = bench_prompts(max(requests_for(c, a.per_client) for c in conc))
    base = ["--target", a.target, "--drafter", a.drafter, "--max-slots", str(a.max_slots)] + a.server_args.split()
    rows = []
    load0 = os.getloadavg()

    servers = [0]

    def levels(url, model, spec_modes, extra, reps=1):
        for c in conc:
            for rep in range(reps):
                for spec in rep_order(spec_modes, rep):
                    level(url, model, c, spec, {**extra, "rep": rep + 1} if reps > 1 else extra)
        servers[0] += 1

    def level(url, model, c, spec, extra):
        r = run_level(url, model, prompts[:requests_for(c, a.per_client)], c, a.max_tokens, spec)
        r.update(extra)
        r["server"] = servers[0]
        r["schedule_after"] = httpx.get(url + "/health").json().get("block_size_schedule")   # in force now
        rows.append(r)
        print(f"  {json.dumps(r)}", flush=True)

    if a.sweep:
        for rep in range(a.reps):
            for b in sizes:
                srv = ServerProcess(base + ["--block-size", str(b), "--block-size-schedule", "none"])
                try:
                    srv.wait_ready()
                    print(f"block size {b}, rep {rep + 1}/{a.reps}: {srv.url}", flush=True)
                    levels(srv.url, srv.model(), [b > 1], {"block_size": b, "rep": rep + 1})
                finally:
                    srv.stop()
    elif a.url:
        levels(a.url, a.model or httpx.get(a.url + "/v1/models").json()["data"][0]["id"], [True, False], {}, a.reps)
    else:
        for sched in ([s.strip() for s in a.schedules.split(",")] if a.schedules else [None]):
            for tree, look, corp, amx, kv, env in [(t, lk, c, x, k, e) for t in trees for lk in lookups
                                                   for c in corpora for x in amxs for k in kvs for e in envs]:
                srv = ServerProcess(base + (["--block-size-schedule", sched] if sched else [])
                                    + (["--draft-tree", tree] if tree else [])
                                    + (["--draft-lookup", look] if look else [])
                                    + (["--draft-corpus", corp] if corp else [])
                                    + (["--amx-inputs", amx] if amx else [])
                                    + (["--kv-cache-dtype", kv] if kv else []), env=env)
                try:
                    srv.wait_ready()
                    env_s = "+".join(f"{k}={v}" for k, v in env.items()) if env else None
                    health = httpx.get(srv.url + "/health").json()
                    if sched or tree or look or corp or amx or kv or env:
                        print(f"block size schedule {sched or 'default'}, draft tree {tree or 'default'}"
                              + (f", draft lookup {look}" if look else "")
                              + (f", draft corpus {corp} ({health.get('draft_corpus')})" if corp else "") + (f", amx inputs {amx}" if amx else "")
                              + (f", KV cache {health.get('kv_cache_dtype')}" if kv else "")
                              + (f", env {env_s}" if env_s else "") + f": {srv.url}, linears "
                              f"{health.get('linears')}", flush=True)
                    extra = ({"schedule": sched} if sched else {}) | ({"draft_tree": tree} if tree else {}) \
                        | ({"draft_lookup": look} if look else {}) | ({"amx_inputs": amx} if amx else {}) \
                        | ({"draft_corpus": corp, "corpus_used": health.get("draft_corpus")} if corp else {}) \
                        | ({"kv_cache_dtype": health.get("kv_cache_dtype")} if kv else {}) \
                        | ({"env": env_s} if env_s else {}) | {"linears": health.get("linears")}
                    levels(srv.url, srv.model(), [True, False], extra, a.reps)
                finally:
                    srv.stop()

    # table
    print()
    key = "block_size" if a.sweep else "speculative"
    print(f"{'conc':>4} {key:>11} {'tok/s':>8} {'TTFT p50 ms':>11} {'TTFT p90 ms':>11} {'ITL p50 ms':>10} "
          f"{'ITL mean ms':>11} {'tau':>6}")
    for r in rows:
        print(f"{r['concurrency']:>4} {str(r[key]):>11} {r['tokens_per_s']:>8} {r['ttft_p50_ms']:>11} "
              f"{r['ttft_p90_ms']:>11} {r['itl_p50_ms']:>10} {r['itl_mean_ms']:>11} {r['mean_acceptance_length']:>6}"
              + (f"  {r['schedule']}" if "schedule" in r else "") + (f"  tree {r['draft_tree']}" if "draft_tree" in r
                                                                         else "")
              + (f"  lookup {r['draft_lookup']}" if "draft_lookup" in r else "")
              + (f"  corpus {r['draft_corpus']}" if "draft_corpus" in r else "")
              + (f"  amx inputs {r['amx_inputs']}" if "amx_inputs" in r else "")
              + (f"  KV {r['kv_cache_dtype']}" if "kv_cache_dtype" in r else "")
              + (f"  {r['env']}" if "env" in r else ""))
    result = {"bench": "serve-sweep" if a.sweep else "serve", "target": a.target, "drafter": a.drafter,
              "max_tokens": a.max_tokens, "max_slots": a.max_slots, "loadavg_before": [round(x, 2) for x in load0],
              "loadavg_after": [round(x, 2) for x in os.getloadavg()], "rows": rows}
    if not a.sweep:
        result["on_off"] = on_off_summary(rows)
        print()
        for x in result["on_off"]:
            print(f"server {x['server']}, concurrency {x['concurrency']}: on/off {x['median_on']} / {x['median_off']} "
                  f"tok/s (medians) = {x['ratio']}x; per rep {x['rep_ratios']}")
    if a.sweep:
        result["schedule"] = pick_schedule(rows, a.min_gain)
        result["min_gain"] = a.min_gain
        print("picked schedule (max_running:block_size): " +
              format_block_size_schedule(result["schedule"]))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    from dflash_core.clitools import run_command
    sys.exit(run_command("python -m service.bench_serve", main, None))
