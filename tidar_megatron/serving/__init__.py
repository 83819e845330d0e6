"""An OpenAI-compatible server that decodes with TiDAR: `tidar-megatron serve --model <exported dir>`.

    engine.py   continuous batching over a KV cache of max_batch rows
    app.py      the HTTP API (FastAPI): completions, chat completions, models, health, metrics
    metrics.py  Prometheus metrics
    server.py   the command line, and a server in a background thread (tests, benchmarks)
"""
