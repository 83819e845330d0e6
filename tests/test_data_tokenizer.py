"""Tokenizer: lossless round trip on real source and awkward text; reserved ids; the three model kinds."""

import io
import sysconfig
from pathlib import Path

import pytest
import sentencepiece as spm

from tidar_megatron.data.tokenizer import EOD_TOKEN, MASK_TOKEN, Tokenizer, TokenizerError, train_sentencepiece

STDLIB = Path(sysconfig.get_paths()["stdlib"])
AWKWARD = [
    "def f(x):\n\tif x:  \n\t\treturn 1   \n\n\n    # four spaces\n        eight\n",
    "  leading spaces, trailing tab\t\n\n\n",
    "Unicode: naïve café 漢字 emoji 🙂 combining e\u0301 NFKC-able ﬁ ① full-width ＡＢ\u00a0nbsp",
    "CRLF\r\nline\rCR only\x00NUL \x07 bell \x1b[0m",
    "literal meta space \u2581 and \u2581\u2581 and end\u2581",
    f"literal special tokens {MASK_TOKEN} {EOD_TOKEN} stay text",
    "\n", " ", "\t", "x",
]


def stdlib_sources(*packages):
    return [p for pkg in packages for p in sorted((STDLIB / pkg).rglob("*.py")) if p.stat().st_size]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    texts = [p.read_text(encoding="utf-8") for p in stdlib_sources("json", "email")]
    return train_sentencepiece(texts, str(tmp_path_factory.mktemp("tok") / "code.model"), vocab_size=800)


def test_round_trip_is_lossless_on_unseen_source_and_awkward_text(sp_model):
    tok = Tokenizer(sp_model)
    files = stdlib_sources("logging", "importlib", "collections")  # not in the training sample
    assert len(files) > 20
    for text in [p.read_text(encoding="utf-8") for p in files] + AWKWARD:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.mask_id not in ids and tok.eod_id not in ids  # reserved ids never come from text


def test_line_cached_encoding_equals_sentencepiece(sp_model):
    """Our encode caches per line; it must give exactly SentencePiece's ids (Megatron's, too)."""
    tok = Tokenizer(sp_model)
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    assert tok.encodes_by_line
    texts = [p.read_text(encoding="utf-8") for p in stdlib_sources("logging", "importlib")]
    for text in texts + texts[:3] + [t for t in AWKWARD if "\u2581" not in t]:  # repeats hit the cache
        assert tok.encode(text) == sp.encode(text)


def test_indentation_gets_whitespace_pieces(sp_model):
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    pieces = sp.encode("\n        return x", out_type=str)
    assert pieces[:2] == ["\n", "\u2581" * 8]  # the indentation is one piece, not eight


def test_sentencepiece_defaults_are_lossy_for_code():
    """The negative control: what the settings above protect against."""
    texts = [p.read_text(encoding="utf-8") for p in stdlib_sources("json")]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(t for x in texts for t in x.split("\n") if t),
                                   model_writer=buf, vocab_size=400, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    assert sp.decode(sp.encode(AWKWARD[0])) != AWKWARD[0]


def test_reserved_ids(sp_model):
    tok = Tokenizer(sp_model)
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    assert tok.eod_id == tok.eod == sp.eos_id() and sp.id_to_piece(tok.eod_id) == EOD_TOKEN
    assert sp.id_to_piece(tok.mask_id) == MASK_TOKEN and sp.is_control(tok.mask_id)
    assert tok.vocab_size == sp.get_piece_size() == 800


def test_existing_sentencepiece_model_gets_mask_appended(tmp_path):
    """A Llama-style model (defaults, </s> eos, no mask token): the mask takes the next free id."""
    texts = [p.read_text(encoding="utf-8") for p in stdlib_sources("json")]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(t for x in texts for t in x.split("\n") if t),
                                   model_prefix=str(tmp_path / "llama"), vocab_size=300, minloglevel=2)
    tok = Tokenizer(str(tmp_path / "llama.model"))
    assert (tok.eod_id, tok.mask_id, tok.vocab_size) == (2, 300, 301)
    assert not tok.encodes_by_line  # NFKC + dummy prefix: lines are not independent, encode whole texts
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert tok.decode(tok.encode("hello") + [tok.mask_id, tok.mask_id]) == f"hello{MASK_TOKEN}{MASK_TOKEN}"


