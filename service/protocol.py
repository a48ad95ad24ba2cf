"""OpenAI wire protocol: request/response models, request parsing, errors.

Contract: `parse_request(Model, body_bytes)` returns a validated request or raises
`APIError`, whose `.response()` is an OpenAI-shaped JSON error
(`{"error": {"message", "type", "param", "code"}}`). Fields of the OpenAI API that this
server does not implement (best_of, suffix, tools, ...) are rejected with a 400 that names
the field, never silently ignored; fields unknown to the OpenAI API are rejected too.

Echo (completions): `echo: true` puts the prompt before the completion in the text, and,
with `logprobs`, its tokens before the completion's in the log-probabilities (the first
prompt token with None: nothing predicts it), as OpenAI did and evaluation harnesses use
for log-likelihoods; streamed, the prompt comes with a choice's first chunk.

Log-probabilities: `logprobs` (completions: an integer k, the alternatives per token;
chat: true, with `top_logprobs` k) returns each generated token's log-probability under
the target's raw distribution (before temperature / top_p / top_k) and its k most likely
alternatives, k <= MAX_LOGPROBS, in OpenAI's shapes (`logprobs_chat`, `logprobs_completion`).

Extensions (request body): `speculative` (bool, default true: false decodes this request
without the drafter), `top_k`, `repetition_penalty`, `min_tokens`, `stop_token_ids`,
`ignore_eos`, `return_token_ids`. The usage object carries
the request's speculative-decoding stats.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dflash_core.sampling import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_REPETITION_PENALTY

MAX_STOP_STRINGS = 8
MAX_CHOICES = 16   # n per request (each choice takes a slot or a queue place)
MAX_STOP_CHARS = 512


class APIError(Exception):
    """An error a client can act on, rendered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _inline_refs(node, defs: dict):
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline_refs(defs[ref.split("/")[-1]], defs)
        return {k: _inline_refs(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


def openapi_body(model) -> dict:
    """`openapi_extra` documenting a request model as the route's JSON body (refs inlined)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": _inline_refs(schema, defs)}}}}


_ERROR_SCHEMA = {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "message": {"type": "string"}, "type": {"type": "string"},
    "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
OPENAPI_RESPONSES = {
    code: {"description": what, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
    for code, what in ((400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
                       (408, "body not received in time"), (413, "body too large"),
                       (429, "too many requests (Retry-After)"), (503, "starting or shutting down"))}


# --------------------------------------------------------------------------- requests

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None   # omitted: the served model (as vLLM and SGLang do)
    max_tokens: int | None = None
    # None: the served model's defaults (generation_config.json), else 1.0 / 1.0 / off
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, lt=2**63)  # extension; 0 or -1: off
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=MAX_REPETITION_PENALTY)  # extension (vLLM's)
    logit_bias: dict[str, Any] | None = None   # token id (as a string) -> bias in [-100, 100]
    min_tokens: int | None = Field(None, ge=0)                        # extension (vLLM's)
    stop_token_ids: list[int] | None = Field(None, max_length=64)     # extension (vLLM's)

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, v):
        if not v:
            return None
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens may be biased, got {len(v)}")
        out = {}
        for key, bias in v.items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids (decimal strings), got {key!r}")
            if not isinstance(bias, (int, float)) or isinstance(bias, bool) or not -100.0 <= bias <= 100.0:
                raise ValueError(f"biases must be numbers in [-100, 100], got {json.dumps(bias)[:40]} for token {key}")
            out[int(key)] = float(bias)
        return out
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)   # choices: n engine requests side by side (seeds seed, seed+1, ..)
    user: str | None = None
    # extensions
    speculative: bool = True
    ignore_eos: bool = False
    return_token_ids: bool = False

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else list(v)
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are supported, got {len(stops)}")
        for s in stops:
            if not s:
                raise ValueError("stop strings must be non-empty")
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"stop strings must be at most {MAX_STOP_CHARS} characters")
        return stops

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def logprobs_k(self) -> int | None:
        """None: no log-probabilities; k: each token's and its k most likely alternatives."""
        return None

    @property
    def score_only(self) -> bool:
        """The prompt alone is asked for (completions: echo with max_tokens 0)."""
        return False


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False           # the prompt comes first in the text (and in logprobs, when asked)

    @field_validator("logprobs", mode="before")
    @classmethod
    def _logprobs_off(cls, v):
        return None if v is False else v   # clients send false for "off"

    @property
    def logprobs_k(self) -> int | None:
        return self.logprobs

    @property
    def score_only(self) -> bool:
        return self.echo and self.max_tokens == 0

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError("only one prompt per request is supported (batch prompts: send separate requests)")
            v = v[0]
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        return v


class ChatContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ChatContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    max_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:   # (an APIError passes pydantic unchanged)
            raise APIError(400, f"'top_logprobs' = {self.top_logprobs} needs 'logprobs': true.",
                           param="top_logprobs", code="invalid_value")
        return self

    @property
    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# Fields of the OpenAI API this server does not implement, with the value(s) that mean
# "not used" and are therefore accepted. Any other value -> 400 naming the field.
UNSUPPORTED_FIELDS: dict[str, tuple] = {
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None,),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "store": (None, False),
    "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}


def _is_off(value: Any, offs: tuple) -> bool:
    """True when `value` is one of the "feature not used" values (same type: 0 is not False)."""
    return any(type(value) is type(off) and value == off for off in offs)


def parse_request(model_cls: type[_SamplingFields], body: bytes) -> _SamplingFields:
    """JSON bytes -> validated request; raises APIError(400) naming the offending field."""
    # 1) JSON
    try:
        data = json.loads(body)   # callers cap the body in bytes first (service/app.py)
    except (ValueError, RecursionError) as e:   # bad JSON, bad UTF-8, 4300+-digit ints, deep nesting
        raise APIError(400, f"We could not parse the JSON body of your request ({str(e)[:200] or type(e).__name__}). "
                            "Send a JSON object with Content-Type: application/json.",
                       code="invalid_json")
    if not isinstance(data, dict):
        raise APIError(400, f"The request body must be a JSON object, got {type(data).__name__}.",
                       code="invalid_json")
    # 2) OpenAI fields we do not implement: name them
    for name, offs in UNSUPPORTED_FIELDS.items():
        if name in model_cls.model_fields:   # implemented for this endpoint (echo: completions)
            continue
        if name in data and not _is_off(data[name], offs):
            raise APIError(400, f"'{name}' is not supported by this server (got {json.dumps(data[name])[:80]}); "
                                "remove it from the request.", param=name, code="unsupported_parameter")
        data.pop(name, None)
    data = {k: v for k, v in data.items() if v is not None or k in ("model",)}
    known = set(model_cls.model_fields)
    for name in data:
        if name not in known:
            raise APIError(400, f"Unrecognized request argument supplied: '{name}'.", param=name,
                           code="unrecognized_parameter")
    # 3) types and ranges
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise validation_error_to_api(e.errors()) from None


def validation_error_to_api(errors: list[dict]) -> APIError:
    """Pydantic/FastAPI error list -> one APIError(400) naming the first bad field."""
    if not errors:
        return APIError(400, "Invalid request.")
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x not in ("body",)]
    # drop pydantic's union-branch markers like "str" / "list[int]"
    loc = [x for x in loc if not any(c in x for c in "[]") and x not in ("str", "int", "float", "bool")]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'."
    elif first.get("type") == "json_invalid":
        message = "We could not parse the JSON body of your request. Send a JSON object."
        param = None
    else:
        got = first.get("input")
        got_s = json.dumps(got)[:80] if _jsonable(got) else repr(got)[:80]
        message = f"Invalid value for '{param}': {msg} (got {got_s})." if param else f"Invalid request: {msg}."
    extra = len(errors) - 1
    if extra > 0:
        message += f" ({extra} more problem{'s' if extra > 1 else ''} in this request.)"
    return APIError(400, message, param=param, code="invalid_value" if first.get("type") != "missing"
                    else "missing_required_parameter")


def _jsonable(x) -> bool:
    try:
        json.dumps(x)
        return True
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now_s() -> int:
    return int(time.time())


def usage_dict(num_prompt_tokens: int, num_generated_tokens: int, stats: dict | None) -> dict:
    """OpenAI usage plus the request's speculative-decoding stats (extension fields)."""
    stats = stats or {}
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_generated_tokens,
        "total_tokens": num_prompt_tokens + num_generated_tokens,
        "mean_acceptance_length": stats.get("mean_acceptance_length", 0.0),
        "num_target_forwards": stats.get("num_steps", 0),
        "num_drafts": stats.get("num_drafts", 0),
        "num_draft_tokens": stats.get("num_draft_tokens", 0),
        "num_accepted_tokens": stats.get("num_accepted_tokens", 0),
        "accepted_per_position": list(stats.get("accepted_per_position", [])),
    }


