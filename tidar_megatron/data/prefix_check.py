"""Checks that keep bad data from reaching a training or evaluation step, each failing in one line that
names the prefix and the fix.

- `check_prefix`: before anything starts.  The .bin and .idx exist, the .idx reads whole, the .bin holds
  exactly the bytes the .idx describes (a .bin cut by half, by 3% or by one byte is caught here, not at
  step 3 or never), the sidecar (sidecar.py) agrees with both, and the tokenizer that made the data is the
  one given.  Data without a sidecar (made by Megatron-LM) passes with a note: its tokenizer is unknown.
- `VocabularyGuard`: while reading.  A token id outside the vocabulary (data without a sidecar, made by
  another tokenizer) stops the run naming the prefix and the first document that holds one, instead of an
  IndexError deep inside the embedding.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import warnings
from dataclasses import dataclass

import numpy as np

from tidar_megatron.data import sidecar
from tidar_megatron.data.tokenizer import Tokenizer
from tidar_megatron.errors import TiDARError

_SCAN_TOKENS = 1 << 26  # tokens read at a time when looking for an out-of-vocabulary id
_INDEX_MAGIC = b"MMIDIDX\x00\x00"


class DataError(TiDARError, ValueError):
    pass


@dataclass(frozen=True)
class PrefixInfo:
    prefix: str
    documents: int
    tokens: int
    sidecar: dict | None
    note: str | None  # one line to show the user (no sidecar: the tokenizer was not checked)


def indexed_dataset(prefix: str):
    # megatron-core loads here, not at import: `evaluate` and `generate` start without its seconds of import
    # and its warnings about missing TE / Apex.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    return IndexedDataset(prefix)


def _retokenize(prefix: str) -> str:
    return f"tokenize it again (`tidar-megatron tokenize ... --output-prefix {prefix} --overwrite`)"


def check_prefix(prefix: str, tokenizer: Tokenizer | None = None, tokenizer_name: str = "data.tokenizer",
                 what: str = "data prefix") -> PrefixInfo:
    """`prefix`.bin/.idx are whole and agree with their sidecar, and (given `tokenizer`, named
    `tokenizer_name` in messages) were made by that tokenizer.  Raises DataError with one line; `what`
    names the prefix's role in messages (e.g. "--data").  The check every command that reads tokenized
    data runs first."""
    missing = [f"{prefix}{ext}" for ext in (".bin", ".idx") if not os.path.exists(f"{prefix}{ext}")]
    if missing:
        raise DataError(f"{what} {prefix}: {' and '.join(missing)} not found; create them with "
                        f"`tidar-megatron tokenize --output-prefix {prefix} ...`")
    bin_bytes = os.path.getsize(f"{prefix}.bin")
    if bin_bytes == 0:
        raise DataError(f"{what} {prefix}: {prefix}.bin is empty (no documents, or truncated); {_retokenize(prefix)}")
    _check_index_size(prefix, what)
    index = indexed_dataset(prefix)
    lengths, documents = index.sequence_lengths, index.document_indices
    itemsize = np.dtype(index.index.dtype).itemsize
    tokens = int(lengths.sum(dtype=np.int64))
    if tokens * itemsize != bin_bytes:
        raise DataError(f"{what} {prefix}: {prefix}.bin holds {bin_bytes:,} bytes but {prefix}.idx describes "
                        f"{tokens * itemsize:,} ({tokens:,} tokens): one of the pair is truncated or from another "
                        f"run; {_retokenize(prefix)}")
    info = PrefixInfo(prefix, len(documents) - 1, tokens, _read_sidecar(prefix, what), None)
    if info.sidecar is None:
        return dataclasses.replace(info, note=f"{what} {prefix}: no {sidecar.SUFFIX} sidecar (made by Megatron-LM?): "
                                   "its tokenizer is not checked")
    _check_counts(info, bin_bytes, what)
    if tokenizer is not None:
        check_made_by(info, tokenizer, tokenizer_name, what)
    return info


def _check_index_size(prefix: str, what: str) -> None:
    """The .idx holds what its header announces: after 34 bytes (magic, version, dtype code, sequence
    count S, document count D), S int32 lengths, S int64 pointers and D int64 document starts (and S mode
    bytes in multimodal data), as megatron-core's indexed_dataset.py writes it.  Checked before Megatron's
    reader sees a torn file, which it reports with an assertion or a numpy error (and a second one from
    its destructor)."""
    path = f"{prefix}.idx"
    with open(path, "rb") as f:
        header = f.read(34)
    size = os.path.getsize(path)
    if len(header) < 34 or header[:9] != _INDEX_MAGIC:
        raise DataError(f"{what} {prefix}: {path} is truncated or not an index ({size} bytes, no Megatron index "
                        f"header); {_retokenize(prefix)}")
    sequences, documents = struct.unpack("<QQ", header[18:34])
    expected = 34 + 12 * sequences + 8 * documents
    if size not in (expected, expected + sequences):
        raise DataError(f"{what} {prefix}: {path} is truncated or not an index ({size:,} bytes where its header "
                        f"announces {expected:,}); {_retokenize(prefix)}")


def _read_sidecar(prefix: str, what: str) -> dict | None:
    try:
        return sidecar.read(prefix)
    except ValueError as e:  # also json's errors
        raise DataError(f"{what} {prefix}: {sidecar.path_of(prefix)} is unreadable ({str(e).splitlines()[0]}); "
                        f"remove it to use the data unchecked, or {_retokenize(prefix)}") from None


def _check_counts(info: PrefixInfo, bin_bytes: int, what: str):
    record = info.sidecar
    found = {"documents": info.documents, "tokens": info.tokens, "bin_bytes": bin_bytes}
    wrong = [f"{k} {record.get(k)} vs {v}" for k, v in found.items() if record.get(k) != v]
    if wrong:
        raise DataError(f"{what} {info.prefix}: {sidecar.path_of(info.prefix)} does not describe this .bin/.idx "
                        f"(sidecar vs files: {', '.join(wrong)}): the data changed after tokenize; "
                        f"{_retokenize(info.prefix)}")


def check_made_by(info: PrefixInfo, tokenizer: Tokenizer, tokenizer_name: str = "data.tokenizer",
                  what: str = "data prefix") -> None:
    """The prefix `info` describes was tokenized by `tokenizer` (nothing to check without a sidecar)."""
    if info.sidecar is None:
        return
    made_by = info.sidecar["tokenizer"]
    if made_by["vocabulary_fingerprint"] != tokenizer.vocabulary_fingerprint:
        raise DataError(f"{what} {info.prefix} was tokenized with {made_by['path']} (vocabulary {made_by['vocab_size']}, "
                        f"fingerprint {made_by['vocabulary_fingerprint']}), not with {tokenizer_name} {tokenizer.path} "
                        f"(vocabulary {tokenizer.vocab_size}, fingerprint {tokenizer.vocabulary_fingerprint}); "
                        f"use that tokenizer, or tokenize the data with this one")
    if info.sidecar["max_token_id"] >= tokenizer.vocab_size:
        raise DataError(f"{what} {info.prefix}: token id {info.sidecar['max_token_id']} is outside the vocabulary of "
                        f"{tokenizer_name} {tokenizer.path} ({tokenizer.vocab_size} ids); {_retokenize(info.prefix)}")


def first_out_of_vocabulary(prefix: str, vocab_size: int) -> tuple[int, int] | None:
    """(document, token id) of the first document of `prefix` holding an id >= vocab_size, or None; reads
    the .bin in blocks (the whole file at worst)."""
    index = indexed_dataset(prefix)
    dtype = np.dtype(index.index.dtype)
    tokens = np.memmap(f"{prefix}.bin", dtype=dtype, mode="r")
    for start in range(0, len(tokens), _SCAN_TOKENS):
        bad = np.flatnonzero(tokens[start:start + _SCAN_TOKENS] >= vocab_size)
        if len(bad):
            position = start + int(bad[0])
            sequence = int(np.searchsorted(index.index.sequence_pointers, position * dtype.itemsize, "right")) - 1
            document = int(np.searchsorted(index.document_indices, sequence, "right")) - 1
            return document, int(tokens[position])
    return None


class VocabularyGuard:
    """Called on every clean batch: ids outside [0, vocab_size) stop the run with one line naming the
    prefix and document they come from (the embedding would fail with an IndexError, or, on a GPU, a
    device-side assert)."""

    def __init__(self, prefixes: list[str], vocab_size: int, tokenizer_name: str):
        self.prefixes, self.vocab_size, self.tokenizer_name = prefixes, vocab_size, tokenizer_name

    def __call__(self, *tensors) -> None:
        if all(int(t.max()) < self.vocab_size and int(t.min()) >= 0 for t in tensors if t.numel()):
            return
        for prefix in self.prefixes:
            found = first_out_of_vocabulary(prefix, self.vocab_size)
            if found is not None:
                document, token = found
                raise DataError(f"data prefix {prefix}: document {document} holds token id {token}, outside the "
                                f"vocabulary of {self.tokenizer_name} ({self.vocab_size} ids): was it tokenized "
                                f"with another tokenizer? Tokenize it with this one")
        raise DataError(f"a batch holds token ids outside [0, {self.vocab_size}) of {self.tokenizer_name}, "
                        f"though no document of {', '.join(self.prefixes)} does: the .bin files changed while "
                        "training; check them")