def test_hugging_face_directory(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3, "<|mask|>": 4}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    core.decoder = tokenizers.decoders.WordPiece()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="[UNK]")
    hf.save_pretrained(tmp_path / "hf")
    tok = Tokenizer(str(tmp_path / "hf"))
    assert (tok.eod_id, tok.mask_id, tok.vocab_size) == (1, 4, 5)
    assert tok.encode("hello world") == [2, 3]
    assert tok.decode([2, 3]) == "hello world"
    assert Tokenizer(str(tmp_path / "hf"), mask_token="<new_mask>").mask_id == 5  # appended


def test_missing_and_unreadable_models_are_one_line_errors(tmp_path):
    with pytest.raises(TokenizerError, match="not found") as e:
        Tokenizer(str(tmp_path / "nope.model"))
    assert "\n" not in str(e.value)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(TokenizerError, match="not a readable SentencePiece model") as e:
        Tokenizer(str(bad))
    assert "\n" not in str(e.value) and str(bad) in str(e.value)


def test_tokenizer_pickles_by_path(sp_model):
    import pickle
    tok = pickle.loads(pickle.dumps(Tokenizer(sp_model)))
    assert tok.decode(tok.encode(AWKWARD[0])) == AWKWARD[0]


def test_train_tokenizer_command(tmp_path, capsys):
    from tidar_megatron.data.tokenizer import main
    (tmp_path / "docs.jsonl").write_text("\n".join(
        '{"text": %s}' % __import__("json").dumps(p.read_text(encoding="utf-8")) for p in stdlib_sources("json")))
    out = tmp_path / "m" / "tok.model"
    assert main(["--input", str(tmp_path / "docs.jsonl"), "--output", str(out), "--vocab-size", "400"]) == 0
    tok = Tokenizer(str(out))
    assert tok.vocab_size == 400 and tok.decode(tok.encode(AWKWARD[0])) == AWKWARD[0]
    assert main(["--input", str(tmp_path / "nothing"), "--output", str(out)]) == 2
    assert "nothing: input not found" in capsys.readouterr().err


def test_train_tokenizer_vocabulary_too_small_or_too_large_for_the_corpus(tmp_path, capsys):
    from tidar_megatron.cli import main as cli
    source = [str(p) for p in stdlib_sources("json")]
    out = tmp_path / "tok.model"
    assert cli(["train-tokenizer", "--input", *source, "--output", str(out), "--vocab-size", "100"]) == 2
    err = capsys.readouterr().err
    needed = int(err.split("alone take ")[1].split(";")[0])
    assert err.startswith("tidar-megatron train-tokenizer: error: --vocab-size 100 is too small for this corpus")
    assert err.count("\n") == 1 and not out.exists()
    # The figure it names is the smallest that trains: SentencePiece accepts it and refuses one less.
    assert cli(["train-tokenizer", "--input", *source, "--output", str(out), "--vocab-size", str(needed - 1)]) == 2
    capsys.readouterr()
    assert cli(["train-tokenizer", "--input", *source, "--output", str(out), "--vocab-size", str(needed)]) == 0
    assert Tokenizer(str(out)).vocab_size == needed and "note:" not in capsys.readouterr().err
    # More pieces than the corpus has: trained all the same, and it says how many it got.
    assert cli(["train-tokenizer", "--input", *source, "--output", str(out), "--vocab-size", "200000"]) == 0
    got = Tokenizer(str(out)).vocab_size
    assert got < 200000 and f"asked for --vocab-size 200,000, but this corpus gives only {got:,} pieces" in \
        capsys.readouterr().err
