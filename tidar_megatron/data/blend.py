"""Which tokenized prefixes a run reads, and how much of each: blends as Megatron-LM writes them.

    --data.blend 0.7 data/a 0.3 data/b        weights and prefixes alternating (Megatron-LM's --data-path)
    --data.blend data/a data/b                prefixes only: one epoch of each, weighted by size
    --data.blend_file blend.txt               the same list in a file (--data-args-path)
    --data.blend_file splits.json             {"train": [...], "valid": [...], "test": [...]}
                                              (--per-split-data-args-path)
    --data.train_blend ... --data.valid_blend ...  --data.test_blend ...
                                              a blend per split (--train-data-path, ...; data.split unused)

Parsed here rather than by megatron-core's `get_blend_from_list`, which reads a mis-paired list such as
`0.7 data/a data/b` as three prefixes named "0.7", "data/a" and "data/b".  Prefixes are paths as given
(relative to the working directory, as in Megatron-LM).  `describe` gives the lines a run starts with:
each dataset's weight, documents, tokens and the epochs the run will take of it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)

from tidar_megatron.config import ConfigError, DataConfig
from tidar_megatron.data.prefix_check import indexed_dataset

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Blend:
    prefixes: list[str]
    weights: list[float] | None  # None: prefixes only

    def megatron(self) -> tuple[list[str], list[float] | None]:
        return list(self.prefixes), None if self.weights is None else list(self.weights)


@dataclass(frozen=True)
class Blends:
    """Either one blend cut into train/valid/test by data.split (`whole`), or one blend per split."""
    whole: Blend | None
    per_split: tuple[Blend | None, Blend | None, Blend | None] | None
    source: str  # where it came from, for messages

    @property
    def prefixes(self) -> list[str]:
        blends = [self.whole] if self.whole else [b for b in self.per_split if b]
        return list(dict.fromkeys(p for b in blends for p in b.prefixes))


def _is_number(item: str) -> bool:
    try:
        float(item)
    except ValueError:
        return False
    return True


def parse(items: list, source: str) -> Blend:
    """[weight, prefix, weight, prefix, ...] or [prefix, ...] -> Blend; ConfigError naming `source`."""
    items = [str(i) for i in items]
    if not items:
        raise ConfigError(f"{source} is empty: give tokenized prefixes, e.g. 0.7 data/a 0.3 data/b")
    numbers = [i for i, item in enumerate(items) if _is_number(item)]
    if not numbers:
        return Blend(items, None)
    if len(items) % 2 or numbers != list(range(0, len(items), 2)):
        raise ConfigError(f"{source} {' '.join(items)}: give weights and prefixes alternating "
                          "(0.7 data/a 0.3 data/b) or prefixes only (data/a data/b)")
    weights = [float(w) for w in items[0::2]]
    if any(not w > 0 or math.isinf(w) for w in weights):
        raise ConfigError(f"{source}: weights must be positive numbers, got {', '.join(items[0::2])}")
    return Blend(items[1::2], weights)


def _read_file(path: str) -> Blends:
    """A whitespace-separated blend (Megatron-LM's --data-args-path; `#` starts a comment) or a JSON object
    of per-split blends (--per-split-data-args-path)."""
    source = f"data.blend_file {path}"
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{source}: cannot read it ({e.strerror})") from None
    if text.lstrip().startswith("{"):
        try:
            splits = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}: not valid JSON ({e.msg} at line {e.lineno})") from None
        unknown = set(splits) - set(SPLITS)
        if unknown or "train" not in splits:
            raise ConfigError(f"{source}: expected the keys train (required), valid, test; got {', '.join(splits)}")
        return Blends(None, tuple(parse(splits[s], f"{source} [{s}]") if splits.get(s) else None for s in SPLITS),
                      source)
    items = [word for line in text.splitlines() for word in line.split("#", 1)[0].split()]
    return Blends(parse(items, source), None, source)


def resolve(data: DataConfig) -> Blends:
    """The run's blends from data.blend, data.blend_file or data.{train,valid,test}_blend (one of them)."""
    given = [name for name, value in (("data.blend", data.blend), ("data.blend_file", data.blend_file),
                                      ("data.train_blend", data.train_blend or data.valid_blend or data.test_blend))
             if value]
    if not given:
        raise ConfigError("data.blend is empty: point it at tokenized data (prefixes of .bin/.idx made by "
                          "`tidar-megatron tokenize`), e.g. --data.blend runs/data/corpus or --data.blend 0.7 "
                          "data/a 0.3 data/b")
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(given)} are given: use one way to name the data")
    if data.blend_file:
        return _read_file(data.blend_file)
    if data.blend:
        return Blends(parse(data.blend, "data.blend"), None, "data.blend")
    if not data.train_blend:
        raise ConfigError("data.valid_blend / data.test_blend need data.train_blend (per-split blends)")
    per_split = tuple(parse(b, f"data.{s}_blend") if b else None
                      for s, b in zip(SPLITS, (data.train_blend, data.valid_blend, data.test_blend)))
    return Blends(None, per_split, "data.train_blend")


