"""The bridge between the engine thread and asyncio: one engine-loop thread, streams out.

The engine owns the only waiting queue, slot admission and the block-size schedule
(dflash_core/scheduler.py); this loop adds what a server needs around it: deadlines,
detokenisation, stop strings, metrics, and handing events to the HTTP side.

Contract
- `EngineLoop.submit(...)` is called from the HTTP event loop. It never blocks: it
  raises `Overloaded` when the running slots and `max_queue` waiting requests are taken,
  `Unavailable` while shutting down or after the engine died; otherwise the request goes
  to the loop thread and a `RequestStream` is returned whose `events()` yield
  `StreamEvent`s.
- Only the loop thread touches the engine. Between two `engine.step()` calls it
  (1) hands submissions to `engine.add_request` and applies aborts, (2) ends requests
  past their deadline, then runs one step and routes each RequestOutput to its stream
  (detokenized, stop strings applied: a stop string aborts the request in the engine at
  once, freeing its slot). Metrics add each output's per-step statistics.
- An abort (client disconnect, timeout) frees the slot before the next step.
- If `engine.step()` raises, every stream gets an error event, the loop stops and
  `alive` turns False (so /health fails and the replica gets restarted).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from dflash_core.engine import SpecStats
from dflash_core.sampling import SamplingParams

from .detokenize import IncrementalDetokenizer
from .metrics import ServiceMetrics

log = logging.getLogger("dflash.scheduler")


class Overloaded(Exception):
    """No room: all slots busy and the waiting queue full."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(Exception):
    """The server is shutting down or its engine died."""


@dataclass
class StreamEvent:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0        # tokens returned so far (up to a stop string)
    stats: dict | None = None            # cumulative SpecStats.to_dict() + num_drafts
    error: tuple[int, str, str] | None = None  # (http status, message, code)
    logprobs: list | None = None         # TokenLogprob per token of token_ids (when the request asks)
    prompt_logprobs: list | None = None  # TokenLogprob per prompt token after the first (params.prompt_logprobs),
                                         # in the request's first event with tokens (or its final one)


class RequestStream:
    """One request as the loop thread sees it, plus the asyncio queue its events go to."""

    _seq = itertools.count()

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 detokenizer: IncrementalDetokenizer, deadline_s: float | None,
                 aio_loop: asyncio.AbstractEventLoop | None):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.detok = detokenizer
        self.deadline_s = deadline_s
        self.arrival_s = time.monotonic()
        self.first_token_s: float | None = None
        self.last_output_s: float | None = None
        self.finished = False
        self.num_drafts = 0
        self.last_stats = None       # the engine's SpecStats of this request (read on the loop thread only)
        self.logprobs: list = []     # TokenLogprob per token the detokenizer took (params.logprobs set)
        self._aio_loop = aio_loop
        self._queue: asyncio.Queue[StreamEvent] | None = asyncio.Queue() if aio_loop else None
        self._events: list[StreamEvent] = []   # used when there is no asyncio loop (tests, tools)
        self._done = threading.Event()

    def _put(self, ev: StreamEvent) -> None:
        if ev.finished or ev.error:
            self.finished = True
        if self._aio_loop is not None:
            try:
                self._aio_loop.call_soon_threadsafe(self._queue.put_nowait, ev)
            except RuntimeError:  # the event loop is closed: nobody listens any more
                pass
        else:
            self._events.append(ev)
        if self.finished:
            self._done.set()

    async def events(self):
        """Yield events until the final one (finished or error)."""
        while True:
            ev = await self._queue.get()
            yield ev
            if ev.finished or ev.error:
                return

    async def next_event(self, timeout_s: float | None = None) -> StreamEvent | None:
        try:
            return await asyncio.wait_for(self._queue.get(), timeout_s)
        except asyncio.TimeoutError:
            return None

    def wait(self, timeout_s: float | None = None) -> list[StreamEvent]:
        """Blocking: all events once finished (only without an asyncio loop)."""
        self._done.wait(timeout_s)
        return list(self._events)


