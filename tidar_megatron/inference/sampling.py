"""Token selection: greedy, temperature / top-p sampling, and speculative verification of drafts.

Verification is standard speculative (rejection) sampling: draft x drawn from q is kept with probability
min(1, p(x) / q(x)); on rejection the token is drawn from the residual max(0, p - q) (normalised).  Each
emitted token is then distributed exactly as p, the AR head's distribution, whatever q is.  Greedy decoding
is the temperature -> 0 limit: a draft is kept when it equals the AR argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tidar_megatron.errors import TiDARError


class SamplingError(TiDARError, ValueError):
    pass


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probabilities(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """[..., V] logits -> [..., V] fp32 probabilities after temperature and top-p (nucleus) truncation."""
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest set whose mass reaches top_p: a token is dropped when the mass before it does.
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= sampling.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """[..., V] probabilities -> [...] token ids."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def select(logits: torch.Tensor, sampling: SamplingConfig, generator=None):
    """[..., V] logits -> (tokens [...], probabilities [..., V] or None when greedy)."""
    if sampling.greedy:
        return logits.argmax(-1), None
    probs = probabilities(logits, sampling)
    return sample(probs, generator), probs


def verify_drafts(ar_logits, drafts, draft_probs, sampling: SamplingConfig, generator=None):
    """Accepts the longest agreeing prefix of the drafts and picks the token that follows it.

    ar_logits [b, B, V]: AR logits at the pending tokens c_0..c_{B-1}; row i predicts the token after c_i.
    drafts [b, B-1]: c_1..c_{B-1}.  draft_probs [b, B-1, V]: the distributions they were drawn from (None
    when greedy).  Returns (accepted [b] = a, the number of pending tokens kept, 1..B; next_token [b]).
    """
    b, block, _ = ar_logits.shape
    rows = torch.arange(b, device=ar_logits.device)
    if sampling.greedy:
        ar_choice = ar_logits.argmax(-1)                     # [b, B]
        keep = drafts == ar_choice[:, :-1]
    else:
        p = probabilities(ar_logits, sampling)              # [b, B, V]
        p_draft = p[:, :-1].gather(-1, drafts[..., None])[..., 0]
        q_draft = draft_probs.gather(-1, drafts[..., None])[..., 0]
        u = torch.rand(drafts.shape, generator=generator, device=drafts.device)
        keep = u * q_draft < p_draft                         # u < p / q without dividing by q
    accepted = 1 + keep.long().cumprod(-1).sum(-1)
    if sampling.greedy:
        return accepted, ar_choice[rows, accepted - 1]
    target = p[rows, accepted - 1]                           # distribution of the token after c_{a-1}
    rejected = accepted < block                              # a draft was rejected: sample the residual
    if rejected.any():
        q_rejected = draft_probs[rows, (accepted - 1).clamp(max=block - 2)]
        residual = (target - q_rejected).clamp(min=0)
        mass = residual.sum(-1, keepdim=True)
        # p == q up to rounding leaves no residual mass; then any draw from p is correct.
        residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), target)
        target = torch.where(rejected[:, None], residual, target)
    return accepted, sample(target, generator)
