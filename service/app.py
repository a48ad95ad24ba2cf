"""The OpenAI-compatible HTTP app around one engine loop (no Ray needed).

Contract: `Server(config, engine, tokenizer)` owns the engine loop and the metrics;
`build_app(server)` returns a FastAPI app with
  POST /v1/completions, POST /v1/chat/completions  (JSON or SSE with `"stream": true`)
  GET  /v1/models, GET /health (503 when the engine loop is dead), GET /metrics.
Every error is a JSON body `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx
status; bad requests never reach the engine. The Ray Serve deployment
(service/deployments.py) wraps exactly this app; tests and `dflash serve --runtime
uvicorn` run it directly.

Tokens: completions encode text prompts without special tokens (or take token ids);
chat requests go through the tokenizer's chat template with the generation prompt.
Generated text is `detokenize.decode_text` of the generated ids, cut before the first stop
string. Extensions in the body: `speculative` (false: this request decodes without the
drafter), `top_k`, `ignore_eos`, `return_token_ids` (choices carry `token_ids`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dflash_core.api import generation_defaults, linear_kind
from dflash_core.chat import encode_chat
from dflash_core.engine import format_block_size_schedule
from dflash_core.sampling import SamplingParams
from dflash_core.sequence import TokenLogprob

from . import protocol as P
from .config import ServiceConfig
from .detokenize import TokenStrings
from .logs import log_event
from .metrics import CONTENT_TYPE, ServiceMetrics
from .engine_loop import EngineLoop, Overloaded, StreamEvent, Unavailable

log = logging.getLogger("dflash.http")

MAX_BODY_BYTES = 8 << 20
_DISCONNECT_POLL_S = 0.25


OPENAI_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}


def serve_replica_id() -> str | None:
    """This Ray Serve replica's id (None outside Serve)."""
    try:
        from ray import serve
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001  (not in a Serve replica)
        return None


def ray_node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    try:
        import ray
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001
        return None


