"""Token selection, per row of a batch: greedy, temperature / top-p sampling, and speculative verification.

Every row has its own settings (`RowSampling`: temperature, top-p, a random key), so greedy and sampled
sequences share one call.  Random numbers are counter-based: the uniform a row uses is splitmix64 of (its key,
its draw counter, the slot inside the pass), so a sequence's draws never depend on which sequences share its
batch.  Tokens are drawn by inverse CDF from those uniforms.

Verification is standard speculative (rejection) sampling: draft x drawn from q is kept with probability
min(1, p(x) / q(x)); on rejection the token is drawn from the residual max(0, p - q) (normalised).  Each
emitted token is then distributed exactly as p, the target distribution, whatever q is.  Greedy rows are the
temperature -> 0 limit: their distributions are one-hot at the argmax, so the same rule keeps a draft exactly
when it equals the argmax.

Numerically safe at any temperature and top-p: logits are shifted by their row maximum before the division
(a tiny temperature sends every other token to probability 0, never to NaN), and top-p always keeps the most
likely token.
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
        if not self.temperature >= 0:  # also refuses NaN
            raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 torch stores."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """Steele et al.'s splitmix64 finaliser on int64 tensors (multiplication wraps modulo 2**64)."""
    z = x + _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def uniforms(keys: torch.Tensor, counters: torch.Tensor, first_slot: int, n: int) -> torch.Tensor:
    """[b, n] float32 uniforms in [0, 1) for slots first_slot.. of each row's draw `counters` [b]."""
    slots = torch.arange(first_slot, first_slot + n, device=keys.device)
    z = splitmix64(splitmix64(keys[:, None] ^ splitmix64(counters[:, None])) + slots)
    return _shift_right(z, 40).float() * 2.0 ** -24  # 24 bits: exact in float32, below 1


@dataclass(frozen=True)
class RowSampling:
    """Per-row sampling settings on the device, and what the host knows about them (no sync to ask)."""
    temperature: torch.Tensor   # [b] float32 (greedy rows: 1, unused)
    top_p: torch.Tensor         # [b] float32
    greedy: torch.Tensor        # [b] bool
    keys: torch.Tensor          # [b] int64, each row's random key: splitmix64 of (seed, stream)
    all_greedy: bool
    any_greedy: bool
    any_top_p: bool

    @classmethod
    def of(cls, settings: list[SamplingConfig], seeds: list[int], device,
           streams: list[int] | None = None) -> "RowSampling":
        """Row i samples with settings[i] from stream streams[i] (default 0) of seeds[i] (any integer, taken
        modulo 2**64): one seed serves a batch through its streams; a sequence alone with a seed draws
        stream 0."""
        # float32 cannot hold a temperature below its smallest normal; the limit is the same greedy one
        tiny = torch.finfo(torch.float32).tiny
        return cls(torch.tensor([max(s.temperature, tiny) if not s.greedy else 1.0 for s in settings],
                                device=device),
                   torch.tensor([s.top_p for s in settings], device=device),
                   torch.tensor([s.greedy for s in settings], device=device),
                   cls._keys(seeds, streams or [0] * len(seeds), device),
                   all(s.greedy for s in settings), any(s.greedy for s in settings),
                   any(s.top_p < 1 for s in settings))

    @staticmethod
    def _keys(seeds: list[int], streams: list[int], device) -> torch.Tensor:
        seeds = torch.tensor([_signed(s) for s in seeds], device=device)
        return splitmix64(splitmix64(seeds) ^ torch.tensor(streams, device=device))


