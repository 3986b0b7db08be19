"""OpenAI's request and response shapes: parsing and checking request bodies, building responses.

Only what ``pipo serve`` implements is accepted: ``n = 1``, ``max_tokens`` (chat also
``max_completion_tokens``), ``temperature`` (0..2), ``top_p`` (0 < p <= 1), ``seed`` (>= 0),
``stop`` (a string or up to 4), ``stream`` and ``stream_options.include_usage``. Other fields that
OpenAI defines are ignored, as most OpenAI-compatible servers do. A bad value raises
:class:`APIError` (status 400, OpenAI's error body naming the field).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from pipo.ops.sampling import SamplingParams

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOPS = 4
ROLES = ("system", "user", "assistant", "developer", "tool")


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        """The JSON body of the error response."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 invalid_request_error about ``param``."""
    return APIError(400, message, param=param, code=code)


@dataclass
class Parsed:
    """A checked request: what to generate and how to answer."""

    model: str
    chat: bool
    prompt: str | list[int] = ""
    messages: list[dict] = field(default_factory=list)
    max_tokens: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


def decode_body(raw: bytes) -> dict:
    """The JSON object of a request body; 400 when it is not one."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


def parse_chat(body: dict) -> Parsed:
    """Check a /v1/chat/completions body."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of {role, content} objects", "messages")
    parsed = _common(body, chat=True)
    parsed.messages = [_message(m, i) for i, m in enumerate(messages)]
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    parsed.max_tokens = _max_tokens(body, key)
    if body.get("logprobs") or body.get("tools") or body.get("response_format"):
        raise bad("logprobs, tools and response_format are not supported by pipo serve")
    return parsed


def parse_completion(body: dict) -> Parsed:
    """Check a /v1/completions body."""
    parsed = _common(body, chat=False)
    parsed.prompt = _prompt(body.get("prompt"))
    parsed.max_tokens = _max_tokens(body, "max_tokens")
    if parsed.max_tokens is None:
        parsed.max_tokens = COMPLETION_DEFAULT_MAX_TOKENS
    if body.get("echo") or body.get("suffix") or body.get("logprobs") is not None:
        raise bad("echo, suffix and logprobs are not supported by pipo serve")
    return parsed


def _common(body: dict, chat: bool) -> Parsed:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' must be the name of a served model (see GET /v1/models)", "model")
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise bad(f"only n=1 is supported, got n={n!r}", "n")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise bad(f"'stream' must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    return Parsed(model=model, chat=chat, sampling=_sampling(body), stop=_stop(body.get("stop")),
                  stream=bool(stream), include_usage=bool(options.get("include_usage")))


def _number(body: dict, name: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or (value <= low if low_open else value < low) or value > high:
        span = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise bad(f"'{name}' must be a number in {span}, got {value!r}", name)
    return float(value)


def _sampling(body: dict) -> SamplingParams:
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise bad(f"'seed' must be an integer >= 0, got {seed!r}", "seed")
    return SamplingParams(temperature=temperature, top_p=top_p, seed=seed)


def _max_tokens(body: dict, key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad(f"'{key}' must be an integer >= 1, got {value!r}", key)
    return value


def _stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or \
            not all(isinstance(s, str) and s for s in stops):
        raise bad(f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them",
                  "stop")
    return tuple(stops)


def _prompt(prompt) -> str | list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
        return prompt
    raise bad("'prompt' must be a non-empty string or list of token ids (one prompt: n=1)",
              "prompt")


def _message(message, index: int) -> dict:
    param = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise bad(f"{param} must be an object with a role in {', '.join(ROLES)}", param)
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text is supported
        if not all(isinstance(p, dict) and p.get("type") == "text" and
                   isinstance(p.get("text"), str) for p in content):
            raise bad(f"{param}.content parts must all be text parts", f"{param}.content")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise bad(f"{param}.content must be a string", f"{param}.content")
    role = "system" if message["role"] == "developer" else message["role"]
    return {"role": role, "content": content}


# ---- responses ----------------------------------------------------------------------------------
def new_id(chat: bool) -> str:
    """A fresh response id (``chatcmpl-...`` or ``cmpl-...``)."""
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(parsed: Parsed, rid: str, text: str, finish: str, use: dict) -> dict:
    """The whole (non-streamed) response."""
    if parsed.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {**_head(parsed, rid, chunk=False), "choices": [choice], "usage": use}


def chunk(parsed: Parsed, rid: str, text: str | None, finish: str | None = None,
          first: bool = False) -> dict:
    """One streamed chunk: a piece of text, or (``finish``) the last one."""
    if parsed.chat:
        delta = {} if text is None else {"content": text}
        if first:
            delta["role"] = "assistant"
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    return {**_head(parsed, rid, chunk=True), "choices": [choice]}


def usage_chunk(parsed: Parsed, rid: str, use: dict) -> dict:
    """The chunk with usage counts and no choices, sent last when include_usage is asked."""
    return {**_head(parsed, rid, chunk=True), "choices": [], "usage": use}


def _head(parsed: Parsed, rid: str, chunk: bool) -> dict:
    obj = ("chat.completion" + (".chunk" if chunk else "")) if parsed.chat else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": parsed.model}


def sse(data: dict | str) -> bytes:
    """One server-sent event carrying ``data`` (JSON, or a literal such as ``[DONE]``)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()
