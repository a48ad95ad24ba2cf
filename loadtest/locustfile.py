"""Locust users for the dflash OpenAI-compatible service: streaming chat or completions.

Each user is a closed loop: send one streaming request, read it to `data: [DONE]`, send
the next (no think time), so `-u N` keeps N requests in flight. Prompts are taken in a
fixed order (one counter shared by the users of this process) from the prompt mix, so two
runs with the same options send the same prompts in the same order.

Per request the user fires these Locust events (they appear in Locust's stats and CSV):
- request_type "POST", name "/v1/chat/completions" (or "/v1/completions"): response
  time = end-to-end ms, response length = output tokens; failures carry the server's
  error message.
- request_type "METRIC": "ttft_ms", "itl_ms" (one event per output token after the
  first; see loadtest/stream.py for the definition), "output_tokens_per_s" (the
  "response time" column holds tokens/s).
and, with `--records-out FILE`, appends one JSON line per request (loadtest.stream
.RequestRecord) for the report; loadtest/run.py reads those.

Options (besides Locust's own): --api chat|completions, --speculative on|off,
--max-tokens, --temperature, --model (default: the first id of GET /v1/models),
--prompts-file (JSON written by loadtest/run.py) or --prompt-source sharegpt|builtin with
--num-prompts/--prompt-seed, --token-ids on|off (ask for per-chunk token ids),
--records-out. The API key, when the server wants one, comes from DFLASH_API_KEY.

    locust -f loadtest/locustfile.py --headless -u 4 -r 4 -t 60s --host http://127.0.0.1:8000 \\
        --speculative off --max-tokens 64
"""
from __future__ import annotations

import itertools
import os
import sys
import time

import requests
from locust import User, constant, events, task

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loadtest.prompts import load_prompt_mix, read_prompts_file  # noqa: E402
from loadtest.stream import RequestRecord, SSEDecoder, StreamRecorder  # noqa: E402

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}

# Shared by every user of this Locust process (filled at test start).
STATE: dict = {"prompts": None, "prompt_source": None, "counter": itertools.count(), "model": None,
               "records": None}


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    group = parser.add_argument_group("dflash load test")
    group.add_argument("--api", choices=sorted(PATHS), default="chat", env_var="DFLASH_LT_API",
                       help="endpoint: chat (/v1/chat/completions) or completions (/v1/completions)")
    group.add_argument("--speculative", choices=["on", "off"], default="on", env_var="DFLASH_LT_SPECULATIVE",
                       help="send \"speculative\": true/false with every request")
    group.add_argument("--max-tokens", type=int, default=64, env_var="DFLASH_LT_MAX_TOKENS")
    group.add_argument("--temperature", type=float, default=0.0, env_var="DFLASH_LT_TEMPERATURE",
                       help="0 = greedy: speculation on and off then produce the same tokens")
    group.add_argument("--model", default="", env_var="DFLASH_LT_MODEL",
                       help="model name (default: the first id of GET /v1/models)")
    group.add_argument("--prompts-file", default="", env_var="DFLASH_LT_PROMPTS_FILE",
                       help="JSON {'prompts': [...]} (loadtest/run.py writes one)")
    group.add_argument("--prompt-source", choices=["sharegpt", "builtin"], default="sharegpt",
                       env_var="DFLASH_LT_PROMPT_SOURCE")
    group.add_argument("--num-prompts", type=int, default=64, env_var="DFLASH_LT_NUM_PROMPTS")
    group.add_argument("--prompt-seed", type=int, default=0, env_var="DFLASH_LT_PROMPT_SEED")
    group.add_argument("--token-ids", choices=["on", "off"], default="on", env_var="DFLASH_LT_TOKEN_IDS",
                       help="ask for token ids per chunk (exact per-token ITL; a dflash extension)")
    group.add_argument("--records-out", default="", env_var="DFLASH_LT_RECORDS_OUT",
                       help="append one JSON line per request to this file")


@events.test_start.add_listener
def _on_test_start(environment, **_kw) -> None:
    opts = environment.parsed_options
    if opts.max_tokens < 1:
        raise SystemExit("--max-tokens must be >= 1")
    if opts.prompts_file:
        STATE["prompts"], STATE["prompt_source"] = read_prompts_file(opts.prompts_file)
    else:
        STATE["prompts"], STATE["prompt_source"] = load_prompt_mix(
            opts.prompt_source, opts.num_prompts, opts.prompt_seed)
    STATE["counter"] = itertools.count()
    STATE["model"] = opts.model or None
    if opts.records_out:
        # line-buffered: every finished (or cut-off) request is on disk at once
        STATE["records"] = open(opts.records_out, "a", buffering=1, encoding="utf-8")


