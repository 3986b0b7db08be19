"""``pipo serve``: an OpenAI-compatible HTTP server with continuous batching (docs/serve.md).

``scheduler`` (requests into the engine's row slots, one step at a time, in its own thread),
``protocol`` (OpenAI's request checks and response shapes),
``text_stream`` (tokens to text, stop strings), ``service`` (what the routes call), ``app`` (the
Starlette routes), ``server`` (putting it together on uvicorn, shutdown).
"""
