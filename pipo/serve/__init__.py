"""``pipo serve``: an OpenAI-compatible HTTP server with continuous batching (docs/serve.md).

``scheduler`` (requests into row slots, one step at a time, in its own thread), ``rows`` (the
engine's batch of row slots), ``protocol`` (OpenAI's request checks and response shapes),
``text_stream`` (tokens to text, stop strings), ``service`` (what the routes call), ``app`` (the
Starlette routes), ``server`` (putting it together on uvicorn, shutdown).
"""
