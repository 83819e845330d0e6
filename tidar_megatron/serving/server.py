"""`tidar-megatron serve`: the OpenAI-compatible TiDAR server on an exported checkpoint.

    tidar-megatron serve --model <exported dir> [--host 127.0.0.1] [--port 8000] [--mode tidar|ar]
        [--block-size N] [--beta B] [--block-by-load auto[:ROWS]|off|N:B[,N:B]] [--max-batch N]
        [--max-model-len N] [--device ...] [--dtype ...]
        [--api-key KEY] [--max-body-bytes N] [--max-prompt-chars N] [--max-stop-strings N] [--max-stop-chars N]
        [--header-timeout S] [--body-timeout S] [--keep-alive-timeout S] [--max-connections N] [--max-waiting N]

Use it to serve TiDAR decoding (several tokens per forward pass).  For plain AR serving of the same
directory a general engine is the better choice (vLLM, SGLang: it loads as a Qwen / Llama model).
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

# fastapi and uvicorn are the serve extra (a missing one is reported by the CLI with the pip line);
# fastapi is imported here so that a half-installed extra fails at start, not at the first request.
import fastapi  # noqa: F401
import torch
import uvicorn

from tidar_megatron.compat.http_guard import guarded_h11
from tidar_megatron.console import entry_point
from tidar_megatron.errors import TiDARError
from tidar_megatron.inference.decoding import Decoder
from tidar_megatron.inference.generate import DTYPES, load_tokenizer, resolve_dtype
from tidar_megatron.net import free_port
from tidar_megatron.serving.app import create_app
from tidar_megatron.serving.block_policy import BlockPolicy
from tidar_megatron.serving.engine import Engine
from tidar_megatron.serving.metrics import Metrics
from tidar_megatron.serving.protocol import ServeLimits, error_body


def build(model_dir, mode: str = "tidar", block_size: int | None = None, beta: float = 1.0, max_batch: int = 8,
          max_model_len: int | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
          served_name: str | None = None, limits: ServeLimits = ServeLimits(), api_key: str | None = None,
          block_policy: BlockPolicy = BlockPolicy("auto")):
    """(FastAPI app, engine) for an exported directory; start the engine before serving (the app's
    `state.limits` also bound connections: serve it with `uvicorn_config`)."""
    model_dir = Path(model_dir)
    if mode not in ("tidar", "ar"):
        raise TiDARError(f"--mode must be tidar or ar, got {mode!r}")
    decoder = Decoder.from_pretrained(model_dir, dtype, device, block_size=block_size, beta=beta)
    if mode == "tidar" and (decoder.block_size is None or decoder.mask_token_id is None or decoder.block_size < 2):
        raise TiDARError(f"{model_dir}: TiDAR decoding needs tidar_mask_token_id and tidar_draft_block_size in "
                         "config.json (or --block-size), or use --mode ar")
    hf = decoder.checkpoint_config
    max_model_len = max_model_len or hf.max_position_embeddings or 2048
    if max_batch < 1 or max_model_len < 2:
        raise TiDARError("--max-batch must be >= 1 and --max-model-len >= 2")
    if hf.max_position_embeddings and max_model_len > hf.max_position_embeddings:  # as vLLM refuses it
        raise TiDARError(f"--max-model-len {max_model_len} is past {model_dir}'s max_position_embeddings "
                         f"({hf.max_position_embeddings}): positions the model was not trained on; use at most that")
    try:
        tokenizer = load_tokenizer(model_dir)
    except TiDARError:
        tokenizer = None  # token-id prompts only
    engine = Engine(decoder, tokenizer, mode, max_batch, max_model_len, max_waiting=limits.max_waiting,
                    block_policy=block_policy)
    engine.metrics = metrics = Metrics(engine.block)
    app = create_app(engine, tokenizer, served_name or model_dir.name, hf.chat_template, metrics, limits, api_key)
    return app, engine


def uvicorn_config(app, host: str, port: int, log_level: str) -> uvicorn.Config:
    """uvicorn with the app's connection limits: header and keep-alive timeouts, a connection cap."""
    limits: ServeLimits = app.state.limits
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_keep_alive=limits.keep_alive_s,
                          # the guard closes connections past the cap; uvicorn's own 503 would hit the
                          # requests of connections within it once the cap is reached
                          limit_concurrency=limits.max_connections + 1,
                          http=guarded_h11(limits.header_timeout_s, limits.max_connections, error_body))


