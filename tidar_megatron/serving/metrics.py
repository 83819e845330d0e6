"""The server's Prometheus metrics (`GET /metrics`), in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, block_size: int):
        self.registry = r = CollectorRegistry()
        # status: the HTTP status ("500" also for a stream that failed after its 200 header), or
        # "disconnected" for a stream whose client left; endpoint "other" for paths the API does not serve.
        self.requests = Counter("tidar_requests", "requests by endpoint and outcome", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("tidar_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("tidar_generation_tokens", "tokens generated for finished requests",
                                         registry=r)
        self.forward_passes = Counter("tidar_forward_passes", "forward passes of the model (batched)", registry=r)
        self.sequence_passes = Counter("tidar_sequence_passes", "forward passes summed over the sequences in "
                                       "them (finished requests); generation_tokens / this = tokens per pass",
                                       registry=r)
        self.block_passes = Counter("tidar_sequence_passes_by_block", "TiDAR decoding passes of a sequence by "
                                    "the draft block they used (serve --block-by-load); prefills are not "
                                    "counted, a pass that failed and ran again is", ["block"], registry=r)
        self.accepted_tokens = Histogram("tidar_tokens_per_pass", "tokens a TiDAR decoding pass made final for "
                                         "a sequence", buckets=tuple(range(1, block_size + 1)), registry=r)
        self.batch_occupancy = Gauge("tidar_batch_occupancy", "KV-cache rows in use", registry=r)
        self.queue_length = Gauge("tidar_queue_length", "requests waiting for a row", registry=r)
        self.latency = Histogram("tidar_request_latency_seconds", "arrival to the last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.first_token_latency = Histogram("tidar_time_to_first_token_seconds", "arrival to the first token",
                                             buckets=LATENCY_BUCKETS, registry=r)

    # --- called by the engine (its thread) ------------------------------------------------------------
    def forward_pass(self, block: int | None = None, sequences: int = 0):
        """One forward; `block`: a TiDAR decoding forward's draft block, over `sequences` sequences."""
        self.forward_passes.inc()
        if block is not None:
            self.block_passes.labels(str(block)).inc(sequences)

    def accepted(self, tokens: int):
        self.accepted_tokens.observe(tokens)

    def first_token(self, seconds: float):
        self.first_token_latency.observe(seconds)

    def finished(self, usage: dict, seconds: float):
        self.prompt_tokens.inc(usage["prompt_tokens"])
        self.generation_tokens.inc(usage["completion_tokens"])
        self.sequence_passes.inc(usage["forward_passes"])
        self.latency.observe(seconds)

    def observe_engine(self, engine):
        self.batch_occupancy.set(engine.occupancy)
        self.queue_length.set(len(engine.waiting))

    def render(self) -> bytes:
        return generate_latest(self.registry)
