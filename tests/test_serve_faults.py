"""Faults stay local, on loopback against the real `openai` client and raw sockets: out-of-range parameters
and text that is not Unicode get 400s naming the parameter; oversized bodies get 413 before they are read;
connections that never finish their headers are closed and the server keeps accepting; the framework's
errors are OpenAI's error object and 500s are `server_error` (streams that fail count as errors in
/metrics); `--api-key` guards /v1/*; and one bad request among running streams leaves them unharmed."""

import asyncio
import json
import socket
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from test_serve import PROMPTS, client, model_dir, reference  # noqa: E402,F401  (model_dir: this module's model)

from tidar_megatron.serving.protocol import ServeLimits  # noqa: E402
from tidar_megatron.serving.server import BackgroundServer, build  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LIMITS = ServeLimits(max_body_bytes=64 * 1024, max_prompt_chars=2000, max_stop_strings=4, max_stop_chars=16,
                     header_timeout_s=1.0, body_timeout_s=1.0, keep_alive_s=5.0, max_connections=24)


@pytest.fixture(scope="module")
def server(model_dir):  # noqa: F811
    app, engine = build(model_dir, mode="tidar", max_batch=3, max_model_len=96, limits=LIMITS)
    with BackgroundServer(app, engine) as running:
        yield running


def post(server, body: bytes | dict, path="/v1/completions", **kw):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"},
                      timeout=60, **kw)


def assert_openai_error(response, status: int, param: str | None = None, kind="invalid_request_error"):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind and error["message"], error
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error


def counts(server) -> dict:
    families = text_string_to_metric_families(httpx.get(server.url + "/metrics").text)
    return {(s.labels["endpoint"], s.labels["status"]): s.value for f in families for s in f.samples
            if s.name == "tidar_requests_total"}


@pytest.mark.parametrize("param,value", [
    ("temperature", -0.1), ("temperature", 2.5), ("top_p", 0.0), ("top_p", 1.5), ("max_tokens", 0), ("n", 2),
    ("seed", 2**64), ("seed", -2**63 - 1), ("best_of", 2), ("logprobs", 1), ("echo", True), ("suffix", "}"),
    ("presence_penalty", 0.5), ("frequency_penalty", -1.0), ("logit_bias", {"5": 10}),
])
def test_out_of_range_or_unsupported_parameters_get_400_naming_them(server, param, value):
    with pytest.raises(openai.BadRequestError) as raised:
        client(server).completions.create(model="m", prompt="x = ", **{"max_tokens": 3, param: value})
    assert raised.value.body["param"] == param and raised.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize("prompt", [[1, 2, True], [1.5], {"ids": [1]}, [[1, True]], None])
def test_a_malformed_prompt_gets_400_naming_the_prompt(server, prompt):
    response = post(server, {"prompt": prompt, "max_tokens": 3})
    assert_openai_error(response, 400)
    error = response.json()["error"]
    assert error["param"] == "prompt" and "a list of token ids" in error["message"], error


def test_a_prompt_of_one_token_list_in_a_list_is_served(server):
    """`prompt=[[5, 6, 7]]`, which the openai client's types allow, as `prompt=[5, 6, 7]`; two are refused
    (one prompt per request)."""
    got = client(server).completions.create(model="m", prompt=[[5, 6, 7]], max_tokens=3, temperature=0)
    alone = client(server).completions.create(model="m", prompt=[5, 6, 7], max_tokens=3, temperature=0)
    assert got.choices[0].text == alone.choices[0].text and got.usage.prompt_tokens == 3
    assert_openai_error(post(server, {"prompt": [[5, 6], [7]], "max_tokens": 3}), 400, "prompt")


def test_a_missing_prompt_gets_400_saying_so(server):
    response = post(server, {"max_tokens": 3})
    assert_openai_error(response, 400, "prompt")
    assert response.json()["error"]["message"] == "prompt: Field required"


