"""The OpenAI-compatible HTTP server (FastAPI) over an EngineClient (async_llm.py).

    app.py          build_app: the app, its lifespan, health/metrics/models
    completions.py  POST /v1/completions
    chat.py         POST /v1/chat/completions
    tokenize.py     POST /tokenize, POST /detokenize (vLLM's)
    serving.py      what both share: request -> engine requests (choices), merged streams, SSE
    errors.py       APIError, the engine's errors as 4xx/503, OpenAI's error body everywhere
    middleware.py   API key and per-endpoint request counts
    protocol.py     the request models (pydantic)
    tools.py        tool calling: which parser reads an output, the schema of a forced call, messages
    tool_parsers/   one file per tool-call format (hermes, llama3_json), registered by name
    metrics.py      Prometheus metrics
"""