@events.quitting.add_listener
def _on_quitting(environment, **_kw) -> None:
    if STATE["records"] is not None:
        STATE["records"].close()
        STATE["records"] = None


def auth_headers() -> dict:
    """Bearer key from DFLASH_API_KEY (the server's own variable), when set."""
    key = os.environ.get("DFLASH_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def served_model(host: str) -> str:
    """The first model id the server lists (cached for the process)."""
    if STATE["model"] is None:
        resp = requests.get(host.rstrip("/") + "/v1/models", timeout=30, headers=auth_headers())
        resp.raise_for_status()
        STATE["model"] = resp.json()["data"][0]["id"]
    return STATE["model"]


def build_body(api: str, model: str, prompt: str, opts) -> dict:
    body = {
        "model": model,
        "max_tokens": opts.max_tokens,
        "temperature": opts.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "speculative": opts.speculative == "on",
    }
    if opts.token_ids == "on":
        body["return_token_ids"] = True
    if api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


class OpenAIStreamUser(User):
    """One closed-loop client streaming OpenAI requests (see the module docstring)."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.session = requests.Session()
        self.session.headers.update(auth_headers())

    def on_stop(self) -> None:
        self.session.close()

    @task
    def stream_one(self) -> None:
        opts = self.environment.parsed_options
        api = opts.api
        prompts = STATE["prompts"]
        index = next(STATE["counter"]) % len(prompts)
        body = build_body(api, served_model(self.host), prompts[index], opts)
        record = RequestRecord(mode=opts.speculative, api=api, prompt_index=index, start_s=time.perf_counter())
        try:
            self._stream(PATHS[api], body, record)
        finally:
            # this also runs when Locust stops the user mid-request (-t elapsed): such a
            # record has complete=False and counts only the tokens it received
            if record.end_s is None:
                record.end_s = time.perf_counter() - record.start_s
            if STATE["records"] is not None:
                STATE["records"].write(record.to_json() + "\n")
        self._fire_events(record)

    def _stream(self, path: str, body: dict, record: RequestRecord) -> None:
        recorder = StreamRecorder(record)
        decoder = SSEDecoder()
        try:
            # 1) send; the request clock started before the connection is made
            with self.session.post(self.host.rstrip("/") + path, json=body, stream=True, timeout=600) as resp:
                record.status = resp.status_code
                if resp.status_code != 200:
                    record.error = _error_message(resp)
                    return
                # 2) read chunks as they arrive (chunk_size=None: no client-side batching)
                for chunk in resp.iter_content(chunk_size=None):
                    now = time.perf_counter()
                    for payload in decoder.feed(chunk):
                        recorder.on_payload(payload, now)
                for payload in decoder.close():
                    recorder.on_payload(payload, time.perf_counter())
            if not record.complete and record.error is None:
                record.error = "stream ended without data: [DONE]"
        except requests.RequestException as e:
            record.error = f"{type(e).__name__}: {e}"

    def _fire_events(self, rec: RequestRecord) -> None:
        fire = self.environment.events.request.fire
        name = PATHS[rec.api]
        exc = RuntimeError(rec.error) if rec.error else None
        fire(request_type="POST", name=name, response_time=(rec.e2e_s or 0.0) * 1000.0,
             response_length=rec.output_tokens, exception=exc, context={"mode": rec.mode})
        if exc is not None:
            return
        if rec.ttft_s is not None:
            fire(request_type="METRIC", name="ttft_ms", response_time=rec.ttft_s * 1000.0,
                 response_length=0, exception=None, context={})
        for itl_s in rec.itl_samples_s():
            fire(request_type="METRIC", name="itl_ms", response_time=itl_s * 1000.0,
                 response_length=0, exception=None, context={})
        if rec.tokens_per_s is not None:
            fire(request_type="METRIC", name="output_tokens_per_s", response_time=rec.tokens_per_s,
                 response_length=rec.output_tokens, exception=None, context={})


def _error_message(resp: requests.Response) -> str:
    """The OpenAI error message of a non-200 response, else the status line."""
    try:
        err = resp.json().get("error")
        if isinstance(err, dict) and err.get("message"):
            return f"HTTP {resp.status_code}: {err['message']}"
    except (ValueError, AttributeError):
        pass
    return f"HTTP {resp.status_code}: {resp.text[:200]}"