class EngineLoop:
    def __init__(self, engine, tokenizer, metrics: ServiceMetrics | None = None, max_queue: int = 64,
                 request_timeout_s: float | None = None, retry_after_s: int = 1, idle_poll_s: float = 0.5):
        self.engine = engine
        self.tokenizer = tokenizer
        self.metrics = metrics or ServiceMetrics(max_slots=engine.config.max_slots)
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self.retry_after_s = retry_after_s
        self.idle_poll_s = idle_poll_s
        self.capacity = engine.config.max_slots + max_queue
        self._cond = threading.Condition()
        self._commands: deque = deque()          # ("add", stream) | ("abort", request_id, reason)
        self._streams: dict[str, RequestStream] = {}   # in the engine (waiting or running)
        self._in_flight = 0                      # submitted and not finished (guards capacity)
        self._accepting = True
        self._stop = False
        self._dead: str | None = None
        self._thread: threading.Thread | None = None
        self.num_steps = 0

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> "EngineLoop":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dflash-engine-loop", daemon=True)
            self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    @property
    def dead_reason(self) -> str | None:
        return self._dead

    @property
    def num_in_flight(self) -> int:
        return self._in_flight

    def shutdown(self, grace_s: float = 30.0) -> None:
        """Stop accepting; let in-flight requests finish for up to grace_s; abort the rest
        (their streams end with finish_reason "abort"); stop the thread."""
        self._accepting = False
        deadline = time.monotonic() + max(0.0, grace_s)
        while self._in_flight > 0 and self.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)

    # ---- API for the HTTP side ---------------------------------------------------------
    def submit(self, prompt_token_ids: list[int], params: SamplingParams, stop_strings=(),
               request_id: str | None = None, timeout_s: float | None = None,
               aio_loop: asyncio.AbstractEventLoop | None = None) -> RequestStream:
        if not self._accepting:
            raise Unavailable("the server is shutting down")
        if not self.alive:
            raise Unavailable(f"the engine is not running ({self._dead or 'not started'})")
        if aio_loop is None:
            try:
                aio_loop = asyncio.get_running_loop()
            except RuntimeError:
                aio_loop = None
        timeout_s = timeout_s if timeout_s is not None else self.request_timeout_s
        rid = request_id or uuid.uuid4().hex
        detok = IncrementalDetokenizer(self.tokenizer, list(stop_strings))
        stream = RequestStream(rid, list(prompt_token_ids), params, detok,
                               time.monotonic() + timeout_s if timeout_s else None, aio_loop)
        with self._cond:
            if self._in_flight >= self.capacity:
                raise Overloaded(f"the server is at capacity ({self.engine.config.max_slots} running, "
                                 f"{self.max_queue} waiting); retry after {self.retry_after_s} s",
                                 self.retry_after_s)
            self._in_flight += 1
            self._commands.append(("add", stream))
            self._cond.notify()
        return stream

    def abort(self, request_id: str, reason: str = "abort") -> None:
        with self._cond:
            self._commands.append(("abort", request_id, reason))
            self._cond.notify()

    # ---- the loop ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.metrics.on_state(0, 0, 0, self.engine.block_size(1), True)
            while True:
                with self._cond:
                    if not self._commands and not self._stop and not self._has_work():
                        self._cond.wait(self.idle_poll_s)
                    commands = list(self._commands)
                    self._commands.clear()
                    stop = self._stop
                if stop:
                    self._abort_everything("the server shut down before this request finished")
                    return
                # 1) submissions and aborts
                for cmd in commands:
                    if cmd[0] == "add":
                        self._add(cmd[1])
                    else:
                        self._abort(cmd[1], cmd[2])
                # 2) deadlines
                self._expire()
                # 3) one engine step
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    self.num_steps += 1
                    for out in outputs:
                        self._route(out)
                self._report_state()
                self._check_drafter()
        except Exception as e:  # the engine is in an unknown state: fail loudly, stop
            log.exception("engine loop died")
            self._dead = f"{type(e).__name__}: {e}"
            self.metrics.on_state(0, 0, 0, 0, False)
            self._fail_everything(500, f"internal engine error: {type(e).__name__}: {e}", "engine_error")

    def _has_work(self) -> bool:
        return self.engine.has_unfinished_requests()

    def _add(self, st: RequestStream) -> None:
        try:
            self.engine.add_request(st.request_id, st.prompt_token_ids, st.params)
        except ValueError as e:
            self._finish_error(st, 400, str(e), "invalid_prompt")
            return
        self._streams[st.request_id] = st

    def _route(self, out) -> None:
        st = self._streams.get(out.request_id)
        if st is None or st.finished:
            return
        now = time.monotonic()
        step, s = out.step, out.stats
        if step.admitted:
            self.metrics.on_admitted(now - st.arrival_s, len(st.prompt_token_ids))
        if step.num_drafts:   # this step's speculative statistics (usage reports the totals)
            st.num_drafts += step.num_drafts
            self.metrics.on_spec(step.num_drafts, step.num_draft_tokens, step.num_accepted_tokens,
                                 step.accepted_per_position, step.num_lookup_accepted_tokens)
        st.last_stats = s
        if not out.new_token_ids and not out.finished:
            return   # a prompt chunk prefilled: nothing to stream yet
        # text, stop strings
        used_before = st.detok.num_tokens_used
        text = st.detok.add(out.new_token_ids, out.finished)
        new_ids = st.detok.token_ids[used_before:st.detok.num_tokens_used]
        if out.logprobs is not None:   # aligned with detok.token_ids (both take every emitted token)
            st.logprobs.extend(out.logprobs)
        finished, reason = out.finished, out.finish_reason
        if st.detok.stopped and not out.finished:
            self.engine.abort_request(st.request_id)   # frees the slot before the next step
            finished, reason = True, "stop"
        elif st.detok.stopped:
            reason = "stop"
        # latencies
        if st.first_token_s is None:
            if new_ids or finished:
                st.first_token_s = now
                self.metrics.on_first_token(now - st.arrival_s)
        elif new_ids:
            self.metrics.on_tokens(now - st.last_output_s, len(new_ids))
        st.last_output_s = now
        ev = StreamEvent(text=text, token_ids=new_ids, finished=finished, finish_reason=reason,
                         num_prompt_tokens=out.num_prompt_tokens, num_generated_tokens=st.detok.num_tokens_used,
                         stats=self._stats_dict(st, s) if finished else None,
                         logprobs=st.logprobs[used_before:st.detok.num_tokens_used]
                         if st.params.logprobs is not None else None,
                         prompt_logprobs=out.prompt_logprobs)
        if finished:
            self._streams.pop(st.request_id, None)
            self._done(st, reason, now)
        st._put(ev)

    @staticmethod
    def _stats_dict(st: RequestStream, stats) -> dict:
        d = stats.to_dict()
        d["num_drafts"] = st.num_drafts
        return d

    def _done(self, st: RequestStream, reason: str, now: float) -> None:
        self.metrics.on_finished(reason, now - st.arrival_s, st.detok.num_tokens_used)
        with self._cond:
            self._in_flight -= 1

    def _abort(self, request_id: str, reason: str) -> None:
        """Client went away or deadline: drop it from the engine's queue or free its slot now."""
        st = self._streams.pop(request_id, None)
        if st is not None and not st.finished:
            self.engine.abort_request(request_id)
            self._finish_abort(st, reason)

    def _finish_abort(self, st: RequestStream, reason: str) -> None:
        now = time.monotonic()
        if reason == "timeout":
            self.metrics.on_finished("timeout", now - st.arrival_s, st.detok.num_tokens_used)
            with self._cond:
                self._in_flight -= 1
            st._put(StreamEvent(error=(504, "the request timed out before it finished", "timeout"),
                                num_generated_tokens=st.detok.num_tokens_used))
            return
        self._done(st, "abort", now)
        st._put(StreamEvent(finished=True, finish_reason="abort", num_prompt_tokens=len(st.prompt_token_ids),
                            num_generated_tokens=st.detok.num_tokens_used,
                            stats=self._stats_dict(st, st.last_stats or SpecStats())))

    def _finish_error(self, st: RequestStream, status: int, message: str, code: str) -> None:
        self.metrics.on_finished("error", time.monotonic() - st.arrival_s, st.detok.num_tokens_used)
        with self._cond:
            self._in_flight -= 1
        st._put(StreamEvent(error=(status, message, code)))

    def _expire(self) -> None:
        now = time.monotonic()
        late = [st.request_id for st in self._streams.values()
                if st.deadline_s is not None and now > st.deadline_s]
        for rid in late:
            log.info("request timed out", extra={"request_id": rid})
            self._abort(rid, "timeout")

    def _abort_everything(self, message: str) -> None:
        for rid in list(self._streams):
            self._abort(rid, "abort")
        with self._cond:
            for cmd in self._commands:
                if cmd[0] == "add":
                    self._finish_error(cmd[1], 503, message, "shutting_down")
            self._commands.clear()

    def _fail_everything(self, status: int, message: str, code: str) -> None:
        streams = list(self._streams.values())
        with self._cond:
            streams += [cmd[1] for cmd in self._commands if cmd[0] == "add"]
            self._commands.clear()
        self._streams.clear()
        for st in streams:
            if not st.finished:
                self._finish_error(st, status, message, code)

    def _check_drafter(self) -> None:
        """Disaggregated: ping an idle drafter link (bounded by its step timeout) and export
        its state; a lost drafter turns speculation off until one joins again."""
        backend = self.engine.draft_backend
        heartbeat = getattr(backend, "heartbeat", None)
        if heartbeat is None:
            return
        up = heartbeat()
        self.metrics.on_drafter_link(up, backend.num_failed_steps, backend.bytes_sent, backend.bytes_received)

    def _report_state(self) -> None:
        e = self.engine
        running = e.num_running
        self.metrics.on_state(running, e.num_waiting, e.config.max_slots - e.num_free_slots, e.block_size(), True)
