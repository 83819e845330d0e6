"""The decoding core (inference/step.py): the batched TiDAR step against a per-sequence brute force, per-row
random streams (a sequence's draws do not depend on its batch), numerically safe sampling, one host transfer
per pass, and the one context rule on every decoding path."""

import json

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from tidar_megatron.evaluation.evaluate import main as evaluate_main
from tidar_megatron.inference.decoding import Decoder
from tidar_megatron.inference.generate import main as generate_main
from tidar_megatron.inference.sampling import RowSampling, SamplingConfig, probabilities, uniforms
from tidar_megatron.inference.step import ContextError, check_context, fit_context, new_tokens, tidar_step
from tidar_megatron.layout import TiDARLayout
from tidar_megatron.serving.engine import Engine, Request
from tidar_megatron.testing import tiny_hf_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MASK, BLOCK, VOCAB, POSITIONS = 31, 3, 32, 64
EXTREME = [SamplingConfig(1e-39), SamplingConfig(1e-300), SamplingConfig(1.0, 1e-300), SamplingConfig(1e-300, 1e-300)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("step")
    tiny_hf_checkpoint(path, "qwen2", vocab_size=VOCAB, initializer_range=0.3, tidar_mask_token_id=MASK,
                       tidar_draft_block_size=BLOCK, max_position_embeddings=POSITIONS, eos_token_id=None,
                       bos_token_id=None)
    return path


@pytest.fixture(scope="module")
def decoder(model_dir):
    return Decoder.from_pretrained(model_dir)


# --- the batched step against a brute force, one sequence at a time, written from the definition ---------
def _distribution(logits, setting: SamplingConfig):
    logits = logits.double()
    if setting.greedy:
        return torch.nn.functional.one_hot(logits.argmax(), len(logits)).double()
    probs = torch.softmax((logits - logits.max()) / setting.temperature, -1)
    order = probs.argsort(descending=True)
    kept, mass = torch.zeros_like(probs), 0.0
    for token in order.tolist():
        kept[token] = probs[token]
        mass += probs[token].item()
        if mass >= setting.top_p:
            break
    return kept / kept.sum()


def _inverse_cdf(probs, u):
    cdf = probs.cumsum(0)
    return int((cdf > u * cdf[-1]).nonzero()[0])


def brute_force_step(logits, pending, draft_probs, groups, beta, setting, u):
    """One sequence: logits [width, V], pending [B] -> (accepted, next pending block)."""
    block = len(pending)
    p = [_distribution(beta * logits[i] + (1 - beta) * logits[groups[i][0]], setting) for i in range(block)]
    q = [d.double() for d in draft_probs]
    accepted = 1
    while accepted < block and u[accepted - 1] * q[accepted - 1][pending[accepted]] < \
            p[accepted - 1][pending[accepted]]:
        accepted += 1
    target = p[accepted - 1]
    if accepted < block:
        residual = (target - q[accepted - 1]).clamp(min=0)
        target = residual / residual.sum() if residual.sum() > 0 else target
    token = _inverse_cdf(target, u[block - 1])
    chosen = logits[groups[accepted - 1]]
    drafts = [_inverse_cdf(_distribution(chosen[j], setting), u[block + j - 1]) for j in range(1, block)]
    return accepted, [token] + drafts


def test_batched_step_equals_a_per_sequence_brute_force():
    g = torch.Generator().manual_seed(0)
    block, vocab, beta = 4, 12, 0.7
    settings = [SamplingConfig(), SamplingConfig(0.9), SamplingConfig(1.3, 0.8), SamplingConfig(),
                SamplingConfig(0.5, 0.95), SamplingConfig(2.0)] * 4
    b = len(settings)
    groups = TiDARLayout.for_decoding(0, block).full_block_rows
    width = TiDARLayout.for_decoding(0, block).seq_len
    logits = 2 * torch.randn(b, width, vocab, generator=g)
    pending = torch.randint(0, vocab, (b, block), generator=g)
    draft_probs = torch.softmax(2 * torch.randn(b, block - 1, vocab, generator=g), -1)
    for i, s in enumerate(settings):
        if s.greedy:  # a greedy row's drafts are certain
            draft_probs[i] = torch.nn.functional.one_hot(pending[i, 1:], vocab).float()
        else:  # sampled drafts were drawn where their distribution has mass
            pending[i, 1:] = torch.multinomial(draft_probs[i], 1, generator=g)[:, 0]
    counters = torch.arange(b) * 3 + 1
    rows = RowSampling.of(settings, list(range(b)), "cpu")
    result = tidar_step(logits, pending, draft_probs, groups, beta, rows, counters)
    packed = result.packed.tolist()
    u = uniforms(rows.keys, counters, 0, 2 * block - 1)
    seen = set()
    for i, s in enumerate(settings):
        expected = brute_force_step(logits[i], pending[i].tolist(), draft_probs[i], groups.tolist(), beta, s, u[i])
        assert (packed[i][0], packed[i][1:]) == expected, i
        seen.add(expected[0])
    assert {1, block} <= seen  # rejections and whole blocks both checked


# --- a sequence's tokens do not depend on its batch --------------------------------------------------------
@pytest.mark.parametrize("mode", ["tidar", "ar"])
def test_a_sampled_sequence_is_the_same_alone_and_in_a_mixed_batch(decoder, mode):
    prompt = [3, 9, 4, 17, 2]
    alone = decoder.generate(prompt, 14, mode, SamplingConfig(0.9), seed=[1234]).tokens[0]
    batch = decoder.generate([[5, 6], prompt, [7, 8, 9, 10, 11, 12, 13], prompt], 14, mode,
                             [SamplingConfig(), SamplingConfig(0.9), SamplingConfig(1.4, 0.7), SamplingConfig(0.9)],
                             seed=[1, 1234, 99, 4321]).tokens
    assert batch[1] == alone
    assert batch[3] != alone  # another seed, another stream
    assert batch[0] == decoder.generate([5, 6], 14, mode).tokens[0]  # the greedy row stays greedy


def test_the_engine_gives_each_request_its_own_stream(model_dir, decoder):
    """Greedy and sampled requests in one pass, each equal to the Decoder's output for it alone."""
    requests = [([3, 9, 4, 17, 2], SamplingConfig(0.9), 1234), ([5, 6], SamplingConfig(), None),
                ([7, 8, 9, 10], SamplingConfig(1.4, 0.7), 7), ([3, 9, 4], SamplingConfig(1e-300), 5)]
    engine = Engine(Decoder.from_pretrained(model_dir), None, "tidar", max_batch=4, max_model_len=POSITIONS)
    outputs = {i: [] for i in range(len(requests))}
    for i, (prompt, sampling, seed) in enumerate(requests):
        engine.submit(Request(prompt, 12, sampling, seed, on_event=lambda e, i=i: outputs[i].extend(e.tokens)))
    with torch.inference_mode():
        while engine.waiting or engine.occupancy:
            engine.step()
    for i, (prompt, sampling, seed) in enumerate(requests):
        alone = decoder.generate(prompt, 12, "tidar", sampling, seed=[seed if seed is not None else 0]).tokens[0]
        assert outputs[i] == alone, i


# --- numerically safe sampling -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["tidar", "ar"])
def test_extreme_temperatures_and_top_p_are_the_greedy_limit(decoder, mode):
    prompts = [[3, 9, 4, 17, 2], [5, 6, 1]]
    greedy = decoder.generate(prompts, 16, mode).tokens
    for setting in EXTREME:
        assert decoder.generate(prompts, 16, mode, setting, seed=3).tokens == greedy, setting


# --- one host transfer per pass ----------------------------------------------------------------------------
class _Reads:
    """Counts the ways a tensor's values reach Python."""
    NAMES = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counted(original))

    def _counted(self, original):
        def read(tensor, *args, **kwargs):
            self.count += 1
            return original(tensor, *args, **kwargs)
        return read


