"""Configs that fit the model and the machine: the vocabulary and mask token an import decides and the run
resolves, warm-up as a fraction of the run, `model.attention_backend: auto`, RoPE scaling in the config, and
every backend x device combination that cannot train refused before any process group, in one line."""

import subprocess
import sys

import pytest

from tidar_megatron.config import ConfigError, ModelConfig, load_config, resolve_vocabulary
from tidar_megatron.convert.mapping import choose_mask_token
from tidar_megatron.hf.config import parse_hf_config
from tidar_megatron.model.attention import BackendUnavailable
from tidar_megatron.training.preflight import check_backend

LLAMA = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4)


@pytest.mark.parametrize("requested, tokenizer, exported, want", [
    (None, None, None, (128, 128, True, "a new row after the 128-row vocabulary")),
    (None, (128, 128), None, (128, 128, True, "a new row")),                      # Llama 3, SmolLM: no spare row
    (None, (100, 100), None, (128, 100, True, "an unused row of the checkpoint")),  # Qwen: the first spare row
    (5, (128, 128), None, (128, 5, False, "an existing row, its trained embedding kept")),  # --mask-token-id 5
    (None, (128, 128), 128, (128, 128, False, "the checkpoint's own (tidar_mask_token_id), its trained row")),
])
def test_the_import_decides_the_mask_token_once(requested, tokenizer, exported, want):
    rows = 129 if exported == 128 else 128
    hf = parse_hf_config(dict(LLAMA, vocab_size=rows, tidar_mask_token_id=exported), set())
    mask = choose_mask_token(hf, requested, tokenizer)
    assert (mask.vocab_size, mask.mask_token_id, mask.fresh_row) == want[:3] and want[3] in mask.story


def test_a_tokenizer_larger_than_the_checkpoint_is_refused():
    from tidar_megatron.convert.mapping import ConvertError

    with pytest.raises(ConvertError, match="the tokenizer has 130 tokens but vocab_size is 128"):
        choose_mask_token(parse_hf_config(LLAMA, set()), tokenizer=(130, 130), source="x/config.json")


@pytest.mark.parametrize("mask", [128, 5])
def test_the_run_accepts_the_imports_vocabulary_as_it_is(mask):
    """What the issue saw fail: a 128-token tokenizer with its mask appended (129 ids) against an import's
    model.vocab_size 128, with a new mask row or an existing id (import-hf --mask-token-id 5)."""
    cfg = load_config("tiny", ["--model.vocab_size", "128", "--tidar.mask_token_id", str(mask)])
    resolve_vocabulary(cfg, 128, 128, "tok")
    assert cfg.padded_vocab_size == (192 if mask == 128 else 128)
    with pytest.raises(ConfigError, match=r"model.vocab_size \(100\) is smaller than the vocabulary of tok "
                                          r"\(128\)"):
        resolve_vocabulary(load_config("tiny", ["--model.vocab_size", "100"]), 128, 128, "tok")


def test_warmup_is_a_fraction_of_the_run_in_the_recipes():
    assert load_config("1p5b").train.warmup_steps == 238
    assert load_config("1p5b", ["--train.train_steps", "2"]).train.warmup_steps == 0  # a short run is fine
    assert load_config("tiny", ["--train.lr_warmup_steps", "null", "--train.lr_warmup_fraction", "0.25",
                                "--train.train_steps", "8"]).train.warmup_steps == 2
    # The warm-up given the other way on the command line replaces the preset's (steps <-> fraction).
    t = load_config("1p5b", ["--train.lr_warmup_steps", "5"]).train
    assert (t.lr_warmup_steps, t.lr_warmup_fraction, t.warmup_steps) == (5, None, 5)
    t = load_config("tiny", ["--train.lr_warmup_fraction", "0.5", "--train.train_steps", "8"]).train
    assert (t.lr_warmup_steps, t.warmup_steps) == (None, 4)
    with pytest.raises(ConfigError, match="are both set; set one"):
        load_config("1p5b", ["--train.lr_warmup_steps", "5", "--train.lr_warmup_fraction", "0.1"])
    with pytest.raises(ConfigError, match=r"train.lr_warmup_fraction \(1.0\) must be in \[0, 1\)"):
        load_config("1p5b", ["--train.lr_warmup_fraction", "1"])


