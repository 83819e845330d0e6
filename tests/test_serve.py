"""`tidar-megatron serve` against the real `openai` client on loopback: completions, chat, streaming, greedy
outputs equal to `generate`'s in tidar and ar mode, concurrent streams with continuous batching (a client
that disconnects frees its row for the next), OpenAI-style 400s that leave the server serving, and /metrics
that a Prometheus parser reads with counters matching the requests made."""

import json
import threading

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tidar_megatron.inference.decoding import Decoder  # noqa: E402
from tidar_megatron.serving.server import BackgroundServer, build  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 1\n    y = 2\n\nfor i in range(10):\n    print(i)\n"
TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tidar_megatron.data.tokenizer import Tokenizer, train_sentencepiece
    from tidar_megatron.testing import trained_toy_checkpoint

    path = tmp_path_factory.mktemp("served")
    train_sentencepiece([TEXT * 40], str(path / "tokenizer.model"), vocab_size=300)
    tok = Tokenizer(str(path / "tokenizer.model"))
    ids = torch.tensor(tok.encode(TEXT * 8))
    corpus = torch.stack([ids[i:i + 33] for i in range(0, len(ids) - 33, 7)])
    trained_toy_checkpoint(path, corpus, 120, vocab_size=tok.vocab_size, tidar_mask_token_id=tok.mask_id,
                           tidar_draft_block_size=4, eos_token_id=tok.eod_id, max_position_embeddings=128)
    (path / "chat_template.jinja").write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module")
def servers(model_dir):
    running = {}
    for mode in ("tidar", "ar"):
        app, engine = build(model_dir, mode=mode, max_batch=3, max_model_len=96)
        running[mode] = BackgroundServer(app, engine).__enter__()
    yield running
    for server in running.values():
        server.__exit__(None, None, None)


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def reference(model_dir, prompt: str, mode: str, max_tokens: int) -> str:
    from tidar_megatron.inference.generate import load_tokenizer

    tok = load_tokenizer(model_dir)
    tokens = Decoder.from_pretrained(model_dir).generate(tok.encode(prompt), max_tokens, mode=mode).tokens[0]
    return tok.decode(tokens)


PROMPTS = ["def add(a, b):\n", "class Point:\n    x", "for i in range(", "print(i"]


@pytest.mark.parametrize("mode", ["tidar", "ar"])
def test_greedy_completions_equal_generate(servers, model_dir, mode):
    api = client(servers[mode])
    for prompt in PROMPTS[:2]:
        got = api.completions.create(model="m", prompt=prompt, max_tokens=20, temperature=0)
        assert got.choices[0].text == reference(model_dir, prompt, mode, 20)
        usage = got.usage.model_dump()
        assert usage["completion_tokens"] <= 20 and usage["forward_passes"] >= 1
        assert usage["tokens_per_pass"] == pytest.approx(usage["completion_tokens"] / usage["forward_passes"])
    streamed = api.completions.create(model="m", prompt=PROMPTS[0], max_tokens=20, temperature=0, stream=True)
    chunks = [c.choices[0].text for c in streamed]
    assert len(chunks) > 1 and "".join(chunks) == reference(model_dir, PROMPTS[0], mode, 20)
    assert api.models.list().data[0].id == model_dir.name


def test_tidar_makes_several_tokens_per_pass(servers):
    usage = client(servers["tidar"]).completions.create(model="m", prompt=PROMPTS[0], max_tokens=40,
                                                        temperature=0).usage.model_dump()
    assert usage["tokens_per_pass"] > 1.5  # the trained drafts are accepted


def test_chat_completions_use_the_template(servers, model_dir):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def add(a, b):"}]
    api = client(servers["tidar"])
    got = api.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0)
    prompt = "<system>be brief\n<user>def add(a, b):\n<assistant>"
    assert got.choices[0].message.content == reference(model_dir, prompt, "tidar", 12)
    stream = api.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == got.choices[0].message.content