class Server:
    """Engine + tokenizer + loop + metrics of one replica."""

    def __init__(self, config: ServiceConfig, engine, tokenizer, metrics: ServiceMetrics | None = None):
        self.config = config
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = config.served_model_name
        self.created = P.now_s()
        self.metrics = metrics or ServiceMetrics(self.model_name, engine.config.max_slots,
                                                 replica_id=serve_replica_id())
        self.node_id = ray_node_id()
        self.loop = EngineLoop(engine, tokenizer, self.metrics, max_queue=config.max_queue,
                               request_timeout_s=config.request_timeout_s, retry_after_s=config.retry_after_s)
        self.vocab_size = engine.vocab_size
        self.token_strings = TokenStrings(tokenizer)   # token text + bytes for logprobs
        self.sampling_defaults = dict(OPENAI_SAMPLING_DEFAULTS)
        given = config.sampling_defaults if config.sampling_defaults is not None else \
            generation_defaults(config.target)
        self.sampling_defaults.update({k: v for k, v in given.items() if k in OPENAI_SAMPLING_DEFAULTS})

    def start(self) -> "Server":
        self.loop.start()
        return self

    def shutdown(self, grace_s: float | None = None) -> None:
        self.loop.shutdown(self.config.shutdown_grace_s if grace_s is None else grace_s)

    # ---- request -> engine inputs ------------------------------------------------------
    def prompt_ids(self, req) -> list[int]:
        try:
            return self._prompt_ids(req)
        except (UnicodeError, TypeError) as e:   # e.g. a lone surrogate ("\ud800") the tokenizer cannot take
            param = "messages" if isinstance(req, P.ChatCompletionRequest) else "prompt"
            raise P.APIError(400, f"the {param} is not valid Unicode text ({type(e).__name__}: {str(e)[:120]})",
                             param=param, code="invalid_value") from None

    def _prompt_ids(self, req) -> list[int]:
        tok = self.tokenizer
        if isinstance(req, P.ChatCompletionRequest):
            if not getattr(tok, "chat_template", None):
                raise P.APIError(400, "this model has no chat template; use /v1/completions", param="messages")
            msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
            try:
                return encode_chat(tok, msgs)
            except Exception as e:  # template errors (e.g. role order) are the client's to fix
                raise P.APIError(400, f"the chat template rejected these messages: {e}", param="messages")
        prompt = req.prompt
        if isinstance(prompt, str):
            return list(tok(prompt, add_special_tokens=False)["input_ids"])
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise P.APIError(400, f"prompt token id {bad[0]} is outside the vocabulary (size {self.vocab_size})",
                             param="prompt", code="invalid_value")
        return list(prompt)

    def sampling_params(self, req, num_prompt_tokens: int) -> SamplingParams:
        cfg = self.config
        max_tokens = req.max_tokens
        if isinstance(req, P.ChatCompletionRequest) and req.max_completion_tokens is not None:
            max_tokens = req.max_completion_tokens
        param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
        if num_prompt_tokens == 0:
            raise P.APIError(400, "the prompt is empty", param="prompt")
        if num_prompt_tokens > cfg.max_prompt_tokens or num_prompt_tokens >= cfg.max_seq_len:
            raise P.APIError(400, f"This model's maximum context length is {cfg.max_seq_len} tokens and prompts "
                                  f"may have at most {cfg.max_prompt_tokens} tokens; your prompt has "
                                  f"{num_prompt_tokens} tokens. Please shorten it.",
                             param="messages" if isinstance(req, P.ChatCompletionRequest) else "prompt",
                             code="context_length_exceeded")
        room = cfg.max_seq_len - num_prompt_tokens
        if max_tokens is None:
            max_tokens = min(cfg.default_max_tokens, cfg.max_tokens_limit, room)
        if req.score_only:   # echo + max_tokens 0: the prompt's logprobs alone (one token run, dropped)
            max_tokens = 1
        if max_tokens < 1:
            raise P.APIError(400, f"'{param}' must be at least 1 (0 only with 'echo'), got {max_tokens}",
                             param=param, code="invalid_value")
        if max_tokens > cfg.max_tokens_limit:
            raise P.APIError(400, f"'{param}' = {max_tokens} is over this server's limit of "
                                  f"{cfg.max_tokens_limit}", param=param, code="invalid_value")
        if max_tokens > room:
            raise P.APIError(400, f"This model's maximum context length is {cfg.max_seq_len} tokens. However, you "
                                  f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the "
                                  f"prompt, {max_tokens} for the completion). Please reduce the prompt or "
                                  f"'{param}'.", param=param, code="context_length_exceeded")
        bias = req.logit_bias or {}
        stop_ids = req.stop_token_ids or []
        for name, ids in (("logit_bias", list(bias)), ("stop_token_ids", stop_ids)):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise P.APIError(400, f"{name} token id {bad[0]} is outside the vocabulary (size {self.vocab_size})",
                                 param=name, code="invalid_value")
        try:
            d = self.sampling_defaults
            temperature = d["temperature"] if req.temperature is None else req.temperature
            top_p = d["top_p"] if req.top_p is None else req.top_p
            top_k = d["top_k"] if req.top_k is None else req.top_k
            return SamplingParams(max_new_tokens=int(max_tokens), temperature=float(temperature),
                                  top_p=float(top_p), top_k=max(0, int(top_k)), seed=req.seed,
                                  ignore_eos=req.ignore_eos, speculative=req.speculative,
                                  logprobs=req.logprobs_k,
                                  prompt_logprobs=req.logprobs_k if getattr(req, "echo", False) else None,
                                  presence_penalty=float(req.presence_penalty or 0.0),
                                  frequency_penalty=float(req.frequency_penalty or 0.0),
                                  repetition_penalty=float(1.0 if req.repetition_penalty is None
                                                           else req.repetition_penalty),
                                  logit_bias=bias, min_tokens=int(req.min_tokens or 0),
                                  stop_token_ids=tuple(stop_ids))
        except ValueError as e:
            field = str(e).split(" ", 1)[0]
            param = {"max_new_tokens": param}.get(field, field if field in type(req).model_fields else None)
            raise P.APIError(400, str(e), param=param, code="invalid_value") from None