def _per_row(values: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """[b] settings broadcast over logits [b, ..., V]; one value over logits of any shape."""
    return values.view((1,) * logits.dim()) if values.numel() == 1 else values.view(-1, *(1,) * (logits.dim() - 1))


def one_hot_distributions(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """[...] token ids -> [..., V] fp32 distributions certain of them (greedy rows' distributions)."""
    return torch.zeros(*tokens.shape, vocab, device=tokens.device).scatter(-1, tokens[..., None], 1.0)


def probabilities(logits: torch.Tensor, sampling: RowSampling | SamplingConfig) -> torch.Tensor:
    """[b, ..., V] logits -> [b, ..., V] fp32 probabilities after temperature and top-p (nucleus) truncation;
    one-hot at the argmax for greedy rows.  A SamplingConfig applies to every row."""
    if isinstance(sampling, SamplingConfig):
        sampling = RowSampling.of([sampling], [0], logits.device)
    logits = logits.float()
    shifted = logits - logits.max(-1, keepdim=True).values  # <= 0 everywhere, 0 at the argmax
    probs = torch.softmax(shifted / _per_row(sampling.temperature, logits), dim=-1)
    if sampling.any_top_p:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest set whose mass reaches top_p (a token is dropped when the mass before it does),
        # and always the most likely token.
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= _per_row(sampling.top_p, logits)
        drop[..., 0] = False
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        truncated = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        truncated = truncated / truncated.sum(-1, keepdim=True)
        # Rows with top_p = 1 keep exactly what they get alone (float32 cumsum may reach 1 before the tail).
        probs = torch.where(_per_row(sampling.top_p < 1, logits), truncated, probs)
    if sampling.any_greedy:
        one_hot = one_hot_distributions(logits.argmax(-1), logits.shape[-1])
        probs = torch.where(_per_row(sampling.greedy, logits), one_hot, probs)
    return probs


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[..., V] probabilities and [...] uniforms -> [...] token ids, by inverse CDF (never a token of
    probability 0)."""
    cdf = probs.cumsum(-1)
    token = torch.searchsorted(cdf, (u * cdf[..., -1])[..., None].contiguous(), right=True)[..., 0]
    token = token.clamp(max=probs.shape[-1] - 1)
    # float rounding at the top of the CDF could land on a trailing zero: take the most likely token then
    missed = probs.gather(-1, token[..., None])[..., 0] <= 0
    return torch.where(missed, probs.argmax(-1), token)


def select(logits: torch.Tensor, sampling: RowSampling, u: torch.Tensor | None):
    """[b, ..., V] logits, [b, ...] uniforms -> (tokens [b, ...], probabilities [b, ..., V], or None when every
    row is greedy)."""
    if sampling.all_greedy:
        return logits.argmax(-1), None
    probs = probabilities(logits, sampling)
    return draw(probs, u), probs


def verify_drafts(target_logits, drafts, draft_probs, sampling: RowSampling, u_accept, u_token):
    """Accepts the longest agreeing prefix of the drafts and picks the token that follows it.

    target_logits [b, B, V]: logits at the pending tokens c_0..c_{B-1}; row i predicts the token after c_i.
    drafts [b, B-1]: c_1..c_{B-1}.  draft_probs [b, B-1, V]: the distributions they were drawn from (None
    when every row is greedy; one-hot for greedy rows).  u_accept [b, B-1], u_token [b]: the uniforms.
    Returns (accepted [b] = a, the number of pending tokens kept, 1..B; next_token [b]).
    """
    b, block, _ = target_logits.shape
    rows = torch.arange(b, device=target_logits.device)
    if sampling.all_greedy:
        choice = target_logits.argmax(-1)                    # [b, B]
        accepted = 1 + (drafts == choice[:, :-1]).long().cumprod(-1).sum(-1)
        return accepted, choice[rows, accepted - 1]
    p = probabilities(target_logits, sampling)               # [b, B, V]
    p_draft = p[:, :-1].gather(-1, drafts[..., None])[..., 0]
    q_draft = draft_probs.gather(-1, drafts[..., None])[..., 0]
    keep = u_accept * q_draft < p_draft                      # u < p / q without dividing by q
    accepted = 1 + keep.long().cumprod(-1).sum(-1)
    target = p[rows, accepted - 1]                           # distribution of the token after c_{a-1}
    rejected = accepted < block                              # a draft was rejected: draw from the residual
    q_rejected = draft_probs[rows, (accepted - 1).clamp(max=block - 2)]
    residual = (target - q_rejected).clamp(min=0)
    mass = residual.sum(-1, keepdim=True)
    # p == q up to rounding leaves no residual mass; then any draw from p is correct.
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), target)
    target = torch.where(rejected[:, None], residual, target)
    return accepted, draw(target, u_token)
