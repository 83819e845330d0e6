"""TiDAR decoding: lossless greedy, exact KV cache, stops, streaming, batching, and speed-up when trained."""

import pytest
import torch

from tidar_megatron.inference.decoding import Decoder
from tidar_megatron.layout import TiDARLayout
from tidar_megatron.testing import repetitive_corpus, tiny_hf_checkpoint, trained_toy_checkpoint

pytest.importorskip("transformers")  # only to write the tiny checkpoints

MASK_TOKEN_ID = 127
TRAINED_BLOCK_SIZE = 4
CORPUS_TOKEN_IDS = list(range(3, 67))
PROMPTS = [[7], [3, 14, 15, 92, 65], list(range(20, 50)), [5, 5, 5, 5, 5, 5, 5, 5, 9]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def random_decoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("random")
    tiny_hf_checkpoint(path, "qwen3", initializer_range=0.1, tidar_mask_token_id=MASK_TOKEN_ID)
    return Decoder.from_pretrained(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A Qwen2 checkpoint trained with the TiDAR loss on walks around a fixed cycle, saved and reloaded."""
    path = tmp_path_factory.mktemp("trained")
    corpus = repetitive_corpus(512, 33, CORPUS_TOKEN_IDS, num_cycles=1, seed=0)
    trained_toy_checkpoint(path, corpus, 200, tidar_mask_token_id=MASK_TOKEN_ID,
                           tidar_draft_block_size=TRAINED_BLOCK_SIZE)
    return Decoder.from_pretrained(path), corpus


def with_block_size(decoder, block_size):
    return Decoder(decoder.model, decoder.mask_token_id, block_size, decoder.eos_token_ids)


@pytest.mark.parametrize("block_size", [2, 3, 5])
def test_greedy_is_lossless_on_a_random_model(random_decoder, block_size):
    decoder = with_block_size(random_decoder, block_size)
    for prompt in PROMPTS:
        expected = decoder.generate(prompt, 40, mode="ar").tokens
        assert decoder.generate(prompt, 40, mode="tidar").tokens == expected, prompt


@pytest.mark.parametrize("block_size", [TRAINED_BLOCK_SIZE, 3, 6])
def test_greedy_is_lossless_on_a_trained_model(trained, block_size):
    decoder, corpus = trained
    decoder = with_block_size(decoder, block_size)
    histogram = [0] * block_size
    for prompt in PROMPTS + [corpus[0, :10].tolist(), corpus[1, :3].tolist()]:
        expected = decoder.generate(prompt, 48, mode="ar").tokens
        result = decoder.generate(prompt, 48, mode="tidar")
        assert result.tokens == expected, prompt
        histogram = [h + n for h, n in zip(histogram, result.stats.acceptance_histogram)]
    # Both paths were exercised: whole blocks accepted, and drafts rejected.
    assert histogram[-1] > 0 and sum(histogram[:-1]) > 0, histogram


def test_trained_model_makes_several_tokens_per_pass(trained):
    decoder, corpus = trained
    for prompt in (corpus[2, :6].tolist(), corpus[3, :12].tolist()):
        # 40 new tokens: the model was trained on 32-token windows, RoPE beyond that is untrained.
        ar = decoder.generate(prompt, 40, mode="ar")
        tidar = decoder.generate(prompt, 40, mode="tidar")
        assert ar.stats.tokens_per_pass == 1.0
        assert tidar.stats.tokens_per_pass >= 2.0, tidar.stats.summary()
        assert sum(tidar.stats.acceptance_histogram) == tidar.stats.forward_passes - 1  # all but the prefill


def test_batched_prompts_of_different_lengths_match_one_at_a_time(trained):
    decoder, corpus = trained
    prompts = PROMPTS + [corpus[4, :7].tolist()]
    for mode in ("ar", "tidar"):
        batched = decoder.generate(prompts, 30, mode=mode).tokens
        assert batched == [decoder.generate(p, 30, mode=mode).tokens[0] for p in prompts], mode


def test_attending_over_the_whole_cache_changes_nothing(trained):
    """The fixed-shape steps used under CUDA graphs: masked-out stale and unused slots have no effect."""
    decoder, corpus = trained
    whole_cache = with_block_size(decoder, decoder.block_size)
    whole_cache.attend_whole_cache = True
    prompts = [corpus[8, :5].tolist(), [3, 14, 15, 92, 65, 35, 89]]
    for mode in ("ar", "tidar"):
        assert whole_cache.generate(prompts, 30, mode=mode).tokens == decoder.generate(prompts, 30, mode=mode).tokens


def fresh_prefill_cache(model, tokens):
    """Per layer (k, v) [1, n, kv_heads, head_dim] of a causal prefill of `tokens` into a new cache."""
    n, layout = len(tokens), TiDARLayout.causal(len(tokens))
    model.drop_kv_cache()
    model.setup_kv_cache(1, n)
    model(torch.tensor([tokens]), layout.position_ids[None], layout.dense_mask()[None],
          torch.arange(n)[None], n)
    return [(layer.self_attn.kv_cache.k[:, :n].clone(), layer.self_attn.kv_cache.v[:, :n].clone())
            for layer in model.model.layers]


@pytest.mark.parametrize("mode", ["tidar", "ar"])
def test_kv_cache_equals_a_fresh_prefill_of_the_accepted_tokens(trained, mode):
    decoder, corpus = trained
    prompts = [corpus[5, :9].tolist(), [3, 14, 15]]
    accepted = [list(p) for p in prompts]
    snapshots = []  # (row, verified tokens, their cached k/v per layer) after every pass
    for step in decoder.stream(prompts, 40, mode=mode):
        for row, new in enumerate(step.new_tokens):
            accepted[row] += new
            n = step.cached_lengths[row]
            cached = [(layer.self_attn.kv_cache.k[row:row + 1, :n].clone(),
                       layer.self_attn.kv_cache.v[row:row + 1, :n].clone()) for layer in decoder.model.model.layers]
            snapshots.append((accepted[row][:n], cached))
    assert max(len(tokens) for tokens, _ in snapshots) > 40  # the cache grew through the whole generation
    with torch.inference_mode():
        for tokens, cached in snapshots:
            for (k, v), (fresh_k, fresh_v) in zip(cached, fresh_prefill_cache(decoder.model, tokens)):
                torch.testing.assert_close(k, fresh_k, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(v, fresh_v, rtol=1e-5, atol=1e-5)


def test_streaming_yields_the_generated_tokens_as_they_are_accepted(trained):
    decoder, corpus = trained
    prompt = corpus[6, :8].tolist()
    chunks = [step.new_tokens[0] for step in decoder.stream(prompt, 40)]
    assert sum(chunks, []) == decoder.generate(prompt, 40).tokens[0]
    assert len(chunks) < 40 and max(map(len, chunks)) > 1  # several tokens per pass, as they are accepted


@pytest.mark.parametrize("mode", ["tidar", "ar"])
def test_stops_at_max_new_tokens_and_after_eos(trained, mode):
    decoder, corpus = trained
    prompt = corpus[7, :8].tolist()
    full = decoder.generate(prompt, 30, mode=mode).tokens[0]
    for limit in (1, 2, 7, 13):  # limits that fall inside a block of accepted tokens
        assert decoder.generate(prompt, limit, mode=mode).tokens[0] == full[:limit]
    eos = full[9]
    stopping = Decoder(decoder.model, decoder.mask_token_id, decoder.block_size, eos_token_ids=(eos,))
    assert stopping.generate(prompt, 30, mode=mode).tokens[0] == full[:full.index(eos) + 1]
    # In a batch, a finished sequence stops while the others go on.
    batch = stopping.generate([prompt, [3, 14, 15]], 30, mode=mode).tokens
    assert batch[0] == full[:full.index(eos) + 1]
    assert batch[1] == stopping.generate([3, 14, 15], 30, mode=mode).tokens[0]


def test_tidar_without_mask_token_is_a_clear_error(trained):
    decoder, _ = trained
    with pytest.raises(ValueError, match="mask token"):
        Decoder(decoder.model, None, 4).generate([1, 2], 5)
    with pytest.raises(ValueError, match="block_size >= 2"):
        Decoder(decoder.model, MASK_TOKEN_ID, 1).generate([1, 2], 5)
