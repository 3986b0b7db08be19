"""The HTTP routes of ``pipo serve`` (Starlette on uvicorn), in OpenAI's shapes.

``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed as server-sent events with
``"stream": true``), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health`` (no API key
needed). Every error is OpenAI's ``{"error": {...}}`` body with its status.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from pipo.serve import protocol
from pipo.serve.protocol import APIError
from pipo.serve.service import Job, Service

CREATED = int(time.time())


def build_app(service: Service) -> Starlette:
    """The ASGI app serving ``service``; the scheduler stops (cancelling rows) at shutdown."""

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", **service.scheduler.load()})

    async def models(request: Request) -> JSONResponse:
        service.authorize(request.headers.get("authorization"))
        return JSONResponse({"object": "list", "data": [_model_card(service)]})

    async def model(request: Request) -> JSONResponse:
        service.authorize(request.headers.get("authorization"))
        service.check_model(request.path_params["model"])
        return JSONResponse(_model_card(service))

    async def chat(request: Request):
        return await _generate(service, request, protocol.parse_chat)

    async def completions(request: Request):
        return await _generate(service, request, protocol.parse_completion)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        service.scheduler.stop(cancel=True, timeout=60)

    routes = [Route("/health", health), Route("/v1/models", models),
              Route("/v1/models/{model:path}", model),
              Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={APIError: _api_error, HTTPException: _http_error,
                                         Exception: _internal_error})


def _model_card(service: Service) -> dict:
    return {"id": service.config.model_id, "object": "model", "created": CREATED,
            "owned_by": "pipo", "max_model_len": service.config.max_len}


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    error = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                     type=kind)
    return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    error = APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
    return JSONResponse(error.body(), status_code=500)


async def _generate(service: Service, request: Request, parse):
    service.authorize(request.headers.get("authorization"))
    parsed = parse(protocol.decode_body(await request.body()))
    service.check_model(parsed.model)
    ids = service.encode(parsed)
    job = service.start(parsed, ids)
    if parsed.stream:
        return StreamingResponse(_events(job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        text = await _unless_disconnected(request, _text(job))
    finally:
        service.scheduler.cancel(job.request)  # no-op once finished; frees the row otherwise
    if text is None:
        return Response(status_code=499)  # nobody is listening any more
    use = protocol.usage(job.prompt_tokens, job.completion_tokens)
    return JSONResponse(protocol.response(parsed, job.request_id, text, job.finish_reason, use))


async def _text(job: Job) -> str:
    return "".join([piece async for piece in job.pieces()])


async def _unless_disconnected(request: Request, work):
    """``work``'s result, or None (``work`` cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        return None
    return task.result()


async def _disconnect(request: Request) -> None:
    """Return once the client has gone (the body is read already, so only that can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(job: Job):
    """The server-sent events of a streamed response, ``data: [DONE]`` last."""
    parsed, rid = job.parsed, job.request_id
    yield protocol.sse(protocol.chunk(parsed, rid, "", first=True))
    try:
        async for piece in job.pieces():
            yield protocol.sse(protocol.chunk(parsed, rid, piece))
    except APIError as exc:
        yield protocol.sse(exc.body())
        yield protocol.sse("[DONE]")
        return
    yield protocol.sse(protocol.chunk(parsed, rid, None, finish=job.finish_reason))
    if parsed.include_usage:
        use = protocol.usage(job.prompt_tokens, job.completion_tokens)
        yield protocol.sse(protocol.usage_chunk(parsed, rid, use))
    yield protocol.sse("[DONE]")
