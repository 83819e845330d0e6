"""`tidar-megatron generate` end to end on a tiny checkpoint, with token ids and with a sentencepiece model."""

import re

import pytest

from tidar_megatron.cli import main as cli
from tidar_megatron.inference.generate import main
from tidar_megatron.testing import tiny_hf_checkpoint

pytest.importorskip("transformers")

TEXT = "the quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun\n" * 20


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    tiny_hf_checkpoint(path, "llama", initializer_range=0.1, tidar_mask_token_id=127, tidar_draft_block_size=3,
                       eos_token_id=None, bos_token_id=None)
    return path


def test_generate_with_prompt_ids_prints_tokens_and_summary(checkpoint, capsys):
    """The text on stdout (pipe it on), the decoding statistics on stderr."""
    outputs = {}
    for mode in ("tidar", "ar"):
        assert main(["--model", str(checkpoint), "--prompt-ids", "3,14,15,92", "--mode", mode,
                     "--max-new-tokens", "12"]) == 0
        captured = capsys.readouterr()
        text, summary = captured.out.strip(), captured.err.strip()
        assert summary.startswith("--- ") and "\n" not in summary and "---" not in text
        outputs[mode] = text
        assert len(text.split()) == 12 and f"mode={mode}" in summary and "T/NFE=" in summary
        assert "tokens/s=" in summary and ("histogram" in summary) == (mode == "tidar")
    assert outputs["tidar"] == outputs["ar"]  # greedy TiDAR is lossless


def test_generate_with_a_sentencepiece_tokenizer_and_a_batch(checkpoint, tmp_path, capsys):
    sentencepiece = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(checkpoint / "tokenizer"),
                                             vocab_size=40, model_type="bpe", minloglevel=2)
    assert main(["--model", str(checkpoint), "--prompt", "the quick brown", "--max-new-tokens", "10",
                 "--temperature", "0.8", "--top-p", "0.9"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("the quick brown") and re.search(r"--- mode=tidar new_tokens=10 ", captured.err)
    assert main(["--model", str(checkpoint), "--prompt", "the cat", "--prompt", "a dog sleeps in the sun",
                 "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("[0] ") and "\n[1] " in captured.out and "new_tokens=12 " in captured.err


def test_bad_inputs_are_clear_errors(tmp_path, capsys):
    tiny_hf_checkpoint(tmp_path, "qwen2")
    assert main(["--model", str(tmp_path), "--prompt", "hello", "--mode", "ar"]) == 2
    assert "no tokenizer.model" in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--prompt-ids", "1,2"]) == 2  # TiDAR without the tidar_* fields
    assert "--mask-token-id" in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--prompt-ids", "1,x"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err


def test_prompt_ids_outside_the_vocabulary_are_one_line_errors(checkpoint, capsys):
    for ids, bad in (("5,6,99999", 99999), ("5,-1", -1), ("128", 128)):  # the vocabulary is ids 0..127
        assert cli(["generate", "--model", str(checkpoint), "--prompt-ids", ids, "--mode", "ar"]) == 2
        captured = capsys.readouterr()
        assert captured.err == (f"tidar-megatron generate: error: --prompt-ids {ids}: token id {bad} is outside the "
                                "model's vocabulary (ids 0..127)\n") and captured.out == ""


def test_a_training_checkpoint_says_export_it_first(tmp_path, capsys):
    """A training run's checkpoint directory (`latest` beside iter_* folders, tidar_megatron/training/checkpoint.py),
    or one of its iter_* folders, where an exported model belongs."""
    run = tmp_path / "checkpoints"
    (run / "iter_0000040").mkdir(parents=True)
    (run / "iter_0000040" / "metadata.json").write_text("{}")
    (run / "latest").write_text("iter_0000040\n")
    for given in (run, run / "iter_0000040"):
        assert cli(["generate", "--model", str(given), "--prompt-ids", "1,2"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--model {given} is a training checkpoint" in err
        assert f"export it first, `tidar-megatron export --checkpoint {given} --output {given}-hf --tokenizer " in err
