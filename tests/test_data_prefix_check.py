"""Tokenized data that cannot be trained on is refused before any process group, in one line: a pair cut
short or torn, a sidecar that does not describe its pair, data made by another tokenizer; an id outside
the vocabulary found while reading names its prefix and document.  The mismatched tokenizer and the
out-of-vocabulary id are also run through `tidar-megatron train`, as users meet them."""

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from tidar_megatron.config import load_config
from tidar_megatron.data.prefix_check import DataError, VocabularyGuard, check_prefix, first_out_of_vocabulary
from tidar_megatron.data.tokenize_corpus import tokenize_corpus
from tidar_megatron.data.tokenizer import Tokenizer, train_sentencepiece
from tidar_megatron.evaluation.likelihood import read_documents
from tidar_megatron.training.preflight import check_data

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tokenizer A (600 pieces) and B (400, other text), and a prefix tokenized with A."""
    root = tmp_path_factory.mktemp("prefix")
    a = train_sentencepiece([p.read_text() for p in sorted((STDLIB / "json").glob("*.py"))], str(root / "a.model"),
                            vocab_size=600)
    b = train_sentencepiece([(STDLIB / "textwrap.py").read_text()], str(root / "b.model"), vocab_size=400)
    files = [str(STDLIB / n) for n in ("argparse.py", "textwrap.py", "csv.py", "string.py", "shlex.py")]
    tokenize_corpus(files, str(root / "corpus"), a, workers=1, progress=False)
    return {"root": root, "a": a, "b": b, "prefix": str(root / "corpus")}


def copy_prefix(data, tmp_path, name="copy", sidecar=True) -> str:
    for ext in (".bin", ".idx") + ((".meta.json",) if sidecar else ()):
        shutil.copy(data["prefix"] + ext, tmp_path / f"{name}{ext}")
    return str(tmp_path / name)


def truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as err:
        fn(*args, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("sidecar", [False, True])
def test_a_pair_cut_short_is_refused(data, tmp_path, sidecar):
    """By half, by 3% and by one byte (which trained 60 steps without a word before), a torn .idx, an
    empty .bin: with or without a sidecar (Megatron-LM data has none)."""
    size = os.path.getsize(data["prefix"] + ".bin")
    for cut in (size // 2, size - size * 3 // 100, size - 1):
        prefix = copy_prefix(data, tmp_path, f"bin{cut}", sidecar)
        truncate(prefix + ".bin", cut)
        assert f"{prefix}.bin holds {cut:,} bytes but {prefix}.idx describes {size:,}" in one_line_error(
            check_prefix, prefix)
    idx = os.path.getsize(data["prefix"] + ".idx")
    for cut in (idx // 2, idx - 5):
        prefix = copy_prefix(data, tmp_path, f"idx{cut}", sidecar)
        truncate(prefix + ".idx", cut)
        assert f"{prefix}.idx is truncated or not an index" in one_line_error(check_prefix, prefix)
    prefix = copy_prefix(data, tmp_path, "empty", sidecar)
    truncate(prefix + ".bin", 0)
    assert f"{prefix}.bin is empty" in one_line_error(check_prefix, prefix)
    # ... and the run that names it stops in its pre-flight check.
    cfg = load_config("tiny", ["--data.blend", str(tmp_path / f"bin{size - 1}"), "--data.tokenizer", data["a"]])
    assert "bytes but" in one_line_error(check_data, cfg)


def test_a_sidecar_that_does_not_describe_its_pair_is_refused(data, tmp_path):
    prefix = copy_prefix(data, tmp_path)
    other = tokenize_corpus([str(STDLIB / "csv.py")], str(tmp_path / "other"), data["a"], workers=1, progress=False)
    for ext in (".bin", ".idx"):  # a whole pair, but not the one the sidecar was written for
        shutil.copy(f"{tmp_path / 'other'}{ext}", prefix + ext)
    message = one_line_error(check_prefix, prefix)
    assert f"{prefix}.meta.json does not describe this .bin/.idx (sidecar vs files: documents 5 vs 1" in message
    assert "tokens" in message and other["docs"] == 1
    Path(prefix + ".meta.json").write_text("{not json")
    assert "meta.json is unreadable" in one_line_error(check_prefix, prefix)


def test_data_of_another_tokenizer_is_refused_and_the_same_tokenizer_anywhere_accepted(data, tmp_path):
    a, b = Tokenizer(data["a"]), Tokenizer(data["b"])
    message = one_line_error(check_prefix, data["prefix"], b)
    assert message == (f"data prefix {data['prefix']} was tokenized with {data['a']} (vocabulary 600, fingerprint "
                       f"{a.vocabulary_fingerprint}), not with data.tokenizer {data['b']} (vocabulary 400, fingerprint "
                       f"{b.vocabulary_fingerprint}); use that tokenizer, or tokenize the data with this one")
    moved = shutil.copy(data["a"], tmp_path / "renamed.model")  # the same vocabulary under another name
    assert check_prefix(data["prefix"], Tokenizer(str(moved))).note is None
    # evaluate --data runs the same check against the model's tokenizer.
    assert "not with the model's tokenizer" in one_line_error(read_documents, data["prefix"], 600, b)
    # Megatron-LM data (no sidecar): accepted, with a note saying its tokenizer is unknown.
    bare = copy_prefix(data, tmp_path, "bare", sidecar=False)
    assert check_prefix(bare, b).note == f"data prefix {bare}: no .meta.json sidecar (made by Megatron-LM?): its " \
                                         "tokenizer is not checked"


def test_an_id_outside_the_vocabulary_names_the_prefix_and_the_document(tmp_path):
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=DType.optimal_dtype(1000))
    docs = [rng.integers(3, 500, rng.integers(5, 50)) for _ in range(20)]
    docs[7][-2] = 650
    docs[12][0] = 700
    for d in docs:
        builder.add_document(d, [len(d)])
    builder.finalize(str(tmp_path / "m.idx"))
    prefix = str(tmp_path / "m")
    assert first_out_of_vocabulary(prefix, 600) == (7, 650)  # brute force: docs[7] is the first with one
    assert first_out_of_vocabulary(prefix, 701) is None
    guard = VocabularyGuard([prefix], 600, "data.tokenizer tok.model")
    guard(torch.tensor([[5, 6, 599]]))  # in range: nothing happens
    message = one_line_error(guard, torch.tensor([[5, 650]]), torch.tensor([[650, 7]]))
    assert message.startswith(f"data prefix {prefix}: document 7 holds token id 650, outside the vocabulary of "
                              "data.tokenizer tok.model (600 ids)")


def _train(*args, cwd):
    return subprocess.run([sys.executable, "-m", "tidar_megatron", "train", "--config", "tiny", *args],
                          capture_output=True, text=True, timeout=600, cwd=cwd)


def test_train_refuses_data_of_another_tokenizer_before_any_process_group(data, tmp_path):
    started = time.time()
    proc = _train("--data.blend", data["prefix"], "--data.tokenizer", data["b"], "--checkpoint.dir",
                  str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"tidar-megatron train: error: data prefix {data['prefix']} was tokenized with "
                                  f"{data['a']}")
    assert not (tmp_path / "run").exists() and time.time() - started < 120  # nothing started, nothing written


@pytest.mark.slow
def test_train_names_prefix_and_document_of_an_id_found_while_reading(data, tmp_path):
    """Megatron-LM data (no sidecar) made by tokenizer A, trained with B: the pre-flight check cannot know,
    the first batch finds ids outside B's vocabulary.  Before: a 93-line traceback ending in IndexError
    inside torch.embedding."""
    bare = copy_prefix(data, tmp_path, "megatron", sidecar=False)
    proc = _train("--data.blend", bare, "--data.tokenizer", data["b"], "--data.split", "100,0,0",
                  "--train.eval_interval", "0", "--train.train_steps", "2", "--train.lr_warmup_steps", "0",
                  "--checkpoint.dir", str(tmp_path / "run"), "--log.wandb_mode", "disabled", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert f"note: data prefix {bare}: no .meta.json sidecar (made by Megatron-LM?): its tokenizer is not " \
           "checked" in lines
    first = first_out_of_vocabulary(bare, 400)
    assert lines[-1].startswith(f"tidar-megatron train: error: data prefix {bare}: document {first[0]} holds token "
                                f"id {first[1]}, outside the vocabulary of data.tokenizer {data["b"]} (400 ids)")
    assert "Traceback" not in proc.stderr and "step 1/2" not in proc.stderr
