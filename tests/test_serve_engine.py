"""The serving engine's parts without HTTP: the output processor's incremental detokenization against decoding
the whole output at once (three tokenizer kinds, random and multi-byte streams, stop strings), its cost in
decoded tokens for a 4,096-token completion, the scheduler's back-pressure, and faults that end only their
own sequence while the others finish with the outputs they have alone."""

import random
import threading

import pytest
import sentencepiece as spm
import torch

from tidar_megatron.data.tokenizer import Tokenizer, train_sentencepiece
from tidar_megatron.errors import TiDARError
from tidar_megatron.inference.decoding import Decoder
from tidar_megatron.inference.sampling import SamplingConfig
from tidar_megatron.inference import decoding as decoding_module
from tidar_megatron.layout import TiDARLayout
from tidar_megatron.serving import runner as runner_module
from tidar_megatron.serving.block_policy import AUTO_ROWS, BlockPolicy
from tidar_megatron.serving.engine import Engine, EngineStopped, QueueFull, Request
from tidar_megatron.serving.output import IncrementalDetokenizer, OutputProcessor
from tidar_megatron.serving.scheduler import Sequence
from tidar_megatron.testing import tiny_hf_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TEXT = ("def add(a, b):\n    return a + b  # sum\n\nclass Punkt:\n    größe = 'Größe'  # ü ö ä ß\n"
        "    name = \"日本語のテキスト\"\n    emoji = '😀🚀 €uro'\n    print(f\"{x!r} -> {y}\")\n")
EXTRA = "Ωμέγα ψ 한국어 ñandú ☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 "  # characters the tokenizers saw rarely or never: byte tokens


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """The project's SentencePiece (no dummy prefix), a Llama-style one (dummy prefix: decoding drops the
    first token's leading space) and a Hugging Face byte-level BPE, all with bytes for unseen characters."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tokenizers")
    train_sentencepiece([TEXT * 20], str(path / "code.model"), vocab_size=400)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT.split("\n") * 20), model_prefix=str(path / "llama"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, add_dummy_prefix=True,
                                   normalization_rule_name="identity", character_coverage=0.98, minloglevel=2,
                                   hard_vocab_limit=False)
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([TEXT] * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(path / "hf")
    return {"sentencepiece": Tokenizer(str(path / "code.model")), "llama": Tokenizer(str(path / "llama.model")),
            "byte-level": Tokenizer(str(path / "hf"))}


class CountingTokenizer:
    """A tokenizer whose `decode` counts the tokens it is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids):
        self.decoded += len(ids)
        return self.tokenizer.decode(ids)


def streams(tok, rng: random.Random):
    """Token streams: encoded text (multi-byte characters, bytes for unseen ones), uniformly random ids (any
    piece: bytes that make no character, control tokens), and text with random ids spliced in."""
    text = tok.encode(TEXT + EXTRA + TEXT[:40])
    yield text
    yield [rng.randrange(tok.vocab_size) for _ in range(300)]
    spliced = list(text)
    for _ in range(20):
        spliced.insert(rng.randrange(len(spliced)), rng.randrange(tok.vocab_size))
    yield spliced
    yield tok.encode(" leading space") + tok.encode(" and " + EXTRA)


def passes(ids, rng: random.Random):
    """`ids` cut into passes of 1..5 tokens, as a TiDAR engine makes them final."""
    i = 0
    while i < len(ids):
        n = rng.randint(1, 5)
        yield ids[i:i + n]
        i += n


@pytest.mark.parametrize("kind", ["sentencepiece", "llama", "byte-level"])
def test_incremental_detokenization_equals_decoding_the_whole_output(tokenizers, kind):
    tok, rng = tokenizers[kind], random.Random(0)
    for ids in streams(tok, rng):
        for _ in range(5):
            detokenizer, text = IncrementalDetokenizer(tok), ""
            chunks = list(passes(ids, rng))
            for k, chunk in enumerate(chunks):
                text += detokenizer.add(chunk, final=k == len(chunks) - 1)
                assert tok.decode(ids).startswith(text)  # nothing given out is taken back
            assert text == tok.decode(ids)
    # A pass of tokens without text (SentencePiece drops control pieces), then one that starts with a space
    # which a dummy-prefix tokenizer drops from the first piece of a decode.
    chunks = [tok.encode("x = add"), [tok.eod_id, tok.eod_id], tok.encode(" return a"), tok.encode(" b")]
    detokenizer = IncrementalDetokenizer(tok)
    text = "".join(detokenizer.add(chunk, final=k == 3) for k, chunk in enumerate(chunks))
    assert text == tok.decode(sum(chunks, []))


