"""The decoding core: what one forward pass decides, for every sequence of a batch at once.

Pure functions over tensors (gpt-fast's `prefill` / `decode_one_token` / `speculative_decode`); the Decoder
(decoding.py), the serving engine, `evaluate`, `generate` and lm-eval all run these, and keep state, stats and
stopping themselves.  Each row has its own sampling settings and random key (sampling.RowSampling), and draws
the uniforms of its pass number `counters[i]`, so a sequence's tokens do not depend on its batch companions.

Uniform slots of one pass (block B; AR is B = 1): [0, B-1) accept the drafts, B-1 draws the next token,
[B, 2B-1) draw the next drafts.  A prefill draws the first token and drafts from the same slots.

A pass's results come back packed in one tensor [b, 1 + B]: the number of pending tokens kept (a), then the
next pending block (the token after the kept ones, then its drafts).  The caller moves it to the host once
per pass (`.tolist()`) and reads each row with `new_tokens`.

The context rule, one for every decoding path: a prompt of n tokens gets at most max_positions - n new tokens
(config.json's max_position_embeddings, or the server's --max-model-len).  `fit_context` applies it: a prompt
that leaves no room is refused; a longer max_new_tokens is clamped, with a one-line note the command prints
(generate, evaluate, lm-eval).  The server's admission (`check_context`) refuses instead of clamping: an API
client asked for exactly that many tokens and can only be told by an error (as OpenAI's API and vLLM do).
Drafts written past the last position are scratch and never become tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tidar_megatron.errors import TiDARError
from tidar_megatron.inference.sampling import RowSampling, select, uniforms, verify_drafts


class ContextError(TiDARError, ValueError):
    """A request longer than the model's context; `param` is "prompt" or "max_new_tokens"."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def fit_context(prompt_len: int, max_new_tokens: int, max_positions: int | None, where: str = "",
                new_tokens_name: str = "max_new_tokens") -> tuple[int, str | None]:
    """-> (the new tokens that fit, at most max_new_tokens; a one-line note when that is fewer).  Refuses a
    prompt that leaves no room.  max_positions None: no limit known.  `where` prefixes the messages (e.g.
    "prompt 3: "); `new_tokens_name` is how the caller spells max_new_tokens."""
    if max_positions is None or prompt_len + max_new_tokens <= max_positions:
        return max_new_tokens, None
    if prompt_len + min(max_new_tokens, 1) > max_positions:
        room = max_positions - min(max_new_tokens, 1)
        raise ContextError(f"{where}{prompt_len} tokens do not fit the model's context of {max_positions} "
                           f"positions (max_position_embeddings); use at most {room}", "prompt")
    room = max_positions - prompt_len
    return room, _past_context(prompt_len, max_new_tokens, max_positions, where, new_tokens_name) + \
        f": generating {room} tokens for it"


def check_context(prompt_len: int, max_new_tokens: int, max_positions: int | None, where: str = "",
                  new_tokens_name: str = "max_new_tokens"):
    """`fit_context` that refuses instead of clamping (the server's admission; the Decoder, whose callers fit
    first)."""
    room, note = fit_context(prompt_len, max_new_tokens, max_positions, where, new_tokens_name)
    if note is not None:
        raise ContextError(_past_context(prompt_len, max_new_tokens, max_positions, where, new_tokens_name) +
                           f": lower {new_tokens_name} to {room} or shorten the prompt", "max_new_tokens")


def _past_context(prompt_len, max_new_tokens, max_positions, where, new_tokens_name) -> str:
    return (f"{where}a {prompt_len}-token prompt plus {new_tokens_name} {max_new_tokens} needs "
            f"{prompt_len + max_new_tokens} positions, the model has {max_positions}")


