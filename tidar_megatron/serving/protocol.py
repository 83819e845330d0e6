"""The wire side of the OpenAI-compatible API: request models with OpenAI's ranges, the server's limits,
reading a body under a size limit, and OpenAI's error object.

What a request body can get wrong is answered here, before it reaches the engine, as a 4xx naming the
parameter (app.py adds the checks that need the model: vocabulary, context length): a value the engine
cannot use would otherwise fail inside a decoding pass.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator
from starlette.requests import Request

from tidar_megatron.errors import TiDARError

# vLLM's temperature floor (sampling_params.py raises temperatures below 0.01 to 0.01); the sampler itself is
# safe at any positive value (it shifts logits by their maximum and always keeps the most likely token), so
# the floors only keep the served distribution what vLLM would serve.  A top_p of 1e-6 keeps only the most
# likely token for any vocabulary under a million ids, as every smaller top_p does.
MIN_TEMPERATURE = 1e-2
MIN_TOP_P = 1e-6
SEED_RANGE = (-2**63, 2**64 - 1)  # a 64-bit integer, signed or not (the sampler takes it modulo 2**64)


@dataclass(frozen=True)
class ServeLimits:
    """Bounds on what one request or connection may cost the server (the CLI's --max-* / --*-timeout flags)."""
    max_body_bytes: int = 4 * 2**20
    max_prompt_chars: int = 1_000_000
    max_stop_strings: int = 16
    max_stop_chars: int = 128
    header_timeout_s: float = 10.0     # a connection must finish its request headers within this
    body_timeout_s: float = 30.0       # ... and then its body within this (408 otherwise)
    keep_alive_s: float = 5.0          # an idle keep-alive connection is closed after this
    max_connections: int = 1024        # open connections; more are closed at once (503 for extra requests)
    max_waiting: int = 1024            # requests queued for a KV-cache row; more get 503 (back-pressure)

    def __post_init__(self):
        counts = (self.max_body_bytes, self.max_prompt_chars, self.max_connections, self.max_waiting)
        if min(counts) < 1 or min(self.header_timeout_s, self.body_timeout_s, self.keep_alive_s) <= 0 \
                or min(self.max_stop_strings, self.max_stop_chars) < 0:
            raise TiDARError(f"serve limits: --max-body-bytes, --max-prompt-chars, --max-connections and "
                             f"--max-waiting must be >= 1, "
                             f"the timeouts > 0, --max-stop-strings / --max-stop-chars >= 0; got {self}")


class ApiError(Exception):
    """Answered as OpenAI's error object with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _no_lone_surrogates(text: str) -> str:
    # JSON's "\ud800" escape decodes to a str that no tokenizer can encode (it is not Unicode text).
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text: lone surrogate {text[e.start]!r} at character {e.start}") from None
    return text


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown fields are ignored, as OpenAI's API does

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    # Not supported: refused with a 400 (as vLLM refuses what it does not support) rather than ignored.
    logprobs: Any = None
    top_logprobs: Any = None
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stop_text(cls, stop):
        for text in [stop] if isinstance(stop, str) else stop or []:
            _no_lone_surrogates(text)
        return stop

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported(self) -> str | None:
        """The first parameter this server does not implement that the request asks for."""
        if self.logprobs not in (None, False, 0):
            return "logprobs"
        if self.top_logprobs not in (None, 0):
            return "top_logprobs"
        if self.best_of not in (None, 1):
            return "best_of"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name
        return "logit_bias" if self.logit_bias else None

    def safe_sampling(self) -> tuple[float, float]:
        """(temperature, top_p) raised to the floors below which float32 sampling breaks (0 stays greedy)."""
        temperature = self.temperature if self.temperature == 0 else max(self.temperature, MIN_TEMPERATURE)
        return temperature, max(self.top_p, MIN_TOP_P)


class CompletionBody(_Body):
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]  # strict: `true` is not token 1
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, prompt):
        for text in [prompt] if isinstance(prompt, str) else prompt:
            if isinstance(text, str):
                _no_lone_surrogates(text)
        return prompt

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo"
        return "suffix" if self.suffix else super().unsupported()


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str

    @field_validator("content")
    @classmethod
    def _content_text(cls, content):
        return _no_lone_surrogates(content)


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


async def read_body(request: Request, limits: ServeLimits) -> bytes:
    """The request's body, refused with 413 as soon as it is known to exceed the size limit (from its
    Content-Length, or while streaming it in): an oversized body is never held or parsed; and with 408
    when it does not arrive within the body timeout (a client trickling it would hold the connection)."""
    limit = limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body has {int(declared)} bytes; this server accepts at most {limit} "
                       "(--max-body-bytes)")
    body = bytearray()
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ApiError(413, f"the request body exceeds {limit} bytes (--max-body-bytes)")
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {limits.body_timeout_s} s "
                       "(--body-timeout)") from None
    return bytes(body)


def parse(model: type[_Body], raw: bytes, limits: ServeLimits) -> _Body:
    """A validated request body, or ApiError(400) naming the parameter at fault."""
    try:
        data = json.loads(raw)
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not UTF-8: {e.reason} at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e.msg} at character {e.pos}") from None
    except RecursionError:
        raise ApiError(400, "the request body's JSON is nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        body = model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = [str(p) for p in first.get("loc", ())]
        if loc[:1] == ["prompt"] and len(loc) > 1 and first["type"] != "value_error":
            # a type error inside the union: pydantic names the member it tried last, not what was wrong
            raise ApiError(400, "prompt: give a string, a list of one string, or a list of token ids (integers)",
                           "prompt") from None
        where = ".".join(loc)
        # OpenAI's `param` is the request's parameter; the message says where inside it
        raise ApiError(400, f"{where + ': ' if where else ''}{first.get('msg', 'invalid value')}",
                       loc[0] if loc else None) from None
    except RecursionError:
        raise ApiError(400, "the request body's JSON is nested too deeply") from None
    name = body.unsupported()
    if name is not None:
        raise ApiError(400, f"{name} is not supported by this server", name)
    check_limits(body, limits)
    return body


def check_limits(body: _Body, limits: ServeLimits):
    stops = body.stop_strings
    if len(stops) > limits.max_stop_strings:
        raise ApiError(400, f"{len(stops)} stop strings; this server accepts at most {limits.max_stop_strings} "
                       "(--max-stop-strings)", "stop")
    longest = max(map(len, stops), default=0)
    if longest > limits.max_stop_chars:
        raise ApiError(400, f"a stop string of {longest} characters; this server accepts at most "
                       f"{limits.max_stop_chars} (--max-stop-chars)", "stop")
    if isinstance(body, CompletionBody):
        chars, param = sum(len(p) for p in ([body.prompt] if isinstance(body.prompt, str) else body.prompt)
                           if isinstance(p, str)), "prompt"
    else:
        chars, param = sum(len(m.content) for m in body.messages), "messages"
    if chars > limits.max_prompt_chars:
        raise ApiError(400, f"the prompt has {chars} characters; this server accepts at most "
                       f"{limits.max_prompt_chars} (--max-prompt-chars)", param)