def run_output(processor, tokens_per_pass, max_tokens, stop=()):
    seq = Sequence(Request([1, 2, 3], max_tokens, stop=list(stop)), row=0)
    text, events = "", []
    for tokens in tokens_per_pass:
        event = processor.process(seq, tokens)
        seq.passes += 1
        text += event.text
        events.append(event)
        if event.finish_reason is not None:
            break
    return text, events


@pytest.mark.parametrize("kind", ["sentencepiece", "byte-level"])
def test_stop_strings_cut_where_the_whole_text_first_holds_one(tokenizers, kind):
    tok, rng = tokenizers[kind], random.Random(1)
    ids = tok.encode(TEXT + EXTRA)
    full = tok.decode(ids)
    for stop in (["größe"], ["return", "Punkt"], ["😀🚀"], ["日本語の", "never there"], ["sum\n\nclass"]):
        cut = min(full.find(s) for s in stop if s in full)
        text, events = run_output(OutputProcessor(tok, [tok.eod_id]), passes(ids, rng), len(ids) + 1, stop)
        assert text == full[:cut] and events[-1].finish_reason == "stop"
        assert all(e.finish_reason is None for e in events[:-1])
    text, events = run_output(OutputProcessor(tok, [tok.eod_id]), passes(ids + [tok.eod_id], rng), 10 ** 6)
    assert text == full and events[-1].finish_reason == "stop"  # EOS ends the text and is left out of it
    text, events = run_output(OutputProcessor(tok, [tok.eod_id]), passes(ids, rng), 17)
    assert text == tok.decode(ids[:17]) and events[-1].usage["completion_tokens"] == 17
    assert events[-1].finish_reason == "length"


def test_a_4096_token_completion_decodes_each_token_a_few_times(tokenizers):
    tok = tokenizers["sentencepiece"]
    ids = (tok.encode(TEXT + EXTRA) * 60)[:4096]
    counting = CountingTokenizer(tok)
    text, events = run_output(OutputProcessor(counting, []), passes(ids, random.Random(2)), 4096)
    assert text == tok.decode(ids) and events[-1].finish_reason == "length"
    # Each token sits in the decode windows of about two passes, a few more when a character's bytes span
    # passes; re-decoding the whole text on each of the ~1,365 passes would decode ~2.8 million tokens.
    assert counting.decoded <= 6 * 4096, counting.decoded


# --- the engine --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_hf_checkpoint(path, tidar_mask_token_id=127, tidar_draft_block_size=4, eos_token_id=None)
    return Decoder.from_pretrained(path)


def drive(engine, requests):
    """Submit `requests`, step the engine (on this thread) until all finished; returns their events."""
    events = {r.id: [] for r in requests}
    for r in requests:
        r.on_event = events[r.id].append
        engine.submit(r)
    with torch.inference_mode():
        while any(not e or e[-1].finish_reason is None for e in events.values()):
            engine.step()
    return events


def tokens_of(events) -> list[int]:
    return [t for e in events for t in e.tokens]


def test_a_full_waiting_queue_refuses_requests_until_rows_take_some(decoder):
    engine = Engine(decoder, None, "tidar", max_batch=2, max_model_len=64, max_waiting=3)
    for _ in range(3):
        engine.submit(Request([5, 6, 7], 4, on_event=lambda e: None))
    with pytest.raises(QueueFull, match="max-waiting"):
        engine.submit(Request([5, 6, 7], 4))
    assert len(engine.waiting) == 3
    with torch.inference_mode():
        engine.step()  # two requests take the two rows
    assert engine.occupancy == 2 and len(engine.waiting) == 1
    engine.submit(Request([5, 6, 7], 4))


