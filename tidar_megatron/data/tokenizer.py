"""Tokenizers: training a SentencePiece model that is lossless for source code, and one wrapper over our
SentencePiece models, existing ones (e.g. Llama-family) and Hugging Face tokenizer directories.

The wrapper is also what Megatron-core's dataset config expects as `tokenizer` (`vocab_size`, `eod`,
`unique_identifiers`), so the same object serves tokenization and training.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import re
import sys
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from tidar_megatron.atomic import write_atomic
from tidar_megatron.console import entry_point
from tidar_megatron.data.corpus import find_inputs, iter_texts
from tidar_megatron.errors import TiDARError

MASK_TOKEN = "<|mask|>"
EOD_TOKEN = "<|endoftext|>"
META_SPACE = "\u2581"  # SentencePiece's stand-in for ' '; a literal one in the text would decode as ' '
_LINES = re.compile(r"\n|[^\n]+")
_LINE_CACHE_MAX = 1 << 20  # entries; cleared when full
# SentencePiece's refusal when the corpus's characters and the reserved pieces do not fit the vocabulary
_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)")
_CACHED_LINE_CHARS = 1024  # longer lines seldom repeat: not kept
# Documents longer than this (characters) are encoded in pieces where the model allows it (encode_array):
# SentencePiece's memory grows with the text it is given at once (~45 bytes per character on one line).
SEGMENT_CHARS = 1 << 20


class TokenizerError(TiDARError):
    pass


def train_sentencepiece(texts: Iterable[str], output: str, vocab_size: int = 32000, model_type: str = "bpe",
                        max_sentences: int = 2_000_000, num_threads: int | None = None, seed: int = 0) -> str:
    """Train on the lines of `texts` and write `output` (a .model file) atomically.

    Lossless for code: identity normalisation (no NFKC), whitespace kept as is (no dummy prefix, no
    collapsing, whitespace-only pieces so indentation gets its own tokens), byte fallback so any UTF-8
    survives.  SentencePiece trains on lines, so '\\n' never appears in training data: it is reserved as a
    user-defined symbol.  The end-of-document token is the model's eos (what Megatron's SentencePiece
    tokenizer uses as `eod`) and the mask token a control symbol: both are reserved ids that encode()
    never produces from text, so a literal "<|endoftext|>" inside a source file stays plain text.
    """
    lines = (line for text in texts for line in text.split("\n") if line)
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)  # the line sampling is the only randomness
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=model, vocab_size=vocab_size, model_type=model_type,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, byte_fallback=True, split_digits=True, character_coverage=0.9999,
        user_defined_symbols=["\n"], control_symbols=[MASK_TOKEN], eos_piece=EOD_TOKEN, pad_id=-1,
        max_sentence_length=16384, input_sentence_size=max_sentences, shuffle_input_sentence=True,
        num_threads=num_threads or os.cpu_count(),
        hard_vocab_limit=False, minloglevel=2)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(output, model.getvalue())
    return output


def _fingerprint(path: Path) -> str:
    """Content hash of a model file, or of a tokenizer directory's small files (not the weights)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        f for f in path.iterdir() if f.is_file() and f.stat().st_size < 64 << 20
        and f.suffix not in (".safetensors", ".bin", ".pt", ".pth"))
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _lines_are_independent(path: Path, sp) -> bool:
    """True when encoding line by line gives exactly the ids of encoding the whole text: the normaliser
    is the identity (nothing rewritten across a newline, no dummy prefix per piece of text) and no piece
    but "\n" itself contains a newline, so no BPE merge can cross one."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:  # needs protobuf; without it, encode whole texts
        return False
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    norm = proto.normalizer_spec
    if norm.name != "identity" or norm.add_dummy_prefix or norm.remove_extra_whitespaces:
        return False
    return not any("\n" in piece and piece != "\n" for piece in map(sp.id_to_piece, range(sp.get_piece_size())))


def _spaces_lead_pieces(sp) -> bool:
    """True when every piece holds its whitespace (META_SPACE) only at its start: no piece then spans a
    non-space character followed by a space, so text cut before such a space encodes to the same ids."""
    return all(META_SPACE not in piece.lstrip(META_SPACE)
               for piece in map(sp.id_to_piece, range(sp.get_piece_size())))


def _next_cut(text: str, start: int, size: int, words: bool) -> int:
    """Where the segment of `text` that begins at `start` ends: after the last newline within `size`
    characters, else (`words`) before the last space there that follows a non-space, else at the first
    such place further on, else at the end of the text."""
    limit = start + size
    cut = text.rfind("\n", start, limit) + 1
    if cut > start:
        return cut
    if words:
        space = text.rfind(" ", start + 1, limit)
        while space > start and text[space - 1] == " ":
            space = text.rfind(" ", start + 1, space)
        if space > start:
            return space
    newline = text.find("\n", limit)
    ahead = len(text) if newline < 0 else newline + 1
    if words:
        match = _WORD_START.search(text, limit, ahead)
        if match:
            return match.start() + 1
    return ahead


_WORD_START = re.compile(r"[^ \n] ")


def segments(text: str, size: int, words: bool) -> Iterator[str]:
    """`text` cut into pieces of about `size` characters at line ends, and also before words (`words`)
    where a line is longer than `size`."""
    start = 0
    while len(text) - start > size:
        cut = _next_cut(text, start, size, words)
        yield text[start:cut]
        start = cut
    if start < len(text):
        yield text[start:]


class Tokenizer:
    """encode / decode / eod_id / mask_id / vocab_size over a SentencePiece model or a HF tokenizer dir.

    A vocabulary without the mask token (e.g. a Llama checkpoint's) gets it appended at id `base vocab
    size`, so `vocab_size` grows by one and the model's embedding must have that extra row.
    """

    def __init__(self, path: str, mask_token: str = MASK_TOKEN):
        self.path, self.mask_token = str(path), mask_token
        p = Path(path)
        if not p.exists():
            raise TokenizerError(f"tokenizer {path}: not found; train one with `tidar-megatron train-tokenizer` or pass "
                                 f"a SentencePiece .model file or a Hugging Face tokenizer directory")
        self._sp = self._hf = None
        try:
            if p.is_dir():
                self._load_hf(p)
            else:
                self._load_sp(p)
        except TokenizerError:
            raise
        except Exception as e:  # sentencepiece/transformers raise many types for a bad file
            kind = "Hugging Face tokenizer directory" if p.is_dir() else "SentencePiece model"
            raise TokenizerError(f"tokenizer {path}: not a readable {kind} ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''})") from None
        self.fingerprint = _fingerprint(p)
        # Megatron's datasets hash this into their cache key (json.dumps default=obj.unique_identifiers).
        self.unique_identifiers = {"class": type(self).__name__, "path": self.path,
                                   "fingerprint": self.fingerprint, "mask_token": mask_token}

    def _load_sp(self, p: Path):
        sp = spm.SentencePieceProcessor(model_file=str(p))
        self._sp = sp
        base = sp.get_piece_size()
        self.eod_id = sp.eos_id()
        if self.eod_id < 0:
            raise TokenizerError(f"tokenizer {p}: the SentencePiece model has no eos piece to use as the "
                                 f"end-of-document token; retrain it with an eos_id")
        found = sp.piece_to_id(self.mask_token)
        self.mask_id = found if found != sp.unk_id() or self.mask_token == sp.id_to_piece(found) else base
        self.vocab_size = base + (self.mask_id == base)
        self._base_vocab = base
        # A literal META_SPACE can only be kept through byte fallback, and splitting the text around it is
        # only safe when the model adds no dummy prefix to each piece of text.
        byte_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in META_SPACE.encode()]
        no_prefix = sp.encode("a", out_type=str)[:1] == ["a"]
        self._meta_ids = byte_ids if no_prefix and all(sp.is_byte(i) for i in byte_ids) else None
        self._line_cache = {} if _lines_are_independent(p, sp) else None
        self._word_cuts = self._line_cache is not None and _spaces_lead_pieces(sp)

    def _load_hf(self, p: Path):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise TokenizerError(f"tokenizer {p}: a Hugging Face tokenizer directory needs transformers; "
                                 f"pip install 'tidar_megatron[hf]'") from None
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we parallelise over processes
        hf = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        self._hf = hf
        if hf.eos_token_id is None:
            raise TokenizerError(f"tokenizer {p}: has no eos token to use as the end-of-document token")
        self.eod_id = hf.eos_token_id
        base = len(hf)
        vocab = hf.get_vocab()
        self.mask_id = vocab.get(self.mask_token, hf.mask_token_id if hf.mask_token_id is not None else base)
        self.vocab_size = max(base, self.mask_id + 1)
        self._base_vocab = base

    @functools.cached_property
    def vocabulary_fingerprint(self) -> str:
        """What token ids mean, whichever file or directory holds the tokenizer: a hash of every id's piece
        (the base vocabulary, without an appended mask token) and the end-of-document id.  Data tokenized by
        one tokenizer reads the same under another exactly when the two fingerprints are equal."""
        ids = list(range(self._base_vocab))
        pieces = self._sp.id_to_piece(ids) if self._hf is None else self._hf.convert_ids_to_tokens(ids)
        return hashlib.sha256(json.dumps([pieces, self.eod_id]).encode()).hexdigest()[:16]

    @property
    def text_vocab_size(self) -> int:
        """The ids text encodes to, [0, text_vocab_size): the tokenizer's own vocabulary, without a mask
        token appended to it (`vocab_size` counts that one too)."""
        return self._base_vocab

    @property
    def encodes_by_line(self) -> bool:
        """True when text is encoded one distinct line at a time through a cache (exact for this model:
        identity normalisation and no piece spanning a newline)."""
        return getattr(self, "_line_cache", None) is not None

    # --- Megatron's tokenizer interface (what GPTDatasetConfig reads) ----------------------------------
    @property
    def eod(self) -> int:
        return self.eod_id

    @property
    def eos(self) -> int:
        return self.eod_id

    # --- encode / decode -----------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=False)
        if self._line_cache is None:
            return self._encode_sp(text)
        # Source code repeats whole lines (blank ones, indentation, imports, `return`); each distinct line
        # is encoded once, and the lines missing from the cache in one call go to SentencePiece together.
        cache = self._line_cache
        if len(cache) > _LINE_CACHE_MAX:
            cache.clear()
        lines = _LINES.findall(text)
        missing = [line for line in dict.fromkeys(lines) if line not in cache]
        encoded = {}
        if missing:
            encoded = dict(zip(missing, [self._encode_sp(m) for m in missing] if self._meta_ids is not None and
                               any(META_SPACE in m for m in missing) else self._sp.encode(missing)))
            cache.update((line, ids) for line, ids in encoded.items() if len(line) <= _CACHED_LINE_CHARS)
        ids: list[int] = []
        for line in lines:
            ids += cache.get(line) or encoded[line]
        return ids

    def encode_array(self, text: str, dtype, segment_chars: int = SEGMENT_CHARS) -> np.ndarray:
        """encode(text) as an array of `dtype`.  A text longer than `segment_chars` is encoded segment by
        segment where the model provably cuts there itself (models that encode by line: at line ends, and
        before a word where a line is longer), so the ids are the same and memory follows the segment, not
        the document (a 200 MB document would otherwise take gigabytes); other models get it whole."""
        if len(text) <= segment_chars or not self.encodes_by_line:
            return np.asarray(self.encode(text), dtype=dtype)
        parts = [np.asarray(self.encode(part), dtype=dtype) for part in segments(text, segment_chars, self._word_cuts)]
        return np.concatenate(parts)

    def _encode_sp(self, text: str) -> list[int]:
        if self._meta_ids is None or META_SPACE not in text:
            return self._sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(META_SPACE)):
            if i:
                ids += self._meta_ids
            if part:
                ids += self._sp.encode(part)
        return ids

    def decode(self, ids) -> str:
        # Ids past the vocabulary (a model's padded embedding rows) have no text.
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        if self.mask_id < self._base_vocab or self.mask_id not in ids:
            return self._decode_base(ids)
        # The appended mask id is unknown to the underlying tokenizer: spell it out.
        parts, run = [], []
        for i in ids + [self.mask_id]:
            if i == self.mask_id:
                parts += [self._decode_base(run), self.mask_token]
                run = []
            else:
                run.append(i)
        return "".join(parts[:-1])

    def _decode_base(self, ids: list[int]) -> str:
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return self._sp.decode(ids)

    # Reload from the path in other processes rather than pickling the native objects.
    def __getstate__(self):
        return {"path": self.path, "mask_token": self.mask_token}

    def __setstate__(self, state):
        self.__init__(state["path"], state["mask_token"])

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, eod_id={self.eod_id}, mask_id={self.mask_id})"


@entry_point("tidar-megatron train-tokenizer")
def main(argv: list[str] | None = None) -> int:
    """Console entry: train a SentencePiece model from the same inputs tokenize accepts."""
    ap = argparse.ArgumentParser(prog="tidar-megatron train-tokenizer",
                                 description="Train a SentencePiece model that is lossless for source code.")
    ap.add_argument("--input", nargs="+", required=True, help="files and/or directories (JSONL, Parquet, Arrow, "
                    "datasets directories, text, source)")
    ap.add_argument("--output", required=True, help="the .model file to write")
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    ap.add_argument("--text-key", default="text", help="JSONL key or Parquet/Arrow column holding the text")
    ap.add_argument("--glob", default="**/*")
    ap.add_argument("--sample-mb", type=float, default=2048,
                    help="read at most this many MB in total, spread evenly over the input files")
    ap.add_argument("--max-sentences", type=int, default=2_000_000, help="lines SentencePiece samples from that")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    files = find_inputs(args.input, args.glob)
    per_file = int(args.sample_mb * (1 << 20) / len(files))
    try:
        train_sentencepiece(iter_texts(files, args.text_key, per_file), args.output, args.vocab_size,
                            args.model_type, args.max_sentences, seed=args.seed)
    except RuntimeError as e:  # SentencePiece's refusal, as a traceback of its C++ check
        if needed := _TOO_SMALL.search(str(e)):
            raise TokenizerError(f"--vocab-size {args.vocab_size} is too small for this corpus: its characters, the 256 "
                                 f"byte pieces and the reserved tokens alone take {needed[1]}; ask for at least that "
                                 "(32000 is usual)") from None
        raise
    tokenizer = Tokenizer(args.output)
    print(repr(tokenizer), file=sys.stderr)
    if tokenizer.vocab_size < args.vocab_size:  # hard_vocab_limit=False: SentencePiece stops when it runs out
        print(f"note: asked for --vocab-size {args.vocab_size:,}, but this corpus gives only {tokenizer.vocab_size:,} "
              f"pieces, so the tokenizer has {tokenizer.vocab_size:,}; train on more text for a larger vocabulary",
              file=sys.stderr)
    return 0