def mixed_logits(ar_logits: torch.Tensor, diffusion_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """The logits drafts are verified against: beta * AR + (1 - beta) * diffusion."""
    return ar_logits if beta == 1.0 else beta * ar_logits.float() + (1.0 - beta) * diffusion_logits.float()


@dataclass
class PassResult:
    pending: torch.Tensor              # [b, B] the next pending block (AR: [b, 1], the token to feed)
    draft_probs: torch.Tensor | None   # [b, B-1, V] the drafts' distributions; None when every row is greedy
    packed: torch.Tensor               # [b, 1 + B] accepted count, then `pending`: the one host transfer


def _uniforms(sampling: RowSampling, counters: torch.Tensor, block: int) -> torch.Tensor | None:
    return None if sampling.all_greedy else uniforms(sampling.keys, counters, 0, 2 * block - 1)


def _part(u: torch.Tensor | None, columns) -> torch.Tensor | None:
    return None if u is None else u[:, columns]


def _result(accepted: torch.Tensor, token: torch.Tensor, drafts: torch.Tensor | None, draft_probs) -> PassResult:
    pending = token[:, None] if drafts is None else torch.cat([token[:, None], drafts], dim=1)
    return PassResult(pending, draft_probs, torch.cat([accepted[:, None], pending], dim=1))


def prefill_select(last_prompt_logits, first_block, beta: float, sampling: RowSampling, counters) -> PassResult:
    """After a TiDAR prefill: the first token from the prompt's last AR row, mixed with slot 0 of the mask
    block after the prompt (it drafts the same position), and the drafts from the block's other slots.

    last_prompt_logits [b, V], first_block [b, B, V], counters [b] int64 (0 for a prefill).
    """
    block = first_block.shape[1]
    u = _uniforms(sampling, counters, block)
    token, _ = select(mixed_logits(last_prompt_logits, first_block[:, 0], beta), sampling, _part(u, block - 1))
    drafts, draft_probs = select(first_block[:, 1:], sampling, _part(u, slice(block, None)))
    return _result(torch.zeros_like(token), token, drafts, draft_probs)


def tidar_step(logits, pending, draft_probs, groups, beta: float, sampling: RowSampling, counters) -> PassResult:
    """One TiDAR pass for every sequence: verify the pending drafts and pick the next block.

    logits [b, width, V]: the pass's rows from the pending block on; pending [b, B]; draft_probs [b, B-1, V]
    or None (every row greedy; a greedy row among sampled ones has one-hot distributions); groups [B, B]:
    the rows of mask block a - 1 (acceptance length a) relative to the pending block (`full_block_rows` of
    `TiDARLayout.for_decoding(0, B)`).  Row i of the pending block predicts position m + i + 1, as does slot
    0 of group i + 1.  The next pending block is the token after the a kept ones, then the drafts of the
    group that saw exactly those.
    """
    block = pending.shape[1]
    u = _uniforms(sampling, counters, block)
    target_logits = mixed_logits(logits[:, :block], logits[:, groups[:, 0]], beta)
    accepted, token = verify_drafts(target_logits, pending[:, 1:], draft_probs, sampling,
                                    _part(u, slice(0, block - 1)), _part(u, block - 1))
    rows = torch.arange(len(pending), device=logits.device)
    chosen_block = logits[rows[:, None], groups[accepted - 1]]        # its slot 0 drafts `token`
    drafts, new_draft_probs = select(chosen_block[:, 1:], sampling, _part(u, slice(block, None)))
    return _result(accepted, token, drafts, new_draft_probs)


def ar_step(logits, sampling: RowSampling, counters) -> PassResult:
    """One AR pass (or an AR prefill): logits [b, V] of each sequence's last row -> the next token."""
    token, _ = select(logits, sampling, _part(_uniforms(sampling, counters, 1), 0))
    return _result(torch.ones_like(token), token, None, None)


def new_tokens(previous_pending: list[int] | None, packed_row: list[int]) -> tuple[int, list[int], list[int]]:
    """One row of a pass's packed result, on the host -> (accepted a, the tokens the pass made final: the kept
    drafts of the previous pending block and the next token, the next pending block).  `previous_pending`:
    None after a prefill."""
    accepted, pending = packed_row[0], packed_row[1:]
    return accepted, (previous_pending[1:accepted] if previous_pending else []) + pending[:1], pending


def clip_at_stop(tokens: list[int], room: int, eos) -> tuple[list[int], str | None]:
    """The stop rule: `tokens` cut to `room` and after the first EOS; the finish reason ("length", "stop")
    or None."""
    finish = None
    if len(tokens) >= room:
        tokens, finish = tokens[:room], "length"
    for j, token in enumerate(tokens):
        if token in eos:
            return tokens[:j + 1], "stop"
    return tokens, finish