def logprobs_chat(entries: list, token_str) -> dict:
    """TokenLogprob entries -> a chat choice's `logprobs` ({"content": [...], "refusal": None});
    token_str(id) -> (text, utf-8 bytes) of one token."""
    def one(tid: int, lp: float) -> dict:
        text, raw = token_str(tid)
        return {"token": text, "logprob": lp, "bytes": list(raw)}
    return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries],
            "refusal": None}


def logprobs_completion(entries: list, token_str, text_offset: int, k: int) -> dict:
    """TokenLogprob entries -> a completion choice's `logprobs` (tokens, token_logprobs,
    top_logprobs (None when k = 0), text_offset: each token's character offset in the
    completion, counting from text_offset, the characters of the tokens before these).
    An entry whose logprob is None (an echoed prompt's first token: nothing predicts it)
    gets None for its logprob and its alternatives, as OpenAI's echo does."""
    tokens, offsets = [], []
    for e in entries:
        offsets.append(text_offset)
        tokens.append(token_str(e.token_id)[0])
        text_offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [None if e.top is None else {token_str(t)[0]: lp for t, lp in e.top}
                             for e in entries] if k else None,
            "text_offset": offsets}


def merge_stats(stats: list[dict | None]) -> dict:
    """The speculative statistics of a request's choices (SpecStats.to_dict() + num_drafts
    each) as one: counts summed, acceptance length averaged over all target forwards."""
    stats = [s for s in stats if s]
    if len(stats) <= 1:
        return dict(stats[0]) if stats else {}
    out = {key: sum(s.get(key, 0) for s in stats)
           for key in ("num_steps", "num_draft_tokens", "num_accepted_tokens", "num_drafts")}
    steps = out["num_steps"]
    out["mean_acceptance_length"] = round(sum(s.get("mean_acceptance_length", 0.0) * s.get("num_steps", 0)
                                              for s in stats) / steps, 4) if steps else 0.0
    width = max(len(s.get("accepted_per_position", [])) for s in stats)
    out["accepted_per_position"] = [sum(s["accepted_per_position"][k] for s in stats
                                        if k < len(s.get("accepted_per_position", []))) for k in range(width)]
    return out


