"""Decoding quality and speed on prompts: TiDAR against AR with the same model, in one run.

Every prompt is decoded greedily at batch 1 (as the paper measures throughput), first in AR mode, then in
TiDAR mode once per block size, so both modes see the same machine state.  Per block size the report has
tokens per forward pass (T/NFE), the acceptance histogram, AR and TiDAR tokens/s and their ratio, and the
fraction of prompts whose TiDAR output equals the AR output (1.0 is the lossless guarantee at beta = 1);
with references, exact match; with tests, pass@1 from the sandboxed runner (sandbox.py).  Every mode's
report has `repetition` (repetition.py): how much of the generated text repeats a loop, and whether it is
degenerate, in which case its tokens per pass is no evidence of speed.

Prompts are JSONL, one object per line: {"prompt": text} or {"prompt_ids": [...]}, optionally
"reference" (for exact match), "tests" (Python run after prompt + completion, for pass@1) and "stop" (strings
that end a completion).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tidar_megatron.errors import TiDARError
from tidar_megatron.evaluation import repetition
from tidar_megatron.evaluation.sandbox import run_tests
from tidar_megatron.inference.decoding import Decoder
from tidar_megatron.inference.generate import check_prompt_ids
from tidar_megatron.inference.step import fit_context


class PromptError(TiDARError, ValueError):
    pass


@dataclass
class Prompt:
    ids: list[int]
    text: str | None = None
    reference: str | None = None
    tests: str | None = None
    stop: list[str] = field(default_factory=list)


def read_prompts(path: str | Path, tokenizer) -> list[Prompt]:
    """Parse a prompts JSONL file; every problem is one line naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"--prompts {path}: not found; give a JSONL file of {{\"prompt\": ...}} lines")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or ("prompt" in obj) == ("prompt_ids" in obj):
            raise PromptError(f"{where}: give exactly one of \"prompt\" (text) or \"prompt_ids\" (token ids)")
        if "prompt_ids" in obj:
            ids = obj["prompt_ids"]
            if not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids):
                raise PromptError(f"{where}: prompt_ids must be a list of token ids")
            text = None
        else:
            text = obj["prompt"]
            if not isinstance(text, str):
                raise PromptError(f"{where}: prompt must be a string")
            if tokenizer is None:
                raise PromptError(f"{where}: a text prompt needs the model's tokenizer, and the model directory "
                                  "has none; use prompt_ids")
            ids = tokenizer.encode(text)
        if not ids:
            raise PromptError(f"{where}: the prompt has no tokens")
        stop = obj.get("stop", [])
        stop = [stop] if isinstance(stop, str) else stop
        prompts.append(Prompt(ids, text, obj.get("reference"), obj.get("tests"), list(stop)))
    if not prompts:
        raise PromptError(f"--prompts {path}: holds no prompts")
    return prompts


def completion_text(tokens: list[int], tokenizer, stop: list[str]) -> str:
    text = tokenizer.decode(tokens) if tokenizer is not None else " ".join(map(str, tokens))
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[:min(cuts)] if cuts else text


def compare(decoder: Decoder, prompts: list[Prompt], tokenizer, max_new_tokens: int, block_sizes: list[int],
            beta: float = 1.0, test_timeout: float = 10.0, progress=None) -> dict:
    """The report described in the module docstring: {"ar": {...}, "tidar": {B: {...}}, "samples": [...]}."""
    check_prompt_ids([p.ids for p in prompts], decoder.model.args.vocab_size,
                     [f"prompt {i + 1}" for i in range(len(prompts))])
    rooms = []  # every prompt's new tokens, clamped to the model's context and said (inference/step.py)
    for i, prompt in enumerate(prompts):
        room, note = fit_context(len(prompt.ids), max_new_tokens, decoder.max_positions, f"prompt {i + 1}: ",
                                 "--max-new-tokens")
        rooms.append(room)
        if note:
            print(note, file=sys.stderr)
    ar = _Totals()
    tidar = {b: _Totals() for b in block_sizes}
    samples = []
    for i, (prompt, room) in enumerate(zip(prompts, rooms)):
        ar_out = decoder.generate(prompt.ids, room, mode="ar")
        ar.add(ar_out, prompt, tokenizer, test_timeout)
        sample = {"prompt": prompt.text if prompt.text is not None else prompt.ids,
                  "ar": completion_text(ar_out.tokens[0], tokenizer, prompt.stop), "tidar": {}}
        for b in block_sizes:
            out = decoder.generate(prompt.ids, room, mode="tidar", block_size=b, beta=beta)
            tidar[b].add(out, prompt, tokenizer, test_timeout, identical=out.tokens[0] == ar_out.tokens[0])
            sample["tidar"][b] = completion_text(out.tokens[0], tokenizer, prompt.stop)
        samples.append(sample)
        if progress is not None:
            progress(i + 1, len(prompts))
    ar_report = ar.report(tidar=False)
    report = {"ar": ar_report, "tidar": {}, "samples": samples, "beta": beta, "max_new_tokens": max_new_tokens}
    for b, totals in tidar.items():
        r = totals.report(tidar=True)
        r["speedup_vs_ar"] = r["tokens_per_s"] / ar_report["tokens_per_s"] if ar_report["tokens_per_s"] else 0.0
        report["tidar"][b] = r
    return report


class _Totals:
    def __init__(self):
        self.tokens = self.passes = self.prompts = self.identical = 0
        self.seconds = 0.0
        self.histogram: list[int] = []
        self.generated: list[list[int]] = []
        self.exact = self.with_reference = self.passed = self.with_tests = 0

    def add(self, generation, prompt: Prompt, tokenizer, test_timeout: float, identical: bool | None = None):
        stats = generation.stats
        self.prompts += 1
        self.tokens += stats.new_tokens
        self.passes += stats.forward_passes
        self.seconds += stats.seconds
        hist = stats.acceptance_histogram
        self.histogram = [a + b for a, b in zip(self.histogram, hist)] if self.histogram else list(hist)
        self.identical += bool(identical)
        self.generated.append(generation.tokens[0])
        text = completion_text(generation.tokens[0], tokenizer, prompt.stop)
        if prompt.reference is not None:
            self.with_reference += 1
            self.exact += text.strip() == prompt.reference.strip()
        if prompt.tests is not None:
            self.with_tests += 1
            program = (prompt.text or "") + text + "\n\n" + prompt.tests + "\n"
            self.passed += run_tests(program, timeout=test_timeout).passed

    def report(self, tidar: bool) -> dict:
        out = {"prompts": self.prompts, "new_tokens": self.tokens, "forward_passes": self.passes,
               "tokens_per_pass": self.tokens / self.passes if self.passes else 0.0,
               "tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0, "seconds": self.seconds,
               "repetition": repetition.measure(self.generated)}
        if tidar:
            out.update(acceptance_histogram=self.histogram,
                       greedy_identical_fraction=self.identical / self.prompts if self.prompts else 0.0)
        if self.with_reference:
            out["exact_match"] = self.exact / self.with_reference
        if self.with_tests:
            out["pass@1"] = self.passed / self.with_tests
        return out