@pytest.mark.parametrize("seed", [2**64 - 1, -2**63])
def test_seeds_at_the_ends_of_the_64_bit_range_are_served(server, seed):
    got = client(server).completions.create(model="m", prompt="x = ", max_tokens=3, temperature=1, seed=seed)
    assert got.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "def \ud800(a):", "max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": ["\udfff"], "max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": "x = ", "max_tokens": 3, "stop": ["\ud800"]}, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \ud800"}], "max_tokens": 3}, "messages"),
])
def test_lone_surrogates_get_400_and_count_in_metrics(server, path, body, param):
    before = counts(server).get((path, "400"), 0)
    raw = json.dumps(body).encode()  # ensure_ascii: the lone surrogate travels as the escape "\ud800"
    assert b"\\ud" in raw
    response = post(server, raw, path)
    assert_openai_error(response, 400, param)
    assert "lone surrogate" in response.json()["error"]["message"]
    assert counts(server)[(path, "400")] == before + 1


def raw_request(server, head: bytes, body_parts=(), read_timeout=10.0) -> bytes:
    """Send a request's head and then body parts on a raw socket (stopping if the server closes), and
    return everything the server answers until it closes the connection."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=read_timeout) as sock:
        sock.sendall(head)
        try:
            for part in body_parts:
                sock.sendall(part)
        except OSError:
            pass  # the server answered and closed before the body was sent: what this tests
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def status_and_json(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        body = body.split(b"\r\n", 1)[1].rsplit(b"\r\n0\r\n", 1)[0]
    return int(head.split()[1]), json.loads(body)


def test_a_100_mb_body_is_refused_with_413_before_it_is_read(server):
    """The server answers from the declared length alone (the body is never sent; a byte sent after the
    server closed would reset the connection); /health answers meanwhile."""
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000\r\n\r\n")
    result = {}
    thread = threading.Thread(target=lambda: result.update(answer=raw_request(server, head)))  # no body byte
    thread.start()
    assert httpx.get(server.url + "/health", timeout=5).json()["status"] == "ok"
    thread.join(timeout=30)
    status, body = status_and_json(result["answer"])
    assert status == 413 and body["error"]["type"] == "invalid_request_error"
    assert "max-body-bytes" in body["error"]["message"]


def test_a_chunked_body_is_refused_with_413_once_it_passes_the_limit(server):
    """No Content-Length: the limit is enforced while the body streams in."""
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b'{"prompt": "' + b"a" * 16000
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    # 80 kB, past the 64 KiB limit (more, unread when the server closes, would make its kernel reset the
    # connection and drop the answer before this client reads it).
    status, body = status_and_json(raw_request(server, head, [chunk] * 5))
    assert status == 413 and "max-body-bytes" in body["error"]["message"]
    assert client(server).completions.create(model="m", prompt="x = ", max_tokens=3).choices[0].text is not None


def test_a_body_that_never_finishes_arriving_gets_408(server):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n")
    started = time.monotonic()
    status, body = status_and_json(raw_request(server, head, [b'{"prompt": "x'], read_timeout=10))
    assert status == 408 and "--body-timeout" in body["error"]["message"]
    assert time.monotonic() - started < 8


@pytest.mark.parametrize("body,param", [
    ({"prompt": "def " * 600, "max_tokens": 3}, "prompt"),                                     # 2,400 chars
    ({"messages": [{"role": "user", "content": "x" * 1500}] * 2, "max_tokens": 3}, "messages"),
    ({"prompt": "x = ", "max_tokens": 3, "stop": ["a", "b", "c", "d", "e"]}, "stop"),           # 5 stop strings
    ({"prompt": "x = ", "max_tokens": 3, "stop": "s" * 17}, "stop"),                            # 17 characters
])
def test_limits_on_prompts_and_stop_strings_get_400(server, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    response = post(server, body, path)
    assert_openai_error(response, 400, param)
    assert "--max-" in response.json()["error"]["message"]  # the limit, not some other check, refused it


def test_connections_that_never_finish_their_headers_are_closed_and_the_server_keeps_accepting(server):
    """More half-open connections than the connection limit (24): the extra ones are closed at once, the
    rest after the header timeout (1 s); then requests are served as before."""
    socks = []
    for _ in range(40):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: appl")  # and nothing more
        socks.append(sock)
    started = time.monotonic()
    for sock in socks:
        try:
            assert sock.recv(1024) == b""  # closed by the server (within the socket's 10 s timeout)
        except ConnectionResetError:
            pass
        sock.close()
    assert time.monotonic() - started < 8
    got = client(server).completions.create(model="m", prompt="x = ", max_tokens=3, temperature=0)
    assert got.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("method,path,body,status", [
    ("GET", "/v1/nowhere", None, 404),
    ("POST", "/v2/completions", b"{}", 404),
    ("GET", "/v1/completions", None, 405),
    ("POST", "/v1/completions", b'{"prompt": "caf\xe9", "max_tokens": 3}', 400),           # not UTF-8
    ("POST", "/v1/completions", b'{"prompt": ' + b"[" * 20000 + b"]" * 20000 + b"}", 400),  # nested too deeply
    ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": ', 400),                    # malformed
    ("POST", "/v1/completions", b'["x"]', 400),                                               # not an object
])
def test_framework_errors_are_openai_error_objects(server, method, path, body, status):
    response = httpx.request(method, server.url + path, content=body, timeout=30,
                             headers={"content-type": "application/json"})
    assert_openai_error(response, status)


@pytest.mark.parametrize("raw", [
    b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 20_000,  # unfinished past h11's 16 KiB
    b"NOT A REQUEST\r\n\r\n",
])
def test_requests_the_http_parser_refuses_get_openai_error_objects(server, raw):
    head, _, body = raw_request(server, raw).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower(), head
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and "not a request HTTP/1.1 could parse" in error["message"]


def asgi_stream(app, send, receive_after_body, stream: bool = True, body: bytes | None = None) -> None:
    """One completion through the ASGI app directly (within 30 s), with the client's side given: `send`
    (what the server writes) and `receive_after_body` (what the client does once `body` is sent; a body
    that stops short of its Content-Length is one the client broke off)."""
    full = json.dumps({"prompt": [5, 6, 7], "max_tokens": 8, "stream": stream}).encode()
    body = full if body is None else body
    sent = [False]

    async def receive():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": len(body) < len(full)}
        return await receive_after_body()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(full)).encode())]}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))


def outcomes(engine) -> dict:
    return {(s.labels["endpoint"], s.labels["status"]): s.value
            for f in text_string_to_metric_families(engine.metrics.render().decode()) for s in f.samples
            if s.name == "tidar_requests_total"}


def test_a_stream_whose_client_left_before_it_started_frees_its_request(model_dir):  # noqa: F811
    """The client goes away between the request and the first byte of the response (the stream's generator
    never runs): the engine is told to drop the request, and /metrics counts a disconnect."""
    app, engine = build(model_dir, mode="tidar", max_batch=1, max_model_len=96)  # engine not started: it waits

    async def gone():
        return {"type": "http.disconnect"}

    async def send(message):  # as uvicorn's once the client is gone: nothing is sent, nothing is raised
        await asyncio.sleep(0)  # a socket write gives way (here the stream is cancelled before it starts)

    asgi_stream(app, send, gone)
    assert [r.id for r in engine.waiting] == list(engine.scheduler.cancelled) and len(engine.waiting) == 1
    assert outcomes(engine) == {("/v1/completions", "disconnected"): 1.0}


async def client_leaves():
    return {"type": "http.disconnect"}


async def nowhere(message):  # as uvicorn's once the client is gone: nothing is sent, nothing is raised
    await asyncio.sleep(0)


def test_a_completion_whose_client_left_is_dropped(model_dir):  # noqa: F811
    """A non-streamed completion whose client gave up while it waited: dropped from the engine and counted
    as a disconnect (it used to run to its end and count as a 200)."""
    app, engine = build(model_dir, mode="tidar", max_batch=1, max_model_len=96)  # engine not started: it waits
    asgi_stream(app, nowhere, client_leaves, stream=False)
    assert [r.id for r in engine.waiting] == list(engine.scheduler.cancelled) and len(engine.waiting) == 1
    assert outcomes(engine) == {("/v1/completions", "disconnected"): 1.0}


def test_a_client_that_breaks_off_its_body_is_a_disconnect_not_a_server_error(model_dir, capsys):  # noqa: F811
    app, engine = build(model_dir, mode="tidar", max_batch=1, max_model_len=96)
    asgi_stream(app, nowhere, client_leaves, body=b'{"prompt": [5, ')
    assert outcomes(engine) == {("/v1/completions", "disconnected"): 1.0} and not engine.waiting
    assert "Traceback" not in capsys.readouterr().err


def test_a_stream_that_fails_as_its_client_leaves_counts_once(model_dir, monkeypatch):  # noqa: F811
    """The request fails (its error chunk is being written) and the client leaves meanwhile: one outcome in
    /metrics, the 500, not also a disconnect."""
    app, engine = build(model_dir, mode="tidar", max_batch=1, max_model_len=96)
    monkeypatch.setattr(engine.runner, "decode", lambda seqs: (_ for _ in ()).throw(RuntimeError("simulated")))
    left = asyncio.Event()

    async def leaves():
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body" and b'"error"' in message.get("body", b""):
            left.set()                # the client stops reading and leaves ...
            await asyncio.sleep(0.2)  # ... while the write waits for the transport to drain

    engine.start()
    try:
        asgi_stream(app, send, leaves)
    finally:
        engine.stop()
    assert outcomes(engine) == {("/v1/completions", "500"): 1.0}


def test_failures_are_server_errors_and_failed_streams_count_as_errors(server):
    engine = server.engine
    before = counts(server)
    real = engine.model.forward
    engine.model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory (simulated)"))
    try:
        failed = post(server, {"prompt": "x", "max_tokens": 4})
        assert_openai_error(failed, 500, kind="server_error")
        with pytest.raises(openai.APIError, match="out of memory"):
            for _ in client(server).completions.create(model="m", prompt="x", max_tokens=4, stream=True):
                pass
    finally:
        engine.model.forward = real
    after = counts(server)
    assert after[("/v1/completions", "500")] == before.get(("/v1/completions", "500"), 0) + 2
    assert after.get(("/v1/completions", "200"), 0) == before.get(("/v1/completions", "200"), 0)


def test_an_unexpected_exception_is_a_500_server_error_in_openai_format(server, monkeypatch):
    before = counts(server).get(("/v1/chat/completions", "500"), 0)
    monkeypatch.setattr(server.engine, "submit", lambda request: (_ for _ in ()).throw(RuntimeError("a bug")))
    response = post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                    "/v1/chat/completions")
    assert_openai_error(response, 500, kind="server_error")
    assert "a bug" in response.json()["error"]["message"]
    assert counts(server)[("/v1/chat/completions", "500")] == before + 1


def test_api_key_guards_the_v1_routes(model_dir):  # noqa: F811
    app, engine = build(model_dir, mode="ar", max_batch=1, max_model_len=96, api_key="sesame")
    with BackgroundServer(app, engine) as keyed:
        for headers in ({}, {"authorization": "Bearer open"}, {"authorization": "sesame"}):
            response = httpx.post(keyed.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2},
                                  headers=headers)
            assert_openai_error(response, 401)
            assert response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(keyed.url + "/v1/models").status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client(keyed).models.list()
        api = openai.OpenAI(base_url=keyed.url + "/v1", api_key="sesame", max_retries=0, timeout=60)
        assert api.completions.create(model="m", prompt="x = ", max_tokens=2, temperature=0).choices[0].text
        assert httpx.get(keyed.url + "/health").status_code == 200  # probes need no key


BAD = [{"temperature": 1e-39}, {"temperature": 1e-300}, {"temperature": 1.0, "top_p": 1e-300},
       {"temperature": 1.0, "seed": 2**64}]


def test_a_bad_request_among_running_streams_fails_alone(server, model_dir):  # noqa: F811
    """Two greedy streams run while the issue's bad requests arrive one by one: each bad request gets a 400
    or an answer, and both streams finish as they would alone."""
    engine = server.engine
    real = engine.model.forward

    def slow_forward(*a, **k):  # keeps the streams running while the bad requests arrive
        time.sleep(0.08)
        return real(*a, **k)

    cases = [(PROMPTS[0], 80), (PROMPTS[2], 80)]
    engine.model.forward = slow_forward
    try:
        streams = [client(server).completions.create(model="m", prompt=p, max_tokens=n, temperature=0,
                                                     stream=True) for p, n in cases]
        chunks = [[next(iter(s))] for s in streams]  # both are admitted and decoding
        answers = [post(server, {"prompt": "x = ", "max_tokens": 4, **bad}) for bad in BAD]
        still_running = engine.occupancy == 2
        for stream, got in zip(streams, chunks):
            got.extend(stream)
    finally:
        engine.model.forward = real
    for (prompt, max_tokens), got in zip(cases, chunks):
        assert got[-1].choices[0].finish_reason in ("length", "stop")
        assert "".join(c.choices[0].text for c in got) == reference(model_dir, prompt, "tidar", max_tokens)
    for bad, answer in zip(BAD, answers):
        assert answer.status_code in (200, 400), (bad, answer.text)
        if answer.status_code == 400:
            assert answer.json()["error"]["param"] in bad, answer.text
        else:
            assert answer.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert still_running  # the bad requests met the streams in the engine


def test_cli_flags_set_the_limits_and_the_key(monkeypatch):
    from tidar_megatron.errors import TiDARError
    from tidar_megatron.serving.server import build_parser, limits_from

    monkeypatch.setenv("TIDAR_API_KEY", "from-env")
    a = build_parser().parse_args(["--model", "m", "--max-body-bytes", "1000", "--max-stop-strings", "2",
                                   "--header-timeout", "3", "--body-timeout", "4", "--max-connections", "7"])
    assert a.api_key == "from-env" and a.host == "127.0.0.1"
    assert limits_from(a) == ServeLimits(max_body_bytes=1000, max_stop_strings=2, header_timeout_s=3.0,
                                         body_timeout_s=4.0, max_connections=7)
    with pytest.raises(TiDARError, match="--max-body-bytes"):
        limits_from(build_parser().parse_args(["--model", "m", "--max-body-bytes", "0"]))


def test_block_by_load_is_auto_unless_told(capsys):
    from tidar_megatron.serving.block_policy import BlockPolicy
    from tidar_megatron.serving.server import build_parser

    parse = build_parser().parse_args
    assert parse(["--model", "m"]).block_by_load == BlockPolicy("auto")
    assert parse(["--model", "m", "--block-by-load", "off"]).block_by_load == BlockPolicy("off")
    assert parse(["--model", "m", "--block-by-load", "auto:64"]).block_by_load == BlockPolicy("auto", 64)
    assert parse(["--model", "m", "--block-by-load", "16:4,48:2"]).block_by_load.table == {16: 4, 48: 2}
    with pytest.raises(SystemExit) as exit_:
        parse(["--model", "m", "--block-by-load", "always"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and "--block-by-load 'always': give auto, auto:ROWS, off" in error


def test_a_full_waiting_queue_answers_503_and_the_queued_request_is_still_served(model_dir):  # noqa: F811
    """Back-pressure (--max-waiting 1): with the engine held back, one request waits for a row and the next
    gets 503 at once; once the engine runs, the waiting one is served."""
    app, engine = build(model_dir, mode="tidar", max_batch=1, max_model_len=96,
                        limits=ServeLimits(max_waiting=1))
    start, engine.start = engine.start, lambda: None  # the server comes up, the engine admits nothing yet
    with BackgroundServer(app, engine) as running:
        waiting = {}
        thread = threading.Thread(target=lambda: waiting.update(answer=post(running, {
            "prompt": PROMPTS[1], "max_tokens": 4})))
        thread.start()
        deadline = time.time() + 30
        while httpx.get(running.url + "/health").json()["queue_length"] < 1:
            assert time.time() < deadline and thread.is_alive()
            time.sleep(0.01)
        full = post(running, {"prompt": PROMPTS[2], "max_tokens": 4})
        assert_openai_error(full, 503, kind="server_error")
        assert "--max-waiting" in full.json()["error"]["message"]
        start()
        thread.join(timeout=60)
        assert waiting["answer"].status_code == 200, waiting["answer"].text
        assert waiting["answer"].json()["choices"][0]["text"] == reference(model_dir, PROMPTS[1], "tidar", 4)


def test_a_connection_within_the_cap_is_served(model_dir):  # noqa: F811
    """--max-connections 1: the one connection allowed gets answers (uvicorn's own limit would 503 it)."""
    app, engine = build(model_dir, mode="tidar", max_batch=1, max_model_len=96,
                        limits=ServeLimits(max_connections=1))
    with BackgroundServer(app, engine) as running, httpx.Client(timeout=60) as one:
        for _ in range(2):  # the same keep-alive connection, twice
            answer = one.post(running.url + "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 2})
            assert answer.status_code == 200, answer.text


def test_booleans_are_not_token_ids(server):
    assert_openai_error(post(server, {"prompt": [5, 6, True], "max_tokens": 2}), 400, "prompt")


def test_max_model_len_past_the_models_context_is_refused(model_dir):  # noqa: F811
    from tidar_megatron.errors import TiDARError

    with pytest.raises(TiDARError, match="past .* max_position_embeddings"):
        build(model_dir, mode="tidar", max_model_len=10**6)