@pytest.mark.parametrize("mode", ["tidar", "ar"])
def test_a_sequence_whose_step_raises_ends_alone(decoder, monkeypatch, mode):
    """Five sequences in three rows; one's decoding step raises in the middle of the batched pass (after
    other sequences' state moved), one's prefill raises: those two end with "error", the others finish with
    the tokens each gives alone (greedy ones: Decoder.generate's)."""
    bad_step, bad_prefill = SamplingConfig(0.8), SamplingConfig(0.9)
    real = {name: getattr(decoding_module, name) for name in ("tidar_step", "prefill_select", "ar_step")}
    prefilling = [False]

    def core(name):
        """The decoding core's call `name`, raising when a row of the batch has the bad settings (every call
        takes the rows' RowSampling second to last)."""
        def call(*args):
            sampling = args[-2]
            prefill = name == "prefill_select" or (name == "ar_step" and prefilling[0])
            bad = (bad_prefill if prefill else bad_step).temperature
            if bool((~sampling.greedy & (sampling.temperature == bad)).any()):
                raise FloatingPointError(f"bad {'prefill' if prefill else 'step'} (simulated)")
            return real[name](*args)
        return call

    def prefill(self, seqs):
        prefilling[0] = True
        try:
            return real_prefill(self, seqs)
        finally:
            prefilling[0] = False

    real_prefill = runner_module.Runner.prefill
    monkeypatch.setattr(runner_module.Runner, "prefill", prefill)
    for name in real:
        monkeypatch.setattr(decoding_module, name, core(name))
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14], [15, 16, 17, 18, 19]]
    samplings = [SamplingConfig(), SamplingConfig(1.0), bad_step, bad_prefill, SamplingConfig()]

    def requests():
        return [Request(p, 12 + 3 * i, s, seed=i) for i, (p, s) in enumerate(zip(prompts, samplings))]

    engine = Engine(decoder, None, mode, max_batch=3, max_model_len=64)
    together = drive(engine, batch := requests())
    alone = [drive(engine, [r])[r.id] for r in requests()]
    for i, r in enumerate(batch):
        if r.sampling in (bad_step, bad_prefill):
            assert together[r.id][-1].finish_reason == alone[i][-1].finish_reason == "error"
            assert "simulated" in together[r.id][-1].usage["error"]
            continue
        assert tokens_of(together[r.id]) == tokens_of(alone[i]) and together[r.id][-1].finish_reason == "length"
        if r.sampling.greedy:
            assert tokens_of(together[r.id]) == decoder.generate(r.prompt_ids, r.max_tokens, mode=mode).tokens[0]
    assert engine.occupancy == 0 and not engine.waiting


def test_a_fault_of_the_engine_itself_ends_its_requests_and_refuses_new_ones(decoder, monkeypatch):
    """Not a request's fault (those end alone, above): the engine thread stops, nothing is left waiting."""
    engine = Engine(decoder, None, "tidar", max_batch=2, max_model_len=64)
    events = []
    monkeypatch.setattr(engine.scheduler, "schedule", lambda: 1 / 0)
    for prompt in ([5, 6], [7, 8], [9, 10]):
        engine.submit(Request(prompt, 4, on_event=events.append))
    engine.start()
    engine.thread.join(timeout=30)
    assert not engine.thread.is_alive() and engine.failed.startswith("ZeroDivisionError")
    assert len(events) == 3 and all(e.finish_reason == "error" for e in events)
    with pytest.raises(TiDARError, match="restart the server"):
        engine.submit(Request([5, 6], 4))