@pytest.mark.parametrize("mode", ["tidar", "ar"])
def test_a_pass_reads_its_results_back_once(decoder, monkeypatch, mode):
    prompts = [[3, 9, 4, 17, 2], [5, 6], [7, 8, 9]]
    settings = [SamplingConfig(), SamplingConfig(0.8), SamplingConfig(1.2, 0.9)]
    stream = decoder.stream(prompts, [10, 4, 7], mode, settings, seed=[1, 2, 3])
    reads, passes = _Reads(monkeypatch), 0
    while True:
        before = reads.count
        try:
            next(stream)
        except StopIteration:
            break
        passes += 1
        assert reads.count - before == 1, f"pass {passes}: {reads.count - before} reads"
    assert passes > 2


def test_an_engine_pass_reads_its_results_back_once(model_dir, monkeypatch):
    engine = Engine(Decoder.from_pretrained(model_dir), None, "tidar", max_batch=3, max_model_len=POSITIONS)
    for prompt, sampling in (([3, 9, 4], SamplingConfig()), ([5, 6], SamplingConfig(0.8)), ([7], SamplingConfig(1.5))):
        engine.submit(Request(prompt, 20, sampling, 1, on_event=lambda e: None))
    with torch.inference_mode():
        engine.step()  # three prefills and the first shared pass
        reads = _Reads(monkeypatch)
        for _ in range(3):
            before = reads.count
            engine.step()
            assert reads.count - before == 1 and engine.occupancy == 3