class BackgroundServer:
    """uvicorn serving `app` on host:port from a thread, with the engine started and stopped with it."""

    def __init__(self, app, engine, host: str = "127.0.0.1", port: int = 0):
        self.port = port or free_port()
        self.engine = engine
        self.server = uvicorn.Server(uvicorn_config(app, host, self.port, "warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://{host}:{self.port}"

    def __enter__(self):
        self.engine.start()
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                self.__exit__(None, None, None)
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.stop()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tidar-megatron serve", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="exported Hugging Face directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--mode", choices=("tidar", "ar"), default="tidar")
    p.add_argument("--block-size", type=int, help="draft block size (default: the checkpoint's)")
    p.add_argument("--beta", type=float, default=1.0, help="1 = trust AR (lossless), 0 = trust the drafts")
    p.add_argument("--block-by-load", type=block_policy, default=BlockPolicy("auto"),
                   metavar="auto[:ROWS] | off | N:B[,N:B]",
                   help="the draft block of each pass by load (default auto: the largest block whose query rows, "
                        "sequences x (B + B^2), fit ROWS: 256 on a GPU, 128 on a CPU); N:B: passes over at least N "
                        "sequences use block B; off: the checkpoint's block.  Greedy output is unchanged; seeded "
                        "sampled requests keep the checkpoint's block")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (KV-cache rows)")
    p.add_argument("--max-model-len", type=int, help="prompt + completion tokens per request (default: "
                   "config.json's max_position_embeddings)")
    p.add_argument("--served-model-name", help="the model name the API reports (default: the directory's name)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--api-key", default=os.environ.get("TIDAR_API_KEY"),
                   help="require `Authorization: Bearer <key>` on /v1/* (default: $TIDAR_API_KEY; none: open)")
    d = ServeLimits()
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="larger request bodies get 413")
    p.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars,
                   help="characters of a prompt (or of a chat's messages); more get 400")
    p.add_argument("--max-stop-strings", type=int, default=d.max_stop_strings, help="stop strings per request")
    p.add_argument("--max-stop-chars", type=int, default=d.max_stop_chars, help="characters per stop string")
    p.add_argument("--header-timeout", type=float, default=d.header_timeout_s,
                   help="seconds a connection has to finish its request headers before it is closed")
    p.add_argument("--body-timeout", type=float, default=d.body_timeout_s,
                   help="seconds a request has to send its body after its headers (408 otherwise)")
    p.add_argument("--keep-alive-timeout", type=float, default=d.keep_alive_s,
                   help="seconds an idle keep-alive connection stays open")
    p.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="open connections; beyond it new ones are closed and extra requests get 503")
    p.add_argument("--max-waiting", type=int, default=d.max_waiting,
                   help="requests waiting for a free row (--max-batch); beyond it requests get 503")
    return p


def block_policy(text: str) -> BlockPolicy:
    """argparse type (the runner checks a table's blocks against the checkpoint)."""
    try:
        return BlockPolicy.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def limits_from(a: argparse.Namespace) -> ServeLimits:
    return ServeLimits(max_body_bytes=a.max_body_bytes, max_prompt_chars=a.max_prompt_chars,
                       max_stop_strings=a.max_stop_strings, max_stop_chars=a.max_stop_chars,
                       header_timeout_s=a.header_timeout, body_timeout_s=a.body_timeout,
                       keep_alive_s=a.keep_alive_timeout, max_connections=a.max_connections,
                       max_waiting=a.max_waiting)


@entry_point("tidar-megatron serve")
def main(argv=None) -> int:

    a = build_parser().parse_args(argv)
    dtype = resolve_dtype(a.dtype, a.device)
    app, engine = build(a.model, a.mode, a.block_size, a.beta, a.max_batch, a.max_model_len, a.device, dtype,
                        a.served_model_name, limits_from(a), a.api_key or None, a.block_by_load)
    engine.start()
    blocks = f", block by load {engine.runner.policy}" if a.mode == "tidar" else ""
    print(f"serving {a.model} ({a.mode}, block {engine.block}{blocks}, {a.max_batch} rows of {engine.max_model_len} "
          f"tokens) on http://{a.host}:{a.port}/v1", flush=True)
    try:
        uvicorn.Server(uvicorn_config(app, a.host, a.port, "info")).run()
    finally:
        engine.stop()
    return 0
