"""The OpenAI-compatible HTTP API over the engine: completions, chat completions, models, health, metrics.

FastAPI (on uvicorn) because it is what OpenAI-compatible servers are built on (vLLM's and SGLang's API
servers).  Bodies are read under a size limit and validated in protocol.py; server-sent events go through
StreamingResponse.  A client that disconnects, streaming or not, has its request dropped from the engine,
which frees its KV-cache row, and counts as "disconnected" in /metrics (also when it broke off its body).
Every error, the framework's included (404, 405, unhandled exceptions), is OpenAI's error object; 5xx are
`server_error`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from tidar_megatron.inference.sampling import SamplingConfig
from tidar_megatron.inference.step import ContextError, check_context
from tidar_megatron.serving.engine import Engine, EngineStopped, Event, QueueFull
from tidar_megatron.serving.engine import Request as EngineRequest
from tidar_megatron.serving.protocol import (ApiError, ChatBody, CompletionBody, ServeLimits, error_body, parse,
                                             read_body)

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    # An error answered before the body was read closes the connection: the unread rest is not waited for.
    headers = {"connection": "close"} if status in (408, 413) else None
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


# --- rendering: one chunk of a stream, and the final non-streamed response -------------------------------
def completion_chunk(rid: str, created: int, model: str, event: Event) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": event.text, "logprobs": None, "finish_reason": event.finish_reason}],
            **({"usage": event.usage} if event.finish_reason else {})}


def completion_final(rid: str, created: int, model: str, text: str, event: Event) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": event.finish_reason}],
            "usage": event.usage}


def chat_chunk(rid: str, created: int, model: str, event: Event) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": event.text},
                         "finish_reason": event.finish_reason}],
            **({"usage": event.usage} if event.finish_reason else {})}


def chat_final(rid: str, created: int, model: str, text: str, event: Event) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": event.finish_reason}], "usage": event.usage}


async def client_gone(request: Request):
    """Returns once the client has closed its connection (its body has been read: the next ASGI message is
    the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(events: asyncio.Queue) -> tuple[str, Event]:
    """A non-streamed request's whole text and its last event."""
    text, event = "", None
    while event is None or event.finish_reason is None:
        event = await events.get()
        text += event.text
    return text, event


class EngineStream(StreamingResponse):
    """Server-sent events whose `on_close` runs however the response ends: completed, cancelled by a client
    that disconnected, or never started (the generator's own `finally` would not run then)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class Api:
    """The handlers, over one engine; `create_app` routes to them."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, chat_template: str | None, metrics,
                 limits: ServeLimits, api_key: str | None):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.chat_template, self.metrics, self.limits, self.api_key = chat_template, metrics, limits, api_key
        self.vocab = engine.model.args.vocab_size
        # Prompts are tokenized off the event loop (a 1M-character prompt takes a few tenths of a second,
        # which would stall every stream), in one thread: the tokenizer's line cache is not thread-safe.
        self.encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tidar-tokenize")

    def count(self, path: str, status: int | str):
        self.metrics.requests.labels(path if path in ENDPOINTS else "other", str(status)).inc()

    # --- errors -----------------------------------------------------------------------------------------
    async def on_api_error(self, request: Request, exc: ApiError):
        self.count(request.url.path, exc.status)
        return error_response(exc.status, exc.message, exc.param, exc.code)

    async def on_http_error(self, request: Request, exc: HTTPException):
        self.count(request.url.path, exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(exc.status_code, message)

    async def on_client_gone(self, request: Request, exc: ClientDisconnect):
        """The client closed the connection while its body was being read (or sent a body h11 could not
        frame, which uvicorn answers itself): nothing to answer, and not a server error."""
        self.count(request.url.path, "disconnected")
        return Response(status_code=499)

    async def on_crash(self, request: Request, exc: Exception):
        self.count(request.url.path, 500)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    async def authorize(self, request: Request):
        """vLLM's --api-key: `Authorization: Bearer <key>` on /v1/*."""
        if self.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "invalid or missing API key: send `Authorization: Bearer <key>`",
                           code="invalid_api_key")

    # --- requests -----------------------------------------------------------------------------------------
    async def prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):  # a batch of prompts
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request (n = 1)", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ApiError(400, "this model has no tokenizer: send token ids as the prompt", "prompt")
            return await asyncio.get_running_loop().run_in_executor(self.encoder, self.tokenizer.encode, prompt)
        return list(prompt)

    def engine_request(self, prompt_ids: list[int], body, max_tokens: int | None, on_event) -> EngineRequest:
        if not prompt_ids:
            raise ApiError(400, "the prompt has no tokens", "prompt")
        limit = self.engine.max_model_len
        max_tokens = max_tokens or max(1, min(16, limit - len(prompt_ids)))
        try:  # the one context rule (inference/step.py), before the vocabulary scan: it costs nothing
            check_context(len(prompt_ids), max_tokens, limit, "", "max_tokens")
        except ContextError as e:
            raise ApiError(400, str(e), e.param.replace("max_new_tokens", "max_tokens")) from None
        outside = [t for t in prompt_ids if not 0 <= t < self.vocab]
        if outside:
            raise ApiError(400, f"token id {outside[0]} is outside the model's vocabulary ({self.vocab} ids)",
                           "prompt")
        return EngineRequest(prompt_ids, max_tokens, SamplingConfig(*body.safe_sampling()), body.seed,
                             body.stop_strings, on_event)

    async def completions(self, request: Request):
        body = parse(CompletionBody, await read_body(request, self.limits), self.limits)
        return await self.run(request, "/v1/completions", await self.prompt_ids(body.prompt), body,
                              body.max_tokens, completion_chunk, completion_final)

    async def chat_completions(self, request: Request):
        body = parse(ChatBody, await read_body(request, self.limits), self.limits)
        if self.chat_template is None:
            raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions, or export the "
                           "checkpoint with --chat-template", "messages")
        prompt = render_chat(self.chat_template, [m.model_dump() for m in body.messages], self.tokenizer)
        return await self.run(request, "/v1/chat/completions", await self.prompt_ids(prompt), body,
                              body.max_completion_tokens or body.max_tokens, chat_chunk, chat_final)

    async def run(self, http: Request, endpoint: str, prompt_ids: list[int], body, max_tokens, render_chunk,
                  render_final):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        request = self.engine_request(prompt_ids, body, max_tokens,
                                      lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        try:
            self.engine.submit(request)
        except (QueueFull, EngineStopped) as e:  # back-pressure (the client retries later), or no engine
            raise ApiError(503, str(e)) from None
        created, rid = int(time.time()), f"{'chatcmpl' if 'chat' in endpoint else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.stream:
            state = {"finished": False, "counted": False}
            return EngineStream(self.stream(endpoint, events, rid, created, render_chunk, state),
                                on_close=lambda: self.closed(endpoint, request, state))
        # The server does not cancel a handler whose client left: watch for it, and drop the request then.
        collected, gone = asyncio.ensure_future(collect(events)), asyncio.ensure_future(client_gone(http))
        try:
            done, _ = await asyncio.wait({collected, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this handler is cancelled
            gone.cancel()
            if not collected.done():
                collected.cancel()
                self.engine.cancel(request.id)
        if collected not in done:
            self.count(endpoint, "disconnected")
            return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
        text, event = collected.result()
        if event.finish_reason == "error":
            raise ApiError(500, f"generation failed: {event.usage['error']}")
        self.count(endpoint, 200)
        return JSONResponse(render_final(rid, created, self.model_name, text, event))

    async def stream(self, endpoint: str, events: asyncio.Queue, rid: str, created: int, render_chunk,
                     state: dict):
        """The events as server-sent events; `state`: "finished" once the request's last event came (the
        engine is done with it), "counted" once the outcome is in /metrics."""
        while not state["finished"]:
            event = await events.get()
            state["finished"] = event.finish_reason is not None
            if event.finish_reason == "error":  # as vLLM: an error object in the stream, then [DONE]
                error = error_body(500, f"generation failed: {event.usage['error']}")
                self.count(endpoint, 500)
                state["counted"] = True
                yield f"data: {json.dumps(error)}\n\n"
                break
            yield f"data: {json.dumps(render_chunk(rid, created, self.model_name, event))}\n\n"
        else:
            self.count(endpoint, 200)
            state["counted"] = True
        yield "data: [DONE]\n\n"

    def closed(self, endpoint: str, request: EngineRequest, state: dict):
        """A stream's response ended.  When its request had not finished (the client went away, perhaps before
        the stream started), the engine drops it and frees its row; an outcome not yet counted is a disconnect."""
        if not state["finished"]:
            self.engine.cancel(request.id)
        if not state["counted"]:
            self.count(endpoint, "disconnected")

    # --- the rest ---------------------------------------------------------------------------------------
    async def models(self):
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "tidar-megatron"}]}

    async def health(self):
        engine = self.engine
        return {"status": "ok", "mode": engine.mode, "block_size": engine.block, "batch_occupancy": engine.occupancy,
                "max_batch": engine.max_batch, "queue_length": len(engine.waiting)}

    async def prometheus(self):
        self.metrics.observe_engine(self.engine)
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")


