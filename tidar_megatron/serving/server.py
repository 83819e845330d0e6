"""`tidar-megatron serve`: the OpenAI-compatible TiDAR server on an exported checkpoint.

    tidar-megatron serve --model <exported dir> [--host 127.0.0.1] [--port 8000] [--mode tidar|ar]
        [--block-size N] [--beta B] [--max-batch N] [--max-model-len N] [--device ...] [--dtype ...]

Use it to serve TiDAR decoding (several tokens per forward pass).  For plain AR serving of the same
directory a general engine is the better choice (vLLM, SGLang: it loads as a Qwen / Llama model).
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

# fastapi and uvicorn are the serve extra (a missing one is reported by the CLI with the pip line);
# fastapi is imported here so that a half-installed extra fails at start, not at the first request.
import fastapi  # noqa: F401
import torch
import uvicorn

from tidar_megatron.console import entry_point
from tidar_megatron.errors import TiDARError
from tidar_megatron.inference.generate import DTYPES, resolve_dtype



def build(model_dir, mode: str = "tidar", block_size: int | None = None, beta: float = 1.0, max_batch: int = 8,
          max_model_len: int | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
          served_name: str | None = None):
    """(FastAPI app, engine) for an exported directory; start the engine before serving."""
    from tidar_megatron.inference.decoding import Decoder
    from tidar_megatron.inference.generate import load_tokenizer
    from tidar_megatron.serving.app import create_app
    from tidar_megatron.serving.engine import Engine
    from tidar_megatron.serving.metrics import Metrics

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
    try:
        tokenizer = load_tokenizer(model_dir)
    except TiDARError:
        tokenizer = None  # token-id prompts only
    engine = Engine(decoder, tokenizer, mode, max_batch, max_model_len)
    engine.metrics = metrics = Metrics(engine.block)
    app = create_app(engine, tokenizer, served_name or model_dir.name, hf.chat_template, metrics)
    return app, engine


class BackgroundServer:
    """uvicorn serving `app` on host:port from a thread, with the engine started and stopped with it."""

    def __init__(self, app, engine, host: str = "127.0.0.1", port: int = 0):

        from tidar_megatron.net import free_port

        self.port = port or free_port()
        self.engine = engine
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning"))
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
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (KV-cache rows)")
    p.add_argument("--max-model-len", type=int, help="prompt + completion tokens per request (default: "
                   "config.json's max_position_embeddings)")
    p.add_argument("--served-model-name", help="the model name the API reports (default: the directory's name)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on GPU, float32 on CPU")
    return p


@entry_point("tidar-megatron serve")
def main(argv=None) -> int:

    a = build_parser().parse_args(argv)
    dtype = resolve_dtype(a.dtype, a.device)
    app, engine = build(a.model, a.mode, a.block_size, a.beta, a.max_batch, a.max_model_len, a.device, dtype,
                        a.served_model_name)
    engine.start()
    print(f"serving {a.model} ({a.mode}, block {engine.block}, {a.max_batch} rows of {engine.max_model_len} "
          f"tokens) on http://{a.host}:{a.port}/v1", flush=True)
    try:
        uvicorn.run(app, host=a.host, port=a.port, log_level="info")
    finally:
        engine.stop()
    return 0
