"""The OpenAI-compatible HTTP API over the engine: completions, chat completions, models, health, metrics.

FastAPI (on uvicorn) because it is what OpenAI-compatible servers are built on (vLLM's and SGLang's API
servers): request bodies validated by pydantic models, server-sent events through StreamingResponse, and a
streaming client that disconnects cancels its response, which frees the request's KV-cache row (a
non-streaming request runs to its end).  Errors are OpenAI's
error object with status 400 (FastAPI's own validation errors, 422, are rewritten to that).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from tidar_megatron.inference.sampling import SamplingConfig
from tidar_megatron.inference.step import ContextError, check_context
from tidar_megatron.serving.engine import Engine, Event
from tidar_megatron.serving.engine import Request as EngineRequest


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown fields are ignored, as OpenAI's API does

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)


class CompletionBody(_Body):
    prompt: str | list[int] | list[str]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


def _error(message: str, param: str | None = None, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                   "code": None}}, status_code=status)


def create_app(engine: Engine, tokenizer, model_name: str, chat_template: str | None, metrics) -> FastAPI:
    app = FastAPI(title="tidar-megatron serve")
    vocab = engine.model.args.vocab_size

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        metrics.requests.labels(request.url.path, "400").inc()
        return _error(f"{param + ': ' if param else ''}{first.get('msg', 'invalid request')}", param)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        metrics.requests.labels(request.url.path, "400").inc()
        return _error(exc.message, exc.param)

    def engine_request(prompt_ids: list[int], body: _Body, max_tokens: int | None, on_event) -> EngineRequest:
        if not prompt_ids:
            raise BadRequest("the prompt has no tokens", "prompt")
        outside = [t for t in prompt_ids if not 0 <= t < vocab]
        if outside:
            raise BadRequest(f"token id {outside[0]} is outside the model's vocabulary ({vocab} ids)", "prompt")
        max_tokens = max_tokens or max(1, min(16, engine.max_model_len - len(prompt_ids)))
        try:
            check_context(len(prompt_ids), max_tokens, engine.max_model_len, "", "max_tokens")
        except ContextError as e:
            raise BadRequest(str(e), e.param.replace("max_new_tokens", "max_tokens")) from None
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return EngineRequest(prompt_ids, max_tokens, SamplingConfig(body.temperature, body.top_p), body.seed,
                             stop, on_event)

    def encode_prompt(prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise BadRequest("one prompt per request (n = 1)", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if tokenizer is None:
                raise BadRequest("this model has no tokenizer: send token ids as the prompt", "prompt")
            return tokenizer.encode(prompt)
        return list(prompt)

    async def run(endpoint: str, prompt_ids: list[int], body: _Body, max_tokens, render_chunk,
                  render_final):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        request = engine_request(prompt_ids, body, max_tokens, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        engine.submit(request)
        created, rid = int(time.time()), f"{'chatcmpl' if 'chat' in endpoint else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if not body.stream:
            text, event = "", None
            try:
                while event is None or event.finish_reason is None:
                    event = await events.get()
                    text += event.text
                if event.finish_reason == "error":
                    metrics.requests.labels(endpoint, "500").inc()
                    return _error(f"generation failed: {event.usage['error']}", status=500)
            except asyncio.CancelledError:
                engine.cancel(request.id)
                raise
            metrics.requests.labels(endpoint, "200").inc()
            return JSONResponse(render_final(rid, created, text, event))

        async def stream():
            finished = False
            try:
                while not finished:
                    event = await events.get()
                    finished = event.finish_reason is not None
                    yield f"data: {json.dumps(render_chunk(rid, created, event))}\n\n"
                yield "data: [DONE]\n\n"
                metrics.requests.labels(endpoint, "200").inc()
            finally:
                if not finished:  # the client went away: free its row
                    engine.cancel(request.id)
                    metrics.requests.labels(endpoint, "disconnected").inc()

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        def chunk(rid, created, event):
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": event.text, "logprobs": None,
                                 "finish_reason": event.finish_reason}],
                    **({"usage": event.usage} if event.finish_reason else {})}

        def final(rid, created, text, event):
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": event.finish_reason}],
                    "usage": event.usage}

        return await run("/v1/completions", encode_prompt(body.prompt), body, body.max_tokens, chunk, final)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        if chat_template is None:
            raise BadRequest("this model's tokenizer has no chat template: use /v1/completions, or export the "
                             "checkpoint with --chat-template", "messages")
        prompt = render_chat(chat_template, [m.model_dump() for m in body.messages], tokenizer)

        def chunk(rid, created, event):
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": event.text},
                                 "finish_reason": event.finish_reason}],
                    **({"usage": event.usage} if event.finish_reason else {})}

        def final(rid, created, text, event):
            return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": event.finish_reason}], "usage": event.usage}

        return await run("/v1/chat/completions", encode_prompt(prompt), body,
                         body.max_completion_tokens or body.max_tokens, chunk, final)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "tidar-megatron"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "mode": engine.mode, "block_size": engine.block, "batch_occupancy": engine.occupancy,
                "max_batch": engine.max_batch, "queue_length": len(engine.waiting)}

    @app.get("/metrics")
    async def prometheus():
        metrics.observe_engine(engine)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def render_chat(template: str, messages: list[dict], tokenizer) -> str:
    """The chat template applied as transformers applies it (a sandboxed Jinja environment)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise BadRequest(f"chat template: {message}", "messages")

    from jinja2 import TemplateError

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    special = {}
    if tokenizer is not None:
        special = {"eos_token": tokenizer.decode([tokenizer.eod_id])}
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, **special)
    except TemplateError as e:
        raise BadRequest(f"chat template: {e}", "messages") from None