def create_app(engine: Engine, tokenizer, model_name: str, chat_template: str | None, metrics,
               limits: ServeLimits = ServeLimits(), api_key: str | None = None) -> FastAPI:
    api = Api(engine, tokenizer, model_name, chat_template, metrics, limits, api_key)
    app = FastAPI(title="tidar-megatron serve")
    app.state.limits = limits
    app.add_exception_handler(ApiError, api.on_api_error)
    app.add_exception_handler(HTTPException, api.on_http_error)
    app.add_exception_handler(ClientDisconnect, api.on_client_gone)
    app.add_exception_handler(Exception, api.on_crash)
    keyed = [Depends(api.authorize)]
    app.add_api_route("/v1/completions", api.completions, methods=["POST"], dependencies=keyed)
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"], dependencies=keyed)
    app.add_api_route("/v1/models", api.models, methods=["GET"], dependencies=keyed)
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/metrics", api.prometheus, methods=["GET"])
    return app


def render_chat(template: str, messages: list[dict], tokenizer) -> str:
    """The chat template applied as transformers applies it (a sandboxed Jinja environment)."""

    def raise_exception(message):
        raise ApiError(400, f"chat template: {message}", "messages")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    special = {}
    if tokenizer is not None:
        special = {"eos_token": tokenizer.decode([tokenizer.eod_id])}
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, **special)
    except TemplateError as e:
        raise ApiError(400, f"chat template: {e}", "messages") from None
