"""How repetitive generated text is, so that tokens per pass from text stuck in a loop is not read as a speed-up.

A model that repeats itself (one token over and over, or a short phrase) predicts its own continuation
trivially: TiDAR keeps whole draft blocks and tokens per pass (T/NFE) nears the block size while the text is
useless.  Weak checkpoints, and AR-objective checkpoints decoded in TiDAR mode, do exactly that.  Every
decoding report (`evaluate`, the quickstart's summary, lm-eval's `config.tidar_decoding`) shows these
figures beside T/NFE:

    loop_fraction   the fraction of generated tokens that only repeat a loop.  Token i is in a loop when it
                    lies in a stretch where every token equals the one p before it, for a period
                    1 <= p <= MAX_PERIOD, and the stretch is long enough for the p-token pattern to occur
                    MIN_REPEATS times in a row and to hold at least MIN_LOOP_TOKENS repeated tokens.  The
                    pattern's first occurrence is not counted, only its repeats ("\\n" x 48: 47 of 48).
    distinct_1/2    distinct n-grams / n-grams, counted within each sample and pooled over the samples
                    (Li et al., 2016, "A Diversity-Promoting Objective Function for Neural Conversation
                    Models"), reported for reading beside the verdict.
    degenerate      loop_fraction >= DEGENERATE_LOOP_FRACTION: at least half of the generated tokens merely
                    repeat a loop, so the tokens-per-pass figure says nothing about speed on real text.

Written here because no installed library measures this on token ids: lm-eval has no repetition metric, and
Hugging Face `evaluate` downloads its metrics from a hub.  Pure functions over lists of token ids.
"""

from __future__ import annotations

import numpy as np

MAX_PERIOD = 32              # tokens in the longest repeated pattern looked for (about a line of code)
MIN_REPEATS = 3              # the pattern occurs at least this often in a row
MIN_LOOP_TOKENS = 8          # and its repeats hold at least this many tokens (9 equal tokens for p = 1)
DEGENERATE_LOOP_FRACTION = 0.5


def loop_mask(tokens: list[int], max_period: int = MAX_PERIOD) -> np.ndarray:
    """[len(tokens)] bool: True where a token repeats a loop (see the module docstring)."""
    ids = np.asarray(tokens, dtype=np.int64)
    looped = np.zeros(len(ids), dtype=bool)
    for period in range(1, min(max_period, len(ids) - 1) + 1):
        same = ids[period:] == ids[:-period]          # same[k]: token k + period repeats token k
        edges = np.diff(np.concatenate([[0], same.view(np.int8), [0]]))
        for start, end in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)):
            if end - start >= max((MIN_REPEATS - 1) * period, MIN_LOOP_TOKENS):
                looped[start + period:end + period] = True
    return looped


def distinct_ngrams(tokens: list[int], n: int) -> tuple[int, int]:
    """(distinct n-grams, n-grams) of one sample."""
    grams = list(zip(*(tokens[i:] for i in range(n))))
    return len(set(grams)), len(grams)


def measure(samples: list[list[int]]) -> dict:
    """The figures of the module docstring over the generated tokens of `samples` (one list of ids per
    generation): {"loop_fraction", "distinct_1", "distinct_2", "degenerate"}.  No tokens: 0.0, 1.0, 1.0,
    False (nothing was repeated)."""
    tokens = sum(len(s) for s in samples)
    looped = sum(int(loop_mask(s).sum()) for s in samples)
    loop_fraction = looped / tokens if tokens else 0.0
    out = {"loop_fraction": loop_fraction}
    for n in (1, 2):
        counts = [distinct_ngrams(s, n) for s in samples]
        total = sum(c[1] for c in counts)
        out[f"distinct_{n}"] = sum(c[0] for c in counts) / total if total else 1.0
    out["degenerate"] = loop_fraction >= DEGENERATE_LOOP_FRACTION
    return out


def degenerate_note(repetition: dict, tokens_per_pass: float, what: str) -> str | None:
    """One sentence in plain words when `what`'s tokens-per-pass figure comes from degenerate output; None
    otherwise."""
    if not repetition["degenerate"]:
        return None
    return (f"{what}'s {tokens_per_pass:.2f} tokens per pass come from degenerate output: "
            f"{repetition['loop_fraction']:.0%} of the generated tokens repeat a loop (distinct-1 "
            f"{repetition['distinct_1']:.2f}). A model that repeats itself drafts its own continuation "
            "trivially, so this figure, and any speed-up measured with it, says nothing about decoding real text.")
