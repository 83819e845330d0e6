"""Sampling: top-p truncation, and rejection sampling keeps the AR distribution (chi-square tests).

Every statistical test uses a fixed seed and a chi-square test at significance 1e-3 (cells with an expected
count below 5 pooled into one); cells the target gives probability 0 must never be drawn.
"""

import math

import pytest
import torch

from tidar_megatron.inference.decoding import Decoder
from tidar_megatron.inference.sampling import RowSampling, SamplingConfig, probabilities, verify_drafts
from tidar_megatron.layout import TiDARLayout
from tidar_megatron.testing import tiny_hf_checkpoint

SIGNIFICANCE_Z = 3.09  # one-sided normal quantile of 1 - 1e-3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_distributed_as(samples: torch.Tensor, expected: torch.Tensor):
    """samples [n] cell indices; expected [cells] probabilities."""
    n = len(samples)
    observed = torch.bincount(samples, minlength=len(expected)).double()
    expected = expected.double() * n
    assert observed[expected == 0].sum() == 0, "drew a token the target distribution excludes"
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    statistic = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum().item()
    dof = int(keep.sum()) - 1
    # Wilson-Hilferty approximation of the chi-square quantile.
    critical = dof * (1 - 2 / (9 * dof) + SIGNIFICANCE_Z * math.sqrt(2 / (9 * dof))) ** 3
    assert statistic < critical, f"chi-square {statistic:.1f} >= {critical:.1f} with {dof} degrees of freedom"


def verify_with(g: torch.Generator, target_logits, drafts, draft_probs, sampling: SamplingConfig):
    """verify_drafts with one setting for every row and the uniforms drawn from `g`."""
    b = len(drafts)
    rows = RowSampling.of([sampling] * b, [0] * b, target_logits.device)
    return verify_drafts(target_logits, drafts, draft_probs, rows, torch.rand(drafts.shape, generator=g),
                         torch.rand(b, generator=g))


def test_top_p_keeps_the_smallest_nucleus_and_renormalises():
    logits = torch.tensor([math.log(p) for p in (0.5, 0.3, 0.15, 0.05)])
    probs = probabilities(logits, SamplingConfig(temperature=1.0, top_p=0.75))
    torch.testing.assert_close(probs, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    probs = probabilities(logits, SamplingConfig(temperature=1.0, top_p=0.8))  # 0.8 = 0.5 + 0.3 exactly
    assert (probs > 0).sum() <= 3 and probs[:2].sum() > 0.8
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(temperature=1.0, top_p=0.0)


def test_verification_of_synthetic_drafts_emits_the_target_distribution():
    """Target p and draft q independent of the tokens: the first token after c_0 must follow p[0]."""
    g = torch.Generator().manual_seed(0)
    batch, block, vocab = 40000, 3, 6
    p = torch.softmax(2 * torch.randn(block, vocab, generator=g), -1)
    q = torch.softmax(2 * torch.randn(block - 1, vocab, generator=g), -1)
    drafts = torch.multinomial(q, batch, replacement=True, generator=g).T  # [batch, B - 1]
    accepted, token = verify_with(g, p.log().expand(batch, -1, -1), drafts, q.expand(batch, -1, -1),
                                  SamplingConfig(temperature=1.0))
    first_emitted = torch.where(accepted > 1, drafts[:, 0], token)
    assert_distributed_as(first_emitted, p[0])
    # Both branches ran: drafts accepted, rejected, and whole blocks with a bonus token.
    assert {1, block} <= set(accepted.tolist())


def exact_ar_joint(model, prompt, num_tokens, sampling):
    """[V] * num_tokens joint probability of the next tokens under the AR model, by enumeration."""
    vocab = model.args.vocab_size
    joint = torch.ones(1, dtype=torch.float64)
    prefixes = torch.tensor([prompt])
    for _ in range(num_tokens):
        layout = TiDARLayout.causal(prefixes.shape[1])
        logits = model(prefixes, layout.position_ids.expand(len(prefixes), -1), layout.dense_mask()[None])
        next_probs = probabilities(logits[:, -1], sampling).double()  # [prefixes, V]
        joint = (joint[:, None] * next_probs).flatten()
        next_tokens = torch.arange(vocab).repeat(len(prefixes))[:, None]
        prefixes = torch.cat([prefixes.repeat_interleave(vocab, 0), next_tokens], 1)
    return joint


@pytest.mark.parametrize("block_size,sampling", [(2, SamplingConfig(temperature=1.0)),
                                                 (3, SamplingConfig(temperature=0.8, top_p=0.9))])
def test_tidar_sampling_keeps_the_ar_distribution(tmp_path, block_size, sampling):
    vocab, num_tokens, samples = 8, 3, 8000
    tiny_hf_checkpoint(tmp_path, "qwen2", vocab_size=vocab, initializer_range=0.3)
    decoder = Decoder.from_pretrained(tmp_path, mask_token_id=vocab - 1, block_size=block_size)
    prompt = [1, 4, 2, 6]
    with torch.inference_mode():
        expected = exact_ar_joint(decoder.model, prompt, num_tokens, sampling)
    result = decoder.generate([prompt] * samples, num_tokens, mode="tidar", sampling=sampling, seed=0)
    tokens = torch.tensor(result.tokens)  # [samples, num_tokens]
    cells = (tokens * torch.tensor([vocab ** 2, vocab, 1])).sum(1)
    assert_distributed_as(cells, expected)
    histogram = result.stats.acceptance_histogram
    assert histogram[0] > 0 and histogram[-1] > 0, histogram  # drafts were rejected and accepted


def test_a_certain_proposal_keeps_the_target_distribution():
    """A draft proposed with certainty (one-hot q: what a padded pending block holds when a pass's block grows,
    serving.runner.fit_pending) is accepted with probability p(x) and otherwise replaced from p without x:
    the emitted token still follows p."""
    g = torch.Generator().manual_seed(1)
    batch, vocab = 40000, 6
    p = torch.softmax(2 * torch.randn(2, vocab, generator=g), -1)
    fixed = int(p[0].argmin())  # the least likely token: most proposals are rejected
    drafts = torch.full((batch, 1), fixed)
    q = torch.zeros(batch, 1, vocab).index_fill_(-1, torch.tensor([fixed]), 1.0)
    accepted, token = verify_with(g, p.log().expand(batch, -1, -1), drafts, q, SamplingConfig(temperature=1.0))
    assert_distributed_as(torch.where(accepted > 1, drafts[:, 0], token), p[0])
    assert {1, 2} <= set(accepted.tolist())
