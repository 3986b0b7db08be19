"""What the HTTP routes call: prompts to token ids, requests into the scheduler, events back.

A :class:`Job` is one request seen from the event loop: the scheduler thread hands its events over
with ``loop.call_soon_threadsafe``, so nothing here blocks the loop.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pipo.errors import PipoError
from pipo.serve.protocol import APIError, Parsed, bad, new_id
from pipo.serve.scheduler import NotAccepting, QueueFull, Request, Scheduler
from pipo.serve.text_stream import TextStream

RETRY_AFTER_S = 1


@dataclass
class ServeConfig:
    """What the server serves and its limits."""

    model_id: str
    max_len: int
    api_key: str | None = None


class Service:
    """The model behind the routes: tokenizer, scheduler, limits."""

    def __init__(self, tokenizer, scheduler: Scheduler, config: ServeConfig):
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.config = config

    def authorize(self, header: str | None) -> None:
        """401 unless the Authorization header carries the API key (when one is set)."""
        key = self.config.api_key
        if key is None:
            return
        scheme, _, given = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def check_model(self, model: str) -> None:
        """404 unless ``model`` is the served model."""
        if model != self.config.model_id:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.config.model_id!r}", param="model",
                           code="model_not_found")

    def encode(self, parsed: Parsed) -> list[int]:
        """The prompt's token ids (chat messages through the chat template); 400 if too long."""
        try:
            if parsed.chat:
                text = self.tokenizer.apply_chat_template(parsed.messages)
                ids = self.tokenizer.encode(text, add_bos=False)
            elif isinstance(parsed.prompt, str):
                ids = self.tokenizer.encode(parsed.prompt)
            else:
                ids = list(parsed.prompt)
        except PipoError as exc:
            raise bad(str(exc)) from None
        self._check_length(parsed, ids)
        return ids

    def _check_length(self, parsed: Parsed, ids: list[int]) -> None:
        limit = self.config.max_len
        vocab = self.tokenizer.vocab_size
        if any(t >= vocab for t in ids):
            raise bad(f"token ids must be below the vocabulary size {vocab}", "prompt")
        if not ids:
            raise bad("the prompt has no tokens", "messages" if parsed.chat else "prompt")
        if parsed.max_tokens is None:
            parsed.max_tokens = max(limit - len(ids), 1)
        if len(ids) + parsed.max_tokens > limit:
            raise bad(f"this server's context is {limit} tokens; the request has "
                      f"{len(ids)} prompt tokens and asks for {parsed.max_tokens} more",
                      "max_tokens" if len(ids) < limit else "messages" if parsed.chat
                      else "prompt", code="context_length_exceeded")

    def start(self, parsed: Parsed, ids: list[int]) -> Job:
        """Queue the request; 429 with Retry-After when the queue is full."""
        job = Job(self, parsed, ids, asyncio.get_running_loop())
        try:
            self.scheduler.submit(job.request)
        except QueueFull as exc:
            raise APIError(429, f"{exc}; retry shortly", type="rate_limit_exceeded",
                           code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except NotAccepting as exc:
            raise APIError(503, str(exc), type="server_error") from None
        return job


class Job:
    """One queued request and the text it produces, read with :meth:`pieces`."""

    def __init__(self, service: Service, parsed: Parsed, ids: list[int],
                 loop: asyncio.AbstractEventLoop):
        self.service, self.parsed, self.prompt_tokens = service, parsed, len(ids)
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.text = TextStream(service.tokenizer.stream_decoder(skip_special_tokens=True),
                               parsed.stop)
        self.request = Request(ids, parsed.max_tokens, parsed.sampling, on_event=self._hand_over)
        self.request_id = new_id(parsed.chat)
        self.finish_reason: str | None = None

    def _hand_over(self, kind: str, value) -> None:
        try:  # from the scheduler thread
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass

    @property
    def completion_tokens(self) -> int:
        """Tokens generated so far (up to the stop string where one cut the text)."""
        return self.text.tokens

    async def pieces(self) -> AsyncIterator[str]:
        """Text pieces as they decode; sets ``finish_reason``. APIError 500/503 on failure."""
        try:
            while True:
                kind, value = await self.events.get()
                if kind == "token":
                    if piece := self.text.feed(value):
                        yield piece
                    if self.text.stopped:
                        self.finish_reason = "stop"
                        return
                elif kind == "error":
                    raise APIError(500, value, type="server_error")
                elif value == "cancelled":
                    raise APIError(503, "the request was cancelled: the server is shutting down",
                                   type="server_error")
                else:
                    if tail := self.text.flush():
                        yield tail
                    self.finish_reason = value
                    return
        finally:
            if self.finish_reason is None or self.text.stopped:
                self.service.scheduler.cancel(self.request)  # a disconnect, a stop string