# --- the context rule ---------------------------------------------------------------------------------------
def test_the_context_rule_clamps_or_refuses_with_one_line():
    assert fit_context(10, 20, 64) == (20, None) and fit_context(10, 200, None) == (200, None)
    room, note = fit_context(10, 200, 64, "prompt 2: ", "--max-new-tokens")
    assert room == 54 and "\n" not in note and all(s in note for s in ("prompt 2", "200", "64", "54"))
    for prompt_len in (64, 80):
        with pytest.raises(ContextError, match="use at most 63") as e:
            fit_context(prompt_len, 5, 64)
        assert e.value.param == "prompt"
    with pytest.raises(ContextError, match="lower max_tokens to 14") as e:
        check_context(50, 20, 64, "", "max_tokens")
    assert e.value.param == "max_new_tokens"


def test_the_decoder_refuses_what_does_not_fit(decoder):
    with pytest.raises(ContextError, match="needs 70 positions, the model has 64"):
        decoder.generate([1] * 20, 50)


def test_generate_past_the_context_is_clamped_and_said(model_dir, capsys):
    assert generate_main(["--model", str(model_dir), "--prompt-ids", "3,14,15,9", "--mode", "ar",
                          "--max-new-tokens", "200"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.split()) == POSITIONS - 4
    note = [line for line in captured.err.splitlines() if "positions" in line]
    assert len(note) == 1 and "--max-new-tokens 200" in note[0] and f"generating {POSITIONS - 4}" in note[0]
    assert generate_main(["--model", str(model_dir), "--prompt-ids", ",".join(["3"] * 70)]) == 2
    assert "70 tokens do not fit the model's context of 64" in capsys.readouterr().err


def test_evaluate_clamps_long_prompts_and_windows(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_ids": [3] * 40}) + "\n" + json.dumps({"prompt_ids": [4, 5]}) + "\n")
    builder = IndexedDatasetBuilder(str(tmp_path / "docs.bin"), dtype=DType.optimal_dtype(VOCAB))
    for doc in ([3, 4, 5] * 60, [6, 7] * 20):
        builder.add_document(np.asarray(doc), [len(doc)])
    builder.finalize(str(tmp_path / "docs.idx"))
    out = tmp_path / "results.json"
    assert evaluate_main(["--model", str(model_dir), "--prompts", str(prompts), "--max-new-tokens", "48",
                          "--data", str(tmp_path / "docs"), "--seq-length", "1024", "--output", str(out),
                          "--quiet"]) == 0
    err = capsys.readouterr().err
    results = json.loads(out.read_text())
    assert results["seq_length"] == POSITIONS and "--seq-length 1024" in err and "windows of 64" in err
    assert "prompt 1: a 40-token prompt plus --max-new-tokens 48" in err and "generating 24" in err
    assert "prompt 2" not in err  # it fits
    assert results["generation"]["ar"]["new_tokens"] == 24 + 48
    prompts.write_text(json.dumps({"prompt_ids": [3] * 64}) + "\n")
    assert evaluate_main(["--model", str(model_dir), "--prompts", str(prompts), "--output", str(out),
                          "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "prompt 1: 64 tokens do not fit the model's context of 64" in err and len(err.strip().splitlines()) == 1


def test_new_tokens_reads_a_packed_row():
    assert new_tokens(None, [0, 7, 8, 9]) == (0, [7], [7, 8, 9])
    assert new_tokens([7, 8, 9], [2, 4, 5, 6]) == (2, [8, 4], [4, 5, 6])
    assert new_tokens([7], [1, 3]) == (1, [3], [3])


def test_any_integer_seed_is_a_stream(decoder):
    """Seeds are taken modulo 2**64 (OpenAI's seeds are 64-bit): 2**64 + 5 is seed 5, and -1 is 2**64 - 1."""
    prompt, sampling = [3, 9, 4, 17, 2], SamplingConfig(1.1)
    assert decoder.generate(prompt, 10, "tidar", sampling, seed=[2 ** 64 + 5]).tokens == \
        decoder.generate(prompt, 10, "tidar", sampling, seed=[5]).tokens
    assert decoder.generate(prompt, 10, "tidar", sampling, seed=[-1]).tokens == \
        decoder.generate(prompt, 10, "tidar", sampling, seed=[2 ** 64 - 1]).tokens


def test_a_row_without_top_p_is_unchanged_by_a_companion_with_it():
    """Per-row settings: a top_p = 1 row's distribution is exactly the one it has alone (float32's cumulative
    sum reaches 1 before a long tail ends, so truncating every row would drop its tail)."""
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(2, 50000, generator=g)
    alone = probabilities(logits[:1], RowSampling.of([SamplingConfig(1.0)], [0], "cpu"))
    both = probabilities(logits, RowSampling.of([SamplingConfig(1.0), SamplingConfig(1.0, 0.5)], [0, 1], "cpu"))
    assert torch.equal(both[0], alone[0]) and (both[0] > 0).all()
    assert (both[1] == 0).any()  # the companion's nucleus is cut
