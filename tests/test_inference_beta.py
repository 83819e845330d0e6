"""The paper's beta: drafts verified against beta * AR + (1 - beta) * diffusion logits.

beta = 1 is today's lossless decoding (tests/test_inference_decoding.py).  beta = 0 greedy is checked
against a brute-force decoder written here from the paper's description, with uncached full forward passes
over the whole decoding layout; sampled tokens at beta = 0.5 against the mixed distribution (chi-square).
"""

import pytest
import torch
from test_inference_sampling import assert_distributed_as

from tidar_megatron.inference.decoding import Decoder
from tidar_megatron.inference.sampling import SamplingConfig, probabilities
from tidar_megatron.layout import TiDARLayout
from tidar_megatron.testing import tiny_hf_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MASK = 31


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("beta")
    tiny_hf_checkpoint(path, "qwen3", vocab_size=32, initializer_range=0.4, tidar_mask_token_id=MASK,
                       tidar_draft_block_size=3)
    return Decoder.from_pretrained(path)


def _full_pass(model, tokens, layout):
    """Logits of every row of `layout` for `tokens`, without a cache."""
    ids = torch.tensor([tokens])
    return model(ids, layout.position_ids[None], layout.dense_mask()[None])[0]


def brute_force(model, prompt, block, beta, max_new):
    """TiDAR decoding as the paper describes it, recomputing everything every pass."""
    def mixed(ar, diffusion):
        return beta * ar + (1 - beta) * diffusion

    layout = TiDARLayout.for_prefill(len(prompt), block)
    logits = _full_pass(model, prompt + [MASK] * block, layout)
    slots = logits[len(prompt):len(prompt) + block]
    out = [int(mixed(logits[len(prompt) - 1], slots[0]).argmax())]
    pending = out[:1] + slots[1:].argmax(-1).tolist()
    prefix = list(prompt)
    while len(out) < max_new:
        m = len(prefix)
        layout = TiDARLayout.for_decoding(m, block)
        logits = _full_pass(model, prefix + pending + [MASK] * (layout.seq_len - layout.clean_len), layout)
        group_rows = [list(layout.block_rows(a - 1)) for a in range(1, block + 1)]  # group a starts at m + a
        target = [int(mixed(logits[m + i], logits[group_rows[i][0]]).argmax()) for i in range(block)]
        accepted = 1
        while accepted < block and pending[accepted] == target[accepted - 1]:
            accepted += 1
        out += pending[1:accepted] + [target[accepted - 1]]
        prefix += pending[:accepted]
        chosen = logits[group_rows[accepted - 1]]
        pending = [target[accepted - 1]] + chosen[1:].argmax(-1).tolist()
    return out[:max_new]


@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_greedy_with_beta_below_one_equals_the_brute_force_decoder(decoder, beta):
    differs_from_ar = False
    for prompt in ([5], [1, 2, 3, 4, 5, 6], [7, 7, 7, 9]):
        with torch.inference_mode():
            expected = brute_force(decoder.model, prompt, 3, beta, 20)
        got = decoder.generate(prompt, 20, mode="tidar", beta=beta).tokens[0]
        assert got == expected, (prompt, beta)
        differs_from_ar |= got != decoder.generate(prompt, 20, mode="ar").tokens[0]
    assert differs_from_ar  # the diffusion logits really enter the choice


def test_beta_one_is_the_ar_output(decoder):
    for prompt in ([5], [1, 2, 3, 4, 5, 6]):
        assert decoder.generate(prompt, 20, beta=1.0).tokens == decoder.generate(prompt, 20, mode="ar").tokens


def test_sampled_tokens_follow_the_mixed_distribution(decoder):
    """The first token after the prompt at beta = 0.5, temperature 1: softmax of the mixed logits."""
    beta, prompt, samples = 0.5, [3, 1, 4, 1, 5], 6000
    sampling = SamplingConfig(temperature=1.0)
    with torch.inference_mode():
        logits = _full_pass(decoder.model, prompt + [MASK] * 3, TiDARLayout.for_prefill(len(prompt), 3))
        expected = probabilities(beta * logits[len(prompt) - 1] + (1 - beta) * logits[len(prompt)], sampling)
        ar_only = probabilities(logits[len(prompt) - 1], sampling)
    assert (expected - ar_only).abs().max() > 0.05  # a mixture that differs from the AR distribution
    result = decoder.generate([prompt] * samples, 1, mode="tidar", sampling=sampling, seed=0, beta=beta)
    assert_distributed_as(torch.tensor(result.tokens)[:, 0], expected)


def test_beta_outside_zero_one_is_an_error(decoder):
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        decoder.generate([1], 4, beta=1.5)


def test_a_decoding_step_samples_from_the_mixed_distribution(decoder):
    """The second token, given the first: drafted before the first was known, then verified by rejection
    sampling against the mixed target of the decoding pass; emitted tokens must follow that target."""
    beta, prompt, samples = 0.5, [2, 7, 1, 8], 12000
    sampling = SamplingConfig(temperature=1.0)
    tokens = torch.tensor(decoder.generate([prompt] * samples, 2, mode="tidar", sampling=sampling, seed=1,
                                           beta=beta).tokens)
    first = int(tokens[:, 0].mode().values)
    second = tokens[tokens[:, 0] == first, 1]
    layout = TiDARLayout.for_decoding(len(prompt), 3)
    m = len(prompt)
    with torch.inference_mode():  # drafts (here 0, 0) cannot change the rows that predict position m + 1
        logits = _full_pass(decoder.model, prompt + [first, 0, 0] + [MASK] * (layout.seq_len - layout.clean_len),
                            layout)
        expected = probabilities(beta * logits[m] + (1 - beta) * logits[layout.block_rows(0).start], sampling)
    assert len(second) > 1000
    assert_distributed_as(second, expected)
