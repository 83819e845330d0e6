"""Typed configs: presets, dotted overrides, and validation messages that name the field."""

import pytest
import yaml

from tidar_megatron.config import ConfigError, load_config, parse_overrides


def test_presets_have_the_documented_shapes():
    q15 = load_config("1p5b")
    m = q15.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size) == \
        (28, 1536, 12, 2, 8960)
    assert m.add_qkv_bias and m.tie_embeddings and m.norm_epsilon == 1e-6 and m.rope_base == 1e6
    assert q15.tidar.mask_token_id == 151936 and q15.padded_vocab_size >= 151937
    q8 = load_config("8b").model
    assert (q8.num_layers, q8.hidden_size, q8.num_attention_heads, q8.num_query_groups, q8.head_dim,
            q8.ffn_hidden_size) == (36, 4096, 32, 8, 128, 12288)
    assert q8.qk_layernorm and not q8.add_qkv_bias and not q8.tie_embeddings
    tiny = load_config("tiny")
    assert tiny.tidar.alpha == 1.0 and tiny.model.num_layers == 2


def test_dotted_overrides_are_typed():
    cfg = load_config("tiny", ["--model.num_layers", "4", "--train.lr=1e-3", "--parallel.sequence_parallel",
                               "false", "--data.blend", "a", "--init.from", "ckpt"])
    assert cfg.model.num_layers == 4 and cfg.train.lr == 1e-3 and cfg.parallel.sequence_parallel is False
    assert cfg.data.blend == ["a"] and cfg.checkpoint.init_from == "ckpt"
    assert parse_overrides(["--a.b", "[1, 2]"]) == [("a.b", [1, 2])]


@pytest.mark.parametrize("overrides,message", [
    (["--model.attention_backend", "fast"], "model.attention_backend must be one of local, flex, te, kernel"),
    (["--model.num_layers", "two"], "model.num_layers must be int"),
    (["--model.num_layerz", "2"], "unknown field(s) model.num_layerz"),
    (["--modle.num_layers", "2"], "unknown section(s) ['modle']"),
    (["--tidar.draft_block_size", "0"], "tidar.draft_block_size must be >= 1"),
    (["--model.num_query_groups", "3"], "must be a multiple of model.num_query_groups"),
    (["--model.vocab_size", "256", "--tidar.mask_token_id", "100000"], "tidar.mask_token_id (100000)"),
    (["--parallel.context_parallel", "2"], "context_parallel > 1 is not supported"),
    (["--parallel.virtual_pipeline", "2"], "parallel.virtual_pipeline (2) needs"),
    (["--train.lr_warmup_steps", "500"], "train.lr_warmup_steps (500)"),
    (["--model.num_layers"], "has no value"),
])
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="presets: 1p5b, 8b, tiny"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML at line 1") as err:
        load_config(bad)
    assert "\n" not in str(err.value)
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump({"model": {"num_layers": 3}, "train": {"seq_length": 32}}))
    cfg = load_config(path)
    assert cfg.model.num_layers == 3 and cfg.train.seq_length == 32