def test_concurrent_streams_each_equal_their_single_request_output(servers, model_dir):
    """More streams than rows (3): they queue, join and leave between passes; every output is the one the
    request gives alone.  One more client disconnects after two events: its row goes to the others."""
    server = servers["tidar"]
    cases = [(PROMPTS[i % 4], 8 + 5 * i) for i in range(5)]
    results, errors = {}, []

    def run(i, prompt, max_tokens):
        try:
            stream = client(server).completions.create(model="m", prompt=prompt, max_tokens=max_tokens,
                                                       temperature=0, stream=True)
            results[i] = "".join(c.choices[0].text for c in stream)
        except Exception as e:  # reported by the assertion below
            errors.append(e)

    def disconnect():
        body = {"prompt": PROMPTS[0], "max_tokens": 60, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            for _ in range(2):
                next(line for line in lines if line.startswith("data:"))

    threads = [threading.Thread(target=run, args=(i, p, n)) for i, (p, n) in enumerate(cases)]
    threads.append(threading.Thread(target=disconnect))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for i, (prompt, max_tokens) in enumerate(cases):
        assert results[i] == reference(model_dir, prompt, "tidar", max_tokens), i
    health = httpx.get(server.url + "/health").json()
    assert health["batch_occupancy"] == 0 and health["queue_length"] == 0  # every row came back


@pytest.mark.parametrize("body,param", [
    (b'{"prompt": "x", "max_tokens": ', None),                           # malformed JSON
    (json.dumps({"prompt": "x", "max_tokens": "many"}).encode(), "max_tokens"),
    (json.dumps({"prompt": "x", "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"prompt": "x", "temperature": "hot"}).encode(), "temperature"),
    (json.dumps({"prompt": [1, 2, 100000]}).encode(), "prompt"),          # outside the vocabulary
    (json.dumps({"prompt": "def " * 200, "max_tokens": 4}).encode(), "prompt"),  # longer than the context
    (json.dumps({"prompt": "def " * 200}).encode(), "prompt"),                    # ... with the default max_tokens
    (json.dumps({"prompt": [5] * 50, "max_tokens": 80}).encode(), "max_tokens"),  # fits, its completion not
    (json.dumps({"max_tokens": 4}).encode(), "prompt"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(servers, body, param):
    server = servers["ar"]
    response = httpx.post(server.url + "/v1/completions", content=body,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param:
        assert error["param"] == param or error["param"].startswith(param), error
    ok = client(server).completions.create(model="m", prompt="x = ", max_tokens=3, temperature=0)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_metrics_parse_and_count_the_requests(model_dir):
    from prometheus_client.parser import text_string_to_metric_families

    app, engine = build(model_dir, mode="tidar", max_batch=2, max_model_len=96)
    with BackgroundServer(app, engine) as server:
        api = client(server)
        usages = [api.completions.create(model="m", prompt=p, max_tokens=10, temperature=0).usage.model_dump()
                  for p in PROMPTS[:3]]
        assert httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 0}).status_code == 400
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("tidar_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] == 3
    assert samples[("tidar_requests_total", (("endpoint", "/v1/completions"), ("status", "400")))] == 1
    assert samples[("tidar_generation_tokens_total", ())] == sum(u["completion_tokens"] for u in usages)
    assert samples[("tidar_prompt_tokens_total", ())] == sum(u["prompt_tokens"] for u in usages)
    assert samples[("tidar_sequence_passes_total", ())] == sum(u["forward_passes"] for u in usages)
    # one request at a time: each decoding pass (every pass but the prefill) at the checkpoint's block
    by_block = {labels: value for (name, labels), value in samples.items()
                if name == "tidar_sequence_passes_by_block_total"}
    assert by_block == {(("block", str(engine.block)),): sum(u["forward_passes"] - 1 for u in usages)}
    # the tokens each decoding pass gave its request (the prefill gives the first one), after max_tokens
    assert samples[("tidar_tokens_per_pass_count", ())] == sum(u["forward_passes"] - 1 for u in usages)
    assert samples[("tidar_tokens_per_pass_sum", ())] == sum(u["completion_tokens"] - 1 for u in usages)
    assert samples[("tidar_request_latency_seconds_count", ())] == 3
    assert samples[("tidar_batch_occupancy", ())] == 0 and samples[("tidar_queue_length", ())] == 0


def test_stop_strings_cut_streams_and_completions_alike(servers, model_dir):
    api = client(servers["tidar"])
    full = reference(model_dir, PROMPTS[0], "tidar", 30)
    stop = full[len(full) // 2:len(full) // 2 + 2]  # a string the completion is known to contain
    got = api.completions.create(model="m", prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=[stop])
    assert got.choices[0].text == full[:full.find(stop)] and got.choices[0].finish_reason == "stop"
    stream = api.completions.create(model="m", prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=[stop],
                                    stream=True)
    assert "".join(c.choices[0].text for c in stream) == got.choices[0].text  # nothing sent twice


def test_a_failed_pass_ends_its_requests_and_the_engine_goes_on(model_dir):
    app, engine = build(model_dir, mode="tidar", max_batch=2, max_model_len=96)
    with BackgroundServer(app, engine) as server:
        real = engine.model.forward
        engine.model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory (simulated)"))
        failed = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4}, timeout=60)
        assert failed.status_code == 500 and "out of memory (simulated)" in failed.json()["error"]["message"]
        engine.model.forward = real
        ok = client(server).completions.create(model="m", prompt="x = ", max_tokens=3, temperature=0)
        assert ok.choices[0].text and httpx.get(server.url + "/health").json()["batch_occupancy"] == 0