def completion_response(rid: str, created: int, model: str, text: str, finish_reason: str | None,
                        usage: dict, token_ids: list[int] | None = None,
                        prompt_token_ids: list[int] | None = None, logprobs: dict | None = None) -> dict:
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
        choice["prompt_token_ids"] = prompt_token_ids
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [choice], "usage": usage}


def chat_response(rid: str, created: int, model: str, text: str, finish_reason: str | None,
                  usage: dict, token_ids: list[int] | None = None,
                  prompt_token_ids: list[int] | None = None, logprobs: dict | None = None) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
              "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
        choice["prompt_token_ids"] = prompt_token_ids
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [choice], "usage": usage}


def _chunk(obj: str, content: dict, rid: str, created: int, model: str, finish_reason: str | None,
           token_ids: list[int] | None, usage_null: bool, logprobs: dict | None = None, index: int = 0) -> dict:
    """One streamed chunk with one choice (`content`: its text or delta)."""
    choice = {"index": index, **content, "logprobs": logprobs, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    chunk = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
    if usage_null:
        chunk["usage"] = None
    return chunk


def completion_chunk(rid: str, created: int, model: str, text: str, finish_reason: str | None,
                     token_ids: list[int] | None = None, usage_null: bool = False,
                     logprobs: dict | None = None, index: int = 0) -> dict:
    return _chunk("text_completion", {"text": text}, rid, created, model, finish_reason, token_ids, usage_null,
                  logprobs, index)


def chat_chunk(rid: str, created: int, model: str, delta: dict, finish_reason: str | None,
               token_ids: list[int] | None = None, usage_null: bool = False, logprobs: dict | None = None,
               index: int = 0) -> dict:
    return _chunk("chat.completion.chunk", {"delta": delta}, rid, created, model, finish_reason, token_ids,
                  usage_null, logprobs, index)


def usage_chunk(rid: str, created: int, model: str, obj: str, usage: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage}


def models_response(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "dflash"}]}


def sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