def test_rope_scaling_in_the_config_is_checked_and_normalised():
    cfg = load_config("tiny", ["--model.rope_scaling", "{type: yarn, factor: 4, original_max_position_embeddings: 64}"])
    assert cfg.model.rope_scaling == dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64,
                                          beta_fast=32.0, beta_slow=1.0, truncate=True)
    with pytest.raises(ConfigError, match="model.rope_scaling.rope_type 'dynamic' is not supported"):
        load_config("tiny", ["--model.rope_scaling", "{rope_type: dynamic, factor: 2}"])
    with pytest.raises(ConfigError, match="model.rope_scaling.low_freq_factor 2: megatron-core's llama3 scaling"):
        load_config("tiny", ["--model.rope_scaling", "{rope_type: llama3, factor: 8, low_freq_factor: 2, "
                                                     "high_freq_factor: 4, original_max_position_embeddings: 8192}"])


def test_auto_is_the_kernel_on_a_gpu_and_local_on_the_cpu():
    assert ModelConfig().attention_backend == "auto"
    assert (ModelConfig().attention_backend_on(True), ModelConfig().attention_backend_on(False)) == ("kernel", "local")
    assert ModelConfig(attention_backend="flex").attention_backend_on(True) == "flex"


@pytest.mark.parametrize("overrides, interpreted, message", [
    (["--model.attention_backend", "auto"], False, None),
    (["--model.attention_backend", "local", "--train.bf16", "true"], False, None),
    (["--model.attention_backend", "kernel"], True, None),
    (["--model.attention_backend", "flex"], True, "flex cannot train on the CPU"),
    (["--model.attention_backend", "kernel"], False, "kernel on the CPU needs Triton's interpreter"),
    (["--model.fused_loss", "true"], False, "model.fused_loss (a Triton kernel) on the CPU needs"),
    (["--model.attention_backend", "te"], True, "model.attention_backend=te needs"),
])
def test_backends_that_cannot_train_on_the_cpu_are_refused(overrides, interpreted, message, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1") if interpreted else monkeypatch.delenv("TRITON_INTERPRET", False)
    cfg = load_config("tiny", [*overrides, "--train.device", "cpu"])
    if message is None:
        check_backend(cfg)
        return
    with pytest.raises((ConfigError, BackendUnavailable)) as error:
        check_backend(cfg)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_train_command_refuses_them_before_any_process_group(corpus, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tidar_megatron", "train", "--config", "tiny", "--data.blend",
                           corpus["prefix"], "--data.tokenizer", corpus["tokenizer"], "--data.split", "90,10,0",
                           "--checkpoint.dir", str(tmp_path), "--model.attention_backend", "flex",
                           "--train.device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("tidar-megatron train: error: model.attention_backend=flex cannot train")


def test_the_recipe_keeps_the_checkpoints_block_size_and_context():
    """`import-hf --config auto` on a small TiDAR export (block 8) of a 2048-token model: the 1p5b recipe with
    the checkpoint's own block size and sequences no longer than its context."""
    from tidar_megatron.convert.hf_import import recipe_preset
    from tidar_megatron.convert.mapping import config_from_hf

    hf = parse_hf_config(dict(LLAMA, vocab_size=129, max_position_embeddings=2048, tidar_mask_token_id=128,
                              tidar_draft_block_size=8), set())
    cfg = config_from_hf(hf, set(), base=load_config(recipe_preset(hf)))
    assert (cfg.tidar.draft_block_size, cfg.train.seq_length, cfg.train.warmup_steps) == (8, 2048, 238)
    assert (cfg.model.vocab_size, cfg.tidar.mask_token_id, cfg.model.hf_config["config.json"]["model_type"]) == \
        (128, 128, "llama")
