"""An OpenAI-compatible server that decodes with TiDAR: `tidar-megatron serve --model <exported dir>`.

    engine.py     continuous batching over a KV cache of max_batch rows: composes the three parts below
    scheduler.py  admission into KV-cache rows, cancellation, a bounded waiting queue (QueueFull)
    runner.py     a pass's inputs, the forward, the decoding calls (prefill, one decoding pass)
    output.py     stop rule, incremental detokenization, stop strings, usage, finishing
    app.py        the HTTP API (FastAPI): completions, chat completions, models, health, metrics
    metrics.py    Prometheus metrics
    server.py     the command line, and a server in a background thread (tests, benchmarks)
"""