def test_on_loopback_one_request_whose_step_raises_fails_alone_among_streams(tmp_path, monkeypatch):
    """The collateral-failure trial through the real `openai` client: four greedy streams are running when a
    request whose decoding step raises arrives; it gets a 500, every stream the text it gets alone."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from tidar_megatron.serving.server import BackgroundServer, build

    train_sentencepiece([TEXT * 20], str(tmp_path / "tokenizer.model"), vocab_size=400)
    tok = Tokenizer(str(tmp_path / "tokenizer.model"))
    tiny_hf_checkpoint(tmp_path, vocab_size=tok.vocab_size, tidar_mask_token_id=tok.mask_id,
                       tidar_draft_block_size=4, eos_token_id=None)
    real = decoding_module.tidar_step

    def step(logits, pending, draft_probs, groups, beta, sampling, counters):
        if bool((sampling.temperature == 0.123).any()):  # the batch holds the bad request's row
            raise FloatingPointError("probability tensor contains nan (simulated)")
        return real(logits, pending, draft_probs, groups, beta, sampling, counters)

    monkeypatch.setattr(decoding_module, "tidar_step", step)
    prompts = ["def add(a, b):\n", "class Punkt:\n", "    größe = ", "print(f\"{x"]
    app, engine = build(tmp_path, mode="tidar", max_batch=4, max_model_len=96)
    with BackgroundServer(app, engine) as server:
        api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        alone = [api.completions.create(model="m", prompt=p, max_tokens=40, temperature=0).choices[0].text
                 for p in prompts]
        together, started, errors = {}, [threading.Event() for _ in prompts], []

        def stream(i):
            try:
                text = ""
                for chunk in api.completions.create(model="m", prompt=prompts[i], max_tokens=40, temperature=0,
                                                    stream=True):
                    started[i].set()
                    text += chunk.choices[0].text
                together[i] = text
            except Exception as e:  # reported by the assertion below
                errors.append(e)
                started[i].set()

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for event in started:
            event.wait(timeout=60)
        with pytest.raises(openai.InternalServerError, match="simulated"):
            api.completions.create(model="m", prompt=prompts[0], max_tokens=20, temperature=0.123, seed=1)
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert [together[i] for i in range(len(prompts))] == alone
        assert engine.occupancy == 0 and not engine.waiting


def test_a_smaller_block_under_load_leaves_greedy_output_unchanged(decoder, monkeypatch):
    """--block-by-load 3:2: passes over three or more sequences use block 2, fewer the checkpoint's 4; as
    requests arrive and finish the block shrinks and grows again (the pending drafts cut, or padded with
    certain proposals), and every greedy output is still the AR model's."""
    engine = Engine(decoder, None, "tidar", max_batch=4, max_model_len=64, block_policy=BlockPolicy.parse("3:2"))
    blocks, block_for = [], engine.runner.block_for
    monkeypatch.setattr(engine.runner, "block_for", lambda *a: blocks.append(block_for(*a)) or blocks[-1])
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14], [15, 16, 17, 18, 19]]
    requests = [Request(p, 6 + 5 * i, SamplingConfig(0.9) if i == 2 else SamplingConfig(), seed=i)
                for i, p in enumerate(prompts)]
    events = {r.id: [] for r in requests}
    for r in requests:
        r.on_event = events[r.id].append
    with torch.inference_mode():
        for r in requests[:2]:
            engine.submit(r)
        for _ in range(2):
            engine.step()
        for r in requests[2:]:
            engine.submit(r)
        while any(not e or e[-1].finish_reason is None for e in events.values()):
            engine.step()
    assert blocks[:2] == [4, 4] and 2 in blocks and blocks[-1] == 4, blocks  # shrank under load, grew back
    for i, r in enumerate(requests):
        assert events[r.id][-1].finish_reason == "length" and len(tokens_of(events[r.id])) == r.max_tokens
        if i != 2:
            assert tokens_of(events[r.id]) == decoder.generate(r.prompt_ids, r.max_tokens, mode="ar").tokens[0]
        else:  # seeded and sampled: it kept the checkpoint's block, so it drew what it draws alone
            alone = decoder.generate(r.prompt_ids, r.max_tokens, sampling=r.sampling, seed=[r.seed])
            assert tokens_of(events[r.id]) == alone.tokens[0]


def test_the_auto_policy_takes_the_largest_block_whose_rows_fit():
    """auto: the checkpoint's block for one sequence, else the largest block b with n x (the decoding
    layout's rows at b) within the device's rows, at least 2, never larger under more load; a table and off
    as given."""
    for device, rows in AUTO_ROWS.items():
        policy = BlockPolicy.parse("auto").for_checkpoint(8, device)
        assert policy.rows == rows and str(policy) == f"auto:{rows}"
        chosen = [policy.block(n, 8) for n in range(1, 300)]
        assert chosen == sorted(chosen, reverse=True) and chosen[-1] == 2, chosen
        assert chosen[0] == 8
        for n, b in enumerate(chosen[1:], 2):
            assert b == 2 or n * TiDARLayout.for_decoding(0, b).seq_len <= rows, (n, b)
            assert b == 8 or n * TiDARLayout.for_decoding(0, b + 1).seq_len > rows, (n, b)
    assert [BlockPolicy.parse("auto:40").block(n, 4) for n in (1, 2, 3, 4)] == [4, 4, 3, 2]
    assert [BlockPolicy.parse("16:4,48:2").block(n, 8) for n in (15, 16, 47, 48, 500)] == [8, 4, 4, 2, 2]
    assert BlockPolicy.parse("off").block(10 ** 6, 8) == 8
    # pinned (seeded sampled) sequences run at the full block and their rows count first: 128 - 72 = 56 rows
    # for three sequences is block 3 (3 x 12), where four unpinned ones would get 5 (4 x 30 <= 128)
    assert BlockPolicy("auto", 128).block(4, 8, pinned=1) == 3 and BlockPolicy("auto", 128).block(4, 8) == 5
    assert BlockPolicy("auto", 128).block(3, 8, pinned=2) == 2  # nothing left: the smallest block
    for bad in ("auto:0", "auto:x", "auto:", "sometimes", "16:", "16", "", "16:4,16:2", "16:4,"):
        with pytest.raises(ValueError, match="--block-by-load"):
            BlockPolicy.parse(bad)