# --- what each split holds ------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """One prefix's share of one split: its normalised weight, documents and tokens."""
    prefix: str
    weight: float
    documents: int
    tokens: int

    def samples_per_epoch(self, seq_length: int) -> int:
        """As megatron-core's GPTDataset counts them: each sample takes seq_length + 1 tokens, consecutive
        samples share one."""
        return max(0, (self.tokens - 1) // seq_length)


def _split_bounds(split: str):
    try:
        return convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    except Exception:  # Megatron asserts on a malformed split
        raise ConfigError(f"data.split={split!r}: give three non-negative proportions, e.g. 98,1,1") from None


def contents(blends: Blends, split: str) -> list[list[Part] | None]:
    """Per split (train, valid, test) the parts it is drawn from (None: the split is not built).  Document
    ranges are cut as Megatron's builder cuts them."""
    if blends.whole is not None:
        bounds, per_split = _split_bounds(split), [blends.whole] * 3
    else:
        bounds, per_split = [(0.0, 1.0)] * 3, list(blends.per_split)
    out = []
    for blend, bound in zip(per_split, bounds):
        if blend is None or bound is None:
            out.append(None)
            continue
        weights = blend.weights or [1.0] * len(blend.prefixes)
        parts = []
        for prefix, weight in zip(blend.prefixes, weights):
            index = indexed_dataset(prefix)
            num_docs = len(index.document_indices) - 1
            beg, end = (int(round(b * num_docs)) for b in bound)
            seqs = index.document_indices[beg:end + 1]
            tokens = int(index.sequence_lengths[seqs[0]:seqs[-1]].sum(dtype=np.int64)) if end > beg else 0
            parts.append(Part(prefix, weight, end - beg, tokens))
        if blend.weights is None:  # Megatron weighs an unweighted blend by size
            parts = [Part(p.prefix, p.tokens, p.documents, p.tokens) for p in parts]
        norm = sum(p.weight for p in parts) or 1.0
        out.append([Part(p.prefix, p.weight / norm, p.documents, p.tokens) for p in parts])
    return out


def check(blends: Blends, split: str, num_samples: list[int], seq_length: int) -> list[list[Part] | None]:
    """Every split the run draws from has tokens in each of its prefixes, and a blend without weights (one
    epoch of each prefix, as Megatron builds it) holds the samples the run needs; returns `contents`.
    Megatron itself would loop forever on an empty split, and end the run early on a short one."""
    parts = contents(blends, split)
    for name, split_parts, wanted in zip(SPLITS, parts, num_samples):
        if split_parts is None or not wanted:
            continue
        for p in split_parts:
            if p.tokens == 0:
                where = f" of data.split={split!r}" if blends.whole else ""
                raise ConfigError(f"data prefix {p.prefix}: the {name} split{where} holds no tokens "
                                  f"({p.documents} documents); add data or change data.split")
        blend = blends.whole or blends.per_split[SPLITS.index(name)]
        one_epoch = sum(p.samples_per_epoch(seq_length) for p in split_parts)
        if blend.weights is None and len(blend.prefixes) > 1 and one_epoch < wanted:
            raise ConfigError(f"{blends.source}: without weights the {name} split is one epoch of each prefix, "
                              f"{one_epoch:,} samples of {seq_length} tokens, but the run needs {wanted:,}; give "
                              f"weights (e.g. 0.5 {blend.prefixes[0]} 0.5 {blend.prefixes[1]}) or train fewer steps")
    return parts


def describe(parts: list[list[Part] | None], num_samples: list[int], seq_length: int) -> list[str]:
    """The lines a run starts with: per training dataset its weight, documents and tokens, and how many
    epochs of it the run takes (Megatron draws round(weight x samples) samples from each)."""
    train = parts[0] or []
    lines = [f"data: {num_samples[0]:,} training samples of {seq_length} tokens from {len(train)} dataset(s)"]
    for p in train:
        epochs = math.ceil(p.weight * num_samples[0]) * seq_length / max(p.tokens, 1)
        lines.append(f"data: weight {p.weight:.3f}  {p.documents:,} documents  {p.tokens:,} tokens  "
                     f"{epochs:.3g} epochs  {p.prefix}")
    for name, split_parts, wanted in zip(SPLITS[1:], parts[1:], num_samples[1:]):
        if split_parts and wanted:
            docs, tokens = sum(p.documents for p in split_parts), sum(p.tokens for p in split_parts)
            lines.append(f"data: {name}: {docs:,} documents, {tokens:,} tokens from {len(split_parts)} dataset(s)")
    return lines