def _error_response(err: P.APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class _GuardMiddleware:
    def __init__(self, app, server: Server):
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        cfg, metrics = self.server.config, self.server.metrics
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        err = None
        if cfg.api_key:
            auth = headers.get("authorization", "")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
                err = P.APIError(401, "Incorrect or missing API key. Send 'Authorization: Bearer <key>'.",
                                 code="invalid_api_key")
        length = headers.get("content-length", "")
        if err is None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            err = P.APIError(413, f"request body over {MAX_BODY_BYTES} bytes", code="too_large")
        if err is None and scope.get("method") == "POST":
            # read the body here, counting the bytes actually received (a chunked body has no
            # Content-Length) and bounding the time a client may take to send it
            body, err = await self._read_body(receive, cfg.body_read_timeout_s)
            if body is None and err is None:
                return                                   # the client left before sending its body
            if err is None:
                receive = _replay(body, receive)
        if err is not None:
            metrics.on_http(err.status)
            return await _error_response(err)(scope, receive, send)

        async def send_counted(message):
            if message["type"] == "http.response.start":
                metrics.on_http(message["status"])
            await send(message)

        await self.app(scope, receive, send_counted)

    @staticmethod
    async def _read_body(receive, timeout_s: float):
        """-> (body, None) | (None, APIError) | (None, None) when the client disconnected."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        chunks, total = [], 0
        while True:
            try:
                msg = await asyncio.wait_for(receive(), timeout=max(0.001, deadline - loop.time()))
            except asyncio.TimeoutError:
                return None, P.APIError(408, f"the request body did not arrive within {timeout_s:g} s",
                                        code="request_timeout")
            if msg["type"] == "http.disconnect":
                return None, None
            data = msg.get("body", b"")
            total += len(data)
            if total > MAX_BODY_BYTES:
                return None, P.APIError(413, f"request body over {MAX_BODY_BYTES} bytes", code="too_large")
            chunks.append(data)
            if not msg.get("more_body", False):
                return b"".join(chunks), None


def _ray_request_id() -> str | None:
    """Ray Serve's id of the current request (its access log and its x-request-id header)."""
    try:
        from ray.serve.context import _get_serve_request_context
        return _get_serve_request_context().request_id or None
    except Exception:  # noqa: BLE001  (not under Ray Serve)
        return None


def _id_header(rid: str) -> dict:
    """Our request id (the response's `id`). Under Ray Serve the proxy already sends its own
    x-request-id (logged beside ours as ray_request_id), so ours goes in X-DFlash-Request-Id
    there; one x-request-id header either way."""
    return {"X-DFlash-Request-Id": rid} if _ray_request_id() else {"X-Request-Id": rid}


def _replay(body: bytes, receive):
    """An ASGI receive that gives the already-read body once, then the client's own
    messages (so handlers still see a disconnect)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replayed


def build_app(server: Server) -> FastAPI:
    cfg = server.config

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.start()
        log_event(log, "server.started", model=server.model_name, placement=cfg.placement,
                  max_slots=server.engine.config.max_slots)
        try:
            yield
        finally:
            # running streams get the grace period to finish, then end with finish_reason "abort"
            await asyncio.to_thread(server.shutdown)
            log_event(log, "server.stopped", model=server.model_name)

    app = FastAPI(title="dflash-serve", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    # auth, body size, request counts: a plain ASGI middleware (Starlette's BaseHTTPMiddleware
    # would hide client disconnects from the handlers)
    app.add_middleware(_GuardMiddleware, server=server)

    @app.exception_handler(P.APIError)
    async def _api_error(request: Request, exc: P.APIError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        msg = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(P.error_body(msg, kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(P.error_body(f"internal server error: {type(exc).__name__}", "server_error"),
                            status_code=500)

    # ---- operational endpoints ---------------------------------------------------------
    @app.get("/health")
    async def health():
        if not server.loop.alive:
            reason = server.loop.dead_reason or "not running"
            return JSONResponse(P.error_body(f"engine loop is dead: {reason}", "server_error",
                                             code="engine_dead"), status_code=503)
        body = {"status": "ok", "running": server.engine.num_running, "in_flight": server.loop.num_in_flight,
                "block_size_schedule": format_block_size_schedule(server.engine.config.block_size_schedule),
                "draft_tree": server.engine.draft_trees,   # requests verify draft trees (tree.py)
                "draft_lookup": server.engine.draft_lookups,   # trees carry lookup branches (lookup.py)
                "draft_corpus": server.engine.draft_corpus,   # greedy trees planned with a corpus index (corpus.py)
                "linears": linear_kind(server.engine.target),
                # what the target's KV cache stores (--kv-cache-dtype, resolved)
                "kv_cache_dtype": str(server.engine.cache.k_all.dtype).replace("torch.", "")}
        if server.metrics.replica_id:   # under Ray Serve: which replica answered, on which node
            body["replica"], body["node"] = server.metrics.replica_id, server.node_id
        backend = server.engine.draft_backend
        if hasattr(backend, "num_connects"):   # disaggregated: the drafter link
            body["drafter"] = {"connected": backend.connected, "state": backend.state,
                               "num_connects": backend.num_connects, "num_failed_steps": backend.num_failed_steps,
                               "num_steps": backend.num_steps, "bytes_sent": backend.bytes_sent,
                               "bytes_received": backend.bytes_received, "last_error": backend.last_error}
            if not backend.connected:   # serving, exact, without drafts: 200, not a failed probe
                body["status"] = "degraded"
        return body

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return P.models_response(server.model_name, server.created)

    # ---- generation ----------------------------------------------------------------------
    # the handlers read the raw body (size and read-time limits, errors in OpenAI's shape),
    # so the request models are documented here for /openapi.json and its clients
    @app.post("/v1/completions", openapi_extra=P.openapi_body(P.CompletionRequest),
              responses=P.OPENAPI_RESPONSES)
    async def completions(request: Request):
        return await _generate(request, P.CompletionRequest, "cmpl", "text_completion")

    @app.post("/v1/chat/completions", openapi_extra=P.openapi_body(P.ChatCompletionRequest),
              responses=P.OPENAPI_RESPONSES)
    async def chat_completions(request: Request):
        return await _generate(request, P.ChatCompletionRequest, "chatcmpl", "chat.completion.chunk")

    async def _generate(request: Request, model_cls, id_prefix: str, chunk_object: str):
        body = await request.body()
        req = await asyncio.to_thread(P.parse_request, model_cls, body) if len(body) > (64 << 10) else \
            P.parse_request(model_cls, body)
        if req.model is None:
            req.model = server.model_name
        if req.model != server.model_name:
            raise P.APIError(404, f"The model '{req.model}' does not exist; this server serves "
                                  f"'{server.model_name}' (GET /v1/models).", param="model",
                             code="model_not_found")
        # tokenising / chat templating a large prompt takes a while: off the event loop, so
        # other streams and /health go on meanwhile (the body is already capped in bytes)
        prompt_ids = await asyncio.to_thread(server.prompt_ids, req)
        params = server.sampling_params(req, len(prompt_ids))
        rid = P.new_id(id_prefix)
        streams = []   # one per choice (n): choice i is the engine request rid (n = 1) or rid-i
        try:
            for i in range(req.n):
                p_i = params if i == 0 or params.seed is None else \
                    dataclasses.replace(params, seed=(params.seed + i) % 2**63)   # n distinct seeded samples
                streams.append(server.loop.submit(prompt_ids, p_i, req.stop_strings,
                                                  request_id=rid if req.n == 1 else f"{rid}-{i}"))
        except (Overloaded, Unavailable) as e:
            for st in streams:   # all n choices or none
                server.loop.abort(st.request_id)
            if isinstance(e, Overloaded):
                raise P.APIError(429, str(e), type="rate_limit_error", code="server_overloaded",
                                 headers={"Retry-After": str(e.retry_after_s)})
            raise P.APIError(503, str(e), type="server_error", code="unavailable",
                             headers={"Retry-After": str(cfg.retry_after_s)})
        ray_rid = _ray_request_id()
        extra = {"ray_request_id": ray_rid} if ray_rid else {}
        log_event(log, "request.accepted", request_id=rid, **extra, prompt_tokens=len(prompt_ids),
                  max_tokens=params.max_new_tokens, temperature=params.temperature, stream=req.stream,
                  speculative=params.speculative, n=req.n)
        created = P.now_s()
        chat = isinstance(req, P.ChatCompletionRequest)
        echo = None
        if getattr(req, "echo", False):   # the prompt as sent (token ids: their text)
            echo = req.prompt if isinstance(req.prompt, str) else \
                await asyncio.to_thread(server.tokenizer.decode, prompt_ids)
        if req.stream:
            return StreamingResponse(_sse(streams, req, rid, created, chat, chunk_object, prompt_ids, echo),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", **_id_header(rid)})
        return await _collect(request, streams, req, rid, created, chat, prompt_ids, echo)

    def _scored(ev: StreamEvent) -> StreamEvent:
        """echo + max_tokens 0: the prompt alone; the one token the engine ran is dropped."""
        return dataclasses.replace(ev, text="", token_ids=[], logprobs=[], num_generated_tokens=0,
                                   finish_reason="length" if ev.finished else None)

    def _echoed(prompt_ids, ev: StreamEvent) -> list:
        """An echoed prompt's logprob entries: its first token (nothing predicts it: None),
        then the engine's entry for each later prompt token."""
        return [TokenLogprob(prompt_ids[0], None, None)] + list(ev.prompt_logprobs or [])

    def _finish_log(rid: str, events: list[StreamEvent], t0: float) -> None:
        stats = P.merge_stats([ev.stats for ev in events])
        log_event(log, "request.finished", request_id=rid, finish_reason=events[0].finish_reason,
                  completion_tokens=sum(ev.num_generated_tokens for ev in events),
                  e2e_s=round(time.monotonic() - t0, 4),
                  mean_acceptance_length=stats.get("mean_acceptance_length"))

    def _usage(events: list[StreamEvent], num_prompt_tokens: int) -> dict:
        return P.usage_dict(num_prompt_tokens, sum(ev.num_generated_tokens for ev in events),
                            P.merge_stats([ev.stats for ev in events]))

    async def _collect(request: Request, streams, req, rid, created, chat, prompt_ids, echo):
        t0 = time.monotonic()
        n, num_prompt_tokens = len(streams), len(prompt_ids)
        text, token_ids, logprobs = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)]
        if echo is not None:
            text = [[echo] for _ in range(n)]
        last: list[StreamEvent | None] = [None] * n
        next_check = time.monotonic() + _DISCONNECT_POLL_S
        try:
            for i, stream in enumerate(streams):   # the choices run side by side in the engine
                while True:
                    ev = await stream.next_event(_DISCONNECT_POLL_S)
                    if time.monotonic() >= next_check:   # events may arrive faster than the poll period
                        next_check = time.monotonic() + _DISCONNECT_POLL_S
                        if await request.is_disconnected():
                            log_event(log, "request.disconnected", request_id=rid)
                            return Response(status_code=499)
                    if ev is None:
                        continue
                    if ev.error:
                        status, message, code = ev.error
                        raise P.APIError(status, message, code=code,
                                         type="server_error" if status >= 500 else "invalid_request_error")
                    if req.score_only:
                        ev = _scored(ev)
                    text[i].append(ev.text)
                    token_ids[i].extend(ev.token_ids)
                    if echo is not None and ev.prompt_logprobs is not None:
                        logprobs[i] = _echoed(prompt_ids, ev) + logprobs[i]
                    logprobs[i].extend(ev.logprobs or [])
                    if ev.finished:
                        last[i] = ev
                        break
        finally:
            for stream in streams:
                if not stream.finished:   # disconnected or cancelled (Ray Serve cancels on disconnect)
                    server.loop.abort(stream.request_id)
        _finish_log(rid, last, t0)
        build = P.chat_response if chat else P.completion_response
        pids = streams[0].prompt_token_ids if req.return_token_ids else None
        bodies = [build(rid, created, server.model_name, "".join(text[i]), last[i].finish_reason, None,
                        token_ids[i] if req.return_token_ids else None, pids,
                        _logprobs_body(req, chat, logprobs[i], 0)) for i in range(n)]
        body = bodies[0]
        body["choices"] = [{**b["choices"][0], "index": i} for i, b in enumerate(bodies)]
        body["usage"] = _usage(last, num_prompt_tokens)
        return JSONResponse(body, headers=_id_header(rid))

    def _logprobs_body(req, chat, entries, text_offset) -> dict | None:
        k = req.logprobs_k
        if k is None:
            return None
        if chat:
            return P.logprobs_chat(entries, server.token_strings)
        return P.logprobs_completion(entries, server.token_strings, text_offset, k)

    async def _merged(streams):
        """(choice index, event) of all streams as they come, each stream's until its last."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, stream):
            async for ev in stream.events():
                await queue.put((i, ev))
        tasks = [asyncio.create_task(pump(i, st)) for i, st in enumerate(streams)]
        try:
            ended = 0
            while ended < len(streams):
                i, ev = await queue.get()
                yield i, ev
                ended += bool(ev.finished or ev.error)
        finally:
            for t in tasks:
                t.cancel()

    async def _sse(streams, req, rid, created, chat, chunk_object, prompt_ids, echo):
        t0 = time.monotonic()
        model = server.model_name
        usage_null = req.include_usage
        want_ids = req.return_token_ids
        want_lp = req.logprobs_k is not None
        n, num_prompt_tokens = len(streams), len(prompt_ids)
        echo_due = [echo is not None] * n   # the echoed prompt goes with a choice's first chunk
        offset = [0] * n   # characters of the tokens reported so far per choice (completions' text_offset)
        last: list[StreamEvent | None] = [None] * n
        try:
            if chat:
                for i in range(n):
                    yield P.sse(P.chat_chunk(rid, created, model, {"role": "assistant", "content": ""}, None,
                                             [] if want_ids else None, usage_null, index=i))
            async for i, ev in _merged(streams):
                if ev.error:
                    status, message, code = ev.error
                    kind = "server_error" if status >= 500 else "invalid_request_error"
                    yield P.sse(P.error_body(message, kind, code=code))
                    break
                if req.score_only:
                    ev = _scored(ev)
                head, head_lp, first = "", [], echo_due[i]
                if first:
                    head, head_lp, echo_due[i] = echo, (_echoed(prompt_ids, ev) if want_lp else []), False
                if first or ev.text or ((want_ids or want_lp) and ev.token_ids):
                    ids = ev.token_ids if want_ids else None
                    lp = _logprobs_body(req, chat, head_lp + (ev.logprobs or []), offset[i]) if want_lp else None
                    if lp is not None and not chat:
                        offset[i] += sum(len(t) for t in lp["tokens"])
                    if chat:
                        yield P.sse(P.chat_chunk(rid, created, model, {"content": ev.text}, None, ids, usage_null,
                                                 lp, index=i))
                    else:
                        yield P.sse(P.completion_chunk(rid, created, model, head + ev.text, None, ids, usage_null,
                                                       lp, index=i))
                if ev.finished:
                    last[i] = ev
                    if chat:
                        yield P.sse(P.chat_chunk(rid, created, model, {}, ev.finish_reason,
                                                 [] if want_ids else None, usage_null, index=i))
                    else:
                        yield P.sse(P.completion_chunk(rid, created, model, "", ev.finish_reason,
                                                       [] if want_ids else None, usage_null, index=i))
                    if all(last):
                        if req.include_usage:
                            yield P.sse(P.usage_chunk(rid, created, model, chunk_object,
                                                      _usage(last, num_prompt_tokens)))
                        _finish_log(rid, last, t0)
            yield b"data: [DONE]\n\n"
        finally:
            gone = [st for st in streams if not st.finished]
            for st in gone:   # the client went away (or the send failed, or a choice failed): free the slots
                server.loop.abort(st.request_id)
            if gone:
                log_event(log, "request.disconnected", request_id=rid)

    return app