def test_seeded_sampled_requests_keep_the_block_while_the_others_shrink(decoder, monkeypatch):
    """auto:12 on a block-4 checkpoint (20 rows a sequence): greedy and unseeded sampled requests decode with
    block 2 among others (4 alone), a seeded sampled one keeps block 4 in a forward of its own in the same pass;
    each greedy output is the AR model's and the seeded one's tokens are those it gets alone."""
    engine = Engine(decoder, None, "tidar", max_batch=4, max_model_len=64, block_policy=BlockPolicy.parse("auto:12"))
    passes, decode, forward = [], engine.runner.decode, engine.runner._decode  # passes: [(block, ids) per forward]
    monkeypatch.setattr(engine.runner, "decode", lambda seqs: passes.append([]) or decode(seqs))
    monkeypatch.setattr(engine.runner, "_decode", lambda seqs, block: passes[-1].append(
        (block, {s.request.id for s in seqs})) or forward(seqs, block))
    seeded = Request([9, 10, 11], 14, SamplingConfig(0.9), seed=7)
    unseeded = Request([12, 13], 10, SamplingConfig(0.9))
    greedy = [Request([5, 6, 7, 8], 12, seed=3), Request([14], 9)]
    events = drive(engine, [seeded, unseeded, *greedy])
    for p in passes:  # the policy's block for the whole pass's load (2 from two sequences on), 4 for the seeded
        load = sum(len(ids) for _, ids in p)
        assert all(block == (4 if seeded.id in ids or load == 1 else 2) for block, ids in p), passes
    assert any(sorted(block for block, _ in p) == [2, 4] for p in passes), passes  # one pass, two forwards
    alone = decoder.generate(seeded.prompt_ids, seeded.max_tokens, sampling=seeded.sampling, seed=[7])
    assert tokens_of(events[seeded.id]) == alone.tokens[0]
    for r in greedy:
        assert tokens_of(events[r.id]) == decoder.generate(r.prompt_ids, r.max_tokens, mode="ar").tokens[0]
    assert len(tokens_of(events[unseeded.id])) == unseeded.max_tokens


def test_block_by_load_is_checked_against_the_checkpoint(decoder):
    with pytest.raises(TiDARError, match="BLOCK in \\[2, 4\\]"):
        Engine(decoder, None, "tidar", max_batch=2, max_model_len=64, block_policy=BlockPolicy.parse("8:6"))


def test_a_stopped_engine_refuses_submits(decoder):
    engine = Engine(decoder, None, "tidar", max_batch=2, max_model_len=64)
    engine.start()
    engine.stop()
    with pytest.raises(EngineStopped, match="restart the server"):
        engine.submit(Request([5, 6], 4))


def test_prefills_past_the_token_budget_run_in_several_forwards(decoder):
    """Five prompts with a budget of two at a time: three prefill forwards, outputs as the AR model's."""
    engine = Engine(decoder, None, "tidar", max_batch=5, max_model_len=64)
    engine.runner.prefill_tokens = 2 * (5 + engine.block)
    forwards = []
    engine.runner.on_forward = lambda block, sequences: forwards.append(block)
    requests = [Request(p, 6) for p in ([5, 6, 7, 8], [9, 10], [11, 12, 13], [14], [15, 16, 17, 18, 19])]
    with torch.inference_mode():
        for r in requests:
            engine.submit(r)
        admitted = engine.scheduler.schedule()
        first = engine.runner.prefill(admitted)
    assert forwards == [None] * 3  # prefills
    for seq, tokens in zip(admitted, first):
        assert tokens == decoder.generate(seq.request.prompt_ids, 1, mode="ar").tokens[0]
