"""Tokenizers: training a SentencePiece model that is lossless for source code, and one wrapper over our
SentencePiece models, existing ones (e.g. Llama-family) and Hugging Face tokenizer directories.

The wrapper is also what Megatron-core's dataset config expects as `tokenizer` (`vocab_size`, `eod`,
`unique_identifiers`), so the same object serves tokenization and training.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from tidar_megatron.atomic import write_atomic
from tidar_megatron.console import entry_point
from tidar_megatron.errors import TiDARError

MASK_TOKEN = "<|mask|>"
EOD_TOKEN = "<|endoftext|>"
META_SPACE = "\u2581"  # SentencePiece's stand-in for ' '; a literal one in the text would decode as ' '
_LINES = re.compile(r"\n|[^\n]+")
_LINE_CACHE_MAX = 1 << 20  # entries; cleared when full


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
        if missing:
            encoded = ([self._encode_sp(m) for m in missing] if self._meta_ids is not None and
                       any(META_SPACE in m for m in missing) else self._sp.encode(missing))
            cache.update(zip(missing, encoded))
        ids: list[int] = []
        for line in lines:
            ids += cache[line]
        return ids

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
    import argparse
    import sys

    from tidar_megatron.data.corpus import find_inputs, iter_texts
    ap = argparse.ArgumentParser(prog="tidar-megatron train-tokenizer",
                                 description="Train a SentencePiece model that is lossless for source code.")
    ap.add_argument("--input", nargs="+", required=True, help="files and/or directories (JSONL, text, source)")
    ap.add_argument("--output", required=True, help="the .model file to write")
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    ap.add_argument("--text-key", default="text")
    ap.add_argument("--glob", default="**/*")
    ap.add_argument("--sample-mb", type=float, default=2048,
                    help="read at most this many MB in total, spread evenly over the input files")
    ap.add_argument("--max-sentences", type=int, default=2_000_000, help="lines SentencePiece samples from that")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    files = find_inputs(args.input, args.glob)
    per_file = int(args.sample_mb * (1 << 20) / len(files))
    train_sentencepiece(iter_texts(files, args.text_key, per_file), args.output, args.vocab_size,
                        args.model_type, args.max_sentences, seed=args.seed)
    print(repr(Tokenizer(args.output)), file=sys.stderr)
    return 0
