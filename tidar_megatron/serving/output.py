"""The engine's output processor: stop rule, incremental detokenization, stop strings, usage, finishing.

Detokenization costs O(new tokens) per pass: each pass decodes only a window of the latest tokens, not the
whole completion (which would be quadratic in its length), and the text it gives out is exactly the whole
completion decoded at once.  The window starts at a token boundary where an earlier decode ended on a whole
character, and keeps at least one token with text before the new ones, so that a tokenizer that drops the
first token's leading space (SentencePiece's dummy prefix, HF's Metaspace) drops it only from text already
given out.  A decode that ends in U+FFFD may be a character whose bytes are split across tokens: that tail
waits for the next pass (or the finish), as vLLM's detokenizer does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tidar_megatron.inference.step import clip_at_stop
from tidar_megatron.serving.scheduler import Request, Sequence

REPLACEMENT = "\ufffd"


@dataclass
class Event:
    """What one pass made final for a request."""
    tokens: list[int]            # the new final tokens
    text: str                    # the text they add (stop strings cut off)
    finish_reason: str | None    # None while generating, then "stop" (EOS or a stop string), "length" or "error"
    usage: dict


class IncrementalDetokenizer:
    """The text of a growing token list, given out piece by piece (`add`), each token decoded O(1) times."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.start = 0       # the decode window: ids[start:]
        self.sent = 0        # characters of the window's text already given out
        self.clean_end = 0   # the last length at which the decoded text ended on a whole character

    def add(self, tokens: list[int], final: bool = False) -> str:
        """The text `tokens` add; `final`: the last call, which also gives out an unfinished character."""
        self.ids += tokens
        text = self.tokenizer.decode(self.ids[self.start:])
        settled = text if final else text.rstrip(REPLACEMENT)
        delta = settled[self.sent:]
        self.sent = max(self.sent, len(settled))
        if len(settled) == len(text) and len(self.ids) > self.clean_end:
            self._slide(len(self.ids))
        return delta

    def _slide(self, end: int):
        """Start the window at the previous clean boundary (everything decoded so far has been given out)."""
        if self.clean_end > self.start:
            window = self.tokenizer.decode(self.ids[self.clean_end:])
            if window:  # a window whose text is empty would let a new first token lose its leading space
                self.start, self.sent = self.clean_end, len(window)
        self.clean_end = end


@dataclass
class SequenceOutput:
    """The output processor's state of one sequence."""
    detokenizer: IncrementalDetokenizer | None
    generated: list[int] = field(default_factory=list)
    held: str = ""                 # decoded text not yet given out: it may still start a stop string
    first_token_at: float | None = None


class OutputProcessor:
    """Turns the tokens a pass made final for a sequence into its Event; `eos`: token ids that end a sequence
    (left out of the text)."""

    def __init__(self, tokenizer, eos):
        self.tokenizer, self.eos = tokenizer, set(eos)

    def process(self, seq: Sequence, tokens: list[int], out_of_room: bool = False) -> Event:
        request = seq.request
        if seq.output is None:
            detokenizer = IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None
            seq.output = SequenceOutput(detokenizer, first_token_at=time.perf_counter())
        out: SequenceOutput = seq.output
        tokens, finish = clip_at_stop(tokens, request.max_tokens - len(out.generated), self.eos)
        out.generated += tokens
        if finish is None and out_of_room:
            finish = "length"  # only reached by callers that skip the API's length check
        text, finish = self._text(out, request, tokens, finish)
        usage = {"prompt_tokens": len(request.prompt_ids), "completion_tokens": len(out.generated),
                 "total_tokens": len(request.prompt_ids) + len(out.generated), "forward_passes": seq.passes,
                 "tokens_per_pass": len(out.generated) / seq.passes}
        return Event(tokens, text, finish, usage)

    def _text(self, out: SequenceOutput, request: Request, tokens: list[int], finish: str | None):
        if out.detokenizer is None:
            return "", finish
        shown = [t for t in tokens if t not in self.eos]  # the completion's text leaves out EOS
        text = out.held + out.detokenizer.add(shown, final=finish is not None)
        # Text given out never holds the start of a stop string (`_settled`), so searching what is held
        # and new finds every stop string the whole text would.
        cuts = [cut for stop in request.stop if stop and (cut := text.find(stop)) >= 0]
        if cuts:
            return text[:min(cuts)], "stop"
        if finish is not None:
            return text, finish
        keep = _settled(text, request.stop)
        out.held = text[keep:]
        return text[:keep], None


def _settled(text: str, stops: list[str]) -> int:
    """How much of `text` is final: not a tail that could still turn into a stop string."""
    keep = len(text)
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                keep = min(keep, len(text) - n)
                break
    return keep
