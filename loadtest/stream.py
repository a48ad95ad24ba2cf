"""OpenAI SSE stream parsing and the per-request timing record.

Contract: `SSEDecoder.feed(bytes)` yields the `data` payload of each complete Server-Sent
Event; `StreamRecorder.on_payload(payload, t_s)` folds one payload that arrived at
clock time `t_s` into a `RequestRecord`. Nothing here does I/O, so the same code runs in
Locust users, tests and the report.

Timing definitions (all per request, all from the client's clock):
- TTFT: send -> arrival of the first chunk that carries at least one output token.
- ITL: the gap between two consecutive token-carrying chunks, amortised over the tokens
  of the later chunk. A speculative step can stream k tokens in one chunk after one
  gap; that chunk contributes k ITL samples of gap/k, so ITL is per output token and
  comparable between speculation on (few large chunks) and off (one token per chunk).
  The mean ITL of a request equals its time per output token after the first.
- Tokens per chunk: `len(token_ids)` when the server returns them (this service does
  with `"return_token_ids": true`), else 1 per chunk with non-empty text.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Iterator


class SSEDecoder:
    """Incremental Server-Sent Events decoder: bytes in, `data` payloads (str) out."""

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> Iterator[str]:
        self._buf += chunk
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                return
            line, self._buf = self._buf[:nl], self._buf[nl + 1:]
            line = line.rstrip(b"\r")
            if not line:  # blank line: end of one event
                if self._data:
                    yield "\n".join(self._data)
                    self._data = []
                continue
            if line.startswith(b":"):  # SSE comment (keep-alive)
                continue
            name, _, value = line.partition(b":")
            if name == b"data":
                if value.startswith(b" "):
                    value = value[1:]
                self._data.append(value.decode("utf-8", errors="replace"))

    def close(self) -> Iterator[str]:
        """Flush an event the server did not terminate with a blank line."""
        if self._buf.strip():
            yield from self.feed(b"\n")
        if self._data:
            yield "\n".join(self._data)
            self._data = []


@dataclass
class RequestRecord:
    """What one streamed request did, as seen by the client. Times in seconds."""

    mode: str                      # "on" | "off": speculation requested for this request
    api: str                       # "chat" | "completions"
    prompt_index: int
    start_s: float                 # client clock when the request was sent
    chunk_times_s: list[float] = field(default_factory=list)  # token-carrying chunks, relative to start_s
    chunk_tokens: list[int] = field(default_factory=list)     # tokens in each of those chunks
    end_s: float | None = None     # relative to start_s: [DONE], error or abort
    complete: bool = False         # the stream ended with data: [DONE]
    error: str | None = None
    status: int | None = None
    finish_reason: str | None = None
    usage: dict | None = None
    token_ids: list[int] = field(default_factory=list)        # output ids, when the server returns them

    # ---------------------------------------------------------------- derived
    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times_s[0] if self.chunk_times_s else None

    @property
    def output_tokens(self) -> int:
        """Tokens received. The usage count wins when the stream finished with one."""
        if self.usage and isinstance(self.usage.get("completion_tokens"), int):
            return int(self.usage["completion_tokens"])
        return sum(self.chunk_tokens)

    @property
    def e2e_s(self) -> float | None:
        if self.end_s is not None:
            return self.end_s
        return self.chunk_times_s[-1] if self.chunk_times_s else None

    @property
    def tokens_per_s(self) -> float | None:
        """Output tokens / end-to-end time (includes queueing and prefill)."""
        e2e = self.e2e_s
        if not self.complete or not e2e or e2e <= 0:
            return None
        return self.output_tokens / e2e

    def itl_samples_s(self) -> list[float]:
        """One sample per output token after the first (see the module docstring)."""
        out: list[float] = []
        for i in range(1, len(self.chunk_times_s)):
            gap = self.chunk_times_s[i] - self.chunk_times_s[i - 1]
            k = self.chunk_tokens[i]
            out.extend([gap / k] * k)
        # tokens that shared the first chunk arrived with the first token: no gap
        return out

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict) -> "RequestRecord":
        return cls(**d)


class StreamRecorder:
    """Folds SSE payloads of one OpenAI streaming response into a RequestRecord."""

    def __init__(self, record: RequestRecord) -> None:
        self.record = record

    def on_payload(self, payload: str, t_s: float) -> None:
        rec = self.record
        rel = t_s - rec.start_s
        if payload.strip() == "[DONE]":
            rec.complete = rec.error is None
            rec.end_s = rel
            return
        try:
            obj = json.loads(payload)
        except json.JSONDecodeError:
            rec.error = f"bad SSE payload: {payload[:120]!r}"
            rec.end_s = rel
            return
        if not isinstance(obj, dict):
            rec.error = f"bad SSE payload: {payload[:120]!r}"
            return
        if "error" in obj:  # the OpenAI error shape, sent mid-stream
            err = obj["error"]
            rec.error = err.get("message", str(err)) if isinstance(err, dict) else str(err)
            rec.end_s = rel
            return
        if obj.get("usage"):
            rec.usage = obj["usage"]
        for choice in obj.get("choices") or []:
            n = tokens_in_choice(choice)
            if isinstance(choice.get("token_ids"), list):
                rec.token_ids.extend(int(t) for t in choice["token_ids"])
            if n > 0:
                rec.chunk_times_s.append(rel)
                rec.chunk_tokens.append(n)
            if choice.get("finish_reason"):
                rec.finish_reason = choice["finish_reason"]


def tokens_in_choice(choice: dict) -> int:
    """Output tokens carried by one streamed choice (chat `delta.content` or completion `text`)."""
    ids = choice.get("token_ids")
    if isinstance(ids, list):
        return len(ids)
    delta = choice.get("delta")
    text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
    return 1 if text else 0
